"""Issue 17, item 3: user mistakes and machine trouble end in one line on stderr naming the file/key/value and
what was expected, exit code 2, no traceback, nothing lost (a run folder that existed is byte-for-byte the same)."""

import dataclasses
import hashlib
import shutil
import subprocess
import sys
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


# ----------------------------------------------------------------------------------- 2. filesystem errors


def kiln(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kiln", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


def one_line(err: str, *needles) -> str:
    err = err.strip()
    assert err.startswith("kiln: error:") and "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture
def small_disk(tmp_path):
    """A 1.5 MB tmpfs (root only): a disk that fills up."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1500k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def remount(disk: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(disk)], check=True, capture_output=True)


def test_a_full_disk_mid_run_is_one_line_the_last_checkpoint_stays_and_resume_finishes(small_disk, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(SHAKESPEARE.read_text()[:20_000])
    out = small_disk / "run"
    # a checkpoint every step, all kept: ~0.3 MB each fills 1.5 MB within a few steps
    done = kiln("pretrain", "--data.source", corpus, "--out", out, *TINY, "--train.max_steps", "200",
                "--train.save_every", "1", "--train.keep_last", "1000")
    assert done.returncode == 2, done.stderr
    err = one_line(done.stderr, "No space left on device", str(out), "(kiln pretrain, ", "free some space")
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert f"the last complete checkpoint ({latest}) is intact: kiln pretrain --resume {out}" in err
    remount(small_disk, "size=30m")  # space freed
    gen = kiln("generate", out, "--max-new-tokens", "5", "--temperature", "0")
    assert gen.returncode == 0, gen.stderr  # the last complete checkpoint loads
    step = int(latest.split("_")[1])
    done = kiln("pretrain", "--resume", out, "--train.max_steps", step + 2, "--train.keep_last", "2")
    assert done.returncode == 0, done.stderr
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{step + 2:06d}"
    assert not list((out / "checkpoints").glob(".tmp-*"))  # the partial save was cleaned up


@pytest.mark.parametrize("argv,doing", [
    (["data", "prepare", "--data.source", "{corpus}", "--out", "{blocked}/prepared"], "writing the prepared data"),
    (["pretrain", "--data.source", "{corpus}", "--out", "{blocked}/run", "--train.max_steps", "2"],
     "writing the run folder"),
    (["eval", "{run}", "{corpus}", "--out", "{blocked}/eval.json"], "writing evaluation results"),
    (["viz", "attention", "{run}", "--text", "To be", "--out", "{blocked}/a.png"], "writing a plot"),
    (["viz", "compare", "{run}", "--out", "{blocked}/c.png"], "writing a plot"),
    (["prune", "{run}", "--out", "{blocked}/pruned", "--ffn-keep", "0.5"], "writing the new run folder"),
    (["quantize", "{run}", "--out", "{blocked}/int8"], "writing the new run folder"),
    (["export", "hf", "{run}", "{blocked}/hf"], "writing the exported model"),
])
def test_a_file_where_a_folder_should_be_is_one_line_and_the_run_is_unchanged(run, tmp_path, capsys, argv, doing):
    blocked = tmp_path / "blocked"
    blocked.write_text("a file, not a folder\n")
    corpus = run.parent / "corpus.txt"
    before = tree_hash(run)
    argv = [a.format(corpus=corpus, blocked=blocked, run=run) for a in argv]
    verb = " ".join(argv[:2]) if argv[0] in ("data", "viz") else argv[0]
    assert_user_error(capsys, argv, f"cannot write {blocked}", "is a file, not a folder", f"(kiln {verb}, {doing})")
    assert tree_hash(run) == before


def test_a_read_only_run_folder_is_one_line_and_unchanged(run, small_disk, capsys):
    copy = small_disk / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("data"))  # the shards are not needed to score
    before = tree_hash(copy)
    remount(small_disk, "ro")
    try:
        assert_user_error(capsys, ["eval", copy, run.parent / "corpus.txt"], f"cannot write {copy}/eval",
                          "Read-only file system", "(kiln eval, writing evaluation results); choose a writable place")
        assert_user_error(capsys, ["viz", "attention", copy, "--text", "To be"], f"cannot write {copy}/plots",
                          "Read-only file system", "(kiln viz attention, writing a plot)")
        assert tree_hash(copy) == before
    finally:
        remount(small_disk, "rw")
