"""The one driver: a Task (kiln.tasks.base) in, a trained, evaluated run folder out. Every run goes through it:
pretraining (kiln.tasks.lm: `kiln pretrain`, `kiln distill`) and every `kiln finetune TASK`.

    read the data (every input error before anything is written) -> under torchrun, join the process group ->
    create and lock the run folder (rank 0) -> seed, threads, device -> task.prepare (data, backbone, encoding,
    model + head, batches, objective; rank 0 first) -> schedule -> precision -> run.json, config, data.json ->
    DDP / FSDP2 -> the Trainer with callbacks (best by the task's metric, early stopping, a time budget) -> the
    best checkpoint -> task.test (rank 0) -> eval/summary.json

`resume=RUN_DIR` continues a stopped run exactly: the same data (checked against data.json), the same
preparation, the newest checkpoint's weights, optimizer, RNG and callback state; batches are a pure function of
the step, so the resumed run takes the steps the uninterrupted one would have.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import shutil
from pathlib import Path

import torch

from kiln.config import dump_yaml
from kiln.errors import KilnError
from kiln.run.checkpoint import find_checkpoint, load_weights, unwrap
from kiln.run.device import choose_precision, resolve_device
from kiln.run.folder import RunLock, RunLog, create_run, default_run_dir, holds_run, run_kind, write_run_json
from kiln.tasks.base import Task
from kiln.train.callbacks import EarlyStopping, TimeBudget
from kiln.train.distributed import broadcast, broadcast_parameters, init_distributed, leave_process_group_after, \
    main_first, wrap_model
from kiln.train.scaling import check_micro_batches, env_world
from kiln.train.trainer import Trainer


def train(task: Task, cfg, quiet: bool = False, resume: str | Path | None = None) -> Path:
    """Train `task` as `cfg` says (or continue the run folder `resume`); returns the run folder. Under torchrun
    every rank runs this: rank 0 writes the run folder, each rank takes its share of every step's micro-batches
    (kiln.train.trainer.Trainer's global_batches), evaluation and the test pass give what one process gives."""
    task.check(cfg)
    tc = cfg.train
    lora = getattr(tc, "lora", None)
    if lora is not None and lora.rank and not getattr(cfg, "init", ""):
        raise KilnError(f"train.lora.rank {lora.rank}: LoRA adapts a pretrained model, and {task.verb} has no init "
                        "here (set init to a kiln run or Hugging Face folder, or train.lora.rank 0)")
    if task.batch_unit:
        check_micro_batches(tc, env_world()[1])
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no fork warnings from the tokenizers' threads
    device = resolve_device(tc.device)
    ours = not (torch.distributed.is_available() and torch.distributed.is_initialized())  # a caller's group stays
    info, device = init_distributed(tc.backend, device)
    with leave_process_group_after() if ours else contextlib.nullcontext():
        return _run(task, cfg, quiet, resume, info, device, lora)


def _run(task: Task, cfg, quiet: bool, resume, info, device: str, lora) -> Path:
    """The run folder's life: created (or reopened) and locked, the data checked, the task prepared, trained."""
    if resume is None:
        run_dir = broadcast(info, default_run_dir(cfg.name, cfg.out))  # rank 0's timestamp
        if holds_run(run_dir):
            raise KilnError(f"run folder {run_dir} already holds checkpoints; pick another --out (or continue it: "
                            f"kiln {task.verb} --resume {run_dir})")
        saved_data = None
    else:
        run_dir = _resumable(task, Path(resume))
        ckpt = find_checkpoint(run_dir)  # fails early on a folder without a complete checkpoint
        saved_data = _saved_data(run_dir) if task.checks_data else None
    log0: list[str] = []
    data = task.read(cfg, log0.append)  # every input error before anything is created
    if saved_data is not None:
        _check_same_data(run_dir, saved_data, data.report, read_only=True)  # refused before writing anything

    created = not run_dir.exists()
    lock = None
    if info.is_main:
        lock = create_run(run_dir, task.name, resume_hint=True) if resume is None else RunLock(run_dir).acquire()
    log = RunLog(run_dir, quiet) if info.is_main else RunLog(None, quiet=True)  # one writer: rank 0
    log(f"kiln {task.verb} -> {run_dir}" if resume is None else f"kiln {task.verb} --resume {run_dir} (from {ckpt.name})")
    for line in log0:
        log(line)
    torch.manual_seed(cfg.seed)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    try:  # errors found once the backbone is loaded: leave no run folder behind
        prep = main_first(info, lambda: _prepare(task, cfg, run_dir, data, device, log, lora))  # rank 0 imports first
        if saved_data is not None:
            _check_same_data(run_dir, saved_data, data.report)
    except KilnError:
        if lock is not None:
            lock.release()
            if created:  # (never on a resume: the folder was there)
                shutil.rmtree(run_dir, ignore_errors=True)
        raise
    try:
        return _train(task, cfg, prep, data, run_dir, device, info, log, resume)
    finally:
        if lock is not None:
            lock.release()


def _prepare(task: Task, cfg, run_dir: Path, data, device: str, log, lora):
    prep = task.prepare(cfg, run_dir, data, device, log)
    if lora is not None and lora.rank:  # freeze the backbone, adapters on it; the task's head trains in full
        from kiln.model.lora import lora_from_config

        lora_from_config(prep.model, lora, log)
    return prep


def _train(task: Task, cfg, prep, data, run_dir: Path, device: str, info, log, resume) -> Path:
    """Schedule, precision, the run's files, the Trainer, the best checkpoint, the test pass, the summary."""
    tc = cfg.train
    steps_per_epoch = math.ceil(prep.n_train / tc.batch_size / tc.grad_accum)
    tcfg = dataclasses.replace(tc)  # the trainer's own copy, derived keys filled in; config.yaml keeps the user's
    line = task.schedule(cfg, tcfg, steps_per_epoch)
    precision, reason = broadcast(info, choose_precision(tc.precision, device))  # ranks agree on rank 0's
    log(reason)
    model = prep.model.to(device)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    if task.batch_unit:  # a schedule in epochs of examples
        log(f"model: {_count(n_params)} parameters" + "".join(f"; {n}" for n in prep.notes) + f"; {tcfg.max_steps} "
            f"steps ({tcfg.max_steps / max(steps_per_epoch, 1):.2f} epochs of {steps_per_epoch}), batch "
            f"{tc.batch_size} x {tc.grad_accum}, lr {tc.lr:g}, warmup {tcfg.warmup_steps}")
    spare = None
    if info.enabled:
        broadcast_parameters(model)
        log(f"distributed: {info.world_size} ranks, backend {info.backend}, {tc.parallel}"
            f"{', activation checkpointing' if getattr(tc, 'activation_checkpointing', False) else ''}"
            + (f"; each rank {tc.grad_accum // info.world_size} of the {tc.grad_accum} micro-batches of every step"
               if prep.global_batches else ""))
        if tc.parallel == "fsdp" and info.is_main:  # the test pass runs on rank 0, on a plain copy
            spare = copy.deepcopy(model)
        if precision == "bf16" and tcfg.bf16_weights:
            tcfg.bf16_weights = False  # the bf16 twin copies a plain model; DDP/FSDP wrap the model itself
    if line:
        log(line)
    wrapped = wrap_model(model, info, tc.parallel, device, getattr(tc, "activation_checkpointing", False))

    # the run folder: everything predict/eval need, written before training starts (a resume keeps the files)
    data.report["schedule"] = {"max_steps": tcfg.max_steps, "steps_per_epoch": steps_per_epoch,
                               "warmup_steps": tcfg.warmup_steps, "eval_every": tcfg.eval_every}
    if info.is_main:
        if resume is None:
            if prep.save is not None:
                prep.save(run_dir)
            write_run_json(run_dir, task.name, task.config_file, **prep.meta)
        (run_dir / task.config_file).write_text(dump_yaml(cfg))  # on a resume: with the overrides it was given
        (run_dir / "data.json").write_text(json.dumps(data.report, indent=2) + "\n")

    if prep.evaluate is None:
        log("warning: the validation split is empty: no evaluation during training; the last checkpoint is used")
    callbacks = [EarlyStopping(getattr(cfg, "patience", 0))]
    budget = task.time_budget_minutes(cfg) if task.time_budget_minutes else 0
    if budget:
        callbacks.append(TimeBudget(60.0 * budget))
    trainer = Trainer(wrapped, prep.objective, tcfg, run_dir, prep.batch, evaluate=prep.evaluate, device=device,
                      precision=precision, log=log, on_eval=prep.on_eval, metric=prep.metric, callbacks=callbacks,
                      world_size=info.world_size, is_main=info.is_main, rank=info.rank,
                      global_batches=prep.global_batches, seed=cfg.seed)
    trainer.throughput_unit = prep.unit or task.throughput_unit
    trainer.ramp = task.ramp(tcfg, cfg, log)
    trainer.resume_hint = f"continue with kiln {task.verb} --resume {run_dir}"
    result = trainer.fit(resume_from=run_dir if resume is not None else None)
    if info.is_main:
        _finish(task, cfg, prep, spare if spare is not None else unwrap(wrapped), trainer, result, precision,
                callbacks[0], run_dir, log)
    return run_dir


def _finish(task: Task, cfg, prep, model, trainer, result, precision, early, run_dir: Path, log) -> None:
    """Rank 0: the best checkpoint into the plain model, the task's test pass, eval/summary.json."""
    best = trainer.best
    summary = {"steps": result["step"], "seconds": result["elapsed"], "train_seconds": trainer.train_seconds,
               "eval_seconds": trainer.eval_seconds, "best_step": best.step, "best_" + prep.metric: best.value,
               "stopped_early_at": early.stopped_at, "precision": precision}
    log(f"trained {result['step']} steps in {result['elapsed']:.1f}s ({trainer.eval_seconds:.1f}s of it "
        f"evaluating); best {prep.metric} {best.value if best.value is not None else float('nan'):.4f} at step "
        f"{best.step}")
    ckpt = find_checkpoint(run_dir, "best")  # the best by the metric; the newest without a validation split
    load_weights(model, ckpt / "model.safetensors")
    summary["checkpoint"] = str(ckpt)
    summary.update(task.summary(result, trainer))
    prep.state["summary"] = summary
    results = task.test(cfg, prep, model, ckpt, run_dir, log)
    (run_dir / "eval").mkdir(exist_ok=True)
    (run_dir / "eval" / "summary.json").write_text(json.dumps({"train": summary, **results}, indent=2) + "\n")
    log(f"done: run folder {run_dir}")


def recipe_for(task: Task, config, resume):
    """The recipe to load: `config`, or for a resume the run's own config file (never both)."""
    if resume is None:
        return config
    if config:
        raise KilnError(f"give a recipe or --resume, not both: --resume {resume} continues with the run's own "
                        f"{task.config_file} (overrides on the command line still apply)")
    path = _resumable(task, Path(resume)) / task.config_file
    if not path.is_file():
        raise KilnError(f"cannot resume: {resume} is not a finetune {task.name} run folder (no {task.config_file})")
    return path


def _resumable(task: Task, run_dir: Path) -> Path:
    kind = run_kind(run_dir)  # one line when it is no run folder at all
    if kind != task.name:
        verb = "pretrain" if kind == "pretrain" else f"finetune {kind}"
        raise KilnError(f"cannot resume {run_dir} with {task.verb}: it is a {kind} run "
                        f"(kiln {verb} --resume {run_dir})")
    return run_dir


def _saved_data(run_dir: Path) -> dict:
    """data.json of the run to resume, without its schedule: what reading and preparing the data found."""
    f = run_dir / "data.json"
    try:
        before = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise KilnError(f"cannot resume: {f} is missing or unreadable (it records the data the run trained on)") \
            from None
    before.pop("schedule", None)
    return before


def _check_same_data(run_dir: Path, before: dict, report: dict, read_only: bool = False) -> None:
    """Exact resume needs the examples the run started with: what reading (read_only: the keys reading wrote)
    and preparing them found now vs data.json."""
    now = json.loads(json.dumps(report))
    for key in sorted(set(now) if read_only else set(before) | set(now)):
        if before.get(key) != now.get(key):
            raise KilnError(f"cannot resume {run_dir}: the data differ from when the run started ({key}: "
                            f"{json.dumps(before.get(key))[:120]} in data.json, now {json.dumps(now.get(key))[:120]});"
                            " exact resume needs the same files")


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 100_000 else f"{n:,}"

