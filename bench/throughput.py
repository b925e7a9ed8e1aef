"""Training throughput, kiln vs Hugging Face GPT2LMHeadModel, same config, same data, same loop, one run.

    python bench/throughput.py --preset gpt2 --batch 4 --context 256      # the 124M comparison
    python bench/throughput.py --preset gpt-baby --batch 12 --context 64  # nanoGPT's CPU "baby" config
    python bench/throughput.py --device cuda --batch 12 --context 1024 \
        --variants hf:bf16,kiln:bf16,hf:bf16+compile,kiln:bf16+compile      # nanoGPT's bench.py config on a GPU

A variant is KIND:PRECISION[+compile], KIND hf or kiln, PRECISION fp32, bf16 (autocast) or bf16-weights (kiln's
bf16 copy of the weights, fp32 master weights in the optimizer).

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
from kiln.run.device import cpu_bf16_flags, matmul_speed  # noqa: E402
from kiln.train.trainer import Trainer  # noqa: E402


def hf_gpt2(cfg):
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_cfg = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.context_length, n_embd=cfg.d_model,
                        n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=0, eos_token_id=0)
    return HFCausalLM(GPT2LMHeadModel(hf_cfg))


def make_trainer(kind: str, precision: str, model_cfg, batch: int, context: int, steps: int, device: str):
    torch.manual_seed(0)
    precision, _, extra = precision.partition("+")
    bf16_weights = precision == "bf16-weights"
    prec = "bf16" if precision.startswith("bf16") else "fp32"
    cfg = load_config(None, {"train": {"batch_size": batch, "lr": 1e-3, "warmup_steps": 10, "max_steps": steps,
                                       "optimizer": "adamw",  # the reference loop: AdamW, as in HF and nanoGPT
                                       "bf16_weights": bf16_weights, "tensorboard": False,
                                       "compile": extra == "compile"}})
    model = (Transformer(model_cfg) if kind == "kiln" else hf_gpt2(model_cfg)).to(device)
    data = torch.randint(0, model_cfg.vocab_size, (16, batch, context + 1))
    return Trainer(model, CausalLM(), cfg.train, Path("/tmp/kiln-bench"), lambda i: data[i % len(data)],
                   device=device, precision=prec, log=lambda s: None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="gpt2")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per variant per round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=0)
    ap.add_argument("--variants", default="", help="comma list like kiln:fp32,hf:bf16,kiln:bf16+compile "
                                                   "(default: all supported precisions, eager)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / (Path(__file__).stem + ".json")), help="raw results written here")
    ap.add_argument("--peak-tflops", type=float, default=0.0,
                    help="datasheet bf16 peak of the device: also print MFU against it, as nanoGPT does (312 on A100)")
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    model_cfg = preset(args.preset, context_length=args.context, **({"vocab_size": args.vocab} if args.vocab else {}))
    model_cfg.resolve()
    bf16_native = torch.cuda.is_bf16_supported() if cuda else bool(cpu_bf16_flags())
    n = 8192 if cuda else 1024
    fp32_ceiling = matmul_speed(torch.float32, n=n, seconds=0.5, device=args.device)
    bf16_ceiling = matmul_speed(torch.bfloat16, n=n, seconds=0.5, device=args.device)
    variants = [tuple(v.split(":")) for v in args.variants.split(",")] if args.variants else (
        [("hf", "fp32"), ("kiln", "fp32")] +
        ([("hf", "bf16"), ("kiln", "bf16"), ("kiln", "bf16-weights")] if bf16_native else []))
    print(f"# {machine()}" + (f"; GPU {torch.cuda.get_device_name()}" if cuda else ""))
    print(f"# model {args.preset}: d_model {model_cfg.d_model}, layers {model_cfg.n_layer}, vocab "
          f"{model_cfg.vocab_size}; batch {args.batch} x {args.context}; matmul ceiling fp32 {fp32_ceiling:.0f} "
          f"GFLOP/s, bf16 {bf16_ceiling:.0f} GFLOP/s")
    trainers = {}
    for k, p in variants:  # build and warm up (allocations, one-time init, compilation); a failure drops the variant
        try:
            t = make_trainer(k, p, model_cfg, args.batch, args.context, args.steps * args.rounds + 3, args.device)
            for _ in range(2):
                t.train_step()
            trainers[(k, p)] = t
        except Exception as e:  # noqa: BLE001 - report and go on with the other variants
            print(f"{k}:{p} FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    times: dict = {v: [] for v in trainers}
    losses: dict = {v: [] for v in trainers}  # printed: a variant whose loss does not fall is not training
    # train_step returns float(loss): each step ends with the device synchronised, so wall time is step time
    for _ in range(args.rounds):
        for v, t in trainers.items():
            for _ in range(args.steps):
                t0 = time.perf_counter()
                loss, _ = t.train_step()
                times[v].append(time.perf_counter() - t0)
                losses[v].append(loss)
    if not trainers:
        raise SystemExit("no variant ran")
    n_params = sum(p.numel() for p in next(iter(trainers.values())).model.parameters())
    tokens = args.batch * args.context
    flops = 6 * n_params * tokens + 12 * model_cfg.n_layer * model_cfg.d_model * args.context * tokens
    base = {}
    peak = f" {'MFU@peak':>8}" if args.peak_tflops else ""
    print(f"{'variant':<24} {'median step ms':>14} {'tokens/s':>10} {'MFU':>6}{peak} {'vs HF same setting':>18}  loss")
    rows = []
    for (kind, prec), ts in times.items():
        step = statistics.median(ts)
        tps = tokens / step
        ceiling = bf16_ceiling if prec.startswith("bf16") else fp32_ceiling
        mfu = flops / step / 1e9 / ceiling
        at_peak = f" {flops / step / 1e12 / args.peak_tflops:>8.1%}" if args.peak_tflops else ""
        key = ("bf16" if prec.startswith("bf16") else "fp32") + ("+compile" if prec.endswith("+compile") else "")
        if kind == "hf":
            base[key] = tps
        ratio = f"{tps / base[key]:.2f}x" if key in base and kind != "hf" else ""
        ls = losses[(kind, prec)]
        print(f"{kind + ':' + prec:<24} {step * 1000:>14.1f} {tps:>10.0f} {mfu:>6.1%}{at_peak} {ratio:>18}  "
              f"{ls[0]:.3f} -> {ls[-1]:.3f}")
        rows.append({"variant": f"{kind}:{prec}", "loop": "kiln Trainer.train_step (fused AdamW, clip 1.0)",
                     "median_step_s": step, "tokens_per_s": tps, "mfu": mfu, "vs_hf_same_setting": ratio,
                     "step_s": ts, "loss_first_last": [ls[0], ls[-1]]})
    from common import emit_json

    emit_json({"bench": "throughput", "machine": machine(), "command": " ".join(sys.argv), "preset": args.preset,
               "batch": args.batch, "context": args.context, "fp32_ceiling_gflops": fp32_ceiling,
               "bf16_ceiling_gflops": bf16_ceiling, "flops_per_step": flops, "rows": rows}, args.json, echo=False)


if __name__ == "__main__":
    main()
