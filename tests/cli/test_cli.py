"""The command line as a user meets it: one-line errors with exit 2, crash safety, resume, generate."""

import signal
import subprocess
import sys
import time

import pytest

from conftest import TINY, assert_user_error
from kiln.cli import main


def kiln(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kiln", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


def pretrain_args(source, out, *extra):
    return ["pretrain", "--data.source", source, "--out", out, *TINY, *extra]


def test_missing_empty_binary_and_non_utf8_inputs(tmp_path, capsys):
    assert_user_error(capsys, pretrain_args(tmp_path / "nope.txt", tmp_path / "r1"), "nope.txt")
    (tmp_path / "empty.txt").write_text("")
    assert_user_error(capsys, pretrain_args(tmp_path / "empty.txt", tmp_path / "r2"), "empty.txt")
    (tmp_path / "blob.txt").write_bytes(bytes(range(256)) * 40)
    assert_user_error(capsys, pretrain_args(tmp_path / "blob.txt", tmp_path / "r3"), "blob.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1") * 100)
    assert_user_error(capsys, pretrain_args(tmp_path / "latin1.txt", tmp_path / "r4"), "latin1.txt", "UTF-8")


def test_a_mistake_in_a_recipe_or_a_run_path_is_one_line_before_torch_is_imported(tmp_path):
    """The config is read first: `kiln pretrain` / `kiln finetune TASK` answer a bad key or value without importing
    torch (~3-5 s; measured 0.14-0.46 s instead), and a verb given a run folder that is not there says so at once."""
    from kiln import tasks

    for kind in tasks.REGISTRY:  # the registry's config class is the task's own
        assert tasks.config_class(kind) is tasks.get(kind).config_cls, kind
    mistakes = [["pretrain", "--train.lrr", "1"], ["pretrain", "--train.lr", "abc"], ["pretrain", "--model.n_layers", "2"],
                ["finetune", "classify", "--train.lrr", "1"], ["finetune", "seq2seq", "--train.lr", "x"],
                ["finetune", "qa", "--data.max_length", "abc"], ["finetune", "tokens", "--data.nope", "1"],
                ["finetune", "image", "--augment.flip", "maybe"],
                ["generate", ".", "--top-p", "1.5"], ["generate", ".", "--max-new-tokens", "-5"],
                ["generate", "nowhere", "--prompt", "a"], ["serve", "nowhere"], ["eval", "nowhere,also", "x.csv"],
                ["translate", "nowhere", "--text", "a"], ["quantize", "nowhere", "--out", "q"]]
    code = ("import contextlib, io, json, sys\nfrom kiln.cli import main\nout = []\n"
            f"for argv in {mistakes!r}:\n"
            "    err = io.StringIO()\n"
            "    with contextlib.redirect_stderr(err):\n"
            "        rc = main(argv)\n"
            "    out.append([rc, err.getvalue(), 'torch' in sys.modules])\n"
            "print(json.dumps(out))")
    import json

    result = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                       cwd=tmp_path).stdout)
    for argv, (rc, err, torch_loaded) in zip(mistakes, result):
        assert rc == 2 and err.startswith("kiln: error:") and err.count("\n") == 1, (argv, err)
        assert not torch_loaded, argv
    assert "did you mean 'train.lr'" in result[0][1] and "expects float" in result[1][1]
    assert "--top-p must be in (0, 1], got 1.5" in result[-7][1] and "--max-new-tokens must be" in result[-6][1]
    assert all(err == "kiln: error: run folder not found: nowhere\n" for _, err, _ in result[-5:]), result[-5:]


