"""Optimizers and the learning-rate schedule.

AdamW decays only 2-D weights (nanoGPT's configure_optimizers). Muon (kiln.train.muon) orthogonalizes the
updates of 2-D hidden weights; embeddings, the output head, norms and biases stay with AdamW, as in the
Muon paper and modded-nanoGPT. Several optimizers are driven as one through `OptimizerGroup`.
"""

from __future__ import annotations

import math
import re

import torch

from kiln.train.config import OptimizerConfig, ScheduleConfig
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


def _adamw(groups, cfg: OptimizerConfig, device: str) -> torch.optim.AdamW:
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


def _decay_groups(named, cfg: OptimizerConfig) -> list[dict]:
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


def _hidden_matrices(model: torch.nn.Module, named) -> tuple[list, list, list]:
    """(Muon's hidden 2-D matrices, weights that stay with AdamW: embeddings, the LM head, LoRA's factors and
    convolution kernels (an image stem's, an audio feature encoder's), 1-D parameters)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    head = getattr(model, "lm_head", None)
    if head is not None:
        embeddings.add(id(head.weight))
    # LoRA's low-rank A and B stay with AdamW too (only the parameters that train are here)
    embeddings |= {id(p) for n, p in named if n.endswith((".lora_A", ".lora_B"))}
    embeddings |= {id(p) for _, p in named if p.dim() > 2}
    decay = [p for n, p in named if p.dim() >= 2]
    return ([p for p in decay if id(p) not in embeddings], [p for p in decay if id(p) in embeddings],
            [p for n, p in named if p.dim() < 2])


MUON_MAX_NS_RATIO = 1.0  # optimizer auto: Muon while Newton-Schulz costs at most the forward + backward FLOPs


def choose_optimizer(model: torch.nn.Module, tokens_per_step: int, ns_steps: int = 5) -> tuple[str, float]:
    """optimizer auto: ("muon" | "adamw", ratio), ratio = Newton-Schulz FLOPs / forward+backward FLOPs per step.

    Muon orthogonalizes every hidden m x n update (m <= n) once per optimizer step: ns_steps x (4 m^2 n + 2 m^3)
    FLOPs, whatever the batch; forward + backward cost 6 x parameters x tokens. Measured (docs/benchmarks.md):
    the default recipe (ratio 0.63, 780 tokens a step) reaches val 1.88 in ~500 Muon steps against ~2000 AdamW
    steps at +5% time a step; GPT-2 124M at batch 4 x 256 (ratio 2.0) runs 3.3x slower a step with Muon, more
    than Muon's published saving in steps (~1.35x), so AdamW. The threshold sits between the two."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    hidden, _, _ = _hidden_matrices(model, named)
    ns = sum(ns_steps * (4 * min(p.shape) ** 2 * max(p.shape) + 2 * min(p.shape) ** 3) for p in hidden)
    step = 6 * sum(p.numel() for _, p in named) * max(tokens_per_step, 1)
    ratio = ns / step
    return ("muon" if hidden and ratio <= MUON_MAX_NS_RATIO else "adamw"), ratio


def build_optimizer(model: torch.nn.Module, cfg: OptimizerConfig, device: str = "cpu",
                    precision: str = "fp32") -> OptimizerGroup:
    """`precision` is the run's measured compute precision: Muon's Newton-Schulz runs in bf16 only where bf16 is
    native (on a CPU without it, bf16 matmuls emulated are ~70x slower than fp32: measured 52 s vs 0.74 s for
    two 768 x 3072 updates on an AVX2 EPYC)."""
    if cfg.optimizer == "auto":
        raise KilnError("train.optimizer auto is resolved by the Trainer (kiln.train.optim.choose_optimizer)")
    opt = _build_optimizer(model, cfg, device, torch.bfloat16 if precision == "bf16" else torch.float32)
    if getattr(model, "lora_spec", None) is not None:  # LoRA: few kinds of trainable tensors, so groups may be
        # empty; drop them (and optimizers left with none) so the name-keyed state resumes (DSD allows one)
        for o in opt.optimizers:
            o.param_groups[:] = [g for g in o.param_groups if g["params"]]
        opt.optimizers = [o for o in opt.optimizers if o.param_groups]
    return opt


def _build_optimizer(model: torch.nn.Module, cfg: OptimizerConfig, device: str, ns_dtype) -> OptimizerGroup:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if cfg.layer_lr_decay != 1.0 and cfg.optimizer == "muon":
        raise KilnError("train.layer_lr_decay works with optimizer adamw or lamb, not muon")
    if cfg.optimizer == "adamw":
        return OptimizerGroup([_adamw(_decay_groups(named, cfg), cfg, device)])
    if cfg.optimizer == "lamb":
        from kiln.train.lamb import Lamb

        return OptimizerGroup([Lamb(_decay_groups(named, cfg), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))])
    # muon: hidden 2-D matrices with Muon, everything else with AdamW
    hidden, rest_decay, no_decay = _hidden_matrices(model, named)
    groups = [{"params": hidden, "lr_scale": muon_lr_scale(cfg)}]
    if any(type(p).__name__ == "DTensor" for p in hidden):  # FSDP2 shards: torch's Muon handles DTensors
        muon = torch.optim.Muon(groups, lr=cfg.muon_lr, weight_decay=cfg.weight_decay,
                                adjust_lr_fn="match_rms_adamw")
    else:  # same algorithm, same-shape matrices orthogonalized in one batched matmul (kiln.train.muon)
        from kiln.train.muon import Muon

        muon = Muon(groups, lr=cfg.muon_lr, weight_decay=cfg.weight_decay, ns_dtype=ns_dtype)
    adam = _adamw([{"params": rest_decay, "weight_decay": cfg.weight_decay, "lr_scale": 1.0},
                   {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0}], cfg, device)
    return OptimizerGroup([muon, adam])


def muon_lr_scale(cfg: OptimizerConfig) -> float:
    """Muon's lr over the schedule's (set_lr multiplies): Muon follows train.lr's schedule, scaled so that its
    peak is train.muon_lr. lr 0 is a frozen run: Muon's part is frozen too (its lr and weight decay are 0)."""
    return cfg.muon_lr / cfg.lr if cfg.lr > 0 else 0.0


def lr_at(step: int, cfg: OptimizerConfig | ScheduleConfig, max_steps: int | None = None) -> float:
    """Warmup then cosine/linear decay to min_lr at max_steps (default cfg.max_steps; a time budget passes the
    steps that fit). A pure function of the step: nothing to resume. A peak lr of 0 is a frozen run: 0 at every
    step, whatever min_lr says (a decay from 0 to min_lr would start training midway)."""
    if cfg.lr == 0:
        return 0.0
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
