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
    from kiln.run.device import choose_precision

    auto = choose_precision("auto", "cpu")[0]
    dtypes = ["fp32", "bf16"] if auto == "bf16" else ["fp32"]
    print(f"GPT-2 small shape (124M), prompt {args.prompt}, {args.new} new tokens, greedy; kiln's "
          f"precision auto on this machine: {auto}")
    g = torch.Generator().manual_seed(1)
    prompts = {B: torch.randint(0, 50257, (B, args.prompt), generator=g) for B in args.batches}
    speed = {}
    with torch.inference_mode():
        for name in dtypes:
            dtype = torch.bfloat16 if name == "bf16" else torch.float32
            kiln, hf = kiln.to(dtype), hf.to(dtype)
            warm = torch.randint(0, 50257, (1, 8), generator=g)
            kiln.generate(warm, 4, greedy=True)
            hf.generate(warm, max_new_tokens=4, do_sample=False)
            for B, idx in prompts.items():
                mask = torch.ones_like(idx)
                t_kiln, out_kiln = timed(lambda: kiln.generate(idx, args.new, greedy=True), args.repeats)
                t_hf, out_hf = timed(lambda: hf.generate(idx, attention_mask=mask, max_new_tokens=args.new,
                                                         min_new_tokens=args.new, do_sample=False), args.repeats)
                same = torch.equal(out_kiln, out_hf)
                tk, th = B * args.new / t_kiln, B * args.new / t_hf
                speed[(name, B)] = (tk, th)
                print(f"{name} batch {B}: kiln {tk:8.1f} tok/s ({t_kiln:6.2f} s)   HF {th:8.1f} tok/s ({t_hf:6.2f} s)   "
                      f"kiln/HF {tk / th:4.2f}x   same tokens: {same}", flush=True)
    for B in args.batches:  # what a user gets by default: kiln picks its precision, HF loads fp32
        tk, th = speed[(auto, B)][0], speed[("fp32", B)][1]
        print(f"default settings, batch {B}: kiln ({auto}) {tk:.1f} tok/s vs HF (fp32) {th:.1f} tok/s = {tk / th:.2f}x")


if __name__ == "__main__":
    main()
