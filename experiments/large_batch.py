"""Feeds docs/large_batch.md, sections 'Large-batch study', '4× the token budget', 'Why, measured: the gradient noise scale'.

Its plots are docs/large_batch.png and docs/large_batch_50m.png (--plot).

Large-batch study: the same small GPT at growing global batches, AdamW vs LAMB, LR scaling rules.

    python experiments/large_batch.py                       # writes docs/large_batch.png and prints a Markdown table
    python experiments/large_batch.py --tokens 4e6 --batches 16384,65536,262144

Global batches are emulated by gradient accumulation on one machine (kiln derives grad_accum from
train.batch_tokens). The baseline (smallest batch, AdamW) trains for --tokens tokens; every other run trains
for up to 1.1x those tokens and records when (tokens, steps) its val loss first reaches the baseline's final
val loss, as in the LAMB paper's BERT study. LR follows the `sqrt` rule from the baseline batch; warmup is a
fixed share of each run's steps.
"""

from __future__ import annotations

import argparse
import csv
import math
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # bench/common.py: machine facts, JSON
from common import machine  # noqa: E402

import matplotlib  # noqa: E402
import torch  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from kiln.config import load_config  # noqa: E402
from kiln.data.prepare import prepare  # noqa: E402
from kiln.train.pretrain import run_pretrain  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def noise_scale(run_dir: Path, ckpt: Path, data: Path, micro_seqs: int, n_micro: int) -> dict:
    """The gradient noise scale B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018, "An Empirical Model of
    Large-Batch Training", appendix A): unbiased estimates of |G|^2 and tr(Sigma) from the gradient norms of
    n_micro micro-batches of micro_seqs windows (B_small tokens each) and of their mean (B_big tokens). The
    critical batch, past which a larger batch buys fewer steps at a growing cost in tokens, is about B_simple."""
    from kiln.api import load
    from kiln.data.shards import TokenShards
    from kiln.data.batches import TokenBatches

    model, _, cfg = load(run_dir, which=str(ckpt))
    model.float()  # eval mode (from load): no dropout noise in the gradients
    context = cfg.model.context_length
    batches = TokenBatches(TokenShards(data, "train"), context, micro_seqs, seed=12345)
    params = [p for p in model.parameters() if p.requires_grad]
    mean = [torch.zeros_like(p) for p in params]
    sq_small = 0.0
    for i in range(n_micro):
        w = batches.batch(i)
        loss = model(w[:, :-1], labels=w[:, 1:]) / w[:, 1:].numel()
        grads = torch.autograd.grad(loss, params)
        sq_small += sum(float(g.pow(2).sum()) for g in grads) / n_micro
        for m, g in zip(mean, grads):
            m.add_(g, alpha=1 / n_micro)
    sq_big = sum(float(m.pow(2).sum()) for m in mean)
    b_small, b_big = micro_seqs * context, n_micro * micro_seqs * context
    g2 = (b_big * sq_big - b_small * sq_small) / (b_big - b_small)
    trace = (sq_small - sq_big) / (1 / b_small - 1 / b_big)
    return {"step": int(ckpt.name.split("_")[-1]), "grad_sq": g2, "trace": trace,
            "b_simple_tokens": trace / g2 if g2 > 0 else float("inf")}


