"""Greedy decoding speed of GPT-2 small (124M): float weights vs kiln's int8 weight-only quantization.

    python bench/quantize_speed.py [--new 128] [--threads 2]

Random GPT-2-small-shaped weights (speed does not depend on their values); batch 1, prompt 32 tokens.
Float runs use kiln's decoding path (oneDNN pre-packed weights); int8 runs `torch._weight_int8pack_mm`.
The accuracy side of the trade-off is measured by `kiln quantize` on a trained run (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402

from kiln.compress.quantize import quantize_model  # noqa: E402
from kiln.model.config import preset  # noqa: E402
from kiln.model.transformer import Transformer  # noqa: E402
from kiln.run.checkpoint import model_state  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    base = Transformer(preset("gpt2")).eval()
    idx = torch.randint(0, 50257, (1, 32))
    variants = {}
    for act in (torch.float32, torch.bfloat16):
        f = copy.deepcopy(base).to(act)
        q = quantize_model(copy.deepcopy(base))
        for p in q.parameters():
            if p.is_floating_point():
                p.data = p.data.to(act)
        name = "fp32" if act == torch.float32 else "bf16"
        variants[f"{name} weights"] = f
        variants[f"int8 weights, {name} activations"] = q
    print(f"# {machine()}")
    print(f"# GPT-2 small (124M), greedy, batch 1, prompt 32, {a.new} new tokens, best of {a.repeats}")
    with torch.inference_mode():
        for name, m in variants.items():
            m.generate(idx, 4, greedy=True)
            best = min(_timed(m, idx, a.new) for _ in range(a.repeats))
            mb = sum(t.numel() * t.element_size() for t in model_state(m).values()) / 1e6  # tied tensors once
            print(f"{name:32s} {a.new / best:7.1f} tok/s   weights in memory {mb:7.1f} MB")


def _timed(m, idx, n) -> float:
    t0 = time.perf_counter()
    m.generate(idx, n, greedy=True)
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
