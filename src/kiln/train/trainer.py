"""The one training loop. Objectives plug in as a loss over a batch; everything else is shared.

Per optimizer step: fetch the step's micro-batches (a pure function of the step, so resume seeks), count
their target tokens, and backpropagate sum-of-losses / total-targets for each, so the gradient does not
depend on how the batch is split into micro-batches (transformers#34191). Then clip, step, log.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch

from kiln.config import TrainConfig  # the components the loop reads, composed
from kiln.errors import KilnError
from kiln.model.packed import forget as forget_packed
from kiln.report.metrics import MetricsLog
from kiln.report.plots import LossPlot
from kiln.report.progress import Progress
from kiln.report.trackers import check_installed, open_trackers
from kiln.run.checkpoint import find_checkpoint, load_trainer_state, save_checkpoint, unwrap
from kiln.train.callbacks import BestByMetric, Callback
from kiln.train.distributed import full_model_state, full_optimizer_state, load_model_state, load_optimizer_state
from kiln.train.optim import MUON_MAX_NS_RATIO, build_optimizer, choose_optimizer, lr_at, set_lr
from kiln.run.device import autocast
from kiln.train.bf16 import bf16_copy, grads_to_master, master_to_copy


class Objective(Protocol):
    def targets(self, batch) -> int: ...  # number of target tokens/labels in the batch

    def loss(self, model, batch) -> torch.Tensor: ...  # SUM of per-target losses (not the mean)


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was saved. The CLI exits 130."""


@dataclass
class TrainState:
    step: int = 0
    tokens: int = 0
    best_val: float = math.inf
    elapsed: float = 0.0  # training wall time over all sessions of this run


def to_device(batch, device: str):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def _tokens_per_step(next_batch, cfg: TrainConfig) -> int:
    """Tokens (or examples x positions) one rank sees per optimizer step, from micro-batch 0's first tensor."""
    b = next_batch(0)
    t = b if isinstance(b, torch.Tensor) else next((v for v in b.values() if isinstance(v, torch.Tensor)), None) \
        if isinstance(b, dict) else None
    return (t.numel() if t is not None else cfg.batch_size) * cfg.grad_accum


