"""Structured pruning of feed-forward neurons: a smaller *dense* model (fewer bytes, fewer FLOPs).

Every feed-forward block keeps the same number of hidden neurons (so one `model.d_ff` describes the result):
the ones with the largest importance |w_in| * |w_out|, the norm of the neuron's input row(s) (gate and up for
SwiGLU) times the norm of its output column. Unstructured sparsity would leave the matrices the same size on a
CPU; removing whole neurons shrinks them. Pruning costs accuracy; recover it with a short distillation from
the original: `kiln distill ORIGINAL --init PRUNED` (the student starts from the pruned weights and shape).

Whole blocks can go too (`keep_blocks`): `kiln finetune classify --keep_layers 0,2,4 --distill.teacher RUN`
fine-tunes a shallower student initialised from every other layer, distilled from a fine-tuned teacher.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from kiln.errors import KilnError
from kiln.model.transformer import FeedForward


def _rows(linear: nn.Linear, idx: torch.Tensor) -> nn.Linear:
    new = nn.Linear(linear.in_features, len(idx), bias=linear.bias is not None)
    new.weight.data = linear.weight.data[idx].clone()
    if linear.bias is not None:
        new.bias.data = linear.bias.data[idx].clone()
    return new


def _cols(linear: nn.Linear, idx: torch.Tensor) -> nn.Linear:
    new = nn.Linear(len(idx), linear.out_features, bias=linear.bias is not None)
    new.weight.data = linear.weight.data[:, idx].clone()
    if linear.bias is not None:
        new.bias.data = linear.bias.data.clone()
    return new


@torch.no_grad()
def prune_ffn(model: nn.Module, keep: float, multiple: int = 8) -> int:
    """Keep the `keep` share of each feed-forward block's neurons, in place; returns the new d_ff."""
    if not 0.0 < keep <= 1.0:
        raise KilnError(f"--ffn-keep must be in (0, 1], got {keep}")
    d_ff = model.config.d_ff
    k = max(1, round(keep * d_ff))
    if k >= multiple:
        k = max(multiple, k // multiple * multiple)  # matmul-friendly widths
    for ff in [m for m in model.modules() if isinstance(m, FeedForward)]:
        w_in = ff.up_proj.weight
        w_out = ff.down_proj.weight.norm(dim=0)
        if ff.gated:
            gate, up = w_in.chunk(2, dim=0)
            score = gate.norm(dim=1) * up.norm(dim=1) * w_out
        else:
            score = w_in.norm(dim=1) * w_out
        idx = score.topk(k).indices.sort().values
        rows = torch.cat([idx, idx + d_ff]) if ff.gated else idx
        ff.up_proj, ff.down_proj = _rows(ff.up_proj, rows), _cols(ff.down_proj, idx)
    model.config.d_ff = k
    return k


def prune_run(run_dir, out_dir, ffn_keep: float, which: str = "latest", log=print) -> dict:
    """Prune a kiln run into a new run folder (config with the new d_ff, same tokenizer and data) and report."""
    import copy
    import shutil
    from pathlib import Path

    from kiln.compress.report import compare, new_run_folder, source_checkpoint
    from kiln.config import dump_yaml
    from kiln.run.checkpoint import save_checkpoint

    ckpt, meta, model, cfg = source_checkpoint(run_dir, out_dir, which)
    if meta.get("quantization"):
        raise KilnError(f"{ckpt} is quantized: prune its source run {meta.get('source', '')}".rstrip())
    pruned = copy.deepcopy(model)
    old = cfg.model.d_ff
    new = prune_ffn(pruned, ffn_keep)
    out_dir = new_run_folder(out_dir, "pruned")
    run_dir = Path(run_dir)
    out_cfg = copy.deepcopy(cfg)
    out_cfg.model.d_ff, out_cfg.name, out_cfg.out = new, f"{cfg.name}-pruned", str(out_dir)
    if not out_cfg.data.prepared and (run_dir / "data" / "manifest.json").is_file():
        out_cfg.data.prepared = str((run_dir / "data").resolve())  # the pruned run trains on the same shards
    (out_dir / "config.yaml").write_text(dump_yaml(out_cfg))
    if (run_dir / "tokenizer.json").is_file():
        shutil.copyfile(run_dir / "tokenizer.json", out_dir / "tokenizer.json")
    saved = save_checkpoint(out_dir, pruned, int(meta.get("step", 0)),
                            meta={"pruning": f"ffn {old} -> {new}", "source": str(ckpt)})
    return compare(f"pruned {ckpt} -> {out_dir} (feed-forward {old} -> {new} neurons per block)",
                   {"method": f"ffn-structured keep {ffn_keep}", "source": str(ckpt), "d_ff": [old, new]}, cfg,
                   run_dir, model, pruned, ckpt, saved, out_dir, log)


def parse_layers(spec: str) -> list[int]:
    """'0,2,4' -> [0, 2, 4] (sorted, unique); a one-line error naming keep_layers otherwise."""
    try:
        layers = sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError:
        raise KilnError(f"keep_layers must be block numbers like 0,2,4, got {spec!r}") from None
    if not layers or layers[0] < 0:
        raise KilnError(f"keep_layers must name blocks 0, 1, ... (like 0,2,4), got {spec!r}")
    return layers


def keep_blocks(model: nn.Module, layers: list[int]) -> nn.Module:
    """Keep only these blocks of a decoder or encoder model, in place (a shallower student initialised from the
    teacher's layers, as DistilBERT); model.config.n_layer follows. Returns the model."""
    if model.config.arch == "encoder-decoder":
        raise KilnError("keep_layers works on decoder or encoder backbones, not encoder-decoder ones")
    stack, n = model.decoder, model.config.n_layer
    if layers[-1] >= n:
        raise KilnError(f"keep_layers {','.join(map(str, layers))}: the backbone has blocks 0..{n - 1}")
    stack.blocks = nn.ModuleList(stack.blocks[i] for i in layers)
    model.config.n_layer = len(layers)
    return model
