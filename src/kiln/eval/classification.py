"""Classification metrics (scikit-learn) and their plots.

    m = classification_metrics(y_true, probs, labels)   # ids, [N, K] probabilities, label names
    print(metrics_table(m)); write_report(m, y_true, probs, labels, out_dir, prefix="test")

Metrics: accuracy, per-class precision/recall/F1/support, macro/micro/weighted averages, the confusion matrix
(rows = true, columns = predicted) and the log loss; for a binary task also ROC-AUC and average precision
of the positive class (plots: confusion matrix, ROC curve, precision-recall curve).

Multi-label (`multilabel_metrics`: multi-hot [N, K] truth, [N, K] sigmoid probabilities, a threshold per label):
per-label precision/recall/F1/support/threshold/ROC-AUC/average precision, macro/micro/weighted/samples
averages, subset accuracy ("accuracy": the whole label set right), Hamming loss and the mean binary log loss.
Regression metrics are in kiln.eval.regression.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np


def classification_metrics(y_true, probs, labels: list[str], positive: int | None = None) -> dict:
    from sklearn.metrics import (accuracy_score, average_precision_score, confusion_matrix, log_loss,
                                 precision_recall_fscore_support, roc_auc_score)

    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    probs = probs / probs.sum(1, keepdims=True)  # float32 softmax rows sum to 1 only within ~1e-7
    y_pred = probs.argmax(1)
    ids = list(range(len(labels)))
    out: dict = {"n": int(len(y_true)), "accuracy": float(accuracy_score(y_true, y_pred))}
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=ids, zero_division=0)
    out["per_class"] = {name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                               "support": int(s[i])} for i, name in enumerate(labels)}
    for avg in ("macro", "micro", "weighted"):
        pa, ra, fa, _ = precision_recall_fscore_support(y_true, y_pred, labels=ids, average=avg, zero_division=0)
        out[f"{avg}_precision"], out[f"{avg}_recall"], out[f"{avg}_f1"] = float(pa), float(ra), float(fa)
    out["confusion_matrix"] = confusion_matrix(y_true, y_pred, labels=ids).tolist()
    out["labels"] = list(labels)
    try:
        out["log_loss"] = float(log_loss(y_true, np.clip(probs, 1e-12, 1.0), labels=ids))
    except ValueError:
        pass
    present = set(y_true.tolist())
    if len(labels) == 2:
        pos = 1 if positive is None else positive
        out["positive_label"] = labels[pos]
        if len(present) == 2:
            out["roc_auc"] = float(roc_auc_score(y_true == pos, probs[:, pos]))
            out["average_precision"] = float(average_precision_score(y_true == pos, probs[:, pos]))
    elif len(present) == len(labels) > 2:
        try:
            out["roc_auc_ovr_macro"] = float(roc_auc_score(y_true, probs, multi_class="ovr", labels=ids))
        except ValueError:
            pass
    return out


def multilabel_metrics(y_true, probs, labels: list[str], thresholds) -> dict:
    """Metrics of multi-label predictions: label k is predicted where probs[:, k] >= thresholds[k]."""
    from sklearn.metrics import (accuracy_score, average_precision_score, hamming_loss,
                                 precision_recall_fscore_support, roc_auc_score)

    y = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    thr = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (len(labels),))
    pred = (probs >= thr).astype(np.int64)
    out: dict = {"problem": "multi_label", "n": int(len(y)), "accuracy": float(accuracy_score(y, pred)),
                 "hamming_loss": float(hamming_loss(y, pred))}
    p, r, f, s = precision_recall_fscore_support(y, pred, average=None, zero_division=0)
    out["per_class"] = {name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                               "support": int(s[i]), "threshold": float(thr[i])} for i, name in enumerate(labels)}
    for i, name in enumerate(labels):
        if 0 < y[:, i].sum() < len(y):
            out["per_class"][name]["roc_auc"] = float(roc_auc_score(y[:, i], probs[:, i]))
            out["per_class"][name]["average_precision"] = float(average_precision_score(y[:, i], probs[:, i]))
    for avg in ("macro", "micro", "weighted", "samples"):
        pa, ra, fa, _ = precision_recall_fscore_support(y, pred, average=avg, zero_division=0)
        out[f"{avg}_precision"], out[f"{avg}_recall"], out[f"{avg}_f1"] = float(pa), float(ra), float(fa)
    aps = [c["average_precision"] for c in out["per_class"].values() if "average_precision" in c]
    if aps:
        out["mean_average_precision"] = float(np.mean(aps))
    q = np.clip(probs, 1e-12, 1 - 1e-12)
    out["log_loss"] = float(-(y * np.log(q) + (1 - y) * np.log(1 - q)).mean())
    out["labels"], out["thresholds"] = list(labels), [float(t) for t in thr]
    return out


def multilabel_val_metrics(probs: np.ndarray, y, thresholds) -> dict:
    """Loss (mean binary cross-entropy), subset accuracy, micro and macro F1 during training (numpy; equal to
    scikit-learn's with zero_division=0)."""
    y = np.asarray(y, dtype=np.float64) > 0.5
    pred = probs >= np.asarray(thresholds, dtype=np.float64)
    q = np.clip(probs, 1e-12, 1 - 1e-12)
    loss = float(-np.where(y, np.log(q), np.log(1 - q)).mean())
    tp, n_pred, n_true = (pred & y).sum(0).astype(float), pred.sum(0), y.sum(0)
    f1 = np.divide(2 * tp, n_pred + n_true, out=np.zeros(len(tp)), where=(n_pred + n_true) > 0)
    micro = 2 * tp.sum() / max(n_pred.sum() + n_true.sum(), 1)
    return {"val_loss": loss, "val_accuracy": float((pred == y).all(1).mean()), "val_micro_f1": float(micro),
            "val_macro_f1": float(f1.mean())}


def tune_thresholds(probs, y, default: float = 0.5) -> list[float]:
    """Per label, the threshold that maximises its F1 on (probs, y): halfway between the lowest score predicted
    positive and the next one down; `default` for a label with no positive example."""
    probs, y = np.asarray(probs, dtype=np.float64), np.asarray(y, dtype=np.float64) > 0.5
    out = []
    for k in range(probs.shape[1]):
        order = np.argsort(-probs[:, k], kind="stable")
        s, t = probs[order, k], y[order, k]
        if not t.any():
            out.append(float(default))
            continue
        f1 = 2 * np.cumsum(t) / (np.arange(1, len(t) + 1) + t.sum())
        f1[:-1][s[1:] == s[:-1]] = -1.0  # a cut inside tied scores is not a threshold
        i = int(np.argmax(f1))
        out.append(float((s[i] + s[i + 1]) / 2 if i + 1 < len(s) else s[i]))
    return out


def metrics_table(m: dict) -> str:
    """Per-class and averaged precision/recall/F1 as a fixed-width text table, then the scalar metrics."""
    if m.get("problem") == "regression":
        from kiln.eval.regression import regression_table

        return regression_table(m)
    names = list(m["per_class"])
    w = max(17, *(len(n) for n in names))
    lines = [f"{'':<{w}}  {'precision':>9}  {'recall':>9}  {'f1':>9}  {'support':>8}"]
    for name, row in m["per_class"].items():
        lines.append(f"{name:<{w}}  {row['precision']:>9.4f}  {row['recall']:>9.4f}  {row['f1']:>9.4f}  "
                     f"{row['support']:>8}")
    lines.append("")
    for avg in ("macro", "micro", "weighted", "samples")[:4 if "samples_f1" in m else 3]:
        lines.append(f"{avg + ' avg':<{w}}  {m[f'{avg}_precision']:>9.4f}  {m[f'{avg}_recall']:>9.4f}  "
                     f"{m[f'{avg}_f1']:>9.4f}  {m['n']:>8}")
    lines.append("")
    scalars = [("accuracy", "accuracy" if "hamming_loss" not in m else "subset accuracy"), ("log_loss", "log loss"),
               ("roc_auc", "ROC-AUC"), ("average_precision", "average precision"),
               ("roc_auc_ovr_macro", "ROC-AUC (ovr, macro)"), ("hamming_loss", "Hamming loss"),
               ("mean_average_precision", "mean average precision")]
    for key, title in scalars:
        if key in m and isinstance(m[key], float) and math.isfinite(m[key]):
            suffix = f" (positive: {m['positive_label']})" if key in ("roc_auc", "average_precision") else ""
            lines.append(f"{title:<{w}}  {m[key]:.4f}{suffix}")
    if "thresholds" in m:
        return "\n".join(lines + [f"{'thresholds':<{w}}  " + ", ".join(f"{n} {t:.3g}" for n, t in
                                                                    zip(names, m["thresholds"]))])
    cm = m["confusion_matrix"]
    lines.append("")
    lines.append("confusion matrix (rows: true, columns: predicted)")
    cw = max(6, *(len(n) for n in names), *(len(str(v)) for row in cm for v in row))
    lines.append(f"{'':<{w}}  " + "  ".join(f"{n:>{cw}}" for n in names))
    for name, row in zip(names, cm):
        lines.append(f"{name:<{w}}  " + "  ".join(f"{v:>{cw}}" for v in row))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- plots


def _save(fig, path: Path) -> Path:
    from kiln.report.plots import save_figure

    return save_figure(fig, path)


def plot_confusion(cm, labels: list[str], path: Path, title: str = "") -> Path:
    from kiln.report.plots import figure

    cm = np.asarray(cm)
    k = len(labels)
    size = min(4 + 0.5 * k, 14)
    fig = figure(figsize=(size, size * 0.85), dpi=110)
    ax = fig.subplots()
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ax.set_xticks(range(k), labels, rotation=45 if k > 4 else 0, ha="right" if k > 4 else "center")
    ax.set_yticks(range(k), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= 30:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, f"{cm[i, j]}", ha="center", va="center",
                        color="white" if norm[i, j] > 0.5 else "black", fontsize=9)
    ax.set_title(title or "confusion matrix")
    return _save(fig, path)


def plot_roc_pr(y_true, scores, roc_path: Path, pr_path: Path, positive_name: str, title: str = "") -> list[Path]:
    """ROC curve and precision-recall curve of one positive class (binary tasks)."""
    from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_curve

    from kiln.report.plots import figure

    y_true = np.asarray(y_true).astype(bool)
    fpr, tpr, _ = roc_curve(y_true, scores)
    fig = figure(figsize=(5, 4.6), dpi=110)
    ax = fig.subplots()
    ax.plot(fpr, tpr, lw=1.8, label=f"AUC {auc(fpr, tpr):.4f}")
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="chance")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"{title + ': ' if title else ''}ROC (positive: {positive_name})")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    out = [_save(fig, roc_path)]
    prec, rec, _ = precision_recall_curve(y_true, scores)
    fig = figure(figsize=(5, 4.6), dpi=110)
    ax = fig.subplots()
    ax.plot(rec, prec, lw=1.8, label=f"AP {average_precision_score(y_true, scores):.4f}")
    ax.axhline(y_true.mean(), ls="--", color="grey", lw=1, label="chance")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"{title + ': ' if title else ''}precision-recall (positive: {positive_name})")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    out.append(_save(fig, pr_path))
    return out


