"""metrics.csv (always), and the same numbers to the report sinks of train.trackers (kiln.report.trackers:
TensorBoard events, MLflow, W&B), written as the run goes."""

from __future__ import annotations

import csv
import sys
from pathlib import Path


class MetricsLog:
    def __init__(self, run_dir: Path, resume_step: int | None = None, tensorboard: bool = True,
                 trackers: list | None = None):
        """trackers: the opened sinks (kiln.report.trackers.open_trackers); None = TensorBoard alone when
        `tensorboard` (the sink list before train.trackers)."""
        self.path = Path(run_dir) / "metrics.csv"
        self.rows: list[dict] = []
        self.columns: list[str] = []  # union of the rows' keys, in first-seen order (the CSV header)
        # a resumed run re-logs the steps between its checkpoint and where it stopped: metrics.csv and TensorBoard
        # drop the old rows; the steps a tracked run (MLflow, W&B) already has are not sent to it again
        self.sent_through: int | None = None
        if self.path.is_file():
            with open(self.path, newline="") as f:
                self.rows = [r for r in csv.DictReader(f)]
            if resume_step is not None:  # drop rows written after the checkpoint we resume from
                self.sent_through = max((int(r["step"]) for r in self.rows), default=None)
                self.rows = [r for r in self.rows if int(r["step"]) <= resume_step]
            for r in self.rows:
                self.columns += [k for k in r if k not in self.columns]
            self._rewrite()
        if trackers is None:
            from kiln.report.trackers import TensorBoardTracker

            tb = TensorBoardTracker.open(run_dir, resume_step) if tensorboard else None
            trackers = [tb] if tb is not None else []
        self.trackers = list(trackers)
        self._sent_step, self._sent_keys = None, set()

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
        if step != self._sent_step:
            self._sent_step, self._sent_keys = step, set()
        # the numbers, each once per step (an evaluation's row repeats tokens and elapsed of the step's row)
        numbers = {k: float(v) for k, v in values.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in self._sent_keys}
        self._sent_keys |= numbers.keys()
        for tracker in list(self.trackers):
            if not tracker.purges and self.sent_through is not None and step <= self.sent_through:
                continue
            try:
                tracker.log(step, numbers)
            except Exception as e:  # a tracker that fails (a server gone) does not stop the training
                print(f"kiln: warning: {tracker.name} failed at step {step} ({type(e).__name__}: "
                      f"{(str(e).strip().splitlines() or [''])[0]}); it gets no more metrics", file=sys.stderr)
                self.trackers.remove(tracker)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        xs, ys = [], []
        for r in self.rows:
            if r.get(key) not in (None, ""):
                xs.append(int(r["step"]))
                ys.append(float(r[key]))
        return xs, ys

    def close(self, status: str = "finished") -> None:
        """status: finished | failed | killed, what a tracked run is marked."""
        for tracker in self.trackers:
            try:
                tracker.close(status)
            except Exception as e:
                print(f"kiln: warning: closing {tracker.name} failed ({type(e).__name__}: "
                      f"{(str(e).strip().splitlines() or [''])[0]})", file=sys.stderr)
        self.trackers = []
