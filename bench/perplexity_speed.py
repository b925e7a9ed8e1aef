"""Sliding-window perplexity speed, `kiln eval`'s loop vs the Hugging Face perplexity recipe, same GPT-2-small
weights, same windows, same run.

    python bench/perplexity_speed.py [--tokens 8192] [--context 1024] [--stride 512] [--batch 4] [--threads 2]

One random GPT-2 small (124M) is built in transformers and mapped into kiln (identical weights; the same setup
as bench/generate_speed.py). The text is random token ids (speed does not depend on their values). Both score
every token once with windows of `--context` tokens advancing by `--stride`, `--batch` windows per forward:
kiln through `kiln.eval.lm.causal_nll` (the fused head + cross-entropy, no logits tensor kept); transformers as
its perplexity guide does, logits of each window then cross-entropy on the new targets, in fp32. Prints the
summed negative log-likelihood of both (they must agree), tokens scored per second, and the ratio.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

from common import emit_json, machine, median  # noqa: E402
from generate_speed import build  # noqa: E402


@torch.no_grad()
def hf_nll(model, ids: torch.Tensor, windows, batch: int) -> tuple[float, int]:
    total, count = 0.0, 0
    by_len: dict[int, list] = {}
    for w in windows:
        by_len.setdefault(w[1] - w[0], []).append(w)
    for group in by_len.values():
        for i in range(0, len(group), batch):
            chunk = group[i:i + batch]
            x = torch.stack([ids[b:e - 1] for b, e, _ in chunk])
            logits = model(x).logits.float()
            for row, (b, e, first) in enumerate(chunk):
                new = slice(first - b - 1, e - b - 1)
                total += float(torch.nn.functional.cross_entropy(logits[row, new], ids[first:e], reduction="sum"))
                count += e - first
    return total, count


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--stride", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from kiln.eval.lm import causal_nll, causal_windows

    kiln, hf = build(a.threads)
    ids = torch.randint(0, 50257, (a.tokens,), generator=torch.Generator().manual_seed(0))
    windows = causal_windows(a.tokens, a.context, a.stride)
    times = {"kiln": [], "hf": []}
    nll = {}
    for _ in range(a.repeats):
        for name in ("kiln", "hf"):
            t0 = time.perf_counter()
            nll[name] = causal_nll(kiln, ids.numpy(), a.context, a.stride, a.batch) if name == "kiln" else \
                hf_nll(hf, ids, windows, a.batch)
            times[name].append(time.perf_counter() - t0)
    assert nll["kiln"][1] == nll["hf"][1] == a.tokens - 1
    rel = abs(nll["kiln"][0] - nll["hf"][0]) / abs(nll["hf"][0])
    assert rel < 1e-4, nll
    speed = {k: (a.tokens - 1) / median(v) for k, v in times.items()}
    emit_json({"machine": machine(), "args": vars(a) | {"json": str(a.json)}, "windows": len(windows),
               "nll_per_token": {k: v[0] / v[1] for k, v in nll.items()},
               "seconds": times, "tokens_per_second": speed, "ratio": speed["kiln"] / speed["hf"]}, a.json)


if __name__ == "__main__":
    main()
