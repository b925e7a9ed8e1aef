"""`kiln viz attention`: a run's attention maps for a text, drawn by kiln.report.attention_plot."""

from __future__ import annotations

from pathlib import Path

import torch

from kiln.data.tokenizer import encode_text
from kiln.errors import KilnError
from kiln.report.attention_plot import attention_maps, plot_attention
from kiln.run.load import load


def viz_attention(run_dir: str | Path, text: str, out: str | Path | None = None) -> Path:
    """`kiln viz attention`: a PNG grid (layers x heads) of a pretraining run's attention maps for `text`."""
    model, tokenizer, cfg = load(run_dir)
    if tokenizer is None:
        raise KilnError(f"{run_dir}: no tokenizer.json; cannot encode --text")
    encode_text(tokenizer, text, "--text")  # a character a char vocabulary lacks: one line naming it
    enc = tokenizer.encode(text)
    ids = enc.ids[: cfg.model.context_length]
    if not ids:
        raise KilnError("--text encodes to no tokens")
    maps = attention_maps(model, torch.tensor([ids]))
    path = Path(out) if out else Path(run_dir) / "plots" / "attention.png"
    return plot_attention(maps, enc.tokens[: len(ids)], path)
