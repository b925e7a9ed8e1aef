"""Issue 17, item 3: user mistakes and machine trouble end in one line on stderr naming the file/key/value and
what was expected, exit code 2, no traceback, nothing lost (a run folder that existed is byte-for-byte the same)."""

import dataclasses
import hashlib
import typing
from pathlib import Path

import pytest

from conftest import SHAKESPEARE, TINY, assert_user_error
from kiln.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def tree_hash(root: Path) -> dict[str, str]:
    """sha256 of every file under root (and the set of folders), to show a run folder was not touched."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink() else "dir"
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny char-level pretraining run (4 steps, checkpoints at 2 and 4) that tests must not change."""
    root = tmp_path_factory.mktemp("robust")
    corpus = root / "corpus.txt"
    corpus.write_text(SHAKESPEARE.read_text()[:20_000])
    out = root / "run"
    assert main(["pretrain", "--data.source", str(corpus), "--out", str(out), *TINY, "--train.max_steps", "4",
                 "--train.save_every", "2"]) == 0
    return out


# ----------------------------------------------------------------------------------- 1. config ranges


def _numeric_fields(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _numeric_fields(tp, f"{prefix}{f.name}.")
        elif tp in (int, float):
            yield f"{prefix}{f.name}", f


def test_every_numeric_key_of_every_config_declares_a_range_and_the_defaults_are_in_it():
    from kiln.config import ClassifyConfig, RunConfig, Seq2SeqConfig, check_ranges, load_config
    from kiln.model.config import PRESETS, preset

    for cls in (RunConfig, ClassifyConfig, Seq2SeqConfig):
        missing = [key for key, f in _numeric_fields(cls) if "range" not in f.metadata]
        assert not missing, f"{cls.__name__}: numeric keys without a range: {missing}"
        check_ranges(cls())
    for name in PRESETS:
        cfg = RunConfig()
        cfg.model = preset(name)
        check_ranges(cfg)
    configs = Path(__file__).resolve().parents[1] / "configs"
    for yaml_file, cls in (("shakespeare-char.yaml", RunConfig), ("bert-mlm.yaml", RunConfig),
                           ("classify-rotten.yaml", ClassifyConfig), ("translate-en-es.yaml", Seq2SeqConfig)):
        load_config(configs / yaml_file, cls=cls)


@pytest.mark.parametrize("key,value,expected", [
    ("train.lr", "-0.1", "--train.lr must be > 0, got -0.1"),
    ("train.batch_size", "0", "--train.batch_size must be >= 1, got 0"),
    ("train.beta2", "1.0", "--train.beta2 must be in [0, 1), got 1.0"),
    ("train.eval_every", "0", "--train.eval_every must be >= 1, got 0"),  # pretraining: 0 means nothing
    ("train.warmup_steps", "-5", "--train.warmup_steps must be >= 0, got -5"),
    ("train.grad_clip", ".nan", "--train.grad_clip must be >= 0, got nan"),
    ("model.dropout", "1", "--model.dropout must be in [0, 1), got 1.0"),
    ("model.context_length", "0", "--model.context_length must be >= 1, got 0"),
    ("model.norm_eps", "0", "--model.norm_eps must be > 0, got 0.0"),
    ("data.val_fraction", "1.5", "--data.val_fraction must be in [0, 1), got 1.5"),
    ("mlm.mask_prob", "0", "--mlm.mask_prob must be in (0, 1), got 0.0"),
    ("distill.temperature", "-1", "--distill.temperature must be > 0, got -1.0"),
    ("seed", "-1", "--seed must be >= 0, got -1"),
])
def test_an_out_of_range_value_is_one_line_naming_key_value_and_range(tmp_path, capsys, key, value, expected):
    out = tmp_path / "never"
    assert_user_error(capsys, ["pretrain", "--out", out, *TINY, f"--{key}", value], expected)
    assert not out.exists()  # rejected before anything is written


@pytest.mark.parametrize("verb,key,value,expected", [
    (["finetune", "classify"], "head_dropout", "1.2", "--head_dropout must be in [0, 1), got 1.2"),
    (["finetune", "classify"], "data.max_length", "1", "--data.max_length must be >= 2, got 1"),
    (["finetune", "classify"], "epochs", "0", "--epochs must be > 0, got 0.0"),
    (["finetune", "seq2seq"], "seq2seq.num_beams", "0", "--seq2seq.num_beams must be >= 1, got 0"),
    (["finetune", "seq2seq"], "seq2seq.label_smoothing", "-0.1", "--seq2seq.label_smoothing must be in [0, 1)"),
    (["finetune", "seq2seq"], "data.test_size", "-2", "--data.test_size must be >= 0, got -2"),
    (["data", "prepare"], "data.vocab_size", "0", "--data.vocab_size must be >= 1, got 0"),
])
def test_out_of_range_in_the_other_verbs(tmp_path, capsys, verb, key, value, expected):
    out = tmp_path / "never"
    assert_user_error(capsys, [*verb, "--out", out, f"--{key}", value], expected)
    assert not out.exists()


def test_out_of_range_in_a_yaml_file_names_the_file_and_classify_reads_zero_as_auto(tmp_path, capsys):
    from kiln.config import ClassifyConfig, load_config

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("train:\n  lr: -3e-4\n")
    assert_user_error(capsys, ["pretrain", recipe, "--out", tmp_path / "never"],
                      f"{recipe}: train.lr must be > 0, got -0.0003")
    cfg = load_config(None, ["--train.eval_every", "0", "--train.max_steps", "0"], cls=ClassifyConfig)
    assert cfg.train.eval_every == 0 and cfg.train.max_steps == 0  # finetune classify: 0 = once per epoch / epochs


def test_resume_with_an_out_of_range_override_leaves_the_run_unchanged(run, capsys):
    before = tree_hash(run)
    assert_user_error(capsys, ["pretrain", "--resume", run, "--train.lr", "0"], "--train.lr must be > 0, got 0.0")
    assert tree_hash(run) == before
