"""Feeds docs/benchmarks.md, section 'CPU dropout and ELECTRA's sampling'.

Dropout and sampling on CPU: kiln's kernels against PyTorch's, forward + backward, median of repeats.

    python experiments/dropout_speed.py [--repeats 20] [--json bench/out/dropout.json]

- dropout: `F.dropout` (a bernoulli_ mask) vs kiln.model.transformer.dropout (a torch.rand mask), on the shapes
  of the bert-mlm recipe at batch 64 x 128: a residual-stream tensor and the attention weights.
- ELECTRA's replacements: `torch.multinomial` vs kiln.train.electra.sample_rows (inverse CDF) on 1,900 rows of
  an 8,192-token vocabulary (15% of 64 x 128 masked positions).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # bench/common.py: machine facts, JSON
from common import emit_json, machine, median  # noqa: E402


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return median(times) * 1000


def main() -> None:
    from kiln.model.transformer import dropout
    from kiln.train.electra import sample_rows

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for shape in ((64, 128, 256), (64, 4, 128, 128)):
            x = torch.randn(*shape, dtype=dtype, requires_grad=True)

            def run(fn):
                return lambda: fn(x).sum().backward()

            torch_ms = timed(run(lambda t: F.dropout(t, 0.1, True)), a.repeats)
            kiln_ms = timed(run(lambda t: dropout(t, 0.1)), a.repeats)
            rows.append({"op": "dropout 0.1, fwd+bwd", "dtype": str(dtype).split(".")[-1], "shape": list(shape),
                         "torch_ms": round(torch_ms, 2), "kiln_ms": round(kiln_ms, 2),
                         "speedup": round(torch_ms / kiln_ms, 2)})
    logits = torch.randn(1900, 8192)
    torch_ms = timed(lambda: torch.multinomial(logits.softmax(-1), 1), a.repeats)
    kiln_ms = timed(lambda: sample_rows(logits), a.repeats)
    rows.append({"op": "sample 1 token per row", "dtype": "float32", "shape": [1900, 8192],
                 "torch_ms": round(torch_ms, 2), "kiln_ms": round(kiln_ms, 2), "speedup": round(torch_ms / kiln_ms, 2)})
    for r in rows:
        print(f"{r['op']:<24} {r['dtype']:<9} {str(r['shape']):<20} torch {r['torch_ms']:8.2f} ms  "
              f"kiln {r['kiln_ms']:8.2f} ms  x{r['speedup']}", file=sys.stderr)
    emit_json({"machine": machine(), "rows": rows}, a.json)


if __name__ == "__main__":
    main()
