"""Llama 3's RoPE scaling in GGUF files: llama.cpp keeps it as a `rope_freqs` tensor, one divisor per frequency,
not as the four numbers of a Hugging Face config.

Export writes the divisors as llama.cpp's converter computes them from the config; import finds the config
(factor, low/high frequency factors, original context) whose divisors those are (the values Llama 3.1 and 3.2
ship with, else fitted to the ramp between kept and divided frequencies) and refuses divisors that no such
config gives.
"""

from __future__ import annotations

import math

import torch

from kiln.model.config import ModelConfig

ORIGINAL_CONTEXTS = (8192, 4096, 2048, 16384, 32768, 65536, 131072)
FREQ_FACTORS = ((1.0, 4.0), (1.0, 2.0), (1.0, 8.0))  # (low_freq_factor, high_freq_factor)


def rope_freqs(cfg: ModelConfig) -> torch.Tensor:
    """llama.cpp's `rope_freqs.weight` of a llama3-scaled config: each base frequency is divided by it."""
    dim = cfg.head_dim
    factors = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * cfg.rope_theta ** (i / dim)
        low_wavelen = cfg.rope_original_context / cfg.rope_low_freq_factor
        high_wavelen = cfg.rope_original_context / cfg.rope_high_freq_factor
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(cfg.rope_scaling_factor)
        else:
            smooth = ((cfg.rope_original_context / wavelen - cfg.rope_low_freq_factor)
                      / (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor))
            factors.append(1 / ((1 - smooth) / cfg.rope_scaling_factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def _fitted(factors: torch.Tensor, cfg: ModelConfig, factor: float) -> list[tuple]:
    """(low, high, original) from the frequencies on the smooth ramp between the kept and the divided ones:
    there the ramp's share s = (1/r - 1/factor) / (1 - 1/factor) is linear in 1/wavelength, s = A/w + B with
    A = original/(high-low), B = -low/(high-low); with low = 1 that fixes high and original."""
    f = factors.double()
    wavelen = 2 * math.pi * cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim)
    ramp = (f > 1 + 1e-6) & (f < factor - 1e-6)
    if int(ramp.sum()) < 2:
        return [_placed(f, wavelen, ramp, factor)]
    share = (1 / f[ramp] - 1 / factor) / (1 - 1 / factor)
    x = torch.stack([1 / wavelen[ramp], torch.ones_like(share)], 1)
    a, b = torch.linalg.lstsq(x, share[:, None]).solution.flatten().tolist()
    if b >= 0:
        return []
    high = 1 - 1 / b
    return [(1.0, high, round(-a / b))]


def _placed(f: torch.Tensor, wavelen: torch.Tensor, ramp: torch.Tensor, factor: float) -> tuple:
    """With one ramp frequency or none, many configs give the same divisors at this model's frequencies: one of
    them, its boundaries placed in the gaps between the kept, ramp and divided wavelengths."""
    kept = float(wavelen[f <= 1 + 1e-6].max()) if bool((f <= 1 + 1e-6).any()) else float(wavelen.min()) / 2
    divided = wavelen[f >= factor - 1e-6]
    top = float(wavelen[ramp].max()) if bool(ramp.any()) else kept
    original = round(math.sqrt(top * float(divided.min()))) if len(divided) else round(2 * top)
    if bool(ramp.any()):  # the ramp's share there fixes high: s = (original / w - 1) / (high - 1)
        share = float((1 / f[ramp] - 1 / factor) / (1 - 1 / factor))
        return 1.0, 1 + (original / top - 1) / share, original
    return 1.0, 2 * original / (kept + original), original


def llama3_keys(factors: torch.Tensor, cfg: ModelConfig) -> dict | None:
    """The ModelConfig rope keys whose `rope_freqs` are `factors` (within fp32 rounding), or None."""
    factor = float(factors.max())
    candidates = [(low, high, original) for original in ORIGINAL_CONTEXTS for low, high in FREQ_FACTORS]
    for low, high, original in candidates + _fitted(factors, cfg, factor):
        keys = dict(rope_scaling="llama3", rope_scaling_factor=factor, rope_low_freq_factor=low,
                    rope_high_freq_factor=high, rope_original_context=original)
        if torch.allclose(rope_freqs(cfg.with_(**keys)), factors.float(), rtol=1e-5, atol=1e-6):
            return keys
    return None
