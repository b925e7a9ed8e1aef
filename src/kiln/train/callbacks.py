"""What watches or stops a run, as small units the Trainer calls: the best checkpoint by a metric, early
stopping, a wall-clock budget. Each keeps its own state (saved in the checkpoint, so a resume continues it);
none touches the config: stopping goes through `trainer.stop(reason)`, a shorter schedule through
`trainer.horizon` (the step the lr schedule and the loop end at).

    trainer = Trainer(..., metric="val_accuracy", callbacks=[EarlyStopping(patience=3), TimeBudget(600)])
"""

from __future__ import annotations

import time


class Callback:
    name = "callback"

    def on_step_start(self, trainer) -> None: ...

    def on_step_end(self, trainer) -> None: ...

    def on_eval(self, trainer, metrics: dict) -> None: ...

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...


LOWER_IS_BETTER = ("loss", "ppl", "wer", "cer", "mse", "rmse", "mae")  # metric-name endings: an error, not a score


def lower_is_better(metric: str) -> bool:
    return metric.endswith(LOWER_IS_BETTER)


class BestByMetric(Callback):
    """`best` is the checkpoint with the best value of `metric` (lower for an error: *loss, *ppl, *wer, *cer,
    *mse, ...; higher otherwise).
    `improved` after each evaluation: True, False, or None when the metric is absent."""

    name = "best"

    def __init__(self, metric: str = "val_loss"):
        self.metric, self.value, self.step = metric, None, None
        self.improved: bool | None = None

    def on_eval(self, trainer, metrics: dict) -> None:
        value = metrics.get(self.metric)
        if value is None:
            self.improved = None
            return
        lower = lower_is_better(self.metric)
        self.improved = self.value is None or (value < self.value if lower else value > self.value)
        if self.improved:
            self.value, self.step = value, trainer.state.step

    def state_dict(self) -> dict:
        return {"value": self.value, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.step = state.get("value"), state.get("step")


class EarlyStopping(Callback):
    """Stop after `patience` evaluations in a row without a new best (0 = never). Its count and the best value
    (BestByMetric's) survive a resume."""

    name = "early_stopping"

    def __init__(self, patience: int = 0):
        self.patience, self.bad_evals, self.stopped_at = patience, 0, None

    def on_eval(self, trainer, metrics: dict) -> None:
        best = trainer.best
        if best.improved:
            self.bad_evals = 0
        elif best.improved is False:
            self.bad_evals += 1
            if self.patience and self.bad_evals >= self.patience and trainer.state.step < trainer.horizon:
                self.stopped_at = trainer.state.step
                trainer.stop(f"early stopping at step {trainer.state.step}: {best.metric} has not improved for "
                             f"{self.bad_evals} evaluation(s) (best {best.value:.4f} at step {best.step})")

    def state_dict(self) -> dict:
        return {"bad_evals": self.bad_evals, "stopped_at": self.stopped_at}

    def load_state_dict(self, state: dict) -> None:
        self.bad_evals, self.stopped_at = int(state.get("bad_evals", 0)), state.get("stopped_at")


class TimeBudget(Callback):
    """Fit the run into `seconds` of wall time (evaluations included): after 5 steps the horizon becomes the
    number of steps that fit, re-estimated every step, so the lr schedule decays to its end in time. A resume
    continues the clock where the checkpoint left it (the time between the runs is not counted)."""

    name = "time_budget"

    def __init__(self, seconds: float):
        self.seconds = seconds
        self._t0: float | None = None
        self._s0 = 0
        self._before = (0.0, 0)  # seconds and steps of this budget spent before a resume
        self._last = (0.0, 0)    # spent at the end of the last step (what a checkpoint saves)

    def _spent(self, trainer, now: float) -> tuple[float, int]:
        return self._before[0] + now - self._t0, self._before[1] + trainer.state.step - self._s0

    def on_step_start(self, trainer) -> None:
        now = time.perf_counter()
        if self._t0 is None:
            self._t0, self._s0 = now, trainer.state.step
        spent, done = self._spent(trainer, now)
        if done >= 5:  # seconds per step so far -> steps that fit the budget
            left = max(self.seconds - spent, 0.0)
            trainer.horizon = trainer.state.step + max(1, int(left / (spent / done)))

    def on_step_end(self, trainer) -> None:
        self._last = self._spent(trainer, time.perf_counter())
        if self._last[0] >= self.seconds:
            trainer.horizon = trainer.state.step  # this step is the last: final eval + checkpoint

    def state_dict(self) -> dict:
        return {"spent": self._last[0], "steps": self._last[1]}

    def load_state_dict(self, state: dict) -> None:
        self._before = self._last = (float(state.get("spent", 0.0)), int(state.get("steps", 0)))
