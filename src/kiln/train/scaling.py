"""Large-batch arithmetic, without torch: the world size from torchrun's environment, grad_accum derived from
train.batch_tokens, learning rates scaled by train.lr_scaling. The CLI runs it on the config before it imports
torch, so under torchrun every rank refuses an impossible batch in a fraction of a second."""

from __future__ import annotations

import dataclasses
import os

from kiln.config import PretrainTrainConfig, RunConfig
from kiln.errors import KilnError
from kiln.train.config import LoopConfig


def env_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) outside torchrun."""
    def num(name: str, default: int) -> int:
        value = os.environ.get(name, "")
        try:
            return int(value) if value != "" else default
        except ValueError:
            raise KilnError(f"environment variable {name}={value!r} is not an integer") from None

    return num("RANK", 0), num("WORLD_SIZE", 1), num("LOCAL_RANK", 0)


def scale_batch_and_lr(cfg: RunConfig, world_size: int) -> tuple[PretrainTrainConfig, str]:
    """The train config the trainer runs with: grad_accum derived from train.batch_tokens, learning rates
    scaled by train.lr_scaling. Pure arithmetic on the config, so its errors come before any work; the
    user's values stay in config.yaml, so a resume (on any number of ranks) derives the same again."""
    t = cfg.train
    T, B = cfg.model.context_length, t.batch_size
    per_micro = B * T * world_size
    accum = t.grad_accum
    if accum < 1 or B < 1:
        raise KilnError(f"train.batch_size ({B}) and train.grad_accum ({accum}) must be >= 1")
    if t.batch_tokens:
        accum, rest = divmod(t.batch_tokens, per_micro)
        if rest or accum < 1:
            raise KilnError(f"train.batch_tokens {t.batch_tokens} is not a multiple of batch_size x context_length x "
                            f"world_size = {B} x {T} x {world_size} = {per_micro}")
    global_tokens = per_micro * accum
    line = f"global batch {global_tokens:,} tokens = {B} x {accum} x {world_size} x {T} (batch x accum x ranks x context)"
    scale = 1.0
    if t.lr_scaling != "none":
        if t.reference_batch_tokens <= 0:
            raise KilnError(f"train.lr_scaling {t.lr_scaling} needs train.reference_batch_tokens > 0: the global batch "
                            f"in tokens that train.lr was tuned for")
        scale = (global_tokens / t.reference_batch_tokens) ** (1.0 if t.lr_scaling == "linear" else 0.5)
        line += (f"; lr scaling {t.lr_scaling} x{scale:.4g} (vs {t.reference_batch_tokens:,} tokens): lr {t.lr:.3g} -> "
                 f"{t.lr * scale:.3g}, min_lr {t.min_lr:.3g} -> {t.min_lr * scale:.3g}")
    return dataclasses.replace(t, grad_accum=accum, lr=t.lr * scale, min_lr=t.min_lr * scale,
                               muon_lr=t.muon_lr * scale), line


def check_micro_batches(t: LoopConfig, world_size: int) -> None:
    """A fine-tuning step is train.grad_accum micro-batches of train.batch_size examples, whatever the number of
    ranks; each rank takes whole micro-batches, so grad_accum must be a multiple of torchrun's world size."""
    if t.grad_accum % world_size:
        fix = world_size * max(1, round(t.grad_accum / world_size))
        raise KilnError(f"train.grad_accum {t.grad_accum} is not a multiple of the {world_size} ranks: each rank takes "
                        f"whole micro-batches of every step (set --train.grad_accum {fix}; the global batch is "
                        f"train.batch_size x train.grad_accum)")
