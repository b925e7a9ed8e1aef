"""What a compression step costs and buys: size, validation loss and decoding speed, before and after.

Shared by `kiln quantize` and `kiln prune`: both write a new run folder and `compress.json` beside it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from kiln.errors import KilnError


def source_checkpoint(run_dir, out_dir, which: str):
    """(checkpoint folder, its meta.json, float model, run config) of the run to compress."""
    from kiln.run.load import load
    from kiln.run.checkpoint import find_checkpoint

    from kiln.run.folder import holds_run

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if holds_run(out_dir):
        raise KilnError(f"{out_dir} already holds checkpoints; choose another --out")
    ckpt = find_checkpoint(run_dir, which)
    meta = json.loads((ckpt / "meta.json").read_text())
    model, _, cfg = load(run_dir, which)
    return ckpt, meta, model, cfg


def new_run_folder(out_dir, how: str) -> Path:
    """The compressed run's folder, created and locked like every run; run.json says how it was made."""
    from kiln.run.folder import create_run, write_run_json

    out_dir = Path(out_dir)
    create_run(out_dir, "pretrain")
    write_run_json(out_dir, "pretrain", "config.yaml", compressed=how)
    return out_dir


def _val_data(cfg, run_dir: Path) -> Path:
    return Path(cfg.data.prepared) if cfg.data.prepared else Path(run_dir) / "data"


def compare(title: str, report: dict, cfg, run_dir, before, after, ckpt_before: Path, ckpt_after: Path,
            out_dir: Path, log=print, eval_batches: int = 20, decode_tokens: int = 64) -> dict:
    """Measure both models, print the table, write out_dir/compress.json; return the report."""
    report = {**report, "out": str(out_dir),
              "size_mb": {k: round((Path(c) / "model.safetensors").stat().st_size / 1e6, 2)
                          for k, c in (("before", ckpt_before), ("after", ckpt_after))},
              "parameters": {k: sum(p.numel() for p in m.parameters()) for k, m in (("before", before), ("after", after))}}
    data = _val_data(cfg, run_dir)
    prompt = torch.zeros(1, 8, dtype=torch.long)
    report["val_loss"] = None  # encoders / seq2seq: evaluate the new run with their task command
    if cfg.model.arch == "decoder" and cfg.objective == "clm" and (data / "manifest.json").is_file():
        from kiln.data.shards import TokenShards
        from kiln.data.batches import eval_windows
        from kiln.train.objectives import CausalLM, evaluate_lm

        val = TokenShards(data, "val")
        T, B = cfg.model.context_length, cfg.train.batch_size
        with torch.no_grad():
            report["val_loss"] = {
                k: round(evaluate_lm(m, CausalLM(), lambda: eval_windows(val, T, B, eval_batches))["val_loss"], 4)
                for k, m in (("before", before), ("after", after))}
        prompt = torch.from_numpy(val.read(0, 8).astype("int64"))[None]
    if cfg.model.arch == "decoder":
        speed = {}
        for k, m in (("before", before), ("after", after)):
            m.generate(prompt, 4, greedy=True)  # warm-up (and weight packing)
            t0 = time.perf_counter()
            m.generate(prompt, decode_tokens, greedy=True)
            speed[k] = round(decode_tokens / (time.perf_counter() - t0), 1)
        report["decode_tokens_per_s"] = speed
    (Path(out_dir) / "compress.json").write_text(json.dumps(report, indent=2))
    s, n = report["size_mb"], report["parameters"]
    log(title)
    log(f"  parameters     {n['before'] / 1e6:9.2f} M  -> {n['after'] / 1e6:9.2f} M")
    log(f"  weights file   {s['before']:9.2f} MB -> {s['after']:9.2f} MB  ({s['before'] / s['after']:.2f}x smaller)")
    if report["val_loss"]:
        v = report["val_loss"]
        log(f"  val loss       {v['before']:9.4f}    -> {v['after']:9.4f}     ({v['after'] - v['before']:+.4f})")
    if "decode_tokens_per_s" in report:
        d = report["decode_tokens_per_s"]
        log(f"  greedy decode  {d['before']:9.1f}/s   -> {d['after']:9.1f}/s    ({d['after'] / d['before']:.2f}x, fp32 "
            f"activations, batch 1, {decode_tokens} tokens)")
    return report
