"""LoRA: low-rank adapters on a frozen model's linear layers (Hu et al. 2021), the frozen base optionally int8.

    y = base(x) + dropout(x) @ A.T @ B.T * alpha / rank        A [rank, in], B [out, rank]

A starts Kaiming-uniform and B at zero (PEFT's init), so training starts from the base model exactly. Only the
adapters and the modules named trainable (a task's head: PEFT's `modules_to_save`) have requires_grad; the
optimizer only sees those (kiln.train.optim takes requires_grad parameters).

Names: a wrapped layer keeps its base tensors under their own names (`...attn.qkv_proj.weight`, `.bias`; int8:
`.weight_int8`, `.scale`) and adds `.lora_A` and `.lora_B`. So the frozen part of the state dict is the plain
model's (kiln.run.checkpoint stores it once per run folder), and merging is `W += B @ A * alpha / rank`
(`merge_state`). kiln's fused `qkv_proj` gets one adapter (one A, one B [q+k+v rows]); kiln.interop.peft
maps it onto Hugging Face's per-projection modules.

int8 base (QLoRA-style, with kiln.model.int8's per-channel weights): every frozen nn.Linear outside the
trainable modules becomes an int8 layer whose backward passes the input gradient through the dequantized
weight (the int8 kernel has no derivative); the tied LM head stays as it is (it is the token embedding).

A leaf of kiln.model: it imports only its siblings and kiln.errors.
"""

from __future__ import annotations

import fnmatch
import json
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from kiln.errors import KilnError
from kiln.model.int8 import Int8Linear, _native_bf16, _quantize_rows
from kiln.model.layers import dropout as _dropout

DEFAULT_TARGETS = "qkv_proj,out_proj"  # kiln's attention projections (self-attention's fused q/k/v, its output)


def split_names(text) -> tuple[str, ...]:
    if isinstance(text, (list, tuple)):
        return tuple(str(t).strip() for t in text if str(t).strip())
    return tuple(t.strip() for t in str(text or "").split(",") if t.strip())


@dataclass(frozen=True)
class LoraSpec:
    """What a LoRA run adapts and how; stored in each checkpoint's metadata (JSON)."""

    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = split_names(DEFAULT_TARGETS)
    int8_base: bool = False
    trainable: tuple[str, ...] = ()  # modules trained in full (the task head; PEFT's modules_to_save)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_config(cls, c, trainable: tuple[str, ...] = ()) -> LoraSpec | None:
        """From a config section with rank/alpha/dropout/targets/int8_base/modules_to_save; None if rank 0."""
        if not c.rank:
            return None
        if c.rank < 0 or c.alpha <= 0 or not 0.0 <= c.dropout < 1.0:
            raise KilnError(f"train.lora: rank must be >= 0, alpha > 0 and dropout in [0, 1); got rank {c.rank}, "
                            f"alpha {c.alpha}, dropout {c.dropout}")
        targets = split_names(c.targets)
        if not targets:
            raise KilnError("train.lora.targets is empty: name the linear layers that get adapters (e.g. "
                            f"{DEFAULT_TARGETS})")
        extra = split_names(getattr(c, "modules_to_save", ""))
        return cls(int(c.rank), float(c.alpha), float(c.dropout), targets, bool(c.int8_base),
                   tuple(dict.fromkeys((*trainable, *extra))))

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> LoraSpec:
        d = json.loads(text)
        return cls(int(d["rank"]), float(d["alpha"]), float(d.get("dropout", 0.0)), tuple(d["targets"]),
                   bool(d.get("int8_base", False)), tuple(d.get("trainable", ())))


def matches(name: str, patterns: tuple[str, ...]) -> bool:
    """A module name matches a pattern that is its last dotted parts (`qkv_proj`, `attn.out_proj`) or an
    fnmatch glob over the whole name (`decoder.blocks.[0-2].attn.*`)."""
    return any(name == p or name.endswith("." + p) or fnmatch.fnmatchcase(name, p) for p in patterns)


def _under(name: str, patterns: tuple[str, ...]) -> bool:
    """`name` is one of the modules `patterns` name, or inside one."""
    parts = name.split(".")
    return any(matches(".".join(parts[:i]), patterns) for i in range(1, len(parts) + 1))


# ----------------------------------------------------------------------------------------------- layers


