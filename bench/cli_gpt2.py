"""GPT-2 124M through the CLI as a user runs it, against a plain Hugging Face loop at its best on this machine.

(a) kiln:  kiln pretrain --model_preset gpt2 --model.context_length 256 --train.batch_size 4
           --train.max_steps N --train.eval_batches 1 --out TMP   (shipped defaults otherwise: optimizer auto,
           precision auto; one val batch for the evaluation at the end, which is not timed)
(b) HF:    GPT2LMHeadModel of the same shape and vocabulary (the preset keeps GPT-2's 50,257 even on the default
           character-level data, whose ids fit in it), model(input_ids, labels=input_ids).loss, torch.optim.AdamW (its default
           implementation), grad clip 1.0, batch 4 x 256 of the same text; bf16 autocast where the CPU has
           native bf16, fp32 where it has not (emulated bf16 matmuls run at ~1 GFLOP/s there).
Both are whole processes, alternated in rounds; tokens/s = median over the timed steps of each process (kiln:
its metrics.csv, the first logged interval dropped; HF: the steps after two warm-up steps).

    .venv/bin/python bench/cli_gpt2.py [--steps 8] [--rounds 3] [--json bench/results/cli_gpt2.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import emit_json, machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def hf_loop(steps: int, bf16: bool) -> None:
    """Child process: print one JSON line with the per-step seconds of a plain HF loop."""
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    text = (ROOT / "src" / "kiln" / "assets" / "tinyshakespeare.txt").read_text()
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text[:200_000]])
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=50257, n_positions=256, n_embd=768, n_layer=12, n_head=12,
                                  bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    times = []
    for i in range(steps + 2):
        starts = torch.randint(0, len(ids) - 257, (4,))
        x = torch.stack([ids[s:s + 256] for s in starts])
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    print(json.dumps({"step_s": times, "last_loss": float(loss)}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8, help="timed steps per process")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / (Path(__file__).stem + ".json")))
    ap.add_argument("--hf-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.hf_child:
        return hf_loop(args.steps, args.bf16)
    from kiln.run.device import cpu_bf16_flags

    bf16 = bool(cpu_bf16_flags())
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    kiln = [str(Path(sys.executable).parent / "kiln"), "pretrain", "--model_preset", "gpt2", "--model.context_length",
            "256", "--train.batch_size", "4", "--train.log_every", "1", "--train.eval_every", "1000000",
            "--train.sample_tokens", "0", "--train.eval_batches", "1", "--train.max_steps", str(args.steps + 2)]
    # (the run's one evaluation, at its last step, on 1 batch instead of 20: 20 took 56 s of each 109 s process
    # here, time that measures nothing the row reports)
    rows: dict[str, list] = {"kiln": [], "hf": []}
    chosen = ""
    with tempfile.TemporaryDirectory(prefix="kiln-cli-gpt2-") as tmp:
        for r in range(args.rounds):
            out = Path(tmp) / f"k{r}"
            p = subprocess.run(kiln + ["--out", str(out)], env=env, capture_output=True, text=True)
            if p.returncode:
                raise SystemExit(f"kiln failed: {p.stdout[-2000:]}{p.stderr[-2000:]}")
            chosen = next((line.strip() for line in p.stdout.splitlines() if "optimizer auto" in line), chosen)
            with open(out / "metrics.csv") as f:
                tps = [float(row["tokens_per_second"]) for row in csv.DictReader(f) if row.get("tokens_per_second")]
            rows["kiln"].append(statistics.median(tps[2:] or tps))
            p = subprocess.run([sys.executable, __file__, "--hf-child", "--steps", str(args.steps)]
                               + (["--bf16"] if bf16 else []), env=env, capture_output=True, text=True)
            if p.returncode:
                raise SystemExit(f"HF loop failed: {p.stderr[-2000:]}")
            step = statistics.median(json.loads(p.stdout.strip().splitlines()[-1])["step_s"])
            rows["hf"].append(1024 / step)
            print(f"round {r + 1}: kiln {rows['kiln'][-1]:.0f} tokens/s, HF {rows['hf'][-1]:.0f} tokens/s", flush=True)
    k, h = statistics.median(rows["kiln"]), statistics.median(rows["hf"])
    print(f"# {machine()}\n# kiln: {chosen or 'optimizer as configured'}; HF: {'bf16 autocast' if bf16 else 'fp32'}")
    print(f"kiln CLI {k:.0f} tokens/s vs plain HF loop {h:.0f} tokens/s = {k / h:.2f}x (target >= 1.6x)")
    emit_json({"bench": "cli_gpt2", "machine": machine(), "command": " ".join(sys.argv),
               "kiln_command": " ".join(kiln + ["--out", "TMP"]), "kiln_optimizer": chosen,
               "hf_precision": "bf16 autocast" if bf16 else "fp32", "kiln_tokens_per_s": round(k),
               "hf_tokens_per_s": round(h), "ratio": round(k / h, 3), "rounds": rows}, args.json, echo=False)


if __name__ == "__main__":
    main()