def write_report(m: dict, y_true, probs, labels: list[str], out_dir: Path, prefix: str,
                 extra: dict | None = None) -> dict:
    """<prefix>.json (metrics + extra), <prefix>_confusion.png and, for a binary task with both classes
    present, <prefix>_roc.png and <prefix>_pr.png. Returns {name: path} of what was written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"json": out_dir / f"{prefix}.json"}
    if "confusion_matrix" in m:  # (not multi-label)
        files["confusion"] = plot_confusion(m["confusion_matrix"], labels, out_dir / f"{prefix}_confusion.png",
                                            title=f"{prefix}: confusion matrix (n={m['n']})")
    if "roc_auc" in m:
        pos = labels.index(m["positive_label"])
        files["roc"], files["pr"] = plot_roc_pr(np.asarray(y_true) == pos, np.asarray(probs)[:, pos],
                                                out_dir / f"{prefix}_roc.png", out_dir / f"{prefix}_pr.png",
                                                m["positive_label"], title=prefix)
    data = {**m, **(extra or {}), "plots": {k: str(v) for k, v in files.items() if k != "json"}}
    files["json"].write_text(json.dumps(data, indent=2) + "\n")
    return files


def val_metrics(probs: np.ndarray, labels, n_classes: int) -> dict:
    """Loss, accuracy and macro F1 during training (numpy; equal to scikit-learn's with zero_division=0)."""
    y = np.asarray(labels)
    pred = probs.argmax(1)
    loss = float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, 1.0)).mean())
    tp = np.bincount(y[pred == y], minlength=n_classes).astype(float)
    n_pred, n_true = np.bincount(pred, minlength=n_classes), np.bincount(y, minlength=n_classes)
    f1 = np.divide(2 * tp, n_pred + n_true, out=np.zeros(n_classes), where=(n_pred + n_true) > 0)
    return {"val_loss": loss, "val_accuracy": float((pred == y).mean()), "val_macro_f1": float(f1.mean())}
