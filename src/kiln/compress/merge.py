"""`kiln merge RUN --out OUT`: a LoRA run's adapters folded into its frozen base -> a run folder with full weights.

    W' = W + B @ A * alpha / rank      for every adapted layer (int8 base weights are dequantized first)

The new folder is the same kind of run (pretrain, classify, ...) with the same config (train.lora.rank 0), tokenizer
and task files; it holds one checkpoint, `best` and `latest`, and loads, evaluates, exports and serves like any
run. Kind-agnostic: it works on state dicts (kiln.run.checkpoint reads the adapters and the base, kiln.model.lora
merges them), never on a task's model class.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from kiln.config_loader import read_yaml
from kiln.errors import KilnError
from kiln.model.lora import merge_state
from kiln.run.checkpoint import atomic_write_text, find_checkpoint, read_lora_checkpoint, read_meta, save_checkpoint
from kiln.run.folder import RUN_JSON, read_run_json


def merge_run(run_dir: str | Path, out: str | Path, which: str = "best", log=print) -> Path:
    """Write `out`: the run's files (config, run.json, tokenizer, labels, data report, metrics) and one checkpoint
    of merged full weights. `which`: best (the newest when the run has no best), latest, or a checkpoint folder."""
    run_dir, out = Path(run_dir), Path(out)
    info = read_run_json(run_dir)
    ckpt = find_checkpoint(run_dir, which)
    spec, base, trained = read_lora_checkpoint(ckpt)
    if out.exists() and any(out.iterdir()):
        raise KilnError(f"{out} already exists and is not empty; pick another --out")
    merged = merge_state({**base, **trained}, spec)
    out.mkdir(parents=True, exist_ok=True)
    for f in sorted(run_dir.iterdir()):
        if f.is_file() and not f.name.startswith("."):  # files only: not checkpoints/, lora/, eval/, base/
            shutil.copyfile(f, out / f.name)
    config = info.get("config", "config.yaml")
    if (run_dir / config).is_file():  # the same recipe, adapters off: re-running it fine-tunes in full
        values = read_yaml(run_dir / config)
        values.setdefault("train", {}).setdefault("lora", {})["rank"] = 0
        values["out"] = str(out)
        atomic_write_text(out / config, yaml_text(values))
    run_info = {**info, "merged_from": str(ckpt.resolve()), "lora": json.loads(spec.to_json())}
    atomic_write_text(out / RUN_JSON, json.dumps(run_info, indent=2) + "\n")
    meta = read_meta(ckpt)
    step = int(meta.get("step", 0))
    keep = {k: meta[k] for k in ("tokens", "val_loss", "best_val_loss") if k in meta}
    save_checkpoint(out, torch.nn.Module(), step, None, {**keep, "merged_from": str(ckpt.resolve()),
                    "lora": json.loads(spec.to_json())}, keep_last=1, is_best=True, weights=merged)
    n_adapters = sum(1 for k in trained if k.endswith(".lora_A"))
    log(f"merged {n_adapters} adapters (rank {spec.rank}, alpha {spec.alpha:g}) of {ckpt} into {out}: "
        f"{sum(t.numel() for t in merged.values()):,} parameters")
    return out


def yaml_text(values: dict) -> str:
    import yaml

    return yaml.safe_dump(values, sort_keys=False)
