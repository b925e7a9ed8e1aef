"""The run components' configs: device and precision (kiln.run.device), checkpoints (kiln.run.checkpoint).

Beside their code, importing nothing but kiln.config_loader (see kiln.train.config for why)."""

from __future__ import annotations

from dataclasses import dataclass

from kiln.config_loader import _f


@dataclass
class DeviceConfig:
    """kiln.run.device and the trainer's compute copy: where and in what precision a run computes."""

    precision: str = _f("auto", "auto | fp32 | bf16 (auto: bf16 only where the device computes it fast)",
                        choices=("auto", "fp32", "bf16"))
    bf16_weights: bool = _f(True, "with bf16: compute in a bf16 copy of the weights (fp32 master weights in the "
                            "optimizer and checkpoints) instead of autocast's per-op casts")
    compile: bool = _f(False, "torch.compile the model")
    device: str = _f("auto", "auto | cpu | cuda[:N] | mps (auto: a CUDA GPU when there is one)")
    threads: int = _f(0, "torch CPU threads; 0 = all cores", range=">= 0")


@dataclass
class CheckpointConfig:
    """kiln.run.checkpoint: how often checkpoints are written and how many are kept."""

    save_every: int = _f(500, "checkpoint every N steps (and at evals and the end); 0 = at evaluations and the end",
                         range=">= 0")
    keep_last: int = _f(2, "checkpoints to keep besides the best", range=">= 0")
