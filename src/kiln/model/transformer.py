"""One Transformer, three shapes (decoder, encoder, encoder-decoder), every variant a config value.

The building blocks (norms, positions, KV cache, attention, feed-forward, Block, Embeddings) live in
kiln.model.layers and are re-exported here; this file holds a stack of blocks, the mask and the model.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kiln.constants import IGNORE_INDEX
from kiln.model.config import ModelConfig
from kiln.model.heads import MLMTransform, Pooler
from kiln.model.layers import (  # noqa: F401  (re-exported: kiln.model.transformer.Block etc. are public)
    Attention, Block, Dropout, Embeddings, FeedForward, KVCache, apply_rope, dropout, embedding, make_norm, on_meta,
    rope_tables, sinusoidal_table)
from kiln.model.losses import linear_cross_entropy
from kiln.model.vision import PatchEmbedding
from kiln.model.audio import AudioEmbedding, run_stack

__all__ = ["Attention", "Block", "Dropout", "Embeddings", "FeedForward", "KVCache", "Stack", "Transformer",
           "apply_rope", "build_mask", "dropout", "make_norm", "rope_tables", "sinusoidal_table"]


# ----------------------------------------------------------------------------------------------- a stack


class Stack(nn.Module):
    """Embeddings, a stack of blocks and the final norm: an encoder, a decoder, or one side of a seq2seq. In an
    image model (cfg.channels > 0) the embedding is kiln.model.vision.PatchEmbedding and `idx` is pixels."""

    def __init__(self, cfg: ModelConfig, tokens: nn.Embedding | None, n_layer: int, causal: bool, cross: bool):
        super().__init__()
        self.cfg, self.causal = cfg, causal
        self.embed = (PatchEmbedding(cfg) if cfg.channels else AudioEmbedding(cfg) if cfg.audio_conv_dim
                      else Embeddings(cfg, tokens))
        self.blocks = nn.ModuleList(Block(cfg, cross=cross) for _ in range(n_layer))
        self.norm = make_norm(cfg) if (cfg.pre_norm and cfg.final_norm) else None
        if cfg.position == "rope":
            cos, sin = rope_tables(cfg.head_dim, cfg.context_length, cfg)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, idx, attention_mask=None, position_ids=None, token_type_ids=None, caches=None,
                memory=None, memory_mask=None, cross_caches=None):
        if self.cfg.channels:  # pixels [B, C, H, W] -> patches [B, N, d]: no padding, no cache, no rope
            x = self.embed(idx)
            for block in self.blocks:
                x = block(x)
            return self.norm(x) if self.norm is not None else x
        if self.cfg.audio_conv_dim:  # samples [B, S] -> frames [B, T, d]; attention_mask is over the samples
            return run_stack(self, idx, attention_mask)[0]
        B, T = idx.shape
        offset = caches[0].length if caches else 0
        if position_ids is None:
            position_ids = torch.arange(offset, offset + T, device=idx.device).unsqueeze(0)
        x = self.embed(idx, position_ids, token_type_ids)
        rope = None
        if self.cfg.position == "rope":
            rope = (self.rope_cos[position_ids].unsqueeze(1).to(x.dtype),
                    self.rope_sin[position_ids].unsqueeze(1).to(x.dtype))
        mask = build_mask(attention_mask, T, offset, self.causal, idx.device)
        is_causal = self.causal and mask is None and offset == 0
        if memory_mask is not None and memory_mask.dim() == 2:
            memory_mask = memory_mask[:, None, None, :].bool()
        for i, block in enumerate(self.blocks):
            x = block(x, mask, is_causal, rope, caches[i] if caches else None, memory, memory_mask,
                      cross_caches[i] if cross_caches else None)
        return self.norm(x) if self.norm is not None else x


def build_mask(attention_mask, T: int, offset: int, causal: bool, device) -> torch.Tensor | None:
    """Boolean [B, 1, T, offset+T] mask (True = attend) from a [B, offset+T] padding mask; None when plain causal.
    A 4-D mask is the caller's own, used as it is (packed sequences: kiln.tasks.chat_batches)."""
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask.bool()
    if attention_mask is None:
        if not causal or offset == 0 or T == 1:
            return None  # plain causal prefill, one-token decode, or full bidirectional attention
        attention_mask = torch.ones(1, offset + T, dtype=torch.bool, device=device)
    keep = attention_mask[:, None, None, :].bool()
    if causal:
        causal_mask = torch.ones(T, offset + T, dtype=torch.bool, device=device).tril(offset)
        keep = keep & causal_mask
        # a fully padded query row (left padding) would give NaN; let it attend to itself
        rows = torch.arange(T, device=device)[:, None] + offset
        keep = keep | (rows == torch.arange(offset + T, device=device)[None, :])
    return keep


# ----------------------------------------------------------------------------------------------- model


