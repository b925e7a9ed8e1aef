"""Weight-only int8 quantization: every linear layer (and a token embedding tied to the output head).

Each output row of a weight matrix gets one fp32 scale (symmetric, per channel: w ≈ scale * q, q in
[-127, 127]); activations stay in fp32 or bf16. On CPU the matmul is `torch._weight_int8pack_mm`, which reads
the int8 weights directly: decoding, bound by how many weight bytes it streams per token, reads 4× fewer
bytes than fp32. Its bf16 path is the fast one, so where the CPU has native bf16 the matmul input is rounded
to bf16 even for fp32 activations (the output is returned in the activations' dtype). A token embedding tied to the head shares the head's int8 matrix and scales (the scale of a
head row is the scale of that token's embedding row), so tying survives quantization.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

METHOD = "int8-weight-only"


def _quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


@functools.cache
def _native_bf16() -> bool:
    from kiln.hardware import cpu_bf16_flags

    return bool(cpu_bf16_flags())


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


class Int8Linear(nn.Module):
    """y = x @ (scale * q).T + bias with q int8 [out, in] and scale [out]; x in fp32 or bf16."""

    def __init__(self, in_features: int, out_features: int, bias: bool, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_int8 = _frozen(torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.scale = _frozen(torch.ones(out_features, device=device))
        self.bias = _frozen(torch.zeros(out_features, device=device)) if bias else None

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> Int8Linear:
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, device=lin.weight.device)
        q, scale = _quantize_rows(lin.weight)
        m.weight_int8.data, m.scale.data = q, scale
        if lin.bias is not None:
            m.bias.data = lin.bias.detach().float().clone()
        return m

    def dequantized(self, dtype=torch.float32) -> torch.Tensor:
        return (self.weight_int8.to(dtype) * self.scale.to(dtype)[:, None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and x2.shape[0] > 0:
            # the kernel's bf16 path is ~9x faster than its fp32 path (bench/quantize_speed.py): use it for fp32
            # activations too where the CPU has native bf16
            dt = torch.bfloat16 if x.dtype == torch.bfloat16 or _native_bf16() else x.dtype
            y = torch._weight_int8pack_mm(x2.to(dt).contiguous(), self.weight_int8, self.scale.to(dt)).to(x.dtype)
        else:  # other devices / dtypes: dequantize (correct, not faster)
            y = F.linear(x2, self.dequantized(x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


class Int8Embedding(nn.Module):
    """A token embedding stored as int8 rows with one scale per row (the tied head's matrix and scales)."""

    def __init__(self, head: Int8Linear):
        super().__init__()
        self.weight_int8, self.scale = head.weight_int8, head.scale  # the same Parameters: tied

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.weight_int8[idx].to(self.scale.dtype) * self.scale[idx, None]


def quantize_model(model: nn.Module, calibrate: bool = True) -> nn.Module:
    """Replace, in place, every nn.Linear by an Int8Linear, and a token embedding tied to a head by an
    Int8Embedding sharing its int8 matrix. calibrate=False builds empty int8 modules for a quantized state dict
    to be loaded into. Returns the model."""
    swaps: dict[nn.Module, nn.Module] = {}
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    for lin in linears:
        swaps[lin] = Int8Linear.from_linear(lin) if calibrate else \
            Int8Linear(lin.in_features, lin.out_features, lin.bias is not None, device=lin.weight.device)
    for emb in [m for m in model.modules() if type(m) is nn.Embedding]:
        tied = next((lin for lin in linears if lin.weight is emb.weight), None)
        if tied is not None:
            swaps[emb] = Int8Embedding(swaps[tied])
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if child in swaps:
                setattr(parent, name, swaps[child])
    model.quantization = METHOD
    return model


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, Int8Linear) for m in model.modules())
