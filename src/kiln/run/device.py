"""Choose the compute precision from what the hardware does fast: measured, never assumed.

On CPUs bf16 is a gamble: with AMX or AVX512-BF16 bf16 matmuls run several times faster than fp32; on an
AVX2-only CPU they emulate bf16 and run ~100x slower. `auto` reads the CPU flags *and* times a small matmul
in both dtypes, and picks bf16 only when it is clearly faster.
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch

from kiln.errors import KilnError
from kiln.hardware import cpu_bf16_flags, cpu_model  # noqa: F401  (re-exported)


def matmul_speed(dtype: torch.dtype, n: int = 256, seconds: float = 0.06, device: str = "cpu") -> float:
    """GFLOP/s of an n x n matmul in `dtype`."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for _ in range(2):
        a @ b
    sync()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
        if count % 8 == 0:
            sync()
    sync()
    return 2 * n**3 * count / (time.perf_counter() - start) / 1e9


def choose_precision(requested: str, device: str) -> tuple[str, str]:
    """('bf16' | 'fp32', reason to print)."""
    if requested == "fp32":
        return "fp32", "precision fp32 (as configured)"
    if device.startswith("cuda"):
        ok = torch.cuda.is_bf16_supported()
        if requested == "bf16" and not ok:
            return "fp32", "bf16 requested but this GPU has no bf16 support: using fp32"
        return ("bf16", f"bf16 on {torch.cuda.get_device_name()} (native bf16)") if ok else \
               ("fp32", f"fp32 on {torch.cuda.get_device_name()} (no native bf16)")
    flags = cpu_bf16_flags()
    fp32, bf16 = 0.0, 0.0
    for _ in range(3):  # alternate and keep the best of each, so a busy neighbour cannot flip the choice
        fp32 = max(fp32, matmul_speed(torch.float32, n=384, seconds=0.03))
        if flags or requested == "bf16":
            bf16 = max(bf16, matmul_speed(torch.bfloat16, n=384, seconds=0.03))
    measured = f"matmul fp32 {fp32:.0f} GFLOP/s, bf16 {bf16:.0f} GFLOP/s" if bf16 else f"matmul fp32 {fp32:.0f} GFLOP/s"
    where = f"{cpu_model()} [{', '.join(flags) or 'no native bf16 flags'}]"
    if requested == "bf16":
        note = "" if bf16 > 1.2 * fp32 else " (warning: bf16 is not faster than fp32 on this CPU)"
        return "bf16", f"precision bf16 (as configured) on {where}: {measured}{note}"
    if flags and bf16 > 1.5 * fp32:
        return "bf16", f"precision auto -> bf16: {where}, {measured}"
    return "fp32", f"precision auto -> fp32: {where}, {measured}"


def autocast(precision: str, device: str):
    if precision == "bf16":
        return torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16)
    return nullcontext()


def resolve_device(name: str, what: str = "train.device") -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise KilnError(f"{what} is {name!r} but no CUDA device is available; use cpu or auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise KilnError(f"{what} is 'mps' but no Apple GPU is available; use cpu or auto")
    if name not in ("cpu", "mps") and not name.startswith("cuda"):
        raise KilnError(f"{what} must be auto, cpu, cuda[:N] or mps, got {name!r}")
    return name
