"""Decoding for encoder-decoders: greedy and beam search, with a self-attention KV cache and cross-attention
keys/values computed once per source; beam search for decoder-only models (`beam_search_causal`, used by
`model.generate(..., num_beams=K)`) shares the same core (`_beam_core`), only the model step differs.

    out = beam_search(model, src, src_mask, num_beams=4, bos_id=0, eos_id=0, max_new_tokens=64)
    texts = [tok.decode(ids) for ids in strip(out.sequences, eos_id)]

Beam search follows Hugging Face's (`generate(num_beams=K)`, transformers >= 4.50) step for step, so the
same model gives the same tokens:
- each step keeps the top 2K continuations of all K beams by summed log-probability; those ending in eos
  (or reaching max_new_tokens) that rank in the top K are *finished* hypotheses scored
  sum_logprobs / generated_len ** length_penalty (generated_len counts eos, not the start token nor a
  decoder-only model's prompt: HF's cur_len + 1 - decoder_prompt_len); the best
  K unfinished continuations go on;
- a source keeps its K best finished hypotheses;
- early_stopping=True stops a source once it has K finished hypotheses; False stops it once the best running
  beam, scored at the current length, cannot beat the worst finished one; "never" uses the length that
  gives the best possible score (max length when length_penalty > 0): the exact bound.
Returned sequences start with the decoder start token and are padded with `pad_id` after eos.

The model is an argument, used by duck typing (`config`, `encode`, `new_caches`, a forward taking `caches=`,
`memory=`, `cross_caches=`): this module never imports kiln.model.transformer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from kiln.model.layers import KVCache
from kiln.model.packed import decoding

NEG = -1.0e9  # the "impossible" score of Hugging Face's implementation


@dataclass
class BeamOutput:
    sequences: torch.Tensor  # [B * num_return_sequences, 1 + generated], start token first, padded
    scores: torch.Tensor     # [B * num_return_sequences] length-normalised scores of those hypotheses


def _config(model):
    while not hasattr(model, "config") and hasattr(model, "module"):
        model = model.module
    if not hasattr(model, "config") and hasattr(model, "_orig_mod"):
        model = model._orig_mod
    return model.config


def cross_caches(model, batch: int, src_len: int, dtype, device) -> list[KVCache]:
    """One cache per decoder block for the encoder keys/values: filled by the first decoder step, read after."""
    cfg = _config(model)
    n = cfg.n_decoder_layer or cfg.n_layer
    return [KVCache(batch, cfg.n_kv_head or cfg.n_head, src_len, cfg.head_dim, dtype, device) for _ in range(n)]


def _max_new(model, max_new_tokens: int) -> int:
    """Position tables stop at context_length, and the start token takes one position."""
    return max(min(int(max_new_tokens), _config(model).context_length - 1), 1)


class _Decoder:
    """Runs the decoder one token at a time over rows that share an encoded source, cached or not."""

    def __init__(self, model, memory, src_mask, max_len: int, use_cache: bool):
        self.model, self.memory, self.src_mask, self.use_cache = model, memory, src_mask, use_cache
        N = memory.shape[0]
        if use_cache:
            dtype = next(model.parameters()).dtype
            self.caches = model.new_caches(N, max_len, dtype=dtype, device=memory.device)
            self.cross = cross_caches(model, N, memory.shape[1], dtype, memory.device)

    def step(self, seqs: torch.Tensor) -> torch.Tensor:
        """Log-probabilities [N, V] (float32) of the next token after `seqs` [N, t]."""
        if self.use_cache:
            logits = self.model(seqs[:, -1:], caches=self.caches, memory=self.memory, src_mask=self.src_mask,
                                cross_caches=self.cross)
        else:
            logits = self.model(seqs, memory=self.memory, src_mask=self.src_mask)
        return F.log_softmax(logits[:, -1, :].float(), dim=-1)

    def reorder(self, index: torch.Tensor) -> None:
        """Keep the rows named by `index` (beams of the same source: the cross caches stay as they are)."""
        if self.use_cache:
            for c in self.caches:
                c.reorder(index)


def _encode(model, src, src_mask):
    if src_mask is not None:
        src_mask = src_mask.bool()
    return model.encode(src, src_mask), src_mask


@decoding
@torch.inference_mode()
def greedy(model, src: torch.Tensor, src_mask: torch.Tensor | None = None, max_new_tokens: int = 64,
           bos_id: int = 0, eos_id: int | None = 0, pad_id: int | None = None, use_cache: bool = True,
           logits_processor: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Greedy decoding of a batch of (right-padded) sources: [B, 1 + generated], start token first; rows that
    finished are padded with `pad_id` (default eos) like Hugging Face's greedy search."""
    was_training = model.training
    model.eval()
    max_new_tokens = _max_new(model, max_new_tokens)
    pad = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
    memory, src_mask = _encode(model, src, src_mask)
    B = src.shape[0]
    dec = _Decoder(model, memory, src_mask, 1 + max_new_tokens, use_cache)
    seqs = torch.full((B, 1), bos_id, dtype=torch.long, device=src.device)
    finished = torch.zeros(B, dtype=torch.bool, device=src.device)
    for _ in range(max_new_tokens):
        logp = dec.step(seqs)
        if logits_processor is not None:
            logp = logits_processor(logp)
        nxt = logp.argmax(-1)
        nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
        seqs = torch.cat([seqs, nxt[:, None]], dim=1)
        if eos_id is not None:
            finished |= nxt == eos_id
            if bool(finished.all()):
                break
    model.train(was_training)
    return seqs


