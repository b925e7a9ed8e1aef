"""Greedy decoding speed, kiln vs transformers, same GPT-2-small-shaped weights, same run.

    PYTHONPATH=src python bench/generate_speed.py [--new 256] [--batches 1 8] [--threads 2] [--prompt 32]

One random GPT-2 small (124M) is built in transformers, mapped into kiln with kiln.interop.gpt2 (so both
hold identical weights), then each decodes `--new` tokens greedily from the same prompt, at batch 1 and 8.
Both outputs are checked equal token for token. Prints tokens/s (new tokens x batch / seconds) and the ratio.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402


def build(threads: int):
    import transformers

    from kiln.interop import gpt2
    from kiln.model.transformer import Transformer

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(n_positions=1024, n_embd=768, n_layer=12, n_head=12, vocab_size=50257)
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    hf.generation_config.eos_token_id = None  # random weights: never stop early, always `--new` tokens
    hf.generation_config.pad_token_id = 0
    cfg = gpt2.config_from_hf(hf_cfg.to_dict())
    cfg.dropout = 0.0
    kiln = Transformer(cfg).eval()
    missing, unexpected = kiln.load_state_dict(gpt2.state_from_hf(hf.state_dict(), cfg), strict=False)
    assert not unexpected and missing == ["lm_head.weight"], (missing, unexpected)  # tied to the embedding
    return kiln, hf


def timed(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per point (best is kept)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kiln, hf = build(args.threads)
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from common import machine

        print("machine:", machine())
    except Exception:  # noqa: BLE001  (the bench helpers are optional)
        print(f"machine: {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"GPT-2 small shape (124M), fp32, prompt {args.prompt}, {args.new} new tokens, greedy")

    g = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        warm = torch.randint(0, 50257, (1, 8), generator=g)
        kiln.generate(warm, 4, greedy=True)
        hf.generate(warm, max_new_tokens=4, do_sample=False)
        for B in args.batches:
            idx = torch.randint(0, 50257, (B, args.prompt), generator=g)
            mask = torch.ones_like(idx)
            t_kiln, out_kiln = timed(lambda: kiln.generate(idx, args.new, greedy=True), args.repeats)
            t_hf, out_hf = timed(lambda: hf.generate(idx, attention_mask=mask, max_new_tokens=args.new,
                                                     min_new_tokens=args.new, do_sample=False), args.repeats)
            same = torch.equal(out_kiln, out_hf)
            tk, th = B * args.new / t_kiln, B * args.new / t_hf
            print(f"batch {B}: kiln {tk:8.1f} tok/s ({t_kiln:6.2f} s)   HF {th:8.1f} tok/s ({t_hf:6.2f} s)   "
                  f"kiln/HF {tk / th:4.2f}x   same tokens: {same}", flush=True)


if __name__ == "__main__":
    main()
