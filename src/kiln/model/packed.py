"""Decoding on CPU with linear weights pre-packed for oneDNN.

Decoding one token reads every weight once: it is bound by memory bandwidth, and how fast a kernel streams a
weight matrix decides the speed. `F.linear` at batch 1 goes through a GEMV that reads fp32 weights at ~18 GB/s
on the 2-core AMD EPYC we measure on, while the same machine streams ~45 GB/s; oneDNN's matmul on a weight
reordered once into its blocked layout reads them at 39-45 GB/s (bench/generate_speed.py, docs/benchmarks.md).
Inductor's CPU "freezing" pass does the same reorder; this applies it without compiling.

`packed_linears(model)` makes every `nn.Linear` of the model run that way inside the block. The packed copies
are cached per module (keyed by the weight's storage, version and dtype, so a weight changed in place by most
ops is packed again) and cost one extra copy of the linear weights in memory while the model lives. Fused
optimizers (torch's `AdamW(fused=True)`) update weights without bumping their version: whoever steps one calls
`forget(model)` (kiln's Trainer does, after every step), or an evaluation during training would decode with the
weights of the first one.
"""

from __future__ import annotations

import functools
import weakref
from contextlib import contextmanager

import torch
import torch.nn as nn

_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # nn.Linear -> (key, packed weight)


def available(device: torch.device | str) -> bool:
    return (torch.device(device).type == "cpu" and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def _packed(m: nn.Linear) -> torch.Tensor:
    w = m.weight
    key = (w.data_ptr(), w._version, w.dtype, tuple(w.shape))
    hit = _CACHE.get(m)
    if hit is not None and hit[0] == key:
        return hit[1]
    with torch.no_grad():
        packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), 1)
    _CACHE[m] = (key, packed)
    return packed


def forget(model: nn.Module) -> None:
    """Drop the packed copies of the model's linears (its weights changed in a way their version misses)."""
    if _CACHE:
        for m in model.modules():
            _CACHE.pop(m, None)


def _forward(m: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    w = m.weight
    if x.dtype != w.dtype or x.device.type != "cpu" or torch.is_grad_enabled() or hasattr(w, "_local_tensor"):
        # (a DTensor shard under FSDP: the plain path)
        return nn.functional.linear(x, w, m.bias)
    return torch.ops.mkldnn._linear_pointwise(x, _packed(m), m.bias, "none", [], "")


@contextmanager
def packed_linears(model: nn.Module, enabled: bool = True):
    """Run the model's fp32/bf16 CPU `nn.Linear`s on pre-packed oneDNN weights (no-grad use only) in the block."""
    p = next(model.parameters(), None)
    if not enabled or p is None or not available(p.device) or p.dtype not in (torch.float32, torch.bfloat16):
        yield model
        return
    # modules already patched belong to an enclosing block (generate -> beam search): leave them to it
    linears = [m for m in model.modules() if type(m) is nn.Linear and "forward" not in m.__dict__]
    for m in linears:
        m.forward = functools.partial(_forward, m)
    try:
        yield model
    finally:
        for m in linears:
            m.__dict__.pop("forward", None)


def decoding(fn):
    """Decorator for decoding loops `fn(model, ...)`: run them under `packed_linears(model)`."""

    @functools.wraps(fn)
    def wrapper(model, *args, **kwargs):
        with packed_linears(model):
            return fn(model, *args, **kwargs)

    return wrapper
