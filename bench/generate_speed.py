"""Greedy decoding speed, kiln vs transformers, same GPT-2-small-shaped weights, same run.

    PYTHONPATH=src python bench/generate_speed.py [--new 256] [--batches 1 8] [--threads 2] [--prompt 32]

One random GPT-2 small (124M) is built in transformers, mapped into kiln with kiln.interop.gpt2 (so both
hold identical weights), then each decodes `--new` tokens greedily from the same prompt, at batch 1 and 8.
Both outputs are checked equal token for token. Prints tokens/s (new tokens x batch / seconds) and the ratio,
and the weights' bytes read per second (one pass over the weights per decoding step) against this machine's
memory bandwidth, measured here by copying a 1 GiB tensor. kiln and HF alternate in rounds (`--repeats`, default
3), the median of each is kept; bf16 is timed only where the CPU has native bf16 (`precision: auto` picks it).
Raw results: --json (default bench/results/generate_speed.json).
"""

from __future__ import annotations

import argparse
import os
import statistics
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


def bandwidth_gbs() -> float:
    """Memory bandwidth in GB/s: median of 5 copies of a 1 GiB fp32 tensor (read + write counted)."""
    src = torch.ones(256 * 1024 * 1024)
    dst = torch.empty_like(src)
    ts = []
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        ts.append(time.perf_counter() - t0)
    return 2 * src.numel() * 4 / statistics.median(ts) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="alternating timed runs per point (median kept)")
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / (Path(__file__).stem + ".json")))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kiln, hf = build(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import emit_json, machine

    print("machine:", machine())
    from kiln.run.device import choose_precision

    auto = choose_precision("auto", "cpu")[0]
    dtypes = ["fp32", "bf16"] if auto == "bf16" else ["fp32"]
    bw = bandwidth_gbs()
    n_params = sum(p.numel() for p in kiln.parameters())
    print(f"GPT-2 small shape ({n_params / 1e6:.0f}M), prompt {args.prompt}, {args.new} new tokens, greedy; kiln's "
          f"precision auto on this machine: {auto}; memory bandwidth (1 GiB copy) {bw:.1f} GB/s")
    g = torch.Generator().manual_seed(1)
    prompts = {B: torch.randint(0, 50257, (B, args.prompt), generator=g) for B in args.batches}
    rows = []
    with torch.inference_mode():
        for name in dtypes:
            dtype = torch.bfloat16 if name == "bf16" else torch.float32
            kiln, hf = kiln.to(dtype), hf.to(dtype)
            warm = torch.randint(0, 50257, (1, 8), generator=g)
            kiln.generate(warm, 4, greedy=True)
            hf.generate(warm, max_new_tokens=4, do_sample=False)
            for B, idx in prompts.items():
                mask = torch.ones_like(idx)
                times: dict[str, list] = {"kiln": [], "hf": []}
                outs = {}
                for _ in range(args.repeats):  # alternate, so drift in the machine hits both alike
                    for who, fn in (("kiln", lambda: kiln.generate(idx, args.new, greedy=True)),
                                    ("hf", lambda: hf.generate(idx, attention_mask=mask, max_new_tokens=args.new,
                                                               min_new_tokens=args.new, do_sample=False))):
                        t0 = time.perf_counter()
                        outs[who] = fn()
                        times[who].append(time.perf_counter() - t0)
                same = torch.equal(outs["kiln"], outs["hf"])
                t_kiln, t_hf = statistics.median(times["kiln"]), statistics.median(times["hf"])
                tk, th = B * args.new / t_kiln, B * args.new / t_hf
                gbs = args.new / t_kiln * n_params * dtype.itemsize / 1e9  # weights read once a decoding step
                rows.append({"precision": name, "batch": B, "kiln_tokens_per_s": round(tk, 1),
                             "hf_tokens_per_s": round(th, 1), "ratio": round(tk / th, 3), "same_tokens": same,
                             "kiln_weights_gb_per_s": round(gbs, 2), "kiln_s": times["kiln"], "hf_s": times["hf"]})
                print(f"{name} batch {B}: kiln {tk:8.1f} tok/s ({t_kiln:6.2f} s, weights {gbs:5.1f} GB/s = "
                      f"{gbs / bw:4.0%} of the copy bandwidth)   HF {th:8.1f} tok/s ({t_hf:6.2f} s)   "
                      f"kiln/HF {tk / th:4.2f}x   same tokens: {same}", flush=True)
    emit_json({"bench": "generate_speed", "machine": machine(), "command": " ".join(sys.argv),
               "kiln_precision_auto": auto, "bandwidth_gb_per_s": round(bw, 1), "new_tokens": args.new,
               "repeats": args.repeats, "rows": rows}, args.json, echo=False)


if __name__ == "__main__":
    main()
