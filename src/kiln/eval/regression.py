"""Regression metrics (`kiln finetune classify --problem regression`) and their plot.

    m = regression_metrics(y_true, pred)   # numbers [N], predictions [N]
    print(regression_table(m)); write_regression_report(m, y_true, pred, out_dir, prefix="test")

Metrics: MSE, RMSE, MAE, R^2 (1 - SSE / SST), Pearson's and Spearman's correlation (scipy; None where a side is
constant), and the mean/standard deviation of the targets and the predictions. Plot: predicted against true.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np


def _correlations(y: np.ndarray, pred: np.ndarray) -> tuple[float | None, float | None]:
    from scipy.stats import pearsonr, spearmanr

    if len(y) < 2 or np.ptp(y) == 0 or np.ptp(pred) == 0:
        return None, None
    return float(pearsonr(y, pred)[0]), float(spearmanr(y, pred)[0])


def regression_metrics(y_true, pred) -> dict:
    y, p = np.asarray(y_true, dtype=np.float64), np.asarray(pred, dtype=np.float64)
    err = p - y
    mse, sst = float(np.mean(err ** 2)), float(np.sum((y - y.mean()) ** 2))
    pearson, spearman = _correlations(y, p)
    return {"problem": "regression", "n": int(len(y)), "mse": mse, "rmse": math.sqrt(mse),
            "mae": float(np.mean(np.abs(err))), "r2": 1.0 - float(np.sum(err ** 2)) / sst if sst > 0 else None,
            "pearson": pearson, "spearman": spearman, "target_mean": float(y.mean()), "target_std": float(y.std()),
            "prediction_mean": float(p.mean()), "prediction_std": float(p.std())}


def regression_val_metrics(pred: np.ndarray, y) -> dict:
    """val_loss (the MSE, as trained), val_rmse, val_mae, val_pearson and val_spearman (0 where undefined: a
    constant prediction, so that picking the best checkpoint always compares numbers)."""
    m = regression_metrics(y, pred)
    return {"val_loss": m["mse"], "val_rmse": m["rmse"], "val_mae": m["mae"], "val_pearson": m["pearson"] or 0.0,
            "val_spearman": m["spearman"] or 0.0}


def regression_table(m: dict) -> str:
    rows = [("examples", "n"), ("MSE", "mse"), ("RMSE", "rmse"), ("MAE", "mae"), ("R^2", "r2"),
            ("Pearson r", "pearson"), ("Spearman rho", "spearman"), ("target mean", "target_mean"),
            ("target std", "target_std"), ("prediction mean", "prediction_mean"), ("prediction std", "prediction_std")]
    return "\n".join(f"{title:<17}  " + ("-" if m.get(key) is None else f"{m[key]}" if key == "n" else f"{m[key]:.4f}")
                     for title, key in rows)


def write_regression_report(m: dict, y_true, pred, out_dir: Path, prefix: str, extra: dict | None = None) -> dict:
    """<prefix>.json (metrics + extra) and <prefix>_scatter.png (predicted against true)."""
    from kiln.report.plots import figure, save_figure

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    y, p = np.asarray(y_true, dtype=np.float64), np.asarray(pred, dtype=np.float64)
    fig = figure(figsize=(5, 4.6), dpi=110)
    ax = fig.subplots()
    ax.scatter(y, p, s=8, alpha=0.5)
    lo, hi = float(min(y.min(), p.min())), float(max(y.max(), p.max()))
    ax.plot([lo, hi], [lo, hi], "--", color="grey", lw=1, label="prediction = target")
    ax.set_xlabel("target")
    ax.set_ylabel("prediction")
    r = f", Pearson {m['pearson']:.3f}" if m.get("pearson") is not None else ""
    ax.set_title(f"{prefix}: RMSE {m['rmse']:.4g}{r} (n={m['n']})")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    files = {"json": out_dir / f"{prefix}.json", "scatter": save_figure(fig, out_dir / f"{prefix}_scatter.png")}
    data = {**m, **(extra or {}), "plots": {"scatter": str(files["scatter"])}}
    files["json"].write_text(json.dumps(data, indent=2) + "\n")
    return files
