"""metrics.csv (always) and TensorBoard events (when tensorboard is installed), written as the run goes."""

from __future__ import annotations

import csv
from pathlib import Path


class MetricsLog:
    def __init__(self, run_dir: Path, resume_step: int | None = None, tensorboard: bool = True):
        self.path = Path(run_dir) / "metrics.csv"
        self.rows: list[dict] = []
        self.columns: list[str] = []  # union of the rows' keys, in first-seen order (the CSV header)
        if self.path.is_file():
            with open(self.path, newline="") as f:
                self.rows = [r for r in csv.DictReader(f)]
            if resume_step is not None:  # drop rows written after the checkpoint we resume from
                self.rows = [r for r in self.rows if int(r["step"]) <= resume_step]
            for r in self.rows:
                self.columns += [k for k in r if k not in self.columns]
            self._rewrite()
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(Path(run_dir) / "events"), purge_step=resume_step)
            except Exception:  # tensorboard not installed: CSV only
                self.writer = None

    def _rewrite(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.columns)
            w.writeheader()
            w.writerows(self.rows)
        tmp.replace(self.path)

    def log(self, step: int, **values) -> None:
        row = {"step": step, **{k: (f"{v:.8g}" if isinstance(v, float) else v) for k, v in values.items()}}
        new_cols = [k for k in row if k not in self.columns]  # a new key rewrites the file with a wider header
        self.columns += new_cols
        self.rows.append(row)
        if new_cols or not self.path.is_file():
            self._rewrite()
        else:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=self.columns).writerow(row)
        if self.writer is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.writer.add_scalar(k, v, step)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        xs, ys = [], []
        for r in self.rows:
            if r.get(key) not in (None, ""):
                xs.append(int(r["step"]))
                ys.append(float(r[key]))
        return xs, ys

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
