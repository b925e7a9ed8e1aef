"""The Fashion-MNIST record: the shipped recipe (configs/vit-fashion-mnist.yaml) trained from scratch in its 20
minutes, its test accuracy, and the val-accuracy-vs-minutes curve beside earlier runs'.

    .venv/bin/python bench/fashion_mnist.py                       # ~21 min: train, test, plot (needs the machine alone)
    .venv/bin/python bench/fashion_mnist.py --minutes 2           # smoke run: the recipe cut to 2 minutes
    .venv/bin/python bench/fashion_mnist.py --plot-only RUN [RUN ...] --labels A B   # curves of finished run folders

Needs Debian's `dataset-fashion-mnist` (the four IDX files under /usr/share/datasets/fashion-mnist). The run folder
is kept (--out, default /tmp/kiln-fashion-mnist); the curve is written to --png (default
docs/vit_fashion_mnist_curve.png) with every run folder given by --compare beside it, and the result as JSON (--json,
default bench/results/fashion_mnist.json). Nothing else should run meanwhile: the recipe fits its schedule to the
minutes it has, so a busy machine costs epochs, not time.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from common import emit_json, machine  # noqa: E402

RECIPE = ROOT / "configs" / "vit-fashion-mnist.yaml"
DATA = Path("/usr/share/datasets/fashion-mnist")


def curve(run: Path) -> list[tuple[float, float]]:
    """(minutes of training, val accuracy) at each evaluation in the run's metrics.csv."""
    with open(run / "metrics.csv", newline="", encoding="utf-8") as f:
        return [(float(r["elapsed"]) / 60, float(r["val_accuracy"])) for r in csv.DictReader(f) if r.get("val_accuracy")]


def plot(runs: list[Path], labels: list[str], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for run, label in zip(runs, labels):
        pts = curve(run)
        test = json.loads((run / "eval" / "summary.json").read_text())["test"]["accuracy"]
        ax.plot([m for m, _ in pts], [100 * a for _, a in pts], marker="o", ms=3, label=f"{label}: test {100 * test:.2f}%")
    ax.axhline(92.0, color="grey", ls="--", lw=1, label="the target, 92.0% test")
    ax.set_xlabel("minutes of training (evaluations included)")
    ax.set_ylabel("val accuracy, % (3,000 held-out training images)")
    ax.set_ylim(80, 95)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("ViT from scratch on Fashion-MNIST, 2-core CPU", fontsize=10)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    print(f"curve: {png}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=0.0, help="cut the recipe's time_budget (0 = the recipe's 20)")
    ap.add_argument("--out", default="/tmp/kiln-fashion-mnist")
    ap.add_argument("--compare", nargs="*", default=[], help="earlier run folders to draw beside this one")
    ap.add_argument("--compare-labels", nargs="*", default=[])
    ap.add_argument("--plot-only", nargs="*", default=None, help="draw these finished run folders, train nothing")
    ap.add_argument("--labels", nargs="*", default=[])
    ap.add_argument("--png", default=str(ROOT / "docs" / "vit_fashion_mnist_curve.png"))
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "fashion_mnist.json"))
    args = ap.parse_args()
    if args.plot_only is not None:
        runs = [Path(r) for r in args.plot_only]
        plot(runs, args.labels or [r.name for r in runs], Path(args.png))
        return
    if not (DATA / "train-images-idx3-ubyte.gz").is_file():
        sys.exit(f"no Fashion-MNIST under {DATA}: apt-get install dataset-fashion-mnist")
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    cmd = [str(Path(sys.executable).parent / "kiln"), "finetune", "image", str(RECIPE.relative_to(ROOT)), "--out", str(out)]
    if args.minutes:
        cmd += ["--time_budget", str(args.minutes)]
    print(f"# {machine()}\n$ HF_HUB_OFFLINE=1 {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - t0
    s = json.loads((out / "eval" / "summary.json").read_text())
    t = s["train"]
    result = {"machine": machine(), "command": " ".join(cmd), "wall_s": round(wall, 1),
              "train_s": round(t["seconds"], 1), "steps": t["steps"], "examples_per_second": round(t["examples_per_second"], 1),
              "epochs": round(t["examples_seen"] / 57000, 2), "precision": t["precision"], "best_step": t["best_step"],
              "test_accuracy": s["test"]["accuracy"], "test_macro_f1": s["test"]["macro_f1"],
              "val_curve": [(round(m, 2), round(a, 4)) for m, a in curve(out)], "target": 0.92,
              "met": s["test"]["accuracy"] >= 0.92}
    emit_json(result, Path(args.json))
    runs = [out, *map(Path, args.compare)]
    plot(runs, ["this run", *(args.compare_labels or [Path(r).name for r in args.compare])], Path(args.png))


if __name__ == "__main__":
    main()
