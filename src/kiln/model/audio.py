"""The input path of a speech model: a raw waveform -> frames, the sequence kiln's encoder Stack runs on; and the
two heads on it (utterance classification, CTC over characters).

Wav2Vec 2.0 (Baevski et al. 2020) is kiln's one Transformer with `arch: encoder` and `model.audio_conv_dim > 0`:
its Stack's embedding is an AudioEmbedding instead of token embeddings (kiln.model.transformer), the blocks and
the final norm are the same. The embedding is
- the feature encoder: convolutions over the samples (Wav2Vec 2.0: seven, 512 channels, kernels 10,3,3,3,3,2,2,
  strides 5,2,2,2,2,2,2: a frame every 20 ms at 16 kHz), each followed by GELU; `audio_conv_norm` group puts a
  GroupNorm (one group per channel) after the first only (wav2vec2-base), layer a LayerNorm after every one;
- the feature projection: LayerNorm + Linear to d_model; frames chosen by SpecAugment-style time masking (a
  mask the batch carries) are replaced by a learned vector, and padded frames are zeroed;
- the convolutional relative position embedding: a grouped convolution over time with a weight-normalised kernel
  (the weight is g * v / |v|, the norm taken per kernel tap as torch's weight_norm(dim=2) does), one frame
  trimmed when the kernel is even, GELU, added to the frames;
- `embedding_norm` (post-LN models, wav2vec2-base) normalises that sum, as HF's encoder.layer_norm does.
Padding: the attention mask over samples gives each utterance its frame count (the convolutions' length formula),
and padded frames are masked as keys. A leaf of kiln.model beside vision.py: it imports only the model config
and the layers.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from kiln.model.config import ModelConfig
from kiln.model.layers import Dropout, make_norm


def frame_lengths(lengths, kernels, strides):
    """Frames the feature encoder makes of `lengths` samples (ints or a tensor): floor((L - k) / s) + 1 per layer."""
    for k, s in zip(kernels, strides):
        lengths = (lengths - k) // s + 1
    return lengths


def min_samples(kernels, strides) -> int:
    """The fewest samples that give one frame (the feature encoder's receptive field)."""
    n = 1
    for k, s in reversed(list(zip(kernels, strides))):
        n = (n - 1) * s + k
    return n


class ConvLayer(nn.Module):
    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, bias: bool, norm: str | None):
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel, stride, bias=bias)
        self.kind = norm
        self.norm = (nn.GroupNorm(c_out, c_out, affine=True) if norm == "group"
                     else nn.LayerNorm(c_out) if norm == "layer" else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.kind == "layer":  # GELU on the norm's contiguous [B, T, C] output: on the transposed view, norm +
            return F.gelu(self.norm(x.transpose(1, 2))).transpose(1, 2)  # GELU cost 1.4x the CPU time, fwd + bwd
        if self.kind == "group":
            x = self.norm(x)
        return F.gelu(x)


class PositionConv(nn.Module):
    """Grouped convolution over time with a weight-normalised kernel: the relative position embedding."""

    def __init__(self, d: int, kernel: int, groups: int):
        super().__init__()
        self.kernel, self.groups = kernel, groups
        self.weight_g = nn.Parameter(torch.ones(1, 1, kernel))
        self.weight_v = nn.Parameter(torch.zeros(d, d // groups, kernel))
        self.bias = nn.Parameter(torch.zeros(d))

    def weight(self) -> torch.Tensor:
        v = self.weight_v
        return v * (self.weight_g / v.norm(dim=(0, 1), keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, d] -> [B, T, d]
        y = F.conv1d(x.transpose(1, 2), self.weight().to(x.dtype), self.bias.to(x.dtype), padding=self.kernel // 2,
                     groups=self.groups)
        if self.kernel % 2 == 0:
            y = y[..., :-1]
        return F.gelu(y).transpose(1, 2)


class AudioEmbedding(nn.Module):
    """[B, S] samples (+ a [B, S] mask) -> [B, T, d_model] frames and their [B, T] mask (None: no padding)."""

    positions = None  # no position table: the positions come from PositionConv

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c, self.kernels, self.strides = cfg.audio_conv_dim, list(cfg.audio_conv_kernels), list(cfg.audio_conv_strides)
        norms = ["group" if i == 0 else None for i in range(len(self.kernels))] if cfg.audio_conv_norm == "group" \
            else ["layer"] * len(self.kernels)
        self.convs = nn.ModuleList(ConvLayer(1 if i == 0 else c, c, k, s, cfg.audio_conv_bias, norms[i])
                                   for i, (k, s) in enumerate(zip(self.kernels, self.strides)))
        self.proj_norm = nn.LayerNorm(c, eps=cfg.norm_eps)
        self.proj = nn.Linear(c, cfg.d_model)
        self.masked_spec_embed = nn.Parameter(torch.zeros(cfg.d_model))
        self.pos_conv = PositionConv(cfg.d_model, cfg.audio_pos_kernel, cfg.audio_pos_groups)
        self.norm = make_norm(cfg) if cfg.embedding_norm else None
        self.dropout = Dropout(cfg.dropout)

    def init_weights(self) -> None:
        """Wav2Vec 2.0's draws: He-normal convolutions, the position kernel's std 2/sqrt(k * d), a uniform mask vector."""
        for layer in self.convs:
            nn.init.kaiming_normal_(layer.conv.weight)
            if layer.conv.bias is not None:
                nn.init.zeros_(layer.conv.bias)
        p = self.pos_conv
        nn.init.normal_(p.weight_v, 0.0, 2 * math.sqrt(1 / (p.kernel * p.weight_v.shape[0])))
        with torch.no_grad():
            p.weight_g.copy_(p.weight_v.norm(dim=(0, 1), keepdim=True))
        nn.init.zeros_(p.bias)
        bound = 1 / math.sqrt(self.proj.in_features)
        nn.init.uniform_(self.proj.weight, -bound, bound)
        nn.init.uniform_(self.proj.bias, -bound, bound)
        nn.init.uniform_(self.masked_spec_embed)

    def frame_mask(self, attention_mask: torch.Tensor | None, n_frames: int) -> torch.Tensor | None:
        if attention_mask is None:
            return None
        n = frame_lengths(attention_mask.long().sum(-1), self.kernels, self.strides)
        return torch.arange(n_frames, device=attention_mask.device)[None, :] < n[:, None]

    def forward(self, wave: torch.Tensor, attention_mask=None, time_mask=None, feature_mask=None):
        w = self.proj.weight
        x = wave.to(w.dtype)[:, None, :]
        for layer in self.convs:
            x = layer(x)
        x = self.proj(self.proj_norm(x.transpose(1, 2)))
        if time_mask is not None:  # SpecAugment: masked frames become the learned vector
            x = torch.where(time_mask[..., None].bool(), self.masked_spec_embed.to(x.dtype), x)
        if feature_mask is not None:  # SpecAugment over channels: zeroed for the whole utterance
            x = x.masked_fill(feature_mask[:, None, :].bool(), 0.0)
        mask = self.frame_mask(attention_mask, x.shape[1])
        if mask is not None:
            x = x.masked_fill(~mask[..., None], 0.0)
        x = x + self.pos_conv(x)
        if self.norm is not None:
            x = self.norm(x)
        return self.dropout(x), mask


def run_stack(stack, wave: torch.Tensor, attention_mask=None, time_mask=None, feature_mask=None):
    """(hidden states [B, T, d], frame mask [B, T] or None) of an audio Stack (duck-typed: embed, blocks, norm)."""
    x, frames = stack.embed(wave, attention_mask, time_mask, feature_mask)
    keep = frames[:, None, None, :] if frames is not None else None
    for block in stack.blocks:
        x = block(x, keep)
    return (stack.norm(x) if stack.norm is not None else x), frames


def mean_pool(h: torch.Tensor, frames: torch.Tensor | None) -> torch.Tensor:
    if frames is None:
        return h.mean(1)
    m = frames[..., None].to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp_min(1.0)


# ----------------------------------------------------------------------------------------------- heads


class AudioClassifier(nn.Module):
    """Utterance classification (Wav2Vec2ForSequenceClassification's head): a projection of every frame, the
    mean over the valid frames, a linear classifier."""

    def __init__(self, backbone: nn.Module, n_labels: int, proj_dim: int = 256, dropout: float = 0.0):
        super().__init__()
        self.backbone = backbone
        self.projector = nn.Linear(backbone.config.d_model, proj_dim)
        self.classifier = nn.Linear(proj_dim, n_labels)
        self.dropout = Dropout(dropout)

    def forward(self, wave, attention_mask=None, time_mask=None, feature_mask=None) -> torch.Tensor:
        h, frames = run_stack(self.backbone.decoder, wave, attention_mask, time_mask, feature_mask)
        return self.classifier(self.dropout(mean_pool(self.projector(h), frames)))


class CTCModel(nn.Module):
    """A linear layer over the characters + the CTC blank (id 0) on every frame (Wav2Vec2ForCTC's head)."""

    def __init__(self, backbone: nn.Module, vocab_size: int, dropout: float = 0.0):
        super().__init__()
        self.backbone = backbone
        self.lm_head = nn.Linear(backbone.config.d_model, vocab_size)
        self.dropout = Dropout(dropout)

    def forward(self, wave, attention_mask=None, time_mask=None, feature_mask=None):
        """(logits [B, T, vocab], frame counts [B])."""
        h, frames = run_stack(self.backbone.decoder, wave, attention_mask, time_mask, feature_mask)
        n = frames.sum(-1) if frames is not None else torch.full((h.shape[0],), h.shape[1], device=h.device)
        return self.lm_head(self.dropout(h)), n
