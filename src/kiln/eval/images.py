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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kiln.report.plots import save_figure

    y_true, pred = np.asarray(y_true), probs.argmax(1)
    wrong = np.flatnonzero(pred != y_true)
    if not len(wrong):
        return None
    wrong = wrong[np.argsort(-probs[wrong, pred[wrong]], kind="stable")][:limit]
    cols = min(6, len(wrong))
    rows = -(-len(wrong) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols, 2.2 * rows + 0.4), dpi=110, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, wrong):
        img = images[i]
        ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None,
                  vmin=0, vmax=255)
        ax.set_title(f"true: {labels[y_true[i]]}\npred: {labels[pred[i]]} ({probs[i, pred[i]]:.2f})", fontsize=7)
    n_wrong = int((pred != y_true).sum())
    fig.suptitle(f"{title + ': ' if title else ''}{n_wrong} of {len(y_true)} misclassified"
                 + (f" (the {len(wrong)} most confident)" if n_wrong > len(wrong) else ""), fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def report(images: np.ndarray, y_true, probs: np.ndarray, labels: list[str], out_dir: Path, prefix: str,
           extra: dict | None = None) -> dict:
    """Metrics (returned) + <prefix>.json, <prefix>_confusion.png and <prefix>_misclassified.png in out_dir."""
    from kiln.eval.classification import classification_metrics, write_report

    m = classification_metrics(y_true, probs, labels)
    grid = plot_misclassified(images, y_true, probs, labels, Path(out_dir) / f"{prefix}_misclassified.png", prefix)
    write_report(m, y_true, probs, labels, out_dir, prefix, {**(extra or {}),
                                                              "misclassified_png": str(grid) if grid else None})
    return m
