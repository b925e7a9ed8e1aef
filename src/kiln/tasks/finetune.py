"""The one fine-tuning driver: a Task (kiln.tasks.base) in, a trained, evaluated run folder out.

    read the data (every input error before anything is written) -> create and lock the run folder ->
    seed, threads, device -> task.prepare (backbone, encoding, model + head, batches, objective) -> schedule ->
    precision -> run.json, config, data.json -> the Trainer with callbacks (best by the task's metric, early
    stopping, a time budget) -> the best checkpoint -> task.test -> eval/summary.json

`resume=RUN_DIR` continues a stopped run exactly: the same data (checked against data.json), the same
preparation, the newest checkpoint's weights, optimizer, RNG and callback state; batches are a pure function of
the step, so the resumed run takes the steps the uninterrupted one would have.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from pathlib import Path

import torch

from kiln.config import dump_yaml, load_config
from kiln.errors import KilnError
from kiln.run.checkpoint import find_checkpoint, load_weights, unwrap
from kiln.run.device import choose_precision, resolve_device
from kiln.run.folder import RunLock, RunLog, create_run, default_run_dir, holds_run, run_kind, write_run_json
from kiln.tasks.base import Task
from kiln.train.callbacks import EarlyStopping, TimeBudget
from kiln.train.trainer import Trainer


def finetune(task: Task, cfg, quiet: bool = False, resume: str | Path | None = None) -> Path:
    """Train `task` as `cfg` says (or continue the run folder `resume`); returns the run folder."""
    task.check_train(cfg)
    task.check(cfg)
    tc = cfg.train
    lora = getattr(tc, "lora", None)
    if lora is not None and lora.rank and not getattr(cfg, "init", ""):
        raise KilnError(f"train.lora.rank {lora.rank}: LoRA adapts a pretrained model, and finetune {task.name} "
                        "has no init here (set init to a kiln run or Hugging Face folder, or train.lora.rank 0)")
    if tc.batch_size < 1 or tc.grad_accum < 1:
        raise KilnError("train.batch_size and train.grad_accum must be >= 1")
    saved_data = None
    if resume is None:
        run_dir = default_run_dir(cfg.name, cfg.out)
        if holds_run(run_dir):
            raise KilnError(f"run folder {run_dir} already holds checkpoints; pick another --out (or continue it: "
                            f"kiln finetune {task.name} --resume {run_dir})")
    else:
        run_dir = _resumable(task, Path(resume))
        ckpt = find_checkpoint(run_dir)  # fails early on a folder without a complete checkpoint
        saved_data = _saved_data(run_dir)
    log0: list[str] = []
    data = task.read(cfg, log0.append)  # every input error before anything is created
    if resume is not None:
        _check_same_data(run_dir, saved_data, data.report, read_only=True)  # refused before writing anything

    created = not run_dir.exists()
    lock = create_run(run_dir, task.name) if resume is None else RunLock(run_dir).acquire()
    log = RunLog(run_dir, quiet)
    log(f"kiln finetune {task.name} -> {run_dir}" if resume is None else
        f"kiln finetune {task.name} --resume {run_dir} (from {ckpt.name})")
    for line in log0:
        log(line)
    torch.manual_seed(cfg.seed)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    device = resolve_device(tc.device)
    try:  # errors found once the backbone is loaded: leave no run folder behind
        prep = task.prepare(cfg, run_dir, data, device, log)
        if resume is not None:
            _check_same_data(run_dir, saved_data, data.report)
        if lora is not None and lora.rank:  # freeze the backbone, adapters on it; the task's head trains in full
            from kiln.model.lora import lora_from_config

            lora_from_config(prep.model, lora, log)
    except KilnError:
        lock.release()
        if created:  # (never on a resume: the folder was there)
            shutil.rmtree(run_dir, ignore_errors=True)
        raise

    steps_per_epoch = math.ceil(prep.n_train / tc.batch_size / tc.grad_accum)
    tcfg = dataclasses.replace(tc)  # the trainer's own copy, derived keys filled in; config.yaml keeps the user's
    task.schedule(cfg, tcfg, steps_per_epoch)
    precision, reason = choose_precision(tc.precision, device)
    log(reason)
    model = prep.model.to(device)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {_count(n_params)} parameters" + "".join(f"; {n}" for n in prep.notes) + f"; {tcfg.max_steps} steps "
        f"({tcfg.max_steps / max(steps_per_epoch, 1):.2f} epochs of {steps_per_epoch}), batch {tc.batch_size} x "
        f"{tc.grad_accum}, lr {tc.lr:g}, warmup {tcfg.warmup_steps}")

    # the run folder: everything predict/eval need, written before training starts (a resume keeps the files)
    data.report["schedule"] = {"max_steps": tcfg.max_steps, "steps_per_epoch": steps_per_epoch,
                               "warmup_steps": tcfg.warmup_steps, "eval_every": tcfg.eval_every}
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
    trainer = Trainer(model, prep.objective, tcfg, run_dir, prep.batch, evaluate=prep.evaluate, device=device,
                      precision=precision, log=log, on_eval=prep.on_eval, metric=prep.metric, callbacks=callbacks)
    trainer.throughput_unit = task.throughput_unit
    trainer.resume_hint = f"continue with kiln finetune {task.name} --resume {run_dir}"
    result = trainer.fit(resume_from=run_dir if resume is not None else None)
    best = trainer.best
    summary = {"steps": result["step"], "seconds": result["elapsed"], "train_seconds": trainer.train_seconds,
               "eval_seconds": trainer.eval_seconds, "best_step": best.step, "best_" + prep.metric: best.value,
               "stopped_early_at": callbacks[0].stopped_at, "precision": precision}
    log(f"trained {result['step']} steps in {result['elapsed']:.1f}s ({trainer.eval_seconds:.1f}s of it "
        f"evaluating); best {prep.metric} {best.value if best.value is not None else float('nan'):.4f} at step "
        f"{best.step}")

    ckpt = find_checkpoint(run_dir, "best")  # the best by the metric; the newest without a validation split
    load_weights(unwrap(model), ckpt / "model.safetensors")
    summary["checkpoint"] = str(ckpt)
    summary.update(task.summary(result, trainer) if hasattr(task, "summary") else {})
    prep.state["summary"] = summary
    results = task.test(cfg, prep, model, ckpt, run_dir, log)
    (run_dir / "eval").mkdir(exist_ok=True)
    (run_dir / "eval" / "summary.json").write_text(json.dumps({"train": summary, **results}, indent=2) + "\n")
    log(f"done: run folder {run_dir}")
    lock.release()
    return run_dir


def finetune_from_cli(task: Task, config: str | None, overrides: list[str], resume: str | None = None) -> Path:
    cfg = load_config(recipe_for(task, config, resume), overrides, cls=task.config_cls)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return finetune(task, cfg, resume=resume)


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
        raise KilnError(f"cannot resume {run_dir} with finetune {task.name}: it is a {kind} run "
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


def is_hf_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and not (path / "config.yaml").is_file()


def load_backbone(init: str, checkpoint: str, run_dir: Path, log, refuse: tuple[str, ...] = ()):
    """(backbone, tokenizer, info) from `init`: a kiln run folder, or a Hugging Face folder imported into
    run_dir/base. `refuse`: config files of run kinds that are no backbone (a fine-tuned classifier)."""
    from kiln.run.load import load

    if not init:
        raise KilnError("init is empty: name a kiln run folder or a Hugging Face model folder (--init PATH)")
    path = Path(init).expanduser()
    if not path.exists():
        raise KilnError(f"init not found: {path}")
    info = {"init": str(path)}
    for name in refuse:
        if (path / name).is_file():
            raise KilnError(f"init {path} is a fine-tuned run ({name}); start from its backbone (a kiln run or HF "
                            "folder)")
    if is_hf_folder(path):
        from kiln.interop.hf import import_hf

        base = run_dir / "base"
        if (base / "config.yaml").is_file():
            log(f"using the backbone already imported into {base}")
        else:
            log(f"importing Hugging Face model {path} -> {base}")
            import_hf(path, base)
        info.update(kind="huggingface", imported_to=str(base))
        backbone, tokenizer, run_cfg = load(base)
    else:
        backbone, tokenizer, run_cfg = load(path, checkpoint, quantized_ok=False)
        info.update(kind="kiln", checkpoint=checkpoint)
    if tokenizer is None:
        raise KilnError(f"init {path} has no tokenizer.json; fine-tuning needs the backbone's tokenizer")
    return backbone, tokenizer, info


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 100_000 else f"{n:,}"