def run(work: Path, data: Path, batch_tokens: int, optimizer: str, tokens: float, args,
        measure_noise: bool = False) -> dict:
    context, micro = 64, args.micro_batch
    steps = max(1, round(tokens / batch_tokens))
    save_every = max(1, steps // 4) if measure_noise else 10**9
    out = work / f"{optimizer}-{batch_tokens}"
    lr = args.lr if optimizer == "adamw" else args.lamb_lr
    cfg = load_config(None, [
        "--data.prepared", str(data), "--out", str(out), "--seed", "1",
        "--model.n_layer", str(args.layers), "--model.n_head", "4", "--model.d_model", str(args.width),
        "--model.context_length", str(context), "--train.optimizer", optimizer,
        "--train.batch_size", str(micro), "--train.batch_tokens", str(batch_tokens),
        "--train.lr", str(lr), "--train.min_lr", str(lr / 10), "--train.lr_scaling", "sqrt",
        "--train.reference_batch_tokens", str(args.base_batch), "--train.weight_decay", "0.01",
        "--train.max_steps", str(steps), "--train.warmup_steps", str(max(1, steps // 10)),
        "--train.eval_every", str(max(1, steps // args.evals)), "--train.eval_batches", "10",
        "--train.save_every", str(save_every), "--train.keep_last", "8", "--train.sample_tokens", "0",
        "--train.tensorboard", "false", "--train.log_every", str(max(1, steps // args.evals))])
    run_pretrain(cfg, quiet=True)
    with open(out / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val_loss")]
    curve = [(int(r["step"]), int(r["step"]) * batch_tokens, float(r["val_loss"])) for r in rows]
    noise = []
    if measure_noise:
        for ckpt in sorted((out / "checkpoints").glob("step_*")):
            n = noise_scale(out, ckpt, data, args.noise_micro, args.noise_batches)
            n["val_loss"] = next((v for s, _, v in curve if s == n["step"]), None)  # None between evals
            noise.append(n)
            print(f"  noise scale at step {n['step']} (val {n['val_loss']}): B_simple = "
                  f"{n['b_simple_tokens']:,.0f} tokens", flush=True)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)  # a later run with the same batch must not append to these metrics
    return {"optimizer": optimizer, "batch_tokens": batch_tokens, "steps": steps, "curve": curve, "noise": noise}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=float, default=6e6, help="baseline token budget")
    ap.add_argument("--base-batch", type=int, default=16384)
    ap.add_argument("--batches", default="16384,65536,262144")
    ap.add_argument("--optimizers", default="adamw,lamb")
    ap.add_argument("--runs", default="", help="explicit optimizer:batch pairs instead of optimizers x batches")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--lamb-lr", type=float, default=2e-3)
    ap.add_argument("--micro-batch", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--evals", type=int, default=8)
    ap.add_argument("--noise-batches", type=int, default=0, help="measure the gradient noise scale of the "
                    "baseline at 4 points, from this many micro-batches (0 = off; 64 is a good start)")
    ap.add_argument("--noise-micro", type=int, default=16, help="sequences per micro-batch for the noise scale")
    ap.add_argument("--plot", type=Path, default=ROOT / "docs" / "large_batch.png")
    args = ap.parse_args()
    print(f"# {machine()}")
    work = Path(tempfile.mkdtemp(prefix="kiln-lb-"))
    data = work / "data"
    prepare(load_config(None).data, data, log=lambda s: None)
    results = []
    pairs = [(o, int(b)) for o in args.optimizers.split(",") for b in args.batches.split(",")]
    if args.runs:  # explicit optimizer:batch pairs, e.g. adamw:16384,lamb:262144
        pairs = [(r.split(":")[0], int(r.split(":")[1])) for r in args.runs.split(",")]
    for optimizer, batch in pairs:
        is_base = batch == args.base_batch and optimizer == "adamw"
        budget = args.tokens if is_base else 1.1 * args.tokens
        results.append(run(work, data, batch, optimizer, budget, args, is_base and args.noise_batches > 0))
        r = results[-1]
        print(f"{optimizer} batch {batch}: final val {r['curve'][-1][2]:.4f} after {r['steps']} steps", flush=True)
    base = next(r for r in results if r["optimizer"] == "adamw" and r["batch_tokens"] == args.base_batch)
    target = base["curve"][-1][2]
    if base["noise"]:
        print("\n| baseline step | tokens | val loss | gradient noise scale B_simple (tokens) |\n|---|---|---|---|")
        for n in base["noise"]:
            shown = "–" if n["val_loss"] is None else f"{n['val_loss']:.4f}"
            print(f"| {n['step']} | {n['step'] * args.base_batch / 1e6:.1f}M | {shown} | {n['b_simple_tokens']:,.0f} |")
    print(f"\nbaseline: AdamW, batch {args.base_batch} tokens, {base['steps']} steps, {args.tokens:.3g} tokens: "
          f"val {target:.4f}\n")
    print("| optimizer | global batch (tokens) | × baseline | steps run | first eval ≤ baseline val: steps, tokens (× baseline) | final val |")
    print("|---|---|---|---|---|---|")
    for r in results:
        hit = next(((s, t) for s, t, v in r["curve"] if v <= target + 1e-9), None)
        reached = f"{hit[0]}, {hit[1] / 1e6:.2f}M ({hit[1] / args.tokens:.2f}×)" if hit else "not reached"
        print(f"| {r['optimizer']} | {r['batch_tokens']:,} | {r['batch_tokens'] // args.base_batch} | {r['steps']} | "
              f"{reached} | {r['curve'][-1][2]:.4f} |")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    for r in results:
        label = f"{r['optimizer']} {r['batch_tokens'] // 1024}k"
        style = "-" if r["optimizer"] == "lamb" else "--"
        axes[0].plot([c[0] for c in r["curve"]], [c[2] for c in r["curve"]], style, marker=".", label=label)
        axes[1].plot([c[1] / 1e6 for c in r["curve"]], [c[2] for c in r["curve"]], style, marker=".", label=label)
    for ax, xlabel in zip(axes, ("optimizer steps", "tokens (millions)")):
        ax.axhline(target, color="gray", lw=0.8, ls=":")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("val loss")
        ax.grid(alpha=0.3)
    axes[0].set_xscale("log")
    axes[1].legend(fontsize=7)
    fig.suptitle("large-batch study: tiny Shakespeare, char GPT (sqrt LR scaling)")
    fig.tight_layout()
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot)
    print(f"\nplot: {args.plot}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
