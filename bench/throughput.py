"""Training throughput, kiln vs Hugging Face GPT2LMHeadModel, same config, same data, same loop, one run.

    python bench/throughput.py --preset gpt2 --batch 4 --context 256      # the 124M comparison
    python bench/throughput.py --preset gpt-baby --batch 12 --context 64  # nanoGPT's CPU "baby" config

Every variant runs kiln's own Trainer.train_step (AdamW fused, grad clip 1.0); the HF model is wrapped to
return logits. Variants are interleaved in rounds so machine noise hits all of them alike; the median step
time is reported, with MFU against the measured matmul ceiling of the same dtype.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import HFCausalLM, machine  # noqa: E402

from kiln.config import load_config  # noqa: E402
from kiln.model.config import preset  # noqa: E402
from kiln.model.transformer import Transformer  # noqa: E402
from kiln.train.objectives import CausalLM  # noqa: E402
from kiln.train.precision import cpu_bf16_flags, matmul_speed  # noqa: E402
from kiln.train.trainer import Trainer  # noqa: E402


def hf_gpt2(cfg):
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_cfg = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.context_length, n_embd=cfg.d_model,
                        n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=0, eos_token_id=0)
    return HFCausalLM(GPT2LMHeadModel(hf_cfg))


def make_trainer(kind: str, precision: str, model_cfg, batch: int, context: int, steps: int):
    torch.manual_seed(0)
    bf16_weights = precision == "bf16-weights"
    prec = "bf16" if precision.startswith("bf16") else "fp32"
    cfg = load_config(None, {"train": {"batch_size": batch, "lr": 1e-3, "warmup_steps": 10, "max_steps": steps,
                                       "optimizer": "adamw",  # the reference loop: AdamW, as in HF and nanoGPT
                                       "bf16_weights": bf16_weights, "tensorboard": False}})
    model = Transformer(model_cfg) if kind == "kiln" else hf_gpt2(model_cfg)
    data = torch.randint(0, model_cfg.vocab_size, (steps * 2 + 8, batch, context + 1))
    return Trainer(model, CausalLM(), cfg.train, Path("/tmp/kiln-bench"), lambda i: data[i % len(data)],
                   precision=prec, log=lambda s: None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="gpt2")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per variant per round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=0)
    ap.add_argument("--variants", default="", help="comma list like kiln:fp32,hf:bf16 (default: all supported)")
    args = ap.parse_args()
    model_cfg = preset(args.preset, context_length=args.context, **({"vocab_size": args.vocab} if args.vocab else {}))
    model_cfg.resolve()
    bf16_native = bool(cpu_bf16_flags()) or torch.cuda.is_available()
    fp32_ceiling = matmul_speed(torch.float32, n=1024, seconds=0.5)
    bf16_ceiling = matmul_speed(torch.bfloat16, n=1024, seconds=0.5)
    variants = [tuple(v.split(":")) for v in args.variants.split(",")] if args.variants else (
        [("hf", "fp32"), ("kiln", "fp32")] +
        ([("hf", "bf16"), ("kiln", "bf16"), ("kiln", "bf16-weights")] if bf16_native else []))
    print(f"# {machine()}")
    print(f"# model {args.preset}: d_model {model_cfg.d_model}, layers {model_cfg.n_layer}, vocab "
          f"{model_cfg.vocab_size}; batch {args.batch} x {args.context}; matmul ceiling fp32 {fp32_ceiling:.0f} "
          f"GFLOP/s, bf16 {bf16_ceiling:.0f} GFLOP/s")
    trainers = {(k, p): make_trainer(k, p, model_cfg, args.batch, args.context, args.steps * args.rounds + 2)
                for k, p in variants}
    times: dict = {v: [] for v in trainers}
    for v, t in trainers.items():  # warm-up step (allocations, one-time init)
        t.train_step()
    for _ in range(args.rounds):
        for v, t in trainers.items():
            for _ in range(args.steps):
                t0 = time.perf_counter()
                t.train_step()
                times[v].append(time.perf_counter() - t0)
    n_params = sum(p.numel() for p in trainers[variants[0]].model.parameters())
    tokens = args.batch * args.context
    flops = 6 * n_params * tokens + 12 * model_cfg.n_layer * model_cfg.d_model * args.context * tokens
    base = {}
    print(f"{'variant':<20} {'median step ms':>14} {'tokens/s':>10} {'MFU':>6} {'vs HF same dtype':>17}")
    for (kind, prec), ts in times.items():
        step = statistics.median(ts)
        tps = tokens / step
        ceiling = bf16_ceiling if prec.startswith("bf16") else fp32_ceiling
        mfu = flops / step / 1e9 / ceiling
        key = "bf16" if prec.startswith("bf16") else "fp32"
        if kind == "hf":
            base[key] = tps
        ratio = f"{tps / base[key]:.2f}x" if key in base and kind != "hf" else ""
        print(f"{kind + ':' + prec:<20} {step * 1000:>14.1f} {tps:>10.0f} {mfu:>6.1%} {ratio:>17}")


if __name__ == "__main__":
    main()
