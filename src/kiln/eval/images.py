"""Scoring an image classifier: class probabilities in fixed batches, the classification report
(kiln.eval.classification: accuracy, per-class P/R/F1, confusion matrix PNG) and a PNG grid of misclassified
examples with their true and predicted labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from kiln.data.images import to_tensor


@torch.no_grad()
def predict_probs(model, images: np.ndarray, mean, std, batch_size: int = 256, device: str = "cpu") -> np.ndarray:
    """Softmax probabilities [N, n_classes] (fp32) of uint8 [N, H, W, C] images."""
    was_training = model.training
    model.eval()
    out = []
    for s in range(0, len(images), batch_size):
        x = to_tensor(images[s:s + batch_size], mean, std).to(device)
        out.append(model(x).float().softmax(-1).cpu())
    if was_training:
        model.train()
    return torch.cat(out).numpy() if out else np.zeros((0, 0), dtype=np.float32)


def plot_misclassified(images: np.ndarray, y_true, probs: np.ndarray, labels: list[str], path: Path,
                       title: str = "", limit: int = 36) -> Path | None:
    """A grid of up to `limit` misclassified images (the most confident mistakes first), each titled with its
    true and predicted label and the predicted probability. None when nothing is misclassified."""
    from kiln.report.plots import figure, save_figure

    y_true, pred = np.asarray(y_true), probs.argmax(1)
    wrong = np.flatnonzero(pred != y_true)
    if not len(wrong):
        return None
    wrong = wrong[np.argsort(-probs[wrong, pred[wrong]], kind="stable")][:limit]
    cols = min(6, len(wrong))
    rows = -(-len(wrong) // cols)
    # one axes, an image and a title per cell (cell = 1.9 x 2.2 inches, as a grid of subplots had): 36 subplots
    # cost ~3 s to lay out and draw, this ~0.3 s
    fig = figure(figsize=(1.9 * cols, 2.2 * rows + 0.4), dpi=110)
    ax = fig.add_axes((0, 0, 1, 2.2 * rows / (2.2 * rows + 0.4)))
    cell_h = 2.2 / 1.9  # in cell widths
    for k, i in enumerate(wrong):
        x0, top = k % cols, (k // cols) * cell_h
        img = images[i]
        ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None,
                  vmin=0, vmax=255, extent=(x0 + 0.08, x0 + 0.92, top + cell_h - 0.04, top + cell_h - 0.88),
                  interpolation="nearest")
        ax.text(x0 + 0.5, top + cell_h - 0.91, f"true: {labels[y_true[i]]}\npred: {labels[pred[i]]} "
                f"({probs[i, pred[i]]:.2f})", fontsize=7, ha="center", va="bottom")
    ax.set_xlim(0, cols)
    ax.set_ylim(rows * cell_h, 0)
    ax.set_aspect("equal")
    ax.axis("off")
    n_wrong = int((pred != y_true).sum())
    fig.suptitle(f"{title + ': ' if title else ''}{n_wrong} of {len(y_true)} misclassified"
                 + (f" (the {len(wrong)} most confident)" if n_wrong > len(wrong) else ""), fontsize=9)
    return save_figure(fig, path, tight=False)


def report(images: np.ndarray, y_true, probs: np.ndarray, labels: list[str], out_dir: Path, prefix: str,
           extra: dict | None = None) -> dict:
    """Metrics (returned) + <prefix>.json, <prefix>_confusion.png and <prefix>_misclassified.png in out_dir."""
    from kiln.eval.classification import classification_metrics, write_report

    m = classification_metrics(y_true, probs, labels)
    grid = plot_misclassified(images, y_true, probs, labels, Path(out_dir) / f"{prefix}_misclassified.png", prefix)
    write_report(m, y_true, probs, labels, out_dir, prefix, {**(extra or {}),
                                                              "misclassified_png": str(grid) if grid else None})
    return m
