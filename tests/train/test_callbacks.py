"""The Trainer's callbacks (kiln.train.callbacks): best by a metric, early stopping with its count kept across a
resume, a time budget that moves the horizon; none of them touches the config."""

import dataclasses
import types

import pytest

from kiln.config import TrainConfig
from kiln.train.callbacks import BestByMetric, EarlyStopping, TimeBudget


class FakeTrainer:
    """What the callbacks see of a Trainer: its step, horizon, best tracker and stop()."""

    def __init__(self, metric="val_accuracy", horizon=100):
        self.state = types.SimpleNamespace(step=0)
        self.best, self.horizon, self.stop_reason = BestByMetric(metric), horizon, None
        self.cfg = TrainConfig(max_steps=horizon)

    def stop(self, reason):
        self.stop_reason = reason

    def evaluate(self, callbacks, step, value):
        self.state.step = step
        for cb in [self.best, *callbacks]:
            cb.on_eval(self, {self.best.metric: value})


@pytest.mark.parametrize("metric, values, best", [("val_accuracy", [0.5, 0.7, 0.6], (0.7, 20)),
                                                   ("val_loss", [2.0, 1.5, 1.7], (1.5, 20))])
def test_best_by_metric_follows_the_direction_of_the_metric(metric, values, best):
    t = FakeTrainer(metric)
    for i, v in enumerate(values, 1):
        t.evaluate([], 10 * i, v)
    assert (t.best.value, t.best.step) == best
    assert t.best.improved is False  # the last evaluation was not a new best


def test_early_stopping_counts_evaluations_without_a_new_best_and_its_count_survives_a_resume():
    t, stop = FakeTrainer(), EarlyStopping(patience=3)
    before = dataclasses.asdict(t.cfg)
    for step, v in ((10, 0.5), (20, 0.6), (30, 0.55), (40, 0.58)):  # two bad evaluations
        t.evaluate([stop], step, v)
    assert stop.bad_evals == 2 and t.stop_reason is None
    saved = {"best": t.best.state_dict(), "early_stopping": stop.state_dict()}

    resumed, stop2 = FakeTrainer(), EarlyStopping(patience=3)  # a new process after a resume
    resumed.best.load_state_dict(saved["best"])
    stop2.load_state_dict(saved["early_stopping"])
    resumed.evaluate([stop2], 50, 0.59)  # still below 0.6: the third bad evaluation in a row
    assert resumed.stop_reason is not None and "has not improved for 3 evaluation(s)" in resumed.stop_reason
    assert "best 0.6000 at step 20" in resumed.stop_reason and stop2.stopped_at == 50
    assert dataclasses.asdict(t.cfg) == before  # stopping never edits the config


def test_a_new_best_resets_the_count_and_patience_zero_never_stops():
    t, stop = FakeTrainer(), EarlyStopping(patience=2)
    for step, v in ((10, 0.5), (20, 0.4), (30, 0.6), (40, 0.5)):
        t.evaluate([stop], step, v)
    assert stop.bad_evals == 1 and t.stop_reason is None
    never = EarlyStopping(0)
    for step in range(50, 500, 10):
        t.evaluate([never], step, 0.1)
    assert t.stop_reason is None


def test_time_budget_moves_the_horizon_to_the_steps_that_fit(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr("kiln.train.callbacks.time.perf_counter", lambda: clock[0])
    t, budget = FakeTrainer(horizon=1000), TimeBudget(seconds=10.0)
    for step in range(6):  # one second per step
        t.state.step = step
        budget.on_step_start(t)
        clock[0] += 1.0
        t.state.step = step + 1
        budget.on_step_end(t)
    assert t.horizon == 5 + int((10.0 - 5.0) / 1.0)  # 5 s left at 1 s per step: 5 more steps
    while t.state.step < t.horizon:
        budget.on_step_start(t)
        clock[0] += 1.0
        t.state.step += 1
        budget.on_step_end(t)
    assert t.state.step == 10 and t.horizon == 10 and t.cfg.max_steps == 1000


def test_time_budget_continues_its_clock_across_a_resume(monkeypatch):
    """10 s steps, a 100 s budget: killed after 5 steps, resumed after a long pause, the run still ends at step
    10 (the pause is not counted) and the horizon estimate keeps the steps done before."""
    import kiln.train.callbacks as cb

    clock = [0.0]
    monkeypatch.setattr(cb.time, "perf_counter", lambda: clock[0])

    def run(budget, t, steps):
        for _ in range(steps):
            budget.on_step_start(t)
            clock[0] += 10.0
            t.state.step += 1
            budget.on_step_end(t)
            if t.state.step >= t.horizon:
                break

    t, budget = FakeTrainer(horizon=1000), TimeBudget(100)
    run(budget, t, 5)
    saved = budget.state_dict()
    assert saved == {"spent": 50.0, "steps": 5}
    clock[0] += 3600.0  # the machine was down for an hour
    t2, again = FakeTrainer(horizon=1000), TimeBudget(100)
    t2.state.step = 5
    again.load_state_dict(saved)
    run(again, t2, 1)
    assert t2.horizon == 6 + 4  # 40 s left at 10 s a step (from the 6 steps of both processes)
    run(again, t2, 100)
    assert t2.state.step == 10 and t2.horizon == 10
