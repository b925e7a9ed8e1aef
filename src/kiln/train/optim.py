"""Optimizers and the learning-rate schedule.

AdamW decays only 2-D weights (nanoGPT's configure_optimizers). Muon (kiln.train.muon) orthogonalizes the
updates of 2-D hidden weights; embeddings, the output head, norms and biases stay with AdamW, as in the
Muon paper and modded-nanoGPT. Several optimizers are driven as one through `OptimizerGroup`.
"""

from __future__ import annotations

import math
import re

import torch

from kiln.config import TrainConfig
from kiln.errors import KilnError


class OptimizerGroup:
    """Several torch optimizers stepped together; state_dict/load_state_dict keep them in order."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers

    @property
    def param_groups(self):
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self):
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True):
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state):
        for o, s in zip(self.optimizers, state["optimizers"], strict=True):
            o.load_state_dict(s)


def _adamw(groups, cfg: TrainConfig, device: str) -> torch.optim.AdamW:
    kw = {"fused": True} if device.startswith("cuda") or device == "cpu" else {}
    try:
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **kw)
    except (RuntimeError, TypeError):  # fused not available for this device/dtype
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def layer_depths(names: list[str]) -> dict[str, int]:
    """Depth of each parameter for layer-wise lr decay: embeddings 0, block i -> i + 1, the rest on top.

    Blocks are found by name (`...blocks.<i>.`); an encoder-decoder's two stacks are numbered alike."""
    blocks = [int(m.group(1)) for n in names if (m := re.search(r"\bblocks\.(\d+)\.", n))]
    top = (max(blocks) + 2) if blocks else 1
    depth = {}
    for n in names:
        m = re.search(r"\bblocks\.(\d+)\.", n)
        depth[n] = int(m.group(1)) + 1 if m else (0 if ".embed." in f".{n}" else top)
    return depth


def _decay_groups(named, cfg: TrainConfig) -> list[dict]:
    """AdamW/LAMB param groups: weight decay on 2-D weights only; with layer_lr_decay, one group per depth."""
    if cfg.layer_lr_decay == 1.0:
        return [{"params": [p for _, p in named if p.dim() >= 2], "weight_decay": cfg.weight_decay, "lr_scale": 1.0},
                {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0, "lr_scale": 1.0}]
    depth = layer_depths([n for n, _ in named])
    top = max(depth.values(), default=0)
    groups: dict[tuple[int, bool], dict] = {}
    for n, p in named:
        key = (depth[n], p.dim() >= 2)
        g = groups.setdefault(key, {"params": [], "weight_decay": cfg.weight_decay if key[1] else 0.0,
                                    "lr_scale": cfg.layer_lr_decay ** (top - key[0])})
        g["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: str = "cpu") -> OptimizerGroup:
    opt = _build_optimizer(model, cfg, device)
    if getattr(model, "lora_spec", None) is not None:  # LoRA: few kinds of trainable tensors, so groups may be
        # empty; drop them (and optimizers left with none) so the name-keyed state resumes (DSD allows one)
        for o in opt.optimizers:
            o.param_groups[:] = [g for g in o.param_groups if g["params"]]
        opt.optimizers = [o for o in opt.optimizers if o.param_groups]
    return opt


def _build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: str = "cpu") -> OptimizerGroup:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not 0.0 < cfg.layer_lr_decay <= 1.0:
        raise KilnError(f"train.layer_lr_decay must be in (0, 1], got {cfg.layer_lr_decay}")
    if cfg.layer_lr_decay != 1.0 and cfg.optimizer == "muon":
        raise KilnError("train.layer_lr_decay works with optimizer adamw or lamb, not muon")
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    head = getattr(model, "lm_head", None)
    if head is not None:
        embeddings.add(id(head.weight))
    decay = [p for n, p in named if p.dim() >= 2]
    no_decay = [p for n, p in named if p.dim() < 2]
    if cfg.optimizer == "adamw":
        return OptimizerGroup([_adamw(_decay_groups(named, cfg), cfg, device)])
    if cfg.optimizer == "lamb":
        from kiln.train.lamb import Lamb

        return OptimizerGroup([Lamb(_decay_groups(named, cfg), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))])
    # muon: hidden 2-D matrices with Muon, everything else with AdamW (LoRA's low-rank A and B too: only the
    # parameters that train are here, kiln.model.lora freezes the rest)
    embeddings |= {id(p) for n, p in named if n.endswith((".lora_A", ".lora_B"))}
    hidden = [p for p in decay if id(p) not in embeddings]
    rest_decay = [p for p in decay if id(p) in embeddings]
    groups = [{"params": hidden, "lr_scale": cfg.muon_lr / cfg.lr}]
    if any(type(p).__name__ == "DTensor" for p in hidden):  # FSDP2 shards: torch's Muon handles DTensors
        muon = torch.optim.Muon(groups, lr=cfg.muon_lr, weight_decay=cfg.weight_decay,
                                adjust_lr_fn="match_rms_adamw")
    else:  # same algorithm, same-shape matrices orthogonalized in one batched matmul (kiln.train.muon)
        from kiln.train.muon import Muon

        muon = Muon(groups, lr=cfg.muon_lr, weight_decay=cfg.weight_decay)
    adam = _adamw([{"params": rest_decay, "weight_decay": cfg.weight_decay, "lr_scale": 1.0},
                   {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0}], cfg, device)
    return OptimizerGroup([muon, adam])


def lr_at(step: int, cfg: TrainConfig, max_steps: int | None = None) -> float:
    """Warmup then cosine/linear decay to min_lr at max_steps (default cfg.max_steps; a time budget passes the
    steps that fit). A pure function of the step: nothing to resume."""
    total = cfg.max_steps if max_steps is None else max_steps
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    if cfg.decay == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    if cfg.decay == "linear":
        return cfg.lr + (cfg.min_lr - cfg.lr) * progress
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: OptimizerGroup, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