def test_a_wrong_verb_flag_or_value_is_one_line_naming_the_command_with_did_you_mean(capsys):
    """argparse's own errors keep the contract too: one line (no usage block), exit 2, the command named."""
    import pytest

    for argv, needles in ((["pretrian"], ["kiln: error: argument VERB: invalid choice: 'pretrian'",
                                          "(did you mean 'pretrain'?)"]),
                          (["generate", "r", "--promptt", "a"], ["kiln generate: error: unrecognized arguments: "
                                                                 "--promptt a (did you mean '--prompt'?)"]),
                          (["finetune", "tokens", "--bogus", "1"], ["kiln finetune tokens: error: unrecognized "
                                                                    "arguments: --bogus"]),
                          (["pretrain", "--nme", "x"], ["kiln pretrain: error:", "(did you mean '--name'?)"]),
                          (["finetune", "classify", "--epochss", "3"], ["(did you mean '--epochs'?)"]),
                          (["export", "hff", "a", "b"], ["kiln export: error:", "(did you mean 'hf'?)"]),
                          (["serve", "r", "--port", "abc"], ["kiln serve: error: argument --port: invalid int"])):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.count("\n") == 1 and all(n in err for n in needles), (argv, err)
        assert err.rstrip().endswith("--help)") and "Traceback" not in err, err


def test_context_longer_than_the_data(tmp_path, capsys):
    (tmp_path / "short.txt").write_text("To be, or not to be, that is the question.\n" * 3)
    assert_user_error(capsys, pretrain_args(tmp_path / "short.txt", tmp_path / "r", "--model.context_length", "64"),
                      "context_length")


def test_unknown_key_and_wrong_type(corpus, tmp_path, capsys):
    assert_user_error(capsys, pretrain_args(corpus, tmp_path / "r", "--model.n_layers", "2"),
                      "model.n_layers", "did you mean 'model.n_layer'")
    assert_user_error(capsys, pretrain_args(corpus, tmp_path / "r", "--train.lr", "fast"), "train.lr", "float")
    assert not (tmp_path / "r").exists()  # nothing was created for a rejected config