def _int8_matmul(layer: Int8Linear, x: torch.Tensor) -> torch.Tensor:
    """x @ (scale * q).T, no bias: kiln.model.int8's kernel choice (its bf16 path where the CPU has native bf16)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and x2.shape[0] > 0:
        dt = torch.bfloat16 if x.dtype == torch.bfloat16 or _native_bf16() else x.dtype
        y = torch._weight_int8pack_mm(x2.to(dt).contiguous(), layer.weight_int8, layer.scale.to(dt)).to(x.dtype)
    else:
        y = F.linear(x2, layer.dequantized(x.dtype))
    return y.reshape(*shape[:-1], layer.out_features)


class _Int8MatMul(torch.autograd.Function):
    """The int8 matmul, with the input gradient through the dequantized weight (the kernel has no derivative)."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return _int8_matmul(layer, x)

    @staticmethod
    def backward(ctx, grad):
        return grad @ ctx.layer.dequantized(grad.dtype), None


class FrozenInt8Linear(Int8Linear):
    """kiln.model.int8.Int8Linear that backpropagates to its input (the frozen base of an int8 LoRA run)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _Int8MatMul.apply(x, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)


def _int8_of(lin: nn.Linear) -> FrozenInt8Linear:
    m = FrozenInt8Linear(lin.in_features, lin.out_features, lin.bias is not None, device=lin.weight.device)
    q, scale = _quantize_rows(lin.weight)
    m.weight_int8.data, m.scale.data = q, scale
    if lin.bias is not None:
        m.bias.data = lin.bias.detach().float().clone()
    return m


class _Adapter:
    """The low-rank update shared by both LoRA layers: lora_A [rank, in], lora_B [out, rank]."""

    def _init_adapter(self, rank: int, alpha: float, p: float, device) -> None:
        self.rank, self.alpha, self.lora_dropout = rank, alpha, p
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's (and nn.Linear's) init of A

    def lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        h = _dropout(x, self.lora_dropout, self.training)
        return F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lora rank={self.rank}, alpha={self.alpha:g}"


class LoraLinear(_Adapter, nn.Linear):
    """nn.Linear (its frozen weight and bias under their own names) + a low-rank adapter."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias  # a Parameter or None (registered either way)
        self._init_adapter(rank, alpha, dropout, base.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.lora_delta(x)


class LoraInt8Linear(_Adapter, FrozenInt8Linear):
    """An int8 frozen base (weight_int8, scale, bias) + a low-rank adapter in fp32."""

    def __init__(self, base: FrozenInt8Linear, rank: int, alpha: float, dropout: float = 0.0):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight_int8, self.scale, self.bias = base.weight_int8, base.scale, base.bias
        self._init_adapter(rank, alpha, dropout, base.scale.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return FrozenInt8Linear.forward(self, x) + self.lora_delta(x)


# ----------------------------------------------------------------------------------------------- a model


def spec_of(model: nn.Module) -> LoraSpec | None:
    """The LoraSpec a model was adapted with (apply_lora), or None."""
    return getattr(model, "lora_spec", None)


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def task_heads(model: nn.Module) -> tuple[str, ...]:
    """The modules a task put on top of its backbone (children other than `backbone` that hold parameters):
    new, so they train in full. A model without a `backbone` (a plain Transformer) has none."""
    if not isinstance(getattr(model, "backbone", None), nn.Module):
        return ()
    return tuple(n for n, c in model.named_children() if n != "backbone" and any(True for _ in c.parameters()))


def apply_lora(model: nn.Module, spec: LoraSpec) -> list[str]:
    """Freeze `model`, give the linear layers `spec.targets` names adapters (in place), keep the modules of
    `spec.trainable` trainable; with spec.int8_base the other frozen linear layers become int8. Returns the
    names of the adapted layers. Call it on the plain module (before DDP/compile wrappers)."""
    if spec_of(model) is not None:
        raise KilnError("this model already has LoRA adapters")
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    linears = {n: m for n, m in model.named_modules() if type(m) is nn.Linear and not _under(n, spec.trainable)}
    targets = [n for n in linears if matches(n, spec.targets)]
    if not targets:
        names = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise KilnError(f"train.lora.targets {','.join(spec.targets)!r} names no linear layer of this model; its "
                        f"linear layers are called {', '.join(names)}")
    bad = [p for p in spec.trainable if not any(matches(n, (p,)) for n, _ in model.named_modules())]
    if bad:
        raise KilnError(f"train.lora.modules_to_save {bad[0]!r} names no module of this model")
    model.requires_grad_(False)
    for name in targets:
        lin = linears[name]
        if id(lin.weight) in tied:
            raise KilnError(f"train.lora.targets: {name} shares its weight with the token embedding (a tied head); "
                            "adapt other layers")
        base = _int8_of(lin) if spec.int8_base else lin
        layer = (LoraInt8Linear if spec.int8_base else LoraLinear)(base, spec.rank, spec.alpha, spec.dropout)
        _set(model, name, layer)
    if spec.int8_base:
        for name, lin in linears.items():
            if name not in targets and id(lin.weight) not in tied:
                _set(model, name, _int8_of(lin))
        model.requires_grad_(False)
    for name, m in model.named_modules():
        if isinstance(m, _Adapter):
            m.lora_A.requires_grad_(True)
            m.lora_B.requires_grad_(True)
        elif spec.trainable and matches(name, spec.trainable):
            m.requires_grad_(True)
    model.lora_spec = spec
    model.lora_targets = targets
    # the starting values of what trains in full (a new head): the frozen base file keeps them, so the base is
    # the whole model as training began (kiln export peft writes it as the base model)
    model.lora_initial = {n: p.detach().clone() for n, p in model.named_parameters()
                          if p.requires_grad and not n.endswith((".lora_A", ".lora_B"))}
    return targets


def base_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The frozen base of an adapted model's state dict: everything but the adapters, with the modules that
    train in full at their starting values (apply_lora kept them)."""
    initial = getattr(model, "lora_initial", {})
    return {k: initial.get(k, v).detach().contiguous().cpu() for k, v in state.items()
            if not k.endswith((".lora_A", ".lora_B"))}


def trainable_names(model: nn.Module) -> set[str]:
    """Names of the parameters that train (adapters and trainable modules): what a LoRA checkpoint stores."""
    return {n for n, p in model.named_parameters() if p.requires_grad}


def count(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameters, tied ones counted once."""
    ps = list(model.parameters())
    return sum(p.numel() for p in ps if p.requires_grad), sum(p.numel() for p in ps)


def adapter_names(state: dict) -> list[str]:
    """Module names that carry an adapter in a state dict (`X.lora_A` present)."""
    return [k[: -len(".lora_A")] for k in state if k.endswith(".lora_A")]


def merge_state(state: dict[str, torch.Tensor], spec: LoraSpec) -> dict[str, torch.Tensor]:
    """A LoRA model's full state dict (base + adapters) -> the plain model's: W + B @ A * alpha / rank for each
    adapted layer, int8 weights dequantized into fp32 `weight`s."""
    out = dict(state)
    for name in [k[: -len(".weight_int8")] for k in state if k.endswith(".weight_int8")]:
        q, scale = out.pop(f"{name}.weight_int8"), out.pop(f"{name}.scale")
        out[f"{name}.weight"] = q.float() * scale.float()[:, None]
    for name in adapter_names(state):
        a, b = out.pop(f"{name}.lora_A").float(), out.pop(f"{name}.lora_B").float()
        w = out[f"{name}.weight"]
        out[f"{name}.weight"] = (w.float() + (b @ a) * spec.scaling).to(w.dtype).contiguous()
    return out


def lora_from_config(model: nn.Module, c, log=print, trainable: tuple[str, ...] | None = None) -> LoraSpec | None:
    """Adapt `model` as a config's train.lora section says (nothing when its rank is 0) and log what trains.
    `trainable`: the modules trained in full (default: the task heads, `task_heads`)."""
    spec = LoraSpec.from_config(c, task_heads(model) if trainable is None else trainable)
    if spec is None:
        return None
    targets = apply_lora(model, spec)
    n_train, n_all = count(model)
    kinds = ", ".join(sorted({t.rsplit(".", 1)[-1] for t in targets}))
    log(f"LoRA: rank {spec.rank}, alpha {spec.alpha:g}, dropout {spec.dropout:g} on {len(targets)} linear layers "
        f"({kinds}){'; frozen linear layers in int8' if spec.int8_base else ''}; trainable {n_train:,} of "
        f"{n_all:,} parameters ({100 * n_train / max(n_all, 1):.2f}%): the adapters"
        + (f" + {', '.join(spec.trainable)}" if spec.trainable else ""))
    return spec
