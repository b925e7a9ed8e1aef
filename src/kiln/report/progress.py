"""Progress: a tqdm bar with loss, lr, tokens/s and ETA on a terminal; plain log lines otherwise."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, start: int = 0, log_every: int = 50, desc: str = "train", log=print,
                 unit: str = "tok"):
        self.total, self.step, self.log_every, self.log, self.unit = total, start, log_every, log, unit
        self.tty = sys.stderr.isatty()
        self.t0, self.start = time.perf_counter(), start
        self.bar = None
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc=desc, dynamic_ncols=True, leave=True)

    def update(self, step: int, total: int | None = None, **stats) -> None:
        """`total`: the run's end when it moved (a time budget re-fits it), so the ETA follows it."""
        if total is not None and total != self.total:
            self.total = total
            if self.bar is not None:
                self.bar.total = total
        text = "  ".join(_fmt(k, v, self.unit) for k, v in stats.items())
        if self.bar is not None:
            self.bar.update(step - self.step)
            self.bar.set_postfix_str(text, refresh=False)
        elif step % self.log_every == 0 or step == self.total:
            done = step - self.start
            elapsed = time.perf_counter() - self.t0
            eta = elapsed / done * (self.total - step) if done else 0.0
            self.log(f"step {step}/{self.total}  {text}  eta {_duration(eta)}")
        self.step = step

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        else:
            self.log(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _fmt(key: str, value, unit: str = "tok") -> str:
    if key == "lr":
        return f"lr {value:.2e}"
    if key == "tokens_per_second":
        return f"{value:,.0f} {unit}/s"
    return f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"
