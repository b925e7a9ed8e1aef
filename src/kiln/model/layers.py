"""The building blocks of a Transformer, every variant a config value: dropout, norms, positions (RoPE tables,
sinusoidal table), the KV cache, attention (self/cross, grouped-query), the feed-forward, a block, embeddings.

A leaf: it imports nothing from kiln but the model config. kiln.model.transformer stacks these into the model.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from kiln.model.config import ModelConfig


# ----------------------------------------------------------------------------------------------- pieces


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """F.dropout, except on CPU, where the mask comes from torch.rand: PyTorch's CPU bernoulli_ made dropout
    1.3-1.7x slower, forward + backward, on [64, 128, 256] and [64, 4, 128, 128] tensors (experiments/dropout_speed.py)."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, True)
    return x * (torch.rand(x.shape) >= p).to(x.dtype).mul_(1.0 / (1.0 - p))


class Dropout(nn.Dropout):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


def rope_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """The rotation frequency of each pair of a head's dimensions, scaled as cfg.rope_scaling says (the
    formulas of transformers' `linear` and `llama3` rope types)."""
    head_dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor = cfg.rope_scaling_factor
    if cfg.rope_scaling == "linear":
        return inv_freq / factor
    if cfg.rope_scaling != "llama3":
        return inv_freq
    low, high, original = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor, cfg.rope_original_context
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)  # long waves: stretched
    smooth = (original / wavelen - low) / (high - low)
    ramp = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < original / high) & ~(wavelen > original / low)
    return torch.where(medium, ramp, scaled)


