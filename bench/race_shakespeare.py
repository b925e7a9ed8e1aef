"""Time-to-quality race on tiny Shakespeare (char level), in one run, with one loop: the like-for-like race.
(bench/race_nanogpt.py is the product-vs-product one: `make demo`'s command against nanoGPT's own train.py.)

(a) kiln's default recipe: configs/shakespeare-char.yaml, exactly as `make demo` runs it.
(b) Hugging Face GPT2LMHeadModel with nanoGPT's CPU "baby" recipe: 4 layers, 4 heads, d_model 128,
    context 64, batch 12, lr 1e-3 warmup 100 cosine to 1e-4, AdamW beta2 0.99, dropout 0, 2000 steps, in the
    precision kiln's `auto` picks on this machine (the same for all three).
(c) kiln's model at (b)'s exact config and precision choice, for the per-step throughput ratio.

All use the same prepared 90/10 split, the same sampler and kiln's Trainer; wall time counts everything
after the data is ready (model build, every eval). Val loss = mean over the same fixed 240 windows.

    python bench/race_shakespeare.py [--target 1.88] [--skip-hf]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import HFCausalLM, machine  # noqa: E402

from kiln.config import load_config  # noqa: E402
from kiln.data.prepare import prepare  # noqa: E402
from kiln.data.shards import TokenShards  # noqa: E402
from kiln.model.transformer import Transformer  # noqa: E402
from kiln.data.batches import TokenBatches, eval_windows  # noqa: E402
from kiln.train.objectives import CausalLM, evaluate_lm  # noqa: E402
from kiln.run.device import choose_precision  # noqa: E402
from kiln.train.trainer import Trainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BABY = ["--model.n_layer", "4", "--model.n_head", "4", "--model.d_model", "128", "--model.context_length", "64",
        "--train.batch_size", "12", "--train.lr", "1e-3", "--train.min_lr", "1e-4", "--train.warmup_steps", "100",
        "--train.beta2", "0.99", "--train.max_steps", "2000", "--train.optimizer", "adamw",
        "--model.dropout", "0.0", "--train.weight_decay", "0.1", "--train.grad_clip", "1.0"]


def run(label: str, cfg, data_dir: Path, out: Path, hf: bool, target: float, eval_every: int) -> dict:
    cfg.train.eval_every = eval_every
    cfg.train.target_loss = target
    cfg.train.save_every = 10**9
    cfg.train.tensorboard = False
    train, val = TokenShards(data_dir, "train"), TokenShards(data_dir, "val")
    cfg.model.vocab_size = 65
    cfg.model.resolve()
    precision = choose_precision(cfg.train.precision, "cpu")[0]  # like for like: HF runs in kiln's precision too
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    if hf:
        from transformers import GPT2Config, GPT2LMHeadModel

        m = cfg.model
        model = HFCausalLM(GPT2LMHeadModel(GPT2Config(
            vocab_size=65, n_positions=m.context_length, n_embd=m.d_model, n_layer=m.n_layer, n_head=m.n_head,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)))
    else:
        model = Transformer(cfg.model)
    T, B = cfg.model.context_length, cfg.train.batch_size
    batches = TokenBatches(train, T, B, cfg.seed)
    objective = CausalLM()
    val_windows = [b for b in eval_windows(val, 64, 12, 20)]  # identical 240 windows of 64 for every entrant

    def evaluate(m):
        return evaluate_lm(m, objective, lambda: iter(val_windows))

    shutil.rmtree(out, ignore_errors=True)
    trainer = Trainer(model, objective, cfg.train, out, batches.batch, evaluate=evaluate, precision=precision,
                      log=lambda s: None)
    curve = []
    trainer.on_eval = lambda step, metrics: curve.append((step, round(time.perf_counter() - t0, 2),
                                                          round(metrics["val_loss"], 4)))
    result = trainer.fit()
    wall = time.perf_counter() - t0
    reached = next((t for s, t, v in curve if v <= target), None)
    import csv
    import statistics

    with open(out / "metrics.csv") as f:  # training throughput only: eval time excluded by the loop
        tps = [float(r["tokens_per_second"]) for r in csv.DictReader(f) if r.get("tokens_per_second")]
    tokens_per_second = statistics.median(tps[1:] or tps)
    row = {"entrant": label, "precision": precision, "steps": result["step"], "wall_s": round(wall, 1),
           "time_to_target_s": reached, "final_val": curve[-1][2] if curve else None,
           "tokens_per_s": round(tokens_per_second), "curve": curve}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", type=float, default=1.88)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--throughput-steps", type=int, default=300, help="steps of (c) at (b)'s config")
    args = ap.parse_args()
    print(f"# {machine()}")
    work = Path(tempfile.mkdtemp(prefix="kiln-race-"))
    default = load_config(ROOT / "configs" / "shakespeare-char.yaml")
    prepare(default.data, work / "data", seed=default.seed, log=lambda s: None)
    rows = [run("kiln default recipe", default, work / "data", work / "a", False, args.target, args.eval_every)]
    if not args.skip_hf:
        rows.append(run("HF GPT2LMHeadModel, nanoGPT baby recipe", load_config(None, BABY), work / "data",
                        work / "b", True, args.target, args.eval_every))
    baby = load_config(None, BABY + ["--train.max_steps", str(args.throughput_steps)])
    rows.append(run("kiln at (b)'s exact config", baby, work / "data", work / "c", False, 0.0, 10**9))
    if not args.skip_hf:
        a, b, c = rows
        if a["time_to_target_s"] and b["time_to_target_s"]:
            print(f"time to val <= {args.target}: kiln {a['time_to_target_s']}s vs HF {b['time_to_target_s']}s "
                  f"= {a['time_to_target_s'] / b['time_to_target_s']:.2f}x (target <= 0.35x)")
        print(f"tokens/s at (b)'s config: kiln {c['tokens_per_s']} vs HF {b['tokens_per_s']} = "
              f"{c['tokens_per_s'] / b['tokens_per_s']:.2f}x (target >= 1.7x)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
