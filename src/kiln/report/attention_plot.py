"""`kiln viz attention RUN_DIR --text "..."`: a PNG grid of attention maps, layers x heads."""

from __future__ import annotations

from pathlib import Path

import torch

from kiln.report.plots import figure, save_figure


@torch.no_grad()
def attention_maps(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Self-attention weights of every layer for one sequence: a list of [heads, T, T] tensors."""
    stack = model.encoder if getattr(model, "encoder", None) is not None else model.decoder
    layers = [block.attn for block in stack.blocks]
    for attn in layers:
        attn.captured = []
    try:
        if stack is model.decoder:
            model(ids)
        else:
            model.encode(ids)
        return [attn.captured[0][0] for attn in layers]
    finally:
        for attn in layers:
            attn.captured = None


def plot_attention(maps: list[torch.Tensor], tokens: list[str], path: Path, max_heads: int = 16) -> Path:
    n_layers, n_heads = len(maps), min(maps[0].shape[0], max_heads)
    size = 2.2 if len(tokens) > 12 else 1.8
    fig = figure(figsize=(size * n_heads, size * n_layers), dpi=100)
    axes = fig.subplots(n_layers, n_heads, squeeze=False)
    for layer, weights in enumerate(maps):
        for head in range(n_heads):
            ax = axes[layer][head]
            ax.imshow(weights[head].float().numpy(), cmap="viridis", vmin=0.0)
            ax.set_xticks([])
            ax.set_yticks([])
            if layer == 0:
                ax.set_title(f"head {head}", fontsize=8)
            if head == 0:
                ax.set_ylabel(f"layer {layer}", fontsize=8)
    if len(tokens) <= 24 and n_heads:
        ax = axes[-1][0]
        ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=6)
        ax.set_yticks(range(len(tokens)), tokens, fontsize=6)
    fig.suptitle("attention (rows: queries, columns: keys)", fontsize=10)
    return save_figure(fig, path)