class _CausalLM:
    """Runs a decoder-only model over beams of left-padded prompts: with a cache, the prompts are prefilled once
    (one row per prompt) and the cache is then copied to the K beams; position ids follow the padding mask."""

    def __init__(self, model, mask: torch.Tensor | None, num_beams: int, max_len: int, use_cache: bool):
        self.model, self.K, self.use_cache = model, num_beams, use_cache
        self.mask = mask.repeat_interleave(num_beams, dim=0) if mask is not None else None  # [B * K, T]
        self.prefilled = False
        self.max_len = max_len

    def _mask(self, n: int):
        if self.mask is None:
            return None, None
        extra = n - self.mask.shape[1]
        mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], extra)], dim=1)
        return mask, (mask.long().cumsum(-1) - 1).clamp(min=0)

    def step(self, seqs: torch.Tensor) -> torch.Tensor:
        """Log-probabilities [N, V] (float32) of the next token after `seqs` [N, t] (prompt included)."""
        mask, pos = self._mask(seqs.shape[1])
        if not self.use_cache:
            logits = self.model(seqs, attention_mask=mask, position_ids=pos)
        elif not self.prefilled:  # all beams of a prompt hold the same tokens: prefill one row per prompt
            K = self.K
            rows = seqs[::K]
            self.caches = self.model.new_caches(rows.shape[0], self.max_len)
            logits = self.model(rows, attention_mask=mask[::K] if mask is not None else None,
                                position_ids=pos[::K] if pos is not None else None, caches=self.caches)
            expand = torch.arange(rows.shape[0], device=seqs.device).repeat_interleave(K)
            for c in self.caches:
                c.reorder(expand)
            logits = logits[:, -1:, :].repeat_interleave(K, dim=0)
            self.prefilled = True
        else:
            logits = self.model(seqs[:, -1:], attention_mask=mask, position_ids=pos[:, -1:] if pos is not None
                                else None, caches=self.caches)
        return F.log_softmax(logits[:, -1, :].float(), dim=-1)

    def reorder(self, index: torch.Tensor) -> None:
        if self.use_cache and self.prefilled:
            for c in self.caches:
                c.reorder(index)


def _check_beam_args(num_beams: int, early_stopping, num_return_sequences: int) -> None:
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    if not 1 <= num_return_sequences <= num_beams:
        raise ValueError(f"num_return_sequences must be in [1, num_beams={num_beams}]")


