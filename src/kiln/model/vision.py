"""The input path of an image model: pixels -> patch embeddings, the sequence kiln's encoder Stack runs on.

A Vision Transformer (Dosovitskiy et al. 2020) is kiln's one Transformer with `arch: encoder` and
`model.channels > 0`: its Stack's embedding is a PatchEmbedding instead of token embeddings
(kiln.model.transformer), the blocks and the final norm are the same. The patchify is a linear layer over the
flattened P x P x C patches (a stride-P convolution written as a matmul; the weight is the convolution's,
flattened in its (C, P, P) order), then an optional learned class token, then positions: learned (ViT) or
fixed 2-D sin-cos (MAE, "simple ViT"; the class token gets position zero).

`model.stem_channels` puts a convolutional stem in front (Xiao et al. 2021, "Early Convolutions Help Transformers
See Better"): k 3x3 stride-2 convolutions, each with BatchNorm and GELU, shrink the image 2^k times, and the
linear patchify then cuts patches of patch_size / 2^k from that feature map: the same tokens, each built from
overlapping local filters instead of one linear map of raw pixels. Where it pays is in fewer tokens: the
Fashion-MNIST recipe's three convolutions turn a 32x32 image into a 4x4 map, 16 tokens instead of 49 linear 4x4
patches, twice the images a second and local texture seen everywhere from the first step (90.90% vs 89.08% test
in 5 minutes); two convolutions in front of the same 49 tokens gained nothing there (docs/benchmarks.md).

A leaf of kiln.model beside layers.py: it imports nothing from kiln but the model config and the dropout.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

from kiln.model.config import ModelConfig
from kiln.model.layers import Dropout, embedding


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """[grid * grid, dim] fixed positions: half the channels encode the row, half the column (sin, cos each)."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos positions need d_model divisible by 4, got {dim}")
    omega = 1.0 / (10000.0 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4)))
    y, x = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                          indexing="ij")
    y, x = y.flatten()[:, None] * omega, x.flatten()[:, None] * omega
    return torch.cat([y.sin(), y.cos(), x.sin(), x.cos()], dim=1)


def patchify(pixels: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/P) * (W/P), C * P * P]: patches in row-major order, each flattened as (C, P, P)."""
    B, C, H, W = pixels.shape
    x = pixels.reshape(B, C, H // patch, patch, W // patch, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (H // patch) * (W // patch), C * patch * patch)


class StemNorm(nn.BatchNorm2d):
    """BatchNorm computed in fp32 whatever the input and parameters (its output in the input's dtype): CPU
    autocast would run it in bf16 beside fp32 parameters, which torch's CPU batch_norm refuses, bf16 weights
    (train.bf16_weights) leave its running statistics fp32, and the statistics want fp32 anyway."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.running_mean.dtype != torch.float32:  # a whole-model .to(bf16) cast them: statistics stay fp32
            self.running_mean, self.running_var = self.running_mean.float(), self.running_var.float()
        off = torch.autocast(x.device.type, enabled=False) if x.device.type in ("cpu", "cuda") else nullcontext()
        with off:  # (a meta-device build has no autocast)
            with torch.no_grad():
                if self.training:
                    self.num_batches_tracked.add_(1)
            y = F.batch_norm(x.float(), self.running_mean, self.running_var, self.weight.float(), self.bias.float(),
                             self.training, self.momentum, self.eps)
        return y.to(x.dtype)


def conv_stem(channels: int, widths: list[int]) -> nn.Sequential | None:
    """k x (3x3 stride-2 convolution, no bias -> BatchNorm -> GELU): [B, C, H, W] -> [B, widths[-1], H/2^k, W/2^k]."""
    if not widths:
        return None
    layers: list[nn.Module] = []
    for c_in, c_out in zip([channels] + list(widths[:-1]), widths):
        layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), StemNorm(c_out), nn.GELU()]
    return nn.Sequential(*layers)


class PatchEmbedding(nn.Module):
    """[B, C, H, W] pixels -> [B, N (+1), d_model]: (conv stem), linear patchify, class token, positions, dropout."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.channels, self.size, self.patch = cfg.channels, cfg.image_size, cfg.patch_size
        self.grid = cfg.image_size // cfg.patch_size
        self.n_patches = self.grid * self.grid
        self.stem = conv_stem(cfg.channels, list(cfg.stem_channels))
        self.stem_patch = cfg.patch_size >> len(cfg.stem_channels)  # the patch side on the stem's feature map
        stem_out = cfg.stem_channels[-1] if cfg.stem_channels else cfg.channels
        self.proj = nn.Linear(stem_out * self.stem_patch ** 2, cfg.d_model)
        self.cls_token = nn.Parameter(torch.zeros(cfg.d_model)) if cfg.class_token else None
        n = self.n_patches + int(cfg.class_token)
        self.positions = embedding(n, cfg.d_model) if cfg.position == "learned" else None
        self.sincos = cfg.position == "sinusoidal"
        if self.sincos and cfg.d_model % 4:
            from kiln.errors import KilnError

            raise KilnError(f"2-D sin-cos positions (model.position sinusoidal) need model.d_model divisible by 4, "
                            f"got {cfg.d_model}")
        self._table: torch.Tensor | None = None  # the sin-cos table, made on first use (never in a checkpoint)
        self.dropout = Dropout(cfg.dropout)

    def init_weights(self) -> None:
        """The stem's convolutions He-normal (they feed GELUs); BatchNorm's scale 1, shift 0. No stem: nothing."""
        for m in self.stem or ():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")

    def _sincos(self, device, dtype) -> torch.Tensor:
        if self._table is None or self._table.device != device:
            t = sincos_2d(self.grid, self.proj.out_features)
            if self.cls_token is not None:
                t = torch.cat([torch.zeros(1, t.shape[1]), t])
            self._table = t.to(device)
        return self._table.to(dtype)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (self.channels, self.size, self.size):
            raise ValueError(f"expected pixels [B, {self.channels}, {self.size}, {self.size}], got "
                             f"{list(pixels.shape)}")
        w = self.proj.weight
        pixels = pixels.to(w.dtype)
        if self.stem is not None:
            pixels = self.stem(pixels)
        x = self.proj(patchify(pixels, self.stem_patch))
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.to(x.dtype).expand(x.shape[0], 1, -1), x], dim=1)
        if self.positions is not None:
            x = x + self.positions.weight.to(x.dtype)
        elif self.sincos:
            x = x + self._sincos(x.device, x.dtype)
        return self.dropout(x)
