"""Where a decoding step's time goes: torch.profiler over kiln's greedy decoding of SmolLM2-135M-Instruct.

    python bench/profile_decode.py [--precision bf16] [--new 32] [--work runs/decode]

Prints the ops by self CPU time over `--new` tokens at batch 1 (after a warm-up), per token: how many calls,
how much of the token's time is matmul work and how much the calls around it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from chat_decode_speed import models  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--work", default="runs/decode")
    args = ap.parse_args()
    model, _, ids = models(Path(args.work))
    model = model.to(torch.bfloat16 if args.precision == "bf16" else torch.float32)
    idx = torch.tensor([ids])
    with torch.inference_mode():
        model.generate(idx, 4, greedy=True)
        t0 = time.perf_counter()
        model.generate(idx, args.new, greedy=True)
        wall = time.perf_counter() - t0
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model.generate(idx, args.new, greedy=True)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    calls = sum(e.count for e in events)
    print(f"{args.precision}, batch 1, {args.new} tokens: {wall / args.new * 1e3:.1f} ms a token unprofiled; "
          f"{calls / args.new:.0f} op calls a token, {total / 1e3 / args.new:.1f} ms of self CPU time a token "
          f"(profiled)")
    print(f"{'op':<42} {'calls/token':>11} {'ms/token':>9} {'share':>6}")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:14]:
        print(f"{e.key[:42]:<42} {e.count / args.new:>11.1f} {e.self_cpu_time_total / 1e3 / args.new:>9.2f} "
              f"{e.self_cpu_time_total / total:>6.1%}")


if __name__ == "__main__":
    main()