class Transformer(nn.Module):
    fused_loss = True  # forward(..., labels=) returns the summed cross-entropy (kiln.train.objectives uses it)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        pixels_or_samples = cfg.channels or cfg.audio_conv_dim
        tokens = embedding(cfg.vocab_size, cfg.d_model) if not pixels_or_samples else None  # images: patches
        if cfg.arch == "encoder-decoder":
            self.encoder = Stack(cfg, tokens, cfg.n_layer, causal=False, cross=False)
            self.decoder = Stack(cfg, tokens, cfg.n_decoder_layer, causal=True, cross=True)
        else:
            self.encoder = None
            self.decoder = Stack(cfg, tokens, cfg.n_layer, causal=cfg.arch == "decoder", cross=False)
        self.head_transform = MLMTransform(cfg) if cfg.mlm_head else None
        self.pooler = Pooler(cfg) if cfg.pooler else None
        # an image model has no LM head: kiln.model.heads.ImageClassifier sits on its hidden states
        self.lm_head = (nn.Linear(cfg.d_model, cfg.vocab_size, bias=cfg.mlm_head or cfg.head_bias)
                        if not pixels_or_samples else None)  # audio: kiln.model.audio's heads
        if cfg.tie_embeddings:
            self.lm_head.weight = tokens.weight
        if not on_meta():  # a meta-device build has nothing to draw: its weights are loaded next
            self.init_weights()

    def to_empty(self, *, device, recurse: bool = True):
        """nn.Module.to_empty unties shared parameters (a meta-device build): tie the head to the embedding again."""
        super().to_empty(device=device, recurse=recurse)
        if self.config.tie_embeddings:
            self.lm_head.weight = self.decoder.embed.tokens.weight
        return self

    @property
    def is_seq2seq(self) -> bool:
        return self.encoder is not None

    def init_weights(self) -> None:
        std = self.config.init_std
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer)
                scale = (2 * self.config.n_layer) ** -0.5 if name.endswith(("out_proj.weight", "down_proj.weight")) else 1.0
                nn.init.normal_(p, mean=0.0, std=std * scale)
            elif name.endswith(("bias", "cls_token")):
                nn.init.zeros_(p)
            else:  # norm weights
                nn.init.ones_(p)
        if hasattr(self.decoder.embed, "init_weights"):  # convolutions: Wav2Vec 2.0's draws, an image stem's He-normal
            self.decoder.embed.init_weights()

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings and self.decoder.embed.positions is not None:
            n -= self.decoder.embed.positions.weight.numel()
        return n

    def encode(self, src, src_mask=None, token_type_ids=None):
        stack = self.encoder if self.is_seq2seq else self.decoder
        return stack(src, attention_mask=src_mask, token_type_ids=token_type_ids)

    def hidden(self, idx, attention_mask=None, position_ids=None, token_type_ids=None, caches=None,
               memory=None, memory_mask=None, cross_caches=None):
        return self.decoder(idx, attention_mask, position_ids, token_type_ids, caches, memory, memory_mask,
                            cross_caches)

    def forward(self, idx, attention_mask=None, position_ids=None, token_type_ids=None, caches=None,
                src=None, src_mask=None, memory=None, cross_caches=None, labels=None, sparse_labels=False):
        """Logits [B, T, vocab]. For an encoder-decoder pass `src` (or a precomputed `memory`).

        With `labels` [B, T] (-100 = ignored) it returns instead the summed cross-entropy as an fp32 scalar,
        computed by the head fused with the loss (kiln.model.losses): no [B, T, vocab] logits are kept.
        `sparse_labels` (masked LM: ~15% of the positions are targets) runs the head on the target rows only;
        it costs a host-device sync, so dense labels (causal LM) skip it."""
        if self.is_seq2seq and memory is None and src is not None:
            memory = self.encode(src, src_mask)
        h = self.hidden(idx, attention_mask, position_ids, token_type_ids, caches, memory, src_mask, cross_caches)
        if self.lm_head is None:  # an image model (idx: pixels [B, C, H, W]): its hidden states [B, N, d]
            return h
        if labels is not None:
            h, labels = h.flatten(0, 1), labels.flatten()
            if sparse_labels:
                keep = labels != IGNORE_INDEX
                h, labels = h[keep], labels[keep]
            if self.head_transform is not None:
                h = self.head_transform(h)
            if type(self.lm_head) is not nn.Linear:  # e.g. a quantized head (kiln.compress): plain logits
                return F.cross_entropy(self.lm_head(h).float(), labels, reduction="sum")
            return linear_cross_entropy(h, self.lm_head.weight, labels, self.lm_head.bias)
        if self.head_transform is not None:
            h = self.head_transform(h)
        return self.lm_head(h)

    def new_caches(self, batch: int, max_len: int, dtype=None, device=None) -> list[KVCache]:
        p = next(p for p in self.parameters() if p.is_floating_point())  # the compute dtype and device
        return [KVCache(batch, self.config.n_kv_head, max_len, self.config.head_dim, dtype or p.dtype,
                        device or p.device) for _ in self.decoder.blocks]

    def generate(self, idx, max_new_tokens: int, **kw) -> torch.Tensor:
        from kiln.model.generate import generate

        return generate(self, idx, max_new_tokens, **kw)