def rope_tables(head_dim: int, length: int, theta: float | ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [length, head_dim]; `theta` is the base frequency, or the ModelConfig (its scaling too)."""
    if isinstance(theta, ModelConfig):
        inv_freq = rope_frequencies(theta)
    else:
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # the "rotate half" layout used by Llama checkpoints
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


def sinusoidal_table(length: int, dim: int, layout: str = "interleaved") -> torch.Tensor:
    """Fixed positions [length, dim]: sin/cos interleaved (the original Transformer), or `halves`: the sines of
    every frequency, then the cosines (Marian; computed in float64 as transformers does)."""
    if layout == "halves":
        j = torch.arange(dim, dtype=torch.float64)
        angle = torch.arange(length, dtype=torch.float64)[:, None] / 10000.0 ** (2 * (j // 2) / dim)
        return torch.cat([angle[:, 0::2].sin(), angle[:, 1::2].cos()], 1).float()
    position = torch.arange(length, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * div)
    table[:, 1::2] = torch.cos(position * div)
    return table


class KVCache:
    """Preallocated keys/values of one attention layer: decoding appends in place, never concatenates."""

    def __init__(self, batch: int, n_kv_head: int, max_len: int, head_dim: int, dtype, device):
        self.k = torch.zeros(batch, n_kv_head, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def reorder(self, index: torch.Tensor) -> None:
        """Beam search: keep the rows named by `index`."""
        self.k = self.k.index_select(0, index)
        self.v = self.v.index_select(0, index)


# ----------------------------------------------------------------------------------------------- layers


class Attention(nn.Module):
    """Multi-head attention (grouped-query when n_kv_head < n_head); self- or cross-attention."""

    def __init__(self, cfg: ModelConfig, cross: bool = False):
        super().__init__()
        self.cross = cross
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        q_dim, kv_dim = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
        qkv_bias = cfg.bias or cfg.qkv_bias
        if cross:  # queries from the decoder, keys/values from the encoder output
            self.q_proj = nn.Linear(cfg.d_model, q_dim, bias=qkv_bias)
            self.kv_proj = nn.Linear(cfg.d_model, 2 * kv_dim, bias=qkv_bias)
        else:
            self.qkv_proj = nn.Linear(cfg.d_model, q_dim + 2 * kv_dim, bias=qkv_bias)
        self.out_proj = nn.Linear(q_dim, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.rope = cfg.position == "rope" and not cross
        self.captured: list | None = None  # set to a list to record attention maps (kiln viz attention)

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, n, self.head_dim).transpose(1, 2)

    def forward(self, x, mask=None, is_causal=False, rope=None, cache: KVCache | None = None,
                memory: torch.Tensor | None = None, return_weights: bool = False):
        q_dim, kv_dim = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        if self.cross:
            q = self._heads(self.q_proj(x), self.n_head)
            if cache is not None and cache.length > 0:  # encoder keys/values are computed once
                k, v = cache.k[:, :, :cache.length], cache.v[:, :, :cache.length]
            else:
                k, v = self.kv_proj(memory).split(kv_dim, dim=-1)
                k, v = self._heads(k, self.n_kv_head), self._heads(v, self.n_kv_head)
                if cache is not None:
                    k, v = cache.append(k, v)
        else:
            q, k, v = self.qkv_proj(x).split([q_dim, kv_dim, kv_dim], dim=-1)
            q, k, v = self._heads(q, self.n_head), self._heads(k, self.n_kv_head), self._heads(v, self.n_kv_head)
            if self.rope:
                cos, sin = rope
                q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            if cache is not None:
                k, v = cache.append(k, v)
        if return_weights or self.captured is not None:
            y, weights = _attention_with_weights(q, k, v, mask, is_causal, self.n_head // self.n_kv_head)
            if self.captured is not None:
                self.captured.append(weights.detach())
        elif q.dtype == torch.bfloat16 and q.device.type == "cpu":
            # PyTorch's CPU flash kernel is slow in bf16 (measured 2-4x slower than these plain matmuls,
            # forward + backward, docs/benchmarks.md); fp32 and CUDA keep the fused kernel.
            weights = None
            y = _attention_matmul(q, k, v, mask, is_causal, self.n_head // self.n_kv_head,
                                  self.dropout if self.training else 0.0)
        else:
            weights = None
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=is_causal and mask is None,
                dropout_p=self.dropout if self.training else 0.0, enable_gqa=self.n_kv_head != self.n_head)
        B, _, T, _ = y.shape
        y = self.out_proj(y.transpose(1, 2).reshape(B, T, q_dim))
        return (y, weights) if return_weights else y


def _attention_matmul(q, k, v, mask, is_causal, groups, dropout_p: float = 0.0, return_weights: bool = False):
    """Softmax attention as plain matmuls: bf16 on CPU (faster than the fused kernel there) and attention maps."""
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    if is_causal and mask is None:
        Tq, Tk = scores.shape[-2:]
        mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    weights = scores.softmax(-1)
    if dropout_p:
        weights = dropout(weights, dropout_p)
    return (weights @ v, weights) if return_weights else weights @ v


def _attention_with_weights(q, k, v, mask, is_causal, groups):
    return _attention_matmul(q, k, v, mask, is_causal, groups, return_weights=True)


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gated = cfg.activation == "swiglu"
        self.up_proj = nn.Linear(cfg.d_model, (2 if self.gated else 1) * cfg.d_ff, bias=cfg.bias)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.act = {"gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh"), "relu": nn.ReLU(),
                    "silu": nn.SiLU(), "swiglu": nn.SiLU()}[cfg.activation]

    def forward(self, x):
        h = self.up_proj(x)
        if self.gated:  # SwiGLU: silu(gate) * up, gate first (Llama's gate_proj, up_proj order)
            gate, up = h.chunk(2, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(h)
        return self.down_proj(h)  # the block drops out its output, once (BERT's and GPT-2's single dropout)


class Block(nn.Module):
    """Self-attention (+ cross-attention in an encoder-decoder's decoder) + feed-forward, pre- or post-norm."""

    def __init__(self, cfg: ModelConfig, cross: bool = False):
        super().__init__()
        self.pre_norm = cfg.pre_norm
        self.attn_norm, self.attn = make_norm(cfg), Attention(cfg)
        self.cross_norm, self.cross_attn = (make_norm(cfg), Attention(cfg, cross=True)) if cross else (None, None)
        self.mlp_norm, self.mlp = make_norm(cfg), FeedForward(cfg)
        self.dropout = Dropout(cfg.dropout)

    def _sublayer(self, x, norm, fn):
        if self.pre_norm:
            return x + self.dropout(fn(norm(x)))
        return norm(x + self.dropout(fn(x)))

    def forward(self, x, mask=None, is_causal=False, rope=None, cache=None, memory=None, memory_mask=None,
                cross_cache=None):
        x = self._sublayer(x, self.attn_norm, lambda h: self.attn(h, mask, is_causal, rope, cache))
        if self.cross_attn is not None:
            x = self._sublayer(x, self.cross_norm,
                               lambda h: self.cross_attn(h, memory_mask, False, None, cross_cache, memory))
        return self._sublayer(x, self.mlp_norm, self.mlp)


def on_meta() -> bool:
    """Building on the meta device (`with torch.device("meta")`: a model whose weights are loaded next)."""
    return torch.get_default_device().type == "meta"


def embedding(num: int, dim: int) -> nn.Embedding:
    """nn.Embedding, without its random init on the meta device, where it draws nothing and costs ~2 s: torch's
    meta normal_ imports torch._dynamo, most of `kiln generate`'s start-up."""
    return nn.Embedding(num, dim, _weight=torch.empty(num, dim)) if on_meta() else nn.Embedding(num, dim)


class Embeddings(nn.Module):
    def __init__(self, cfg: ModelConfig, tokens: nn.Embedding):
        super().__init__()
        self.cfg = cfg
        self.tokens = tokens
        self.positions = embedding(cfg.context_length, cfg.d_model) if cfg.position == "learned" else None
        if cfg.position == "sinusoidal":
            self.register_buffer("sinusoid", sinusoidal_table(cfg.context_length, cfg.d_model, cfg.sinusoid_layout),
                                 persistent=False)
        self.token_types = embedding(cfg.type_vocab_size, cfg.d_model) if cfg.type_vocab_size else None
        self.norm = make_norm(cfg) if cfg.embedding_norm else None
        self.dropout = Dropout(cfg.dropout)
        self.scale = math.sqrt(cfg.d_model) if cfg.embed_scale else 1.0

    def forward(self, idx, position_ids, token_type_ids=None):
        x = self.tokens(idx)
        if self.scale != 1.0:
            x = x * self.scale
        if self.positions is not None:
            x = x + self.positions(position_ids)
        elif self.cfg.position == "sinusoidal":
            x = x + self.sinusoid[position_ids].to(x.dtype)
        if self.token_types is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(idx)
            x = x + self.token_types(token_type_ids)
        if self.norm is not None:
            x = self.norm(x)
        return self.dropout(x)
