"""The training components' configs: the loop, the optimizer, the lr schedule, batch scaling, parallelism.

Each is a small dataclass beside the code that reads it (trainer.py, optim.py, scaling.py, distributed.py) and
imports nothing but kiln.config_loader, so a verb's config (kiln.config) composes the ones it uses and the CLI checks
them before torch is imported. A field's range is written once, here or in a verb's override of the field.
"""

from __future__ import annotations

from dataclasses import dataclass

from kiln.config_loader import _f


@dataclass
class LoopConfig:
    """kiln.train.trainer: how long, how big a step, how often to evaluate and log."""

    max_steps: int = _f(2000, "optimizer steps", range=">= 1")
    batch_size: int = _f(12, "sequences per micro-batch", range=">= 1")
    grad_accum: int = _f(1, "micro-batches per optimizer step", range=">= 1")
    eval_every: int = _f(250, "evaluate every N steps", range=">= 1")
    log_every: int = _f(10, "write metrics every N steps", range=">= 1")
    target_loss: float = _f(0.0, "stop when val loss reaches this value; 0 = never", range=">= 0")


@dataclass
class OptimizerConfig:
    """kiln.train.optim.build_optimizer."""

    optimizer: str = _f("adamw", "adamw | muon | lamb | auto (Muon where its Newton-Schulz step costs at most the "
                        "forward+backward FLOPs of a step, else AdamW; the run log says which)",
                        choices=("adamw", "muon", "lamb", "auto"))
    lr: float = _f(1e-3, "peak learning rate (AdamW part); 0 = a frozen run", range=">= 0")
    muon_lr: float = _f(0.02, "learning rate of Muon for 2-D hidden weights (optimizer: muon)", range="> 0")
    layer_lr_decay: float = _f(1.0, "layer-wise lr decay (fine-tuning, AdamW/LAMB): block i of n gets lr * "
                               "decay^(n - i), the embeddings decay^(n + 1), heads and final norms the full lr; 1 = off",
                               range="(0, 1]")
    weight_decay: float = _f(0.1, "decoupled weight decay, on 2-D weights only", range=">= 0")
    beta1: float = _f(0.9, "Adam beta1", range="[0, 1)")
    beta2: float = _f(0.99, "Adam beta2", range="[0, 1)")
    grad_clip: float = _f(1.0, "clip the global grad norm to this value; 0 = off", range=">= 0")


@dataclass
class ScheduleConfig:
    """kiln.train.optim.lr_at: warmup, then a decay to min_lr at the last step."""

    warmup_steps: int = _f(100, "linear warmup steps", range=">= 0")
    decay: str = _f("cosine", "cosine | linear | constant", choices=("cosine", "linear", "constant"))
    min_lr: float = _f(1e-4, "final learning rate of the decay", range=">= 0")


@dataclass
class BatchScalingConfig:
    """kiln.train.scaling and kiln.train.ramp: a global batch counted in tokens, lr scaled with it, a ramp."""

    batch_tokens: int = _f(0, "global batch in tokens per optimizer step; when set, grad_accum is derived as "
                           "batch_tokens / (batch_size * context_length * world_size); 0 = batch_size * "
                           "grad_accum * world_size * context_length", range=">= 0")
    lr_scaling: str = _f("none", "none | linear | sqrt: scale lr (and min_lr, muon_lr) by (global batch tokens / "
                         "reference_batch_tokens)^(1 | 0.5)", choices=("none", "linear", "sqrt"))
    reference_batch_tokens: int = _f(0, "global batch in tokens that train.lr was tuned for (train.lr_scaling)",
                                     range=">= 0")
    batch_ramp_tokens: int = _f(0, "grow the global batch from one micro-batch per rank to the target over this "
                                "many tokens, lr following train.lr_scaling; 0 = off", range=">= 0")


@dataclass
class ParallelConfig:
    """kiln.train.distributed: the process group and the wrapper under torchrun."""

    backend: str = _f("auto", "distributed backend under torchrun: auto (nccl on cuda, gloo on cpu) | nccl | gloo",
                      choices=("auto", "nccl", "gloo"))
    parallel: str = _f("ddp", "data parallelism under torchrun: ddp | fsdp (FSDP2, each block then the root "
                       "sharded)", choices=("ddp", "fsdp"))
    activation_checkpointing: bool = _f(False, "recompute each block's activations in the backward pass")
