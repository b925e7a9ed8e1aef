"""The Task contract: what a fine-tuning task supplies to the one driver (kiln.tasks.driver).

The driver owns what every task shares: config checks, the run folder and its lock, seed/threads/device/
precision, the schedule, the Trainer with its callbacks (best by `metric`, early stopping, a time budget), the
best checkpoint, the test pass's bookkeeping and the summary. A task supplies only what differs:

    class MyTask(Task):
        name = "mytask"                       # the run's kind in run.json; `kiln finetune mytask`
        config_cls, config_file = MyConfig, "mytask.yaml"
        def check(self, cfg): ...             # cross-key checks (ranges are checked when the config loads)
        def read(self, cfg, log) -> Data: ... # files -> splits (kiln.data.*), every input error before any work
        def prepare(self, cfg, run_dir, data, device, log) -> Prepared: ...
                                              # backbone/tokenizer, encoding, the model with its head, the
                                              # batches, the objective (loss SUM + target count), val metrics
        def test(self, cfg, prepared, model, ckpt, run_dir, log) -> dict: ...   # the final pass
        def load(self, run_dir, which, device): ...       # the model (and codec/labels) of a finished run
        def evaluate_file(self, run_dir, file, out, which, log, **kw) -> dict: ...  # `kiln eval`
        def predict_file(self, run_dir, file, out, which, log) -> Path: ...         # `kiln predict`

Register it in kiln/tasks/__init__.py; the CLI, `kiln eval`/`predict` and the Python API find it by its name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from kiln.errors import KilnError


@dataclass
class Data:
    """A task's examples, split, and what reading them found (written to data.json)."""

    splits: dict[str, list]
    report: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # task-specific results of reading (labels, teachers, ...)


@dataclass
class Prepared:
    """Everything the driver needs to train a task's model, made by Task.prepare."""

    model: torch.nn.Module
    objective: object                                  # targets(batch) -> int, loss(model, batch) -> SUM
    batch: Callable[[int], dict]                       # micro-batch i (a pure function of i: exact resume)
    n_train: int                                       # training examples (the schedule counts epochs of them)
    evaluate: Callable[[torch.nn.Module], dict] | None = None  # val_* metrics, or None (no val split)
    metric: str = "val_loss"                           # the val metric that picks `best`
    meta: dict = field(default_factory=dict)           # task metadata for run.json (labels, codec, fields)
    save: Callable[[Path], None] | None = None         # writes the task's own files (tokenizers, labels)
    on_eval: Callable[[int, dict], None] | None = None
    notes: list[str] = field(default_factory=list)     # lines for the model summary
    state: dict = field(default_factory=dict)          # what test() needs again (encodings, codec, ...)
    unit: str = ""                                     # what the progress line counts (default: the task's)
    global_batches: bool = True                        # batch(i) is the run's i-th micro-batch, split over ranks
                                                       # by the trainer (False: each rank reads its own, as
                                                       # pretraining's TokenBatches do)


class Task:
    name: str = ""
    config_cls: type = object
    config_file: str = ""
    batch_unit: str = ""  # fine-tuning tasks: what train.batch_size counts ("examples", "windows", ...)
    throughput_unit: str = "ex"  # what the progress line counts per second
    time_budget_minutes: Callable | None = None  # cfg -> minutes of wall time (0 = off), where the task has one
    usage: str = ""    # `kiln finetune NAME --help`: the command line
    example: str = ""  # a shipped recipe

    def help_rows(self) -> list[tuple[str, str, str]]:
        """(flag, default, help) of every key of the task's config (its dataclasses are the one source), less
        what `shows` leaves out."""
        from kiln.config import config_help

        return [row for row in config_help(self.config_cls) if self.shows(row[0])]

    @property
    def verb(self) -> str:
        """The command that trains it: `kiln finetune NAME` (pretraining says `pretrain`)."""
        return f"finetune {self.name}"

    checks_data = True  # a resume compares the data read now with data.json (exact resume needs the same examples)

    def shows(self, flag: str) -> bool:
        """Whether --help lists this key; fine-tuning tasks hide the model keys (they come from init)."""
        return not flag.startswith("--model.")

    def check(self, cfg) -> None:
        pass

    def read(self, cfg, log) -> Data:
        raise NotImplementedError

    def prepare(self, cfg, run_dir: Path, data: Data, device: str, log) -> Prepared:
        raise NotImplementedError

    def schedule(self, cfg, tcfg, steps_per_epoch: int) -> str | None:
        """Fill in the derived schedule keys of the trainer's copy of the train config (in place); a line to log."""
        if tcfg.save_every <= 0:
            tcfg.save_every = tcfg.max_steps
        return None

    def ramp(self, tcfg, cfg, log):
        """A kiln.train.ramp.BatchRamp where the global batch grows during training (pretraining), else None."""
        return None

    def summary(self, result: dict, trainer) -> dict:
        """What the task adds to eval/summary.json's "train" (throughput in its own unit)."""
        return {}

    def test(self, cfg, prepared: Prepared, model, ckpt: Path, run_dir: Path, log) -> dict:
        return {}

    def load(self, run_dir: Path, which: str = "best", device: str = "cpu"):
        raise NotImplementedError

    def evaluate_file(self, run_dir, file, out=None, which: str = "best", log=print, **kw) -> dict:
        raise NotImplementedError

    def predict_file(self, run_dir, file, out=None, which: str = "best", log=print) -> Path:
        raise NotImplementedError


def eval_batch_size(cfg, least: int = 16) -> int:
    """Examples per batch when a task evaluates or predicts: twice the training batch (no gradients or optimizer
    state to hold), at least `least`. kiln predict, kiln eval and kiln serve batch the same way."""
    return max(2 * cfg.train.batch_size, least)


def epochs_schedule(cfg, tcfg, steps_per_epoch: int) -> None:
    """max_steps from `epochs`, warmup from `warmup_fraction`, an evaluation per epoch (each where not set)."""
    if tcfg.max_steps <= 0:
        if cfg.epochs <= 0:
            raise KilnError("set epochs > 0 or train.max_steps > 0")
        tcfg.max_steps = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    if tcfg.warmup_steps <= 0:
        tcfg.warmup_steps = int(cfg.warmup_fraction * tcfg.max_steps)
    if tcfg.eval_every <= 0:
        tcfg.eval_every = min(steps_per_epoch, tcfg.max_steps)
    if tcfg.save_every <= 0:
        tcfg.save_every = tcfg.max_steps


class EpochTask(Task):
    """A task whose schedule counts epochs of its examples (`epochs`, `warmup_fraction`; an evaluation per epoch)."""

    def schedule(self, cfg, tcfg, steps_per_epoch: int) -> None:
        epochs_schedule(cfg, tcfg, steps_per_epoch)

    @staticmethod
    def held_out(prep: Prepared):
        """(name, encoded, rows) of the val and test splits that hold examples, for `test`: a task that keeps
        its encodings in prep.state["enc"] and its examples in prep.state["rows"], by split."""
        for name in ("val", "test"):
            encoded, rows = prep.state["enc"][name], prep.state["rows"][name]
            if len(encoded):
                yield name, encoded, rows
