"""PNG plots of a run (matplotlib, headless)."""

from __future__ import annotations

import math
import time
from pathlib import Path


def figure(**kw):
    """A matplotlib Figure of its own, not pyplot's: no process-wide list of open figures to close (or to leak
    when a save fails), nothing shared with another thread, no GUI backend chosen; matplotlib is imported when
    the first plot is drawn, not with the trainer. PNG files are drawn with Agg whatever the user's backend."""
    from matplotlib.figure import Figure

    return Figure(**kw)


def save_figure(fig, path: Path, tight: bool = True) -> Path:
    """Write a figure atomically (temp file + rename): a viewer never sees half a PNG. tight: lay its subplots
    out first (False for a figure placed by hand)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if tight:
        fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp)
    tmp.replace(path)
    return path


def loss_curve(metrics, path: Path, title: str = "", per: str = "token") -> Path:
    """Train and validation loss against steps; written atomically so a viewer never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = figure(figsize=(7, 4.2), dpi=110)
    ax = fig.subplots()
    for key, style in (("loss", dict(alpha=0.6, lw=1)), ("val_loss", dict(marker="o", lw=1.6))):
        xs, ys = metrics.series(key)
        if xs:
            ax.plot(xs, ys, label={"loss": "train", "val_loss": "validation"}[key], **style)
    ax.set_xlabel("step")
    ax.set_ylabel(f"loss (nats/{per})")
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    return save_figure(fig, path)


# ----------------------------------------------------------------------------------------------- several runs

X_AXES = {"step": "step", "tokens": "tokens", "elapsed": "elapsed"}


def read_metrics(run: Path) -> list[dict]:
    """The rows of a run's metrics.csv (any kind of run)."""
    import csv

    from kiln.errors import KilnError

    f = Path(run) / "metrics.csv"
    if not f.is_file():
        raise KilnError(f"{run}: no metrics.csv (expected a kiln run folder)" if Path(run).exists()
                        else f"run folder not found: {run}")
    with open(f, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def compare_runs(runs: list[Path], metrics: list[str], out: Path, x: str = "step",
                 labels: list[str] | None = None) -> tuple[Path, list[dict]]:
    """One panel per metric, one colour per run, against step, tokens seen or elapsed minutes. Returns the PNG
    path and, per run and metric, the last and the best value (lowest for losses/perplexities, else highest)."""
    from kiln.errors import KilnError, did_you_mean

    if not metrics:
        raise KilnError("--metric names no metrics.csv column (e.g. --metric loss,val_loss)")
    if x not in X_AXES:
        raise KilnError(f"--x must be one of {', '.join(X_AXES)}, got {x!r}{did_you_mean(x, X_AXES)}")
    labels = labels or [Path(r).name for r in runs]
    if len(labels) != len(runs):
        raise KilnError(f"--labels names {len(labels)} run(s) for {len(runs)} run folder(s)")
    tables = [read_metrics(r) for r in runs]
    columns = {k for t in tables for row in t for k, v in row.items() if v not in (None, "")}
    for m in metrics:
        if m not in columns:
            raise KilnError(f"no run has the metric {m!r}{did_you_mean(m, columns)}; the runs log: "
                            f"{', '.join(sorted(columns - {'step', 'tokens', 'elapsed'}))}")
    import matplotlib

    fig = figure(figsize=(6.2 * len(metrics), 4.2), dpi=110)
    axes = fig.subplots(1, len(metrics), squeeze=False)
    colours = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    summary = []
    for i, (rows, label) in enumerate(zip(tables, labels)):
        colour = colours[i % len(colours)]
        for ax, m in zip(axes[0], metrics):
            pts = [(float(r[x]) / (60.0 if x == "elapsed" else 1.0), float(r[m])) for r in rows
                   if r.get(m) not in (None, "") and r.get(x) not in (None, "")]
            if not pts:
                continue
            xs, ys = zip(*pts)
            style = dict(marker="o", ms=3, lw=1.4) if len(pts) <= 50 else dict(lw=1.0, alpha=0.8)
            ax.plot(xs, ys, color=colour, label=label, **style)
            pick = min if any(w in m for w in ("loss", "ppl", "perplexity")) else max
            at = pick(range(len(ys)), key=ys.__getitem__)
            summary.append({"run": label, "metric": m, "last": ys[-1], "best": ys[at], "at": xs[at]})
    for ax, m in zip(axes[0], metrics):
        ax.set_xlabel({"step": "step", "tokens": "tokens", "elapsed": "minutes"}[x])
        ax.set_ylabel(m)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, Path(out)), summary


def metric_curve(history: list[tuple[int, dict]], keys: tuple[str, ...], path: Path, title: str = "",
                 ylabel: str = "score (0-100)") -> Path:
    """Validation metrics (BLEU/chrF or ROUGE, benchmark scores) against steps."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = figure(figsize=(7, 4.2), dpi=110)
    ax = fig.subplots()
    for k in keys:
        xs = [s for s, m in history if f"val_{k}" in m]
        ys = [m[f"val_{k}"] for s, m in history if f"val_{k}" in m]
        if xs:
            ax.plot(xs, ys, marker="o", lw=1.6, label=k)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    return save_figure(fig, path)


PLOT_EVERY_S = 10.0  # plots/loss.png: at the first evaluation, then at most every 10 s of wall time, and at the end


class LossPlot:
    """plots/loss.png, redrawn at evaluations: the first one, then no more often than every PLOT_EVERY_S seconds
    (each redraw costs ~0.2-0.3 s of CPU: at every evaluation that is a few % of a tiny model's run),
    and once more when the run ends or stops with evaluations the file does not show yet."""

    def __init__(self, metrics, path: Path, title: str, per: str, clock=time.perf_counter):
        self.metrics, self.path, self.title, self.per, self.clock = metrics, path, title, per, clock
        self.drawn_at, self.pending = -math.inf, False

    def evaluated(self) -> None:
        self.pending = True
        if self.clock() - self.drawn_at >= PLOT_EVERY_S:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            loss_curve(self.metrics, self.path, title=self.title, per=self.per)
            self.drawn_at, self.pending = self.clock(), False
