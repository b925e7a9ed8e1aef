"""`kiln finetune TASK --resume RUN`: a fine-tuning run killed mid-way and resumed ends exactly where the
uninterrupted run ends — the same weights bit for bit, the same loss at every step, the same test metrics — for
a task whose batches are shuffled and length-bucketed (classify, with early-stopping state), one with seeded
augmentation drawn anew every step (image) and one whose evaluations keep a history (seq2seq). Why it holds on any
CPU: both runs execute the same kernels on the same inputs in one process; the resume restores the weights,
optimizer, RNG and callback state, and each micro-batch is a pure function of its index.

Bad resumes are one-line errors that write nothing: another kind of run, a recipe given as well, changed data.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import assert_user_error, run_until_crash
from kiln.cli import main
from test_classify import FAST, make_backbone, reviews, write_csv
from test_images import image_folder
from test_seq2seq import BIBLE, s2s_args, write_tsv

pytestmark = pytest.mark.usefixtures("one_thread")


def losses(run: Path) -> list[tuple]:
    """(step, loss, val_*) of every metrics.csv row: what must not change across a resume (time columns may)."""
    with open(run / "metrics.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [(r["step"], r["loss"], *(v for k, v in sorted(r.items()) if k.startswith("val_"))) for r in rows]


def newest_weights(run: Path) -> dict:
    name = (run / "checkpoints" / "latest").read_text().strip()
    return load_file(run / "checkpoints" / name / "model.safetensors")


def assert_resume_is_exact(argv: list[str], tmp_path: Path, crash_at: int, capsys) -> tuple[Path, Path]:
    """Run argv (a `kiln finetune TASK ...` command without --out) whole, then again killed after step
    `crash_at` and resumed; compare the two run folders."""
    full, part = tmp_path / "full", tmp_path / "part"
    assert main([*argv, "--out", str(full)]) == 0
    run_until_crash(lambda: main([*argv, "--out", str(part)]), crash_at)
    assert not (part / "eval" / "summary.json").exists()
    saved = (part / "checkpoints" / "latest").read_text().strip()
    assert int(saved.split("_")[1]) < crash_at  # the resume has steps to redo
    capsys.readouterr()
    assert main([*argv[:2], "--resume", str(part)]) == 0
    out = capsys.readouterr().out
    assert f"resumed from {part / 'checkpoints' / saved} at step" in out, out
    a, b = newest_weights(full), newest_weights(part)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)  # bit for bit
    assert losses(full) == losses(part)
    fa, fb = (json.loads((r / "eval" / "summary.json").read_text()) for r in (full, part))
    assert fa["train"]["steps"] == fb["train"]["steps"] and fa["train"]["best_step"] == fb["train"]["best_step"]
    return full, part


def test_classify_resumes_exactly_with_length_buckets_and_early_stopping(tmp_path, capsys):
    backbone = make_backbone(tmp_path / "backbone")
    data = write_csv(tmp_path / "reviews.csv", reviews(90))
    argv = ["finetune", "classify", "--data.train", str(data), "--init", str(backbone), "--data.max_length", "12",
            "--epochs", "4", "--train.batch_size", "6", "--train.lr", "5e-3", "--train.eval_every", "5",
            "--length_buckets", "3", "--patience", "4", "--metric", "val_loss", *FAST]
    full, part = assert_resume_is_exact(argv, tmp_path, 13, capsys)
    ea, eb = (json.loads((r / "eval" / "summary.json").read_text()) for r in (full, part))
    assert ea["test"] == eb["test"]
    log = (part / "log.txt").read_text()
    assert log.count("kiln finetune classify -> ") == 1 and "kiln finetune classify --resume" in log


def test_image_augmentation_resumes_exactly(tmp_path, capsys):
    root = image_folder(tmp_path / "imgs", n=20)  # a convolutional stem: BatchNorm's running statistics resume too
    argv = ["finetune", "image", "--data.train", str(root), "--model.n_layer", "1", "--model.d_model", "32",
            "--model.n_head", "2", "--model.d_ff", "64", "--model.patch_size", "4", "--model.stem_channels", "[8]",
            "--train.batch_size", "8", "--epochs", "4",
            "--train.lr", "3e-3", "--augment.crop_padding", "2", "--augment.flip", "true", "--data.val_fraction",
            "0.2", "--data.test_fraction", "0.2", *FAST]
    full, part = assert_resume_is_exact(argv, tmp_path, 7, capsys)  # 24 images: 3 steps an epoch
    ta, tb = (json.loads((r / "eval" / "test.json").read_text()) for r in (full, part))
    assert ta["accuracy"] == tb["accuracy"] and ta["confusion_matrix"] == tb["confusion_matrix"]


def test_seq2seq_resume_keeps_the_evaluation_history(tmp_path, capsys):
    rows = list(csv.reader(open(BIBLE, encoding="utf-8"), delimiter="\t"))[1:81]
    data = write_tsv(tmp_path / "pairs.tsv", rows)
    argv = [str(a) for a in s2s_args(data, tmp_path / "unused")]
    argv = argv[:argv.index("--out")] + argv[argv.index("--out") + 2:]
    full, part = assert_resume_is_exact(argv, tmp_path, 9, capsys)  # evaluations at 6 and 12
    ha, hb = (json.loads((r / "eval" / "test.json").read_text()) for r in (full, part))
    assert [h["step"] for h in hb["train"]["history"]] == [6, 12]
    assert ha["train"]["history"] == hb["train"]["history"] and ha["test"]["bleu"] == hb["test"]["bleu"]


def _digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def test_bad_resumes_are_one_line_errors_that_change_nothing(tmp_path, capsys):
    backbone = make_backbone(tmp_path / "backbone")
    data = write_csv(tmp_path / "reviews.csv", reviews(60))
    argv = ["finetune", "classify", "--data.train", str(data), "--init", str(backbone), "--train.max_steps", "8",
            "--train.batch_size", "6", "--train.eval_every", "4", *FAST]
    run = tmp_path / "run"
    run_until_crash(lambda: main([*argv, "--out", str(run)]), 6)
    before = _digest(run)
    capsys.readouterr()
    assert_user_error(capsys, argv[:2] + ["x.yaml", "--resume", run], "give a recipe or --resume, not both")
    assert_user_error(capsys, ["finetune", "image", "--resume", run], "it is a classify run",
                      f"kiln finetune classify --resume {run}")
    assert_user_error(capsys, ["finetune", "classify", "--resume", backbone], "it is a pretrain run",
                      f"kiln pretrain --resume {backbone}")
    assert_user_error(capsys, ["finetune", "classify", "--resume", tmp_path / "nowhere"], "not found")
    assert_user_error(capsys, [*argv, "--out", run], "already holds checkpoints",
                      f"kiln finetune classify --resume {run}")
    write_csv(data, reviews(61))  # one more row: another split
    assert_user_error(capsys, ["finetune", "classify", "--resume", run], "the data differ from when the run started",
                      "data.json", "exact resume needs the same files")
    assert _digest(run) == before
    write_csv(data, reviews(60))  # the data back as they were: the resume finishes the run
    assert main(["finetune", "classify", "--resume", str(run)]) == 0
    assert json.loads((run / "eval" / "summary.json").read_text())["train"]["steps"] == 8


def test_a_lora_run_resumes_exactly(tmp_path, capsys):
    """Adapters and the head in the checkpoints, the frozen base once in lora/: the resume loads both."""
    backbone = make_backbone(tmp_path / "backbone", n_layer=2)
    data = write_csv(tmp_path / "reviews.csv", reviews(60))
    argv = ["finetune", "classify", "--data.train", str(data), "--init", str(backbone), "--train.max_steps", "12",
            "--train.batch_size", "6", "--train.eval_every", "4", "--train.lr", "1e-2", "--train.lora.rank", "2",
            *FAST]
    full, part = assert_resume_is_exact(argv, tmp_path, 6, capsys)
    assert (part / "lora" / "base.safetensors").is_file()
