"""Fine-tuning under torchrun (gloo, CPU): every task trains on N ranks through the one driver.

Why a 2-rank DDP run equals one process bit for bit, on any CPU: a step is train.grad_accum micro-batches of
train.batch_size examples whatever the number of ranks; with grad_accum 2 on 2 ranks each rank computes exactly one
of the micro-batches one process computes (the same examples, the same dropout: torch's RNG is reseeded from the
micro-batch's global index), with the same kernels, and DDP's all-reduce adds the two gradients as one process's
accumulation does (a + b, one rounding; the 2x of DDP's averaging is a power of two, exact). The loss is summed
over ranks before it is divided, as one process does. Evaluation runs once, on rank 0, on the same weights.

FSDP2 shards each parameter over the ranks: the gradient norm that clipping divides by is summed shard by shard
(another fp32 order), so weights may differ in the last bits; the tolerance is the one tests/train/test_scale.py derives
for pretraining, and the same run with clipping off must equal one process (showing that is the only difference).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kiln.cli import main
from test_classify import FAST, make_backbone, reviews, write_csv
from test_finetune_resume import losses, newest_weights
from test_images import image_folder
from test_multinode import two_nodes
from test_scale import ATOL_LOSS, RTOL, RTOL_WEIGHTS, column, rel

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.distributed]


def torchrun(nproc: int, *args: str, nnodes: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
           "--nproc-per-node", str(nproc), "-m", "kiln", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def classify_args(tmp_path: Path) -> list[str]:
    backbone = tmp_path / "backbone"
    if not backbone.exists():
        make_backbone(backbone)
    data = write_csv(tmp_path / "reviews.csv", reviews(60))
    return ["finetune", "classify", "--data.train", str(data), "--init", str(backbone), "--data.max_length", "12",
            "--epochs", "3", "--train.batch_size", "4", "--train.grad_accum", "2", "--train.lr", "5e-3",
            "--train.eval_every", "3", "--train.save_every", "1", "--train.keep_last", "0", "--train.log_every", "1",
            *FAST[:-4]]  # (FAST's own log_every and seed replaced)


def assert_same_run(ref: Path, got: Path) -> None:
    """The same fp32 operations: every logged loss and val metric, the newest weights, the test metrics."""
    assert losses(got) == losses(ref)
    a, b = newest_weights(ref), newest_weights(got)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    sa, sb = (json.loads((r / "eval" / "summary.json").read_text()) for r in (ref, got))
    assert {k: v for k, v in sa.items() if k != "train"} == {k: v for k, v in sb.items() if k != "train"}
    assert sa["train"]["best_step"] == sb["train"]["best_step"]


def assert_ddp_equals_one_process(args: list[str], tmp_path: Path, verb: str) -> tuple[Path, Path]:
    """`kiln ARGS` in this process and on 2 DDP ranks: one writer, the same run bit for bit."""
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*args, "--out", str(one)]) == 0
    r = torchrun(2, *args, "--out", str(two))
    assert r.returncode == 0, r.stderr[-3000:]
    assert_one_writer(two, verb)
    assert_same_run(one, two)
    return one, two


def assert_one_writer(run: Path, verb: str, ranks: int = 2, parallel: str = "ddp") -> None:
    log = (run / "log.txt").read_text()
    assert log.count(f"kiln finetune {verb} -> ") == 1, log
    assert f"distributed: {ranks} ranks, backend gloo, {parallel}" in log
    steps = [r.split(",")[0] for r in (run / "metrics.csv").read_text().splitlines()[1:]]
    assert len(steps) == len(set(steps)) or all(steps.count(s) <= 2 for s in steps)  # a step's row and its eval row


def test_classify_ddp_equals_one_process_and_resumes_on_one(tmp_path):
    one, two = assert_ddp_equals_one_process(classify_args(tmp_path), tmp_path, "classify")
    first, last = (float(r[1]) for r in (losses(two)[0], [r for r in losses(two) if r[1]][-1]))
    assert last < first - 0.05  # it trained
    # saved by 2 ranks at step 4, resumed by one process: the uninterrupted run, exactly
    part = tmp_path / "part"
    shutil.copytree(two, part)
    for name in ("eval",):
        shutil.rmtree(part / name)
    (part / "checkpoints" / "latest").write_text("step_000004\n")
    assert main(["finetune", "classify", "--resume", str(part)]) == 0
    assert_same_run(one, part)


def test_classify_fsdp_matches_one_process(tmp_path):
    """Without clipping, FSDP2 equals one process bit for bit; with it (train.grad_clip 1, the default), only the
    clipping factor's norm is summed in another order: losses within ATOL_LOSS, grad norms within RTOL, the final
    weights within RTOL_WEIGHTS per tensor (tests/train/test_scale.py derives them; measured here: losses 6e-8 apart,
    grad norms 6e-8 relative, weights after 18 steps 2.4e-6 relative at most)."""
    args = classify_args(tmp_path)
    one, fsdp = tmp_path / "one", tmp_path / "fsdp"
    assert main([*args, "--out", str(one), "--train.grad_clip", "0"]) == 0
    r = torchrun(2, *args, "--out", str(fsdp), "--train.parallel", "fsdp", "--train.grad_clip", "0")
    assert r.returncode == 0, r.stderr[-3000:]
    assert_one_writer(fsdp, "classify", parallel="fsdp")
    assert_same_run(one, fsdp)  # without clipping, the same sums in the same order: equal

    one, fsdp = tmp_path / "one-clip", tmp_path / "fsdp-clip"
    assert main([*args, "--out", str(one)]) == 0
    r = torchrun(2, *args, "--out", str(fsdp), "--train.parallel", "fsdp")
    assert r.returncode == 0, r.stderr[-3000:]
    la, lb = column(one, "loss"), column(fsdp, "loss")
    assert la.keys() == lb.keys() and max(abs(la[s] - lb[s]) for s in la) <= ATOL_LOSS
    na, nb = column(one, "grad_norm"), column(fsdp, "grad_norm")
    assert max(abs(nb[s] / na[s] - 1) for s in na) <= RTOL and max(na.values()) > 1  # some steps were clipped
    a, b = newest_weights(one), newest_weights(fsdp)
    assert a.keys() == b.keys() and max(rel(b[k], a[k]) for k in a) <= RTOL_WEIGHTS


def test_image_ddp_equals_one_process(tmp_path):
    root = image_folder(tmp_path / "imgs", n=16)
    args = ["finetune", "image", "--data.train", str(root), "--model.n_layer", "1", "--model.d_model", "32",
            "--model.n_head", "2", "--model.d_ff", "64", "--train.batch_size", "4", "--train.grad_accum", "2",
            "--epochs", "3", "--train.lr", "3e-3", "--augment.crop_padding", "2", "--augment.flip", "true",
            "--head_dropout", "0.1", "--data.val_fraction", "0.2", "--data.test_fraction", "0.2", *FAST]
    assert_ddp_equals_one_process(args, tmp_path, "image")


def test_grad_accum_not_a_multiple_of_the_ranks_is_one_line_exit_2(tmp_path):
    args = classify_args(tmp_path)
    args[args.index("--train.grad_accum") + 1] = "3"
    r = torchrun(2, *args, "--out", str(tmp_path / "run"))
    assert r.returncode != 0 and "exitcode  : 2" in r.stderr
    lines = {line for line in r.stderr.splitlines() if line.startswith("kiln: error:")}
    assert lines == {"kiln: error: train.grad_accum 3 is not a multiple of the 2 ranks: each rank takes whole "
                     "micro-batches of every step (set --train.grad_accum 4; the global batch is train.batch_size x "
                     "train.grad_accum)"}, r.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_tokens_ddp_equals_one_process(tmp_path):
    from task_data import ASSETS, make_backbone as make_wordpiece_backbone

    ner = (ASSETS / "ner_austen.conll").read_text()
    data = tmp_path / "ner.conll"
    data.write_text("\n\n".join(ner.split("\n\n")[:160]) + "\n")  # 160 sentences
    backbone = make_wordpiece_backbone(tmp_path / "bb", ner, context_length=64, vocab_size=1500, n_layer=1)
    args = ["finetune", "tokens", "--data.train", str(data), "--init", str(backbone), "--data.max_length", "48",
            "--epochs", "2", "--train.batch_size", "8", "--train.grad_accum", "2", "--train.lr", "3e-3",
            "--train.eval_every", "4", *FAST]
    assert_ddp_equals_one_process(args, tmp_path, "tokens")


def test_two_nodes_fine_tune_as_one_process(tmp_path):
    """Two torchrun "nodes" of one process each on this machine (c10d rendezvous on 127.0.0.1, gloo): what README
    "Training on several machines" runs on each machine, for a fine-tuning task."""
    args = classify_args(tmp_path)
    one, two = tmp_path / "one", tmp_path / "two-nodes"
    assert main([*args, "--out", str(one)]) == 0
    two_nodes(*args, "--out", str(two))
    assert_one_writer(two, "classify")
    assert_same_run(one, two)
