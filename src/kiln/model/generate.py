"""Decoding for decoder-only models: greedy and sampling (temperature, top-k, top-p), with a KV cache.

The model is an argument, used by duck typing (`config`, `new_caches`, a forward taking `caches=`): this module
never imports kiln.model.transformer (Transformer.generate imports it, not the other way round).
"""

from __future__ import annotations

import torch

from kiln.model.packed import decoding


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Mask logits outside the top-k and the top-p nucleus with -inf. logits: [B, V]."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > top_p  # keep the token that crosses top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


@decoding
@torch.inference_mode()
def generate(model, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, greedy: bool = False, eos_token_id: int | None = None, use_cache: bool = True,
             attention_mask: torch.Tensor | None = None, generator: torch.Generator | None = None,
             stop=None, num_beams: int = 1, length_penalty: float = 1.0,
             early_stopping: bool | str = False) -> torch.Tensor:
    """Extend `idx` [B, T] by up to `max_new_tokens`. Left-pad batched prompts and pass `attention_mask`.

    temperature 0 or greedy=True picks the argmax. Returns [B, T + new] (rows that hit eos are padded with eos).
    `stop(new_ids [B, n]) -> bool tensor [B]` marks rows as finished (stop strings, see kiln.api.sample).
    num_beams > 1: beam search as Hugging Face's generate(num_beams=..., length_penalty=..., early_stopping=...)
    (kiln.model.beam.beam_search_causal); the best hypothesis of each prompt, padded with eos after its eos.
    Sampling settings and `stop` do not apply to it. max_new_tokens 0 returns `idx` as it is.
    (The faces check these settings with kiln.model.generation_settings.check_generation.)
    """
    if max_new_tokens == 0:  # beam search would still add one token
        return idx
    if num_beams > 1:
        if stop is not None:
            raise ValueError("stop is not supported with num_beams > 1")
        from kiln.model.beam import beam_search_causal

        return beam_search_causal(model, idx, attention_mask, num_beams=num_beams, max_new_tokens=max_new_tokens,
                                  eos_id=eos_token_id, length_penalty=length_penalty,
                                  early_stopping=early_stopping, use_cache=use_cache).sequences
    was_training = model.training
    model.eval()
    cfg = model.config
    B, T = idx.shape
    ctx = cfg.context_length
    if T > ctx:  # keep the most recent context_length tokens of a long prompt
        idx = idx[:, -ctx:]
        attention_mask = attention_mask[:, -ctx:] if attention_mask is not None else None
        T = ctx
    greedy = greedy or temperature == 0
    mask = attention_mask.bool() if attention_mask is not None else None
    position_ids = None
    if mask is not None:
        position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
    caches = model.new_caches(B, min(T + max_new_tokens, ctx)) if use_cache else None
    finished = torch.zeros(B, dtype=torch.bool, device=idx.device)
    out = idx
    step_input, step_mask, step_pos = idx, mask, position_ids
    for _ in range(max_new_tokens):
        if use_cache and out.shape[1] > ctx:
            use_cache = False  # past the context window: recompute over the last context_length tokens (nanoGPT)
        if use_cache:
            logits = model(step_input, attention_mask=step_mask, position_ids=step_pos, caches=caches)
        else:
            window_mask = mask[:, -ctx:] if mask is not None else None
            window_pos = (window_mask.long().cumsum(-1) - 1).clamp(min=0) if window_mask is not None else None
            logits = model(out[:, -ctx:], attention_mask=window_mask, position_ids=window_pos)
        logits = logits[:, -1, :].float()
        if greedy:
            next_token = logits.argmax(-1)
        else:
            logits = filter_logits(logits / temperature, top_k, top_p)
            next_token = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)
        if eos_token_id is not None:
            next_token = torch.where(finished, torch.full_like(next_token, eos_token_id), next_token)
            finished |= next_token == eos_token_id
        out = torch.cat([out, next_token[:, None]], dim=1)
        if stop is not None:
            done = stop(out[:, T:])
            if bool(done.all()):
                break
        if mask is not None:
            mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.bool, device=mask.device)], dim=1)
            position_ids = torch.cat([position_ids, position_ids[:, -1:] + 1], dim=1)
            step_mask, step_pos = mask, position_ids[:, -1:]
        step_input = next_token[:, None]
        if eos_token_id is not None and bool(finished.all()):
            break
    if was_training:
        model.train()
    return out
