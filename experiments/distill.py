"""Feeds docs/benchmarks.md, section 'Distillation: a 4.8× smaller student (`kiln distill`)'.

Distillation study: a small student trained with and without its teacher, same recipe, same steps.

    python experiments/distill.py                     # teacher: kiln's default recipe trained here first
    python experiments/distill.py --teacher runs/demo-...   # or an existing decoder run
    python experiments/distill.py --student "--model.n_layer 2 --model.d_model 64"

Every student run is `kiln distill TEACHER` (the teacher's data and schedule) with distill.alpha 0 (plain
cross-entropy: the baseline) or the chosen alphas. Prints parameters, final val loss and wall time per run.
"""

from __future__ import annotations

import argparse
import csv
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # bench/common.py: machine facts, JSON
from common import machine  # noqa: E402

from kiln.config import load_config  # noqa: E402
from kiln.train.pretrain import distill_from_cli, run_pretrain  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def final_val(run: Path) -> float:
    with open(run / "metrics.csv", newline="") as f:
        return float([r for r in csv.DictReader(f) if r.get("val_loss")][-1]["val_loss"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="")
    ap.add_argument("--student", default="--model.n_layer 2 --model.d_model 64 --model.n_head 4")
    ap.add_argument("--alphas", default="0,0.5,0.9")
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / f"distill-{time.strftime('%Y%m%d-%H%M%S')}")
    a = ap.parse_args()
    print(f"# {machine()}")
    common = ["--train.sample_tokens", "0", "--train.tensorboard", "false"]
    teacher = Path(a.teacher) if a.teacher else a.out / "teacher"
    if not a.teacher:
        run_pretrain(load_config(ROOT / "configs" / "shakespeare-char.yaml", ["--out", str(teacher), *common]),
                     quiet=True)
    from kiln import load

    n_teacher = sum(p.numel() for p in load(teacher)[0].parameters())
    print(f"teacher {teacher}: {n_teacher / 1e6:.2f}M parameters, val {final_val(teacher):.4f}")
    print("| student | alpha | parameters | val loss | wall s |\n|---|---|---|---|---|")
    for alpha in [float(x) for x in a.alphas.split(",")]:
        out = a.out / f"student-alpha{alpha:g}"
        t0 = time.perf_counter()
        run = distill_from_cli(str(teacher), ["--out", str(out), "--distill.alpha", str(alpha),
                                              "--distill.temperature", str(a.temperature), *shlex.split(a.student),
                                              *common])
        wall = time.perf_counter() - t0
        n = sum(p.numel() for p in load(run)[0].parameters())
        print(f"| `{a.student}` | {alpha:g}{' (no teacher)' if alpha == 0 else ''} | {n / 1e6:.2f}M | "
              f"{final_val(run):.4f} | {wall:.1f} |", flush=True)


if __name__ == "__main__":
    main()