class Trainer:
    throughput_unit = "tok"  # what the progress bar counts per second: tokens, or "ex" (examples) for classifiers
    def __init__(self, model: torch.nn.Module, objective: Objective, cfg: TrainConfig, run_dir: Path,
                 next_batch: Callable[[int], object], evaluate: Callable[[torch.nn.Module], dict] | None = None,
                 device: str = "cpu", precision: str = "fp32", log=print, tokens_per_target: int = 1,
                 on_eval: Callable[[int, dict], None] | None = None, world_size: int = 1, is_main: bool = True,
                 metric: str = "val_loss", callbacks: list[Callback] | None = None, rank: int = 0,
                 global_batches: bool = False, seed: int | None = None):
        """global_batches: next_batch(i) is the i-th micro-batch of the whole run (not of this rank) and
        cfg.grad_accum counts micro-batches per step over all ranks: rank r of W takes micro-batches r, r + W, ...
        of each step, so the global batch and the order of examples do not depend on the number of ranks
        (train.scaling.check_micro_batches: a multiple of the world size).
        seed: reseed torch's RNG before each micro-batch from (seed, its global index), so dropout is a pure
        function of the micro-batch too (a run on W ranks draws what one process draws; resume draws the same)."""
        self.model, self.objective, self.cfg, self.run_dir = model, objective, cfg, Path(run_dir)
        self.rank, self.global_batches, self.seed = rank, global_batches, seed
        self.best = BestByMetric(metric)  # `best` checkpoint pointer: the best value of `metric`
        self.callbacks: list[Callback] = [self.best, *(callbacks or [])]
        self.horizon = cfg.max_steps  # where the loop and the lr schedule end (a time budget may move it)
        self.stop_reason: str | None = None
        self.resume_hint = "resume with --resume"  # what a stop by signal tells the user (the driver may differ)
        self.train_seconds = 0.0  # inside optimizer steps only (batches, forward, backward, update)
        self.eval_seconds = 0.0
        self.evals: list[tuple[int, dict]] = []  # (step, metrics) of every evaluation, kept across a resume
        self.next_batch, self.evaluate, self.device, self.precision = next_batch, evaluate, device, precision
        self.log, self.on_eval, self.world_size, self.is_main = log, on_eval, world_size, is_main
        self.tokens_per_target = tokens_per_target
        self.ramp = None  # a kiln.train.ramp.BatchRamp when the global batch grows during training
        self.optimizer_name = cfg.optimizer
        if cfg.optimizer == "auto":  # Muon where its per-step Newton-Schulz cost is amortised, else AdamW
            per_step = _tokens_per_step(next_batch, cfg) * (1 if global_batches else world_size)  # the global step's
            self.optimizer_name, ratio = choose_optimizer(unwrap(model), per_step)
            log(f"optimizer auto: {self.optimizer_name} (Muon's Newton-Schulz would cost {ratio:.2f}x the "
                f"forward+backward FLOPs of a step; Muon up to {MUON_MAX_NS_RATIO:g}x)")
            cfg = dataclasses.replace(cfg, optimizer=self.optimizer_name)
        check_installed(cfg)  # train.trackers' libraries, on every rank before any step (one line if missing)
        self.optimizer = build_optimizer(unwrap(model), cfg, "cpu" if device == "cpu" else device, precision)
        self.state = TrainState()
        # bf16 weights: forward/backward run in a bf16 copy; the fp32 model is the master copy that the
        # optimizer updates and checkpoints store (exact resume, no precision lost in the weights).
        self.bf16_weights = precision == "bf16" and cfg.bf16_weights
        self.compute_model = bf16_copy(model) if self.bf16_weights else model
        self.compiled = torch.compile(self.compute_model) if cfg.compile else self.compute_model
        self._stop_signal: int | None = None
        self.reached_target_at: float | None = None

    # ------------------------------------------------------------------ checkpoints
    def trainer_state(self) -> dict:
        s = self.state
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {"step": s.step, "tokens": s.tokens, "best_val": s.best_val, "elapsed": s.elapsed,
                # full (unsharded) state keyed by parameter name: resumes on any number of ranks
                "optimizer": full_optimizer_state(self.model, self.optimizer), "optimizer_format": "fqn",
                "rng": rng, "callbacks": {cb.name: cb.state_dict() for cb in self.callbacks},
                "train_seconds": self.train_seconds, "eval_seconds": self.eval_seconds, "evals": self.evals}

    def save(self, is_best: bool = False, val_loss: float | None = None) -> Path | None:
        # gathering the full state is a collective under FSDP: every rank takes part, rank 0 writes
        weights, state = full_model_state(self.model), self.trainer_state()
        if not self.is_main:
            return None
        meta = {"tokens": self.state.tokens, "val_loss": val_loss, "best_val_loss": self.state.best_val
                if math.isfinite(self.state.best_val) else None, "world_size": self.world_size}
        return save_checkpoint(self.run_dir, self.model, self.state.step, state, meta,
                               keep_last=self.cfg.keep_last, is_best=is_best, weights=weights)

    def restore(self, path: Path) -> None:
        ckpt = find_checkpoint(path)
        state = load_trainer_state(ckpt)
        load_model_state(self.model, ckpt / "model.safetensors")
        if self.bf16_weights:
            master_to_copy(self.model, self.compute_model)
        try:
            if state.get("optimizer_format") == "fqn":
                load_optimizer_state(self.model, self.optimizer, state["optimizer"])
            else:  # older checkpoints: the optimizers' own (index-keyed) state dicts
                self.optimizer.load_state_dict(state["optimizer"])
        except (KeyError, ValueError, RuntimeError) as e:
            raise KilnError(f"{ckpt}: optimizer state does not match this model/optimizer ({e})") from None
        self.state = TrainState(step=int(state["step"]), tokens=int(state["tokens"]),
                                best_val=float(state["best_val"]), elapsed=float(state["elapsed"]))
        for cb in self.callbacks:
            cb.load_state_dict(state.get("callbacks", {}).get(cb.name, {}))
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.eval_seconds = float(state.get("eval_seconds", 0.0))
        self.evals = [(int(st), dict(m)) for st, m in state.get("evals", [])]
        if self.on_eval and self.is_main:  # a watcher of evaluations (a task's history, its curves) sees them again
            for st, m in self.evals:
                self.on_eval(st, m)
        if self.best.value is None and self.best.metric == "val_loss" and math.isfinite(self.state.best_val):
            self.best.value = self.state.best_val  # checkpoints from before callbacks kept only this
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.log(f"resumed from {ckpt} at step {self.state.step}")

    # ------------------------------------------------------------------ the loop
    def _on_signal(self, signum, frame):
        self._stop_signal = signum

    def stop(self, reason: str) -> None:
        """End the run after this step (its checkpoint is written): early stopping, a target reached."""
        self.stop_reason = reason
        self.log(reason)

    def train_step(self) -> tuple[float, float | None]:
        for cb in self.callbacks:
            cb.on_step_start(self)
        t0 = time.perf_counter()
        out = self._step()
        self.train_seconds += time.perf_counter() - t0
        for cb in self.callbacks:
            cb.on_step_end(self)
        return out

    def _step(self) -> tuple[float, float | None]:
        cfg, step = self.cfg, self.state.step
        lr = lr_at(step, cfg, self.horizon)
        self.current_lr = lr * (self.ramp.lr_factor(step) if self.ramp is not None else 1.0)
        set_lr(self.optimizer, self.current_lr)
        indices = self.micro_batches(step)
        batches = [to_device(self.next_batch(i), self.device) for i in indices]
        total = torch.tensor(float(sum(self.objective.targets(b) for b in batches)), device=self.device)
        if self.world_size > 1:
            torch.distributed.all_reduce(total)
        loss_sum = 0.0
        for i, batch in enumerate(batches):
            sync = i == len(batches) - 1
            ctx = self.compiled.no_sync() if (not sync and hasattr(self.compiled, "no_sync")) else nullcontext()
            if self.seed is not None:
                torch.manual_seed(_micro_seed(self.seed, indices[i] if self.global_batches
                                              else indices[i] * self.world_size + self.rank))
            with ctx:
                with autocast("fp32" if self.bf16_weights else self.precision, self.device):
                    loss = self.objective.loss(self.compiled, batch)
                (loss / total * self.world_size).backward()  # DDP averages over ranks; undo it to get a sum
            loss_sum += loss.detach().float()
        if self.bf16_weights:
            grads_to_master(self.compute_model, self.model)
        grad_norm = None
        if cfg.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor reduced over the shards
                grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.bf16_weights:
            master_to_copy(self.model, self.compute_model, trainable_only=True)
        forget_packed(self.compute_model)  # the fused optimizer's update leaves the weights' versions as they were
        if self.world_size > 1:  # the sum over ranks first: the same number one process logs
            torch.distributed.all_reduce(loss_sum)
        mean_loss = loss_sum / total
        self.state.step += 1
        self.state.tokens += int(total.item()) * self.tokens_per_target
        return float(mean_loss), (float(grad_norm) if grad_norm is not None else None)

    def micro_batches(self, step: int) -> list[int]:
        """The indices this rank passes to next_batch at optimizer step `step`."""
        if self.ramp is not None:
            first = self.ramp.first_micro(step)
            return list(range(first, first + self.ramp.accum(step)))
        accum = self.cfg.grad_accum
        if not self.global_batches:
            return list(range(step * accum, (step + 1) * accum))
        return list(range(step * accum + self.rank, (step + 1) * accum, self.world_size))

    def run_eval(self) -> dict:
        if self.evaluate is None:
            return {}
        t0 = time.perf_counter()
        self.compute_model.eval()
        with torch.no_grad(), autocast("fp32" if self.bf16_weights else self.precision, self.device):
            metrics = evaluate_on_ranks(self.evaluate, self.compiled, self.world_size, self.is_main)
        self.compute_model.train()
        self.eval_seconds += time.perf_counter() - t0
        for cb in self.callbacks:
            cb.on_eval(self, metrics)
        return metrics

    def _check_step(self, step: int, loss: float, grad_norm: float | None, first_step: int) -> None:
        """Stop with one line when training cannot go on: a gradient of exactly zero at the first step (not one
        parameter would move), a loss that is no longer finite."""
        cfg = self.cfg
        if step == first_step and grad_norm == 0.0:
            raise KilnError(f"the gradient is exactly zero at step {step}: the model would not learn"
                            + (" (train.compile on: try train.compile false)" if cfg.compile else ""))
        if not math.isfinite(loss):
            latest = self.run_dir / "checkpoints" / "latest"
            where = f"; the last good checkpoint is {latest.read_text().strip()}" if latest.is_file() else ""
            raise KilnError(f"loss became {loss} at step {step} (lr {lr_at(step - 1, cfg, self.horizon):.2e}); "
                            f"stopping without saving{where}. Try a lower train.lr or train.grad_clip > 0")

    def _evaluate_and_save(self, step: int, progress, metrics, plot) -> dict:
        """An evaluation: metrics logged (rank 0), the checkpoint saved (best pointer moved when the metric improved),
        train.target_loss checked (reached_target_at set: the loop stops)."""
        cfg = self.cfg
        last_eval = self.run_eval()
        self.evals.append((step, {k: v for k, v in last_eval.items() if isinstance(v, (int, float))}))
        val = last_eval.get("val_loss", math.inf)
        is_best = bool(self.best.improved)
        self.state.best_val = min(self.state.best_val, val)
        if self.is_main:
            line = "  ".join(f"{k} {v:.4f}" for k, v in last_eval.items() if isinstance(v, float))
            progress.write(f"step {step}: {line}  ({self.state.elapsed:.1f}s)")
            metrics.log(step, tokens=self.state.tokens, elapsed=self.state.elapsed, **last_eval)
            plot.evaluated()
            if self.on_eval:
                self.on_eval(step, last_eval)
        self.save(is_best=is_best, val_loss=val)
        if cfg.target_loss and val <= cfg.target_loss and self.reached_target_at is None:
            self.reached_target_at = self.state.elapsed
            if self.is_main:
                progress.write(f"reached target val loss {cfg.target_loss} at step {step} after "
                               f"{self.state.elapsed:.1f}s; stopping")
        return last_eval

    def fit(self, resume_from: Path | None = None) -> dict:
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_from is not None:
            self.restore(resume_from)
        resume_step = self.state.step if resume_from else None
        metrics = MetricsLog(self.run_dir, resume_step=resume_step, trackers=open_trackers(
            self.run_dir, cfg, resume_step)) if self.is_main else None  # only rank 0 logs
        old_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        progress = Progress(self.horizon, self.state.step, cfg.log_every, log=self.log,
                            unit=self.throughput_unit) if self.is_main else None
        plot = LossPlot(metrics, self.run_dir / "plots" / "loss.png", self.run_dir.name,
                        "token" if self.throughput_unit == "tok" else "target") if self.is_main else None
        self.compute_model.train()
        last_eval: dict = {}
        window_t, window_tokens = time.perf_counter(), self.state.tokens
        session_t0 = time.perf_counter() - self.state.elapsed
        first_step = self.state.step + 1
        outcome = "failed"
        try:
            while self.state.step < self.horizon and self.stop_reason is None:
                loss, grad_norm = self.train_step()
                step = self.state.step
                self.state.elapsed = time.perf_counter() - session_t0
                self._check_step(step, loss, grad_norm, first_step)
                now = time.perf_counter()
                tps = (self.state.tokens - window_tokens) / max(now - window_t, 1e-9)
                if progress is not None:
                    progress.update(step, total=self.horizon, loss=loss, lr=self.current_lr, tokens_per_second=tps)
                if metrics is not None and (step % cfg.log_every == 0 or step == self.horizon):
                    metrics.log(step, tokens=self.state.tokens, loss=loss, lr=self.current_lr,
                                grad_norm=grad_norm if grad_norm is not None else "",
                                tokens_per_second=tps, elapsed=self.state.elapsed)
                    window_t, window_tokens = now, self.state.tokens
                is_eval = self.evaluate is not None and (step % cfg.eval_every == 0 or step == self.horizon)
                saved = False
                if is_eval:
                    last_eval = self._evaluate_and_save(step, progress, metrics, plot)
                    saved = True
                    if self.reached_target_at is not None:
                        break
                if not saved and (step % cfg.save_every == 0 or step == self.horizon):
                    self.save()
                    saved = True
                if saved:  # evaluation and checkpoint time are not training throughput: restart the window
                    window_t, window_tokens = time.perf_counter(), self.state.tokens
                if self._stop_signal is not None:
                    if not saved:
                        self.save()
                    name = signal.Signals(self._stop_signal).name
                    if progress is not None:
                        progress.write(f"{name} received: saved checkpoint at step {step}; {self.resume_hint}")
                    if plot is not None:
                        plot.flush()
                    outcome = "killed"
                    raise Interrupted(name)
            if plot is not None:
                plot.flush()
            outcome = "finished"
        finally:
            for s, h in old_handlers.items():
                signal.signal(s, h)
            if progress is not None:
                progress.close()
            if metrics is not None:
                metrics.close(outcome)  # how a tracked run ends: finished | killed | failed
        return {"step": self.state.step, "tokens": self.state.tokens, "elapsed": self.state.elapsed,
                "best_val_loss": self.state.best_val, "reached_target_at": self.reached_target_at, **last_eval}


def _micro_seed(seed: int, index: int) -> int:
    return (seed * 0x9E3779B97F4A7C15 + index) % (1 << 63)


def evaluate_on_ranks(evaluate, model: torch.nn.Module, world_size: int, is_main: bool) -> dict:
    """evaluate(model) as one process computes it. Under DDP, rank 0 evaluates the plain module and sends the
    metrics to the others (no rank repeats it; a task may decode with the model's own methods). Under FSDP every
    rank must take part in the forward's all-gathers: all evaluate the same batches, with the root's own weights
    (embeddings, head) gathered for the whole evaluation, since decoding calls more than forward()."""
    if world_size <= 1:
        return evaluate(model)
    from kiln.train.distributed import is_sharded, on_main

    plain = unwrap(model)
    if not is_sharded(plain):
        return on_main(is_main, lambda: evaluate(plain))
    plain.unshard()
    try:
        return evaluate(model)
    finally:
        plain.reshard()
