"""PNG plots of a run (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def save_figure(fig, path: Path) -> Path:
    """Write a figure atomically (temp file + rename): a viewer never sees half a PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path


def loss_curve(metrics, path: Path, title: str = "") -> Path:
    """Train and validation loss against steps; written atomically so a viewer never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for key, style in (("loss", dict(alpha=0.6, lw=1)), ("val_loss", dict(marker="o", lw=1.6))):
        xs, ys = metrics.series(key)
        if xs:
            ax.plot(xs, ys, label={"loss": "train", "val_loss": "validation"}[key], **style)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    return save_figure(fig, path)