def test_resume_from_missing_or_corrupted_checkpoint(corpus, tmp_path, capsys):
    assert_user_error(capsys, ["pretrain", "--resume", tmp_path / "nowhere"], "nowhere")
    run = tmp_path / "run"
    assert main([str(a) for a in pretrain_args(corpus, run, "--train.max_steps", "4")]) == 0
    state = run / "checkpoints/step_000004/trainer.pt"
    good = state.read_bytes()
    state.write_bytes(good[: len(good) // 2])  # truncated, as after a disk-full write outside kiln
    assert_user_error(capsys, ["pretrain", "--resume", run, "--train.max_steps", "8"], "trainer.pt", "corrupted")
    assert state.read_bytes() == good[: len(good) // 2]  # destroys nothing
    assert (run / "checkpoints/step_000004/model.safetensors").is_file()


def test_large_vocabulary_switches_to_uint32_shards(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [f"w{i}" for i in range(70_000)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)} | {"[UNK]": 70_000}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "big.json"))
    (tmp_path / "text.txt").write_text(" ".join(words[-500:] * 4) + "\n")
    assert main(["data", "prepare", "--data.source", str(tmp_path / "text.txt"), "--data.tokenizer",
                 str(tmp_path / "big.json"), "--out", str(tmp_path / "prepared")]) == 0
    from kiln.data.shards import TokenShards, read_manifest

    assert read_manifest(tmp_path / "prepared")["dtype"] == "uint32"
    tokens = TokenShards(tmp_path / "prepared", "train").read(0, 10)
    assert tokens.max() >= 69_500  # ids above 65535 survive intact


def test_sigkill_mid_run_leaves_a_loadable_checkpoint_and_resume_finishes(corpus, tmp_path):
    run = tmp_path / "run"
    args = [sys.executable, "-m", "kiln", *map(str, pretrain_args(corpus, run, "--train.max_steps", "100000",
                                                                  "--train.save_every", "3", "--train.eval_every", "1000"))]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = run / "checkpoints" / "latest"
    deadline = time.time() + 600  # an upper bound for a loaded machine, not a timing assertion
    while time.time() < deadline and not (latest.is_file() and latest.read_text().strip() >= "step_000009"):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert latest.is_file(), "no checkpoint was written before the kill"
    from kiln.api import load

    model, tokenizer, cfg = load(run)  # loadable, whatever instant the kill hit
    step = int(latest.read_text().strip().split("_")[1])
    done = kiln("pretrain", "--resume", run, "--train.max_steps", step + 4)
    assert done.returncode == 0, done.stderr
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{step + 4:06d}"
    assert not list((run / "checkpoints").glob(".tmp-*"))


def test_sigint_saves_then_exits_130(corpus, tmp_path):
    run = tmp_path / "run"
    args = [sys.executable, "-m", "kiln", *map(str, pretrain_args(corpus, run, "--train.max_steps", "100000",
                                                                  "--train.save_every", "100000", "--train.eval_every", "100000"))]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600  # an upper bound for a loaded machine, not a timing assertion
    while time.time() < deadline and not (run / "metrics.csv").is_file():
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 130, err
    assert "SIGINT received: saved checkpoint" in out + err
    assert (run / "checkpoints" / "latest").is_file()


def test_generate_cli_greedy_is_deterministic(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    assert main([str(a) for a in pretrain_args(corpus, run, "--train.max_steps", "5")]) == 0
    capsys.readouterr()
    argv = ["generate", str(run), "--prompt", "ROMEO:", "--max-new-tokens", "20", "--temperature", "0"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert main(argv) == 0
    assert capsys.readouterr().out == first and first.startswith("ROMEO:") and len(first) >= 26
    assert main(["generate", str(run), "--prompt", "ROMEO:", "--max-new-tokens", "20", "--seed", "1",
                 "--top-k", "5", "--top-p", "0.9"]) == 0
    capsys.readouterr()
    import torch

    from kiln.api import load
    from kiln.run.device import resolve_device

    # greedy on the CPU in fp32 is the argmax of a full forward pass, token by token (no KV cache), written out
    assert main(argv + ["--device", "cpu", "--precision", "fp32"]) == 0
    model, tok, _ = load(run, device="cpu")
    ids = torch.tensor([tok.encode("ROMEO:").ids])
    with torch.no_grad():
        for _ in range(20):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert capsys.readouterr().out == tok.decode(ids[0].tolist()) + "\n"
    # --device auto is the GPU when there is one, else the CPU: the same text as naming that device
    assert main(argv + ["--device", resolve_device("auto", "device")]) == 0
    assert capsys.readouterr().out == first
    assert_user_error(capsys, argv + ["--device", "tpu"], "device must be auto, cpu, cuda[:N] or mps, got 'tpu'")


def test_viz_attention_writes_a_grid_of_layers_by_heads(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    assert main([str(a) for a in pretrain_args(corpus, run, "--train.max_steps", "2")]) == 0
    assert main(["viz", "attention", str(run), "--text", "ROMEO: what light"]) == 0
    png = run / "plots" / "attention.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from kiln.api import load
    from kiln.report.attention_plot import attention_maps
    import torch

    model, tok, cfg = load(run)
    maps = attention_maps(model, torch.tensor([tok.encode("ROMEO").ids]))
    assert len(maps) == cfg.model.n_layer and maps[0].shape == (cfg.model.n_head, 5, 5)
    assert torch.allclose(maps[0].sum(-1), torch.ones(cfg.model.n_head, 5), atol=1e-5)  # rows are distributions
    assert float(maps[0][0].triu(1).abs().max()) == 0.0  # causal: no weight on future keys


def test_generate_settings_out_of_range_are_one_line_before_the_run_is_loaded(tmp_path, capsys):
    """kiln generate checks its settings as kiln.sample and kiln serve do (kiln.model.generation_settings): one
    line, exit 2, before the run is read (this folder holds no run at all)."""
    for flag, value, expected in (("--top-p", "1.5", "--top-p must be in (0, 1], got 1.5"),
                                  ("--top-p", "0", "--top-p must be in (0, 1], got 0.0"),
                                  ("--max-new-tokens", "-5", "--max-new-tokens must be >= 0, got -5"),
                                  ("--temperature", "-1", "--temperature must be >= 0, got -1.0"),
                                  ("--temperature", "nan", "--temperature must be a finite number >= 0, got nan"),
                                  ("--top-k", "-1", "--top-k must be >= 0, got -1"),
                                  ("--num-beams", "0", "--num-beams must be >= 1, got 0")):
        err = assert_user_error(capsys, ["generate", tmp_path, "--prompt", "a", flag, value], expected)
        assert err == f"kiln: error: {expected}", err


def test_generate_stops_before_a_stop_string(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    assert main([str(a) for a in pretrain_args(corpus, run, "--train.max_steps", "5")]) == 0
    capsys.readouterr()
    from kiln import sample

    full = sample(run, "ROMEO:", max_new_tokens=40, greedy=True)
    generated = full[len("ROMEO:"):]
    stop = generated[5:7]  # a string the greedy continuation is known to contain
    cut = sample(run, "ROMEO:", max_new_tokens=40, greedy=True, stop=[stop])
    assert cut == "ROMEO:" + generated[: generated.index(stop)]
    assert stop not in cut[len("ROMEO:"):]
    # max_new_tokens 0 returns the prompt (beam search too, which would otherwise add one token)
    assert sample(run, "ROMEO:", max_new_tokens=0) == sample(run, "ROMEO:", max_new_tokens=0, num_beams=2) == "ROMEO:"
    assert main(["generate", str(run), "--prompt", "ROMEO:", "--max-new-tokens", "0"]) == 0
    assert capsys.readouterr().out == "ROMEO:\n"
    # the Python face refuses what the CLI refuses, with the same line (the setting named as the API spells it)
    from kiln.errors import KilnError

    for kw, message in (({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5"),
                        ({"max_new_tokens": -5}, "max_new_tokens must be >= 0, got -5"),
                        ({"temperature": -1.0}, "temperature must be >= 0, got -1.0"),
                        ({"top_k": -1}, "top_k must be >= 0, got -1"),
                        ({"num_beams": 0}, "num_beams must be >= 1, got 0")):
        with pytest.raises(KilnError) as e:
            sample(run, "ROMEO:", **kw)
        assert str(e.value) == message, kw
    with pytest.raises(KilnError, match="top_p must be in"):  # checked before the run is read
        sample(tmp_path / "no-run-here", top_p=0)


def test_pretrain_init_starts_from_another_runs_weights_and_tokenizer(corpus, tmp_path, capsys):
    import csv

    first, again, fresh = tmp_path / "first", tmp_path / "again", tmp_path / "fresh"
    assert main([str(a) for a in pretrain_args(corpus, first, "--train.max_steps", "40")]) == 0
    assert main([str(a) for a in pretrain_args(corpus, again, "--train.max_steps", "3", "--init", first,
                                                "--model.d_model", "48")]) == 0  # the shape comes from init
    assert main([str(a) for a in pretrain_args(corpus, fresh, "--train.max_steps", "3")]) == 0

    def first_loss(run):
        return float(next(r for r in csv.DictReader(open(run / "metrics.csv")) if r.get("loss"))["loss"])

    assert first_loss(again) < first_loss(fresh) - 0.5  # trained weights, not a random init
    assert "init: weights from" in (again / "log.txt").read_text()
    assert (again / "tokenizer.json").read_bytes() == (first / "tokenizer.json").read_bytes()
    from kiln import load

    assert load(again)[2].model.d_model == load(first)[2].model.d_model == 32
    capsys.readouterr()
    assert_user_error(capsys, pretrain_args(corpus, tmp_path / "x", "--init", tmp_path / "nope"),
                      "not a kiln run folder", "kiln import hf")
    assert not (tmp_path / "x").exists()  # refused before any work: no run folder
