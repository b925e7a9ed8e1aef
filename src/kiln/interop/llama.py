"""Llama-shaped decoders (HF `llama`, `mistral`, `qwen2`) <-> kiln decoder.

Pre-RMSNorm, RoPE, SwiGLU, grouped-query attention, usually no biases (Qwen2: biases on q/k/v only).
HF q/k/v are concatenated into kiln's qkv_proj and gate/up into up_proj ([gate; up]). kiln's RoPE uses the
same "rotate half" layout as HF's Llama, so q/k rows need no permutation.
"""

from __future__ import annotations

import torch

from kiln.errors import KilnError
from kiln.interop import _map
from kiln.model.config import ModelConfig

FAMILY = "llama"
MODEL_TYPES = ("llama", "mistral", "qwen2")
PREFIX = "model."
IGNORE = (r"\.rotary_emb\.inv_freq$",)


def _layout_rows(cfg: ModelConfig) -> list[tuple]:
    q, kv, ff = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.d_ff
    attn = "model.layers.{}.self_attn."
    mlp = "model.layers.{}.mlp."
    # kiln name                                  HF name(s), concatenated along dim 0
    rows = [
        ("decoder.embed.tokens.weight",           "model.embed_tokens.weight"),
        ("decoder.blocks.{}.attn_norm.weight",    "model.layers.{}.input_layernorm.weight"),
        ("decoder.blocks.{}.attn.qkv_proj.weight", (attn + "q_proj.weight", attn + "k_proj.weight",
                                                   attn + "v_proj.weight"), (q, kv, kv)),
        ("decoder.blocks.{}.attn.out_proj.weight", attn + "o_proj.weight"),
        ("decoder.blocks.{}.mlp_norm.weight",     "model.layers.{}.post_attention_layernorm.weight"),
        ("decoder.blocks.{}.mlp.up_proj.weight",  (mlp + "gate_proj.weight", mlp + "up_proj.weight"), (ff, ff)),
        ("decoder.blocks.{}.mlp.down_proj.weight", mlp + "down_proj.weight"),
        ("decoder.norm.weight",                   "model.norm.weight"),
    ]
    if cfg.bias or cfg.qkv_bias:
        rows.append(("decoder.blocks.{}.attn.qkv_proj.bias", (attn + "q_proj.bias", attn + "k_proj.bias",
                                                             attn + "v_proj.bias"), (q, kv, kv)))
    if cfg.bias:
        rows += [("decoder.blocks.{}.attn.out_proj.bias", attn + "o_proj.bias"),
                 ("decoder.blocks.{}.mlp.up_proj.bias", (mlp + "gate_proj.bias", mlp + "up_proj.bias"), (ff, ff)),
                 ("decoder.blocks.{}.mlp.down_proj.bias", mlp + "down_proj.bias")]
    if not cfg.tie_embeddings:
        rows.append(("lm_head.weight", "lm_head.weight"))
    return rows


def layout(cfg: ModelConfig) -> list[_map.Entry]:
    return _map.entries(_layout_rows(cfg.with_().resolve()), cfg.n_layer)


def _rope(h: dict) -> dict:
    """The ModelConfig rope keys of a transformers 4.x (rope_theta, rope_scaling) or 5.x (rope_parameters)
    config: the base frequency and the `linear` or `llama3` scaling."""
    params = h.get("rope_parameters") or {}
    scaling = {**(h.get("rope_scaling") or {}), **params}
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind not in ("default", "linear", "llama3"):
        raise KilnError(f"{h.get('model_type')} config.json: rope scaling {kind!r} is not supported "
                        "(kiln implements plain RoPE and the linear and llama3 scalings)")
    if h.get("partial_rotary_factor", 1.0) != 1.0 or params.get("partial_rotary_factor", 1.0) != 1.0:
        raise KilnError(f"{h.get('model_type')} config.json: partial_rotary_factor is not supported")
    out = {"rope_theta": float(params.get("rope_theta") or h.get("rope_theta") or 10000.0)}
    if kind == "default":
        return out
    out.update(rope_scaling=kind, rope_scaling_factor=float(scaling.get("factor", 1.0)))
    if kind == "llama3":
        out.update(rope_low_freq_factor=float(scaling["low_freq_factor"]),
                   rope_high_freq_factor=float(scaling["high_freq_factor"]),
                   rope_original_context=int(scaling["original_max_position_embeddings"]))
    return out