def _beam_core(step, prompt: torch.Tensor, num_beams: int, max_new_tokens: int, eos_id: int | None, fill: int,
               length_penalty: float, early_stopping: bool | str, num_return_sequences: int,
               logits_processor: Callable[[torch.Tensor], torch.Tensor] | None) -> BeamOutput:
    """Hugging Face's beam search over `prompt` [B, P] (the decoder start token of an encoder-decoder, or the
    left-padded prompt of a decoder-only model). `step.step(seqs [B*K, t]) -> log-probs [B*K, V]` and
    `step.reorder(index)` hide the model. Hypothesis lengths count generated tokens only (HF: cur_len + 1 -
    decoder_prompt_len)."""
    K = num_beams
    (B, P), dev = prompt.shape, prompt.device
    L = P + max_new_tokens  # HF's max_length
    n_keep = 2 * K  # HF: max(2, 1 + number of eos ids) * K
    top_k_mask = torch.arange(n_keep, device=dev) < K

    running = torch.full((B, K, L), fill, dtype=torch.long, device=dev)
    running[:, :, :P] = prompt[:, None, :]
    running_scores = torch.zeros(B, K, device=dev)
    running_scores[:, 1:] = NEG  # the first step expands beam 0 only
    done_seqs = running.clone()
    done_scores = torch.full((B, K), NEG, device=dev)
    done_len = torch.zeros(B, K, dtype=torch.long, device=dev)
    is_done = torch.zeros(B, K, dtype=torch.bool, device=dev)
    open_ = torch.ones(B, 1, dtype=torch.bool, device=dev)  # can the finished set of this source still improve?
    batch_rows = torch.arange(B, device=dev)[:, None]

    cur = P
    while True:
        logp = step.step(running[:, :, :cur].reshape(B * K, cur))
        if logits_processor is not None:
            logp = logits_processor(logp)
        V = logp.shape[-1]
        acc = (logp.view(B, K, V) + running_scores[:, :, None]).view(B, K * V)
        cand_scores, cand_idx = torch.topk(acc, n_keep, dim=1)               # [B, 2K], sorted
        cand_beam, cand_tok = cand_idx // V, cand_idx % V
        cand_seqs = running[batch_rows, cand_beam]                           # [B, 2K, L]
        cand_seqs[:, :, cur] = cand_tok
        hits = torch.zeros_like(cand_tok, dtype=torch.bool) if eos_id is None else cand_tok == eos_id
        if cur + 1 >= L:
            hits = torch.ones_like(hits)

        # the best K continuations that did not stop run on
        keep = torch.topk(cand_scores + hits.float() * NEG, K, dim=1).indices
        running = cand_seqs[batch_rows, keep]
        running_scores = (cand_scores + hits.float() * NEG)[batch_rows, keep]
        parents = cand_beam[batch_rows, keep]

        # stopped continuations among the top K enter the finished set, if they beat its worst member
        just_done = hits & top_k_mask[None, :]
        n_gen = cur + 1 - P  # generated tokens incl. this one
        scored = cand_scores / float(n_gen) ** length_penalty
        full = is_done.all(dim=1, keepdim=True) & (early_stopping is True)
        scored = scored + full.float() * NEG + (~open_).float() * NEG + (~just_done).float() * NEG
        merged_scores = torch.cat([done_scores, scored], dim=1)
        best = torch.topk(merged_scores, K, dim=1).indices
        done_seqs = torch.cat([done_seqs, cand_seqs], dim=1)[batch_rows, best]
        done_scores = merged_scores[batch_rows, best]
        done_len = torch.cat([done_len, torch.full_like(cand_tok, n_gen)], dim=1)[batch_rows, best]
        is_done = torch.cat([is_done, just_done], dim=1)[batch_rows, best]

        step.reorder((parents + batch_rows * K).reshape(-1))
        cur += 1
        # can a running beam still beat the worst finished hypothesis?
        length = (L - P) if (early_stopping == "never" and length_penalty > 0.0) else (cur - P)
        best_running = running_scores[:, :1] / float(length) ** length_penalty
        worst_done = torch.where(is_done, done_scores.min(dim=1, keepdim=True).values, torch.full_like(done_scores, NEG))
        open_ = open_ & (best_running > worst_done).any(dim=1, keepdim=True)
        if not bool(open_.any()) or (bool(is_done.all()) and early_stopping is True) or bool(hits.all()):
            break

    R = num_return_sequences
    seqs = done_seqs[:, :R].reshape(B * R, L)
    lengths = done_len[:, :R].reshape(-1)
    seqs = seqs[:, :P + int(lengths.max())]
    return BeamOutput(seqs, done_scores[:, :R].reshape(-1))


