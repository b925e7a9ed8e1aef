"""Build a model from a run folder: the one place that turns a config + a checkpoint into a module.

`build_model(model_cfg, device)` makes the Transformer on the meta device and materialises it without a random
init (the weights are about to be overwritten); `load(run_dir)` does that for a pretraining run (or an imported
Hugging Face model) and loads its weights. Fine-tuned runs are loaded by their task (`kiln.tasks`), which builds
its head on top of `build_model`'s backbone and loads the weights with `load_checkpoint_weights`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kiln.config import RunConfig, load_config
from kiln.errors import KilnError
from kiln.model.config import ModelConfig
from kiln.run.checkpoint import find_checkpoint, load_weights, weights_prefix


def load_run_config(run_dir: str | Path) -> RunConfig:
    """The RunConfig of a pretraining run folder (or of the run that holds a checkpoint folder)."""
    run_dir = Path(run_dir)
    if (run_dir / "model.safetensors").is_file() and not (run_dir / "config.yaml").is_file():
        run_dir = run_dir.parent.parent  # a checkpoint folder inside a run
    cfg_file = run_dir / "config.yaml"
    if not cfg_file.is_file():
        task_file = _whole_lm_config(run_dir)
        if task_file is None:
            raise KilnError(f"{run_dir} is not a kiln run folder (no config.yaml)")
        from kiln.config_loader import read_yaml

        return load_config(None, {"model": read_yaml(task_file).get("model") or {}})
    return load_config(cfg_file)


# fine-tuned runs whose model is a whole language model (no head of a task's own): kiln generate, chat, serve and
# export load them like a pretraining run, from the model section of their own config file
WHOLE_LM_KINDS = ("chat",)


def _whole_lm_config(run_dir: Path) -> Path | None:
    from kiln.run.folder import RUN_JSON, read_run_json

    if not (run_dir / RUN_JSON).is_file():
        return None
    info = read_run_json(run_dir)
    path = run_dir / str(info.get("config", ""))
    return path if info["kind"] in WHOLE_LM_KINDS and path.is_file() else None


def rebuild_buffers(model: torch.nn.Module, cfg: ModelConfig) -> None:
    """Non-persistent buffers are not in the weights file: recompute them after a meta-device build."""
    from kiln.model.transformer import rope_tables, sinusoidal_table

    for stack in [s for s in (model.encoder, model.decoder) if s is not None]:
        if cfg.position == "rope":
            cos, sin = rope_tables(cfg.head_dim, cfg.context_length, cfg)
            stack.rope_cos, stack.rope_sin = cos, sin
        if cfg.position == "sinusoidal":
            stack.embed.sinusoid = sinusoidal_table(cfg.context_length, cfg.d_model, cfg.sinusoid_layout)


def build_model(cfg: ModelConfig, device: str = "cpu") -> torch.nn.Module:
    """An uninitialised Transformer of this shape on `device`, its computed buffers in place."""
    from kiln.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device=device)
    rebuild_buffers(model, cfg)
    return model


def checkpoint_meta(ckpt: Path) -> dict:
    try:
        return json.loads((Path(ckpt) / "meta.json").read_text())
    except (OSError, ValueError):
        return {}


def load_tokenizer_of(root: Path, name: str = "tokenizer.json"):
    f = Path(root) / name
    if not f.is_file():
        return None
    from kiln.data.tokenizer import load_tokenizer

    return load_tokenizer(f)


def load(run_dir: str | Path, which: str = "latest", device: str = "cpu", quantized_ok: bool = True):
    """(model, tokenizer or None, RunConfig) of a pretraining run; `which` is latest, best, or a checkpoint path.
    quantized_ok=False: refuse a `kiln quantize` run (for commands that train or export float weights)."""
    run_dir = Path(run_dir)
    ckpt = find_checkpoint(run_dir, which)
    cfg = load_run_config(run_dir if (run_dir / "config.yaml").is_file() or _whole_lm_config(run_dir) else ckpt)
    model = build_model(cfg.model, device)
    meta = checkpoint_meta(ckpt)
    if meta.get("quantization"):  # a `kiln quantize` run: int8 modules, then its weights
        if not quantized_ok:
            raise KilnError(f"{run_dir} holds {meta['quantization']} weights (kiln quantize): use its source run "
                            f"{meta.get('source', '')} here".rstrip())
        from kiln.model.int8 import quantize_model

        quantize_model(model, calibrate=False)
    load_weights(model, ckpt / "model.safetensors", prefix=weights_prefix(cfg))
    model.eval()
    return model, load_tokenizer_of(ckpt.parent.parent), cfg


def load_for_decoding(run_dir: str | Path, which: str = "latest", device: str = "auto", precision: str = "auto"):
    """(model, tokenizer, RunConfig, device, precision) of a run, set up to generate: a quantized run on the CPU
    (its int8 kernels are CPU kernels), bf16 parameters where the device computes bf16 natively (decoding is
    memory-bound: half the bytes per token; position tables and int8 weights stay as they are)."""
    from kiln.run.device import choose_precision, resolve_device

    if device == "auto" and checkpoint_meta(find_checkpoint(Path(run_dir), which)).get("quantization"):
        device = "cpu"
    device = resolve_device(device, what="device")
    model, tokenizer, cfg = load(run_dir, which, device=device)
    precision = choose_precision(precision, device)[0]
    if precision == "bf16":
        for p in model.parameters():
            if p.is_floating_point():
                p.data = p.data.to(torch.bfloat16)
    return model, tokenizer, cfg, device, precision