def _rope_to_hf(cfg: ModelConfig) -> dict:
    """rope_theta and rope_parameters (transformers 5.x) with rope_scaling (4.x) when the frequencies are scaled."""
    params = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling != "none":
        params.update(rope_type=cfg.rope_scaling, factor=cfg.rope_scaling_factor)
    if cfg.rope_scaling == "llama3":
        params.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
                      original_max_position_embeddings=cfg.rope_original_context)
    out = {"rope_theta": cfg.rope_theta, "rope_parameters": params}
    if cfg.rope_scaling != "none":
        out["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}
    return out


def config_from_hf(h: dict) -> ModelConfig:
    model_type = h.get("model_type", "llama")
    need = lambda key: _map.need(h, key, model_type)  # noqa: E731
    d, n_head = need("hidden_size"), need("num_attention_heads")
    if h.get("head_dim") not in (None, d // n_head) or d % n_head:
        raise KilnError(f"{model_type} config.json: head_dim {h.get('head_dim')} != hidden_size/num_attention_heads "
                        f"({d}/{n_head}) is not supported")
    if h.get("hidden_act", "silu") not in ("silu", "swish"):
        raise KilnError(f"{model_type} config.json: hidden_act {h['hidden_act']!r} is not supported (kiln: SwiGLU)")
    if model_type == "qwen2":
        bias, qkv_bias = False, True
    else:
        bias = bool(h.get("attention_bias", False))
        if bias != bool(h.get("mlp_bias", False)):
            raise KilnError(f"{model_type} config.json: attention_bias={h.get('attention_bias')} with "
                            f"mlp_bias={h.get('mlp_bias')} is not supported (kiln: both or neither)")
        qkv_bias = False
    context = h.get("max_position_embeddings", 2048)
    window = h.get("sliding_window") if (model_type == "mistral" or h.get("use_sliding_window")) else None
    if window:  # kiln has no sliding-window attention: stay inside one window, where the two agree exactly
        context = min(context, window)
    return ModelConfig(
        arch="decoder", vocab_size=need("vocab_size"), n_layer=need("num_hidden_layers"), n_head=n_head,
        n_kv_head=h.get("num_key_value_heads") or n_head, d_model=d, d_ff=need("intermediate_size"),
        context_length=context, position="rope", **_rope(h), norm="rmsnorm",
        norm_eps=h.get("rms_norm_eps", 1e-6), pre_norm=True, final_norm=True, embedding_norm=False,
        activation="swiglu", bias=bias, qkv_bias=qkv_bias, dropout=h.get("attention_dropout", 0.0),
        tie_embeddings=h.get("tie_word_embeddings", False), type_vocab_size=0, pad_token_id=_map.pad_id(h))


def config_to_hf(cfg: ModelConfig) -> dict:
    """LlamaForCausalLM, or Qwen2ForCausalLM when only q/k/v carry biases."""
    cfg = cfg.with_().resolve()
    _map.require(cfg, "llama", arch="decoder", position="rope", norm="rmsnorm", pre_norm=True, final_norm=True,
                 embedding_norm=False, activation="swiglu", mlm_head=False, type_vocab_size=0, embed_scale=False)
    qwen2 = cfg.qkv_bias and not cfg.bias
    out = {
        "architectures": ["Qwen2ForCausalLM" if qwen2 else "LlamaForCausalLM"],
        "model_type": "qwen2" if qwen2 else "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim, "hidden_act": "silu", "max_position_embeddings": cfg.context_length,
        "rms_norm_eps": cfg.norm_eps, **_rope_to_hf(cfg),
        "attention_dropout": cfg.dropout, "tie_word_embeddings": cfg.tie_embeddings, "dtype": "float32",
    }
    if qwen2:
        out.update(use_sliding_window=False, sliding_window=None)
    else:
        out.update(attention_bias=cfg.bias, mlp_bias=cfg.bias)
    if cfg.pad_token_id >= 0:
        out["pad_token_id"] = cfg.pad_token_id
    return out


def state_from_hf(hf_state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    ignore = IGNORE + ((r"^lm_head\.weight$",) if cfg.tie_embeddings else ())
    return _map.from_hf(hf_state, layout(cfg), cfg, FAMILY, ignore, PREFIX)


def state_to_hf(kiln_state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    return _map.to_hf(kiln_state, layout(cfg), FAMILY)