@decoding
@torch.inference_mode()
def beam_search(model, src: torch.Tensor, src_mask: torch.Tensor | None = None, num_beams: int = 4,
                max_new_tokens: int = 64, bos_id: int = 0, eos_id: int | None = 0, pad_id: int | None = None,
                length_penalty: float = 1.0, early_stopping: bool | str = False, num_return_sequences: int = 1,
                use_cache: bool = True,
                logits_processor: Callable[[torch.Tensor], torch.Tensor] | None = None) -> BeamOutput:
    """Beam search over a batch of (right-padded) sources; see the module docstring for the exact rules."""
    _check_beam_args(num_beams, early_stopping, num_return_sequences)
    was_training = model.training
    model.eval()
    K = num_beams
    max_new_tokens = _max_new(model, max_new_tokens)
    memory, src_mask = _encode(model, src, src_mask)
    B, dev = src.shape[0], src.device
    memory = memory.repeat_interleave(K, dim=0)
    if src_mask is not None:
        src_mask = src_mask.repeat_interleave(K, dim=0)
    dec = _Decoder(model, memory, src_mask, 1 + max_new_tokens, use_cache)
    fill = pad_id if pad_id is not None else (eos_id if eos_id is not None else -1)
    prompt = torch.full((B, 1), bos_id, dtype=torch.long, device=dev)
    out = _beam_core(dec, prompt, K, max_new_tokens, eos_id, fill, length_penalty, early_stopping,
                     num_return_sequences, logits_processor)
    model.train(was_training)
    return out


@decoding
@torch.inference_mode()
def beam_search_causal(model, idx: torch.Tensor, attention_mask: torch.Tensor | None = None, num_beams: int = 4,
                       max_new_tokens: int = 64, eos_id: int | None = None, pad_id: int | None = None,
                       length_penalty: float = 1.0, early_stopping: bool | str = False,
                       num_return_sequences: int = 1, use_cache: bool = True,
                       logits_processor: Callable[[torch.Tensor], torch.Tensor] | None = None) -> BeamOutput:
    """Beam search for a decoder-only model over prompts `idx` [B, T] (left-padded, with `attention_mask`):
    the same rules as `beam_search` (Hugging Face's `generate(num_beams=K)`), hypothesis lengths counting the
    generated tokens only. Sequences are [B * num_return_sequences, T + generated], prompt first, padded with
    `pad_id` (default eos) after eos. Generation stops at the context length (no sliding window)."""
    _check_beam_args(num_beams, early_stopping, num_return_sequences)
    was_training = model.training
    model.eval()
    ctx = _config(model).context_length
    if idx.shape[1] > ctx - 1:  # keep the most recent tokens, leaving room for at least one new one
        idx = idx[:, -(ctx - 1):]
        attention_mask = attention_mask[:, -(ctx - 1):] if attention_mask is not None else None
    T = idx.shape[1]
    max_new_tokens = max(min(int(max_new_tokens), ctx - T), 1)
    mask = attention_mask.bool() if attention_mask is not None else None
    step = _CausalLM(model, mask, num_beams, T + max_new_tokens, use_cache)
    fill = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
    out = _beam_core(step, idx, num_beams, max_new_tokens, eos_id, fill, length_penalty, early_stopping,
                     num_return_sequences, logits_processor)
    model.train(was_training)
    return out


def generate_seq2seq(model, src: torch.Tensor, src_mask: torch.Tensor | None = None, num_beams: int = 1,
                     **kw) -> torch.Tensor:
    """Greedy when num_beams == 1, else beam search; [B, 1 + generated] token ids."""
    if num_beams <= 1:
        for k in ("length_penalty", "early_stopping", "num_return_sequences"):
            kw.pop(k, None)
        return greedy(model, src, src_mask, **kw)
    return beam_search(model, src, src_mask, num_beams=num_beams, **kw).sequences


def strip(sequences: torch.Tensor, eos_id: int | None, skip: int = 1) -> list[list[int]]:
    """Token lists without the start token(s) and without eos and what follows it."""
    out = []
    for row in sequences.tolist():
        row = row[skip:]
        if eos_id is not None and eos_id in row:
            row = row[:row.index(eos_id)]
        out.append(row)
    return out
