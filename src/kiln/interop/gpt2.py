"""GPT-2 (HF `gpt2`, GPT2LMHeadModel) <-> kiln decoder.

Pre-LN, learned positions, LayerNorm, tanh-GELU, biases everywhere, head tied to the token embedding.
HF's Conv1D stores weights [in, out]: they are transposed; c_attn is already [q; k; v] like kiln's qkv_proj.
"""

from __future__ import annotations

import torch

from kiln.errors import KilnError
from kiln.interop import _map
from kiln.model.config import ModelConfig

FAMILY = "gpt2"
PREFIX = "transformer."
IGNORE = (r"\.attn\.(masked_)?bias$", r"^lm_head\.weight$")  # causal-mask buffers of old checkpoints; tied head

ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
               "gelu": "gelu", "relu": "relu", "silu": "silu", "swish": "silu"}

# kiln name                                 HF name                                    Conv1D -> transpose
LAYOUT = [
    ("decoder.embed.tokens.weight",          "transformer.wte.weight"),
    ("decoder.embed.positions.weight",       "transformer.wpe.weight"),
    ("decoder.blocks.{}.attn_norm.weight",   "transformer.h.{}.ln_1.weight"),
    ("decoder.blocks.{}.attn_norm.bias",     "transformer.h.{}.ln_1.bias"),
    ("decoder.blocks.{}.attn.qkv_proj.weight", "transformer.h.{}.attn.c_attn.weight",    True),
    ("decoder.blocks.{}.attn.qkv_proj.bias", "transformer.h.{}.attn.c_attn.bias"),
    ("decoder.blocks.{}.attn.out_proj.weight", "transformer.h.{}.attn.c_proj.weight",    True),
    ("decoder.blocks.{}.attn.out_proj.bias", "transformer.h.{}.attn.c_proj.bias"),
    ("decoder.blocks.{}.mlp_norm.weight",    "transformer.h.{}.ln_2.weight"),
    ("decoder.blocks.{}.mlp_norm.bias",      "transformer.h.{}.ln_2.bias"),
    ("decoder.blocks.{}.mlp.up_proj.weight", "transformer.h.{}.mlp.c_fc.weight",         True),
    ("decoder.blocks.{}.mlp.up_proj.bias",   "transformer.h.{}.mlp.c_fc.bias"),
    ("decoder.blocks.{}.mlp.down_proj.weight", "transformer.h.{}.mlp.c_proj.weight",     True),
    ("decoder.blocks.{}.mlp.down_proj.bias", "transformer.h.{}.mlp.c_proj.bias"),
    ("decoder.norm.weight",                  "transformer.ln_f.weight"),
    ("decoder.norm.bias",                    "transformer.ln_f.bias"),
]
UNTIED_HEAD = [("lm_head.weight", "lm_head.weight")]


def layout(cfg: ModelConfig) -> list[_map.Entry]:
    return _map.entries(LAYOUT + ([] if cfg.tie_embeddings else UNTIED_HEAD), cfg.n_layer)


def config_from_hf(h: dict) -> ModelConfig:
    need = lambda key: _map.need(h, key, FAMILY)  # noqa: E731
    act = h.get("activation_function", "gelu_new")
    if act not in ACTIVATIONS:
        raise KilnError(f"gpt2 config.json: activation_function {act!r} is not supported "
                        f"(kiln knows {', '.join(ACTIVATIONS)})")
    if h.get("scale_attn_weights", True) is False or h.get("scale_attn_by_inverse_layer_idx"):
        raise KilnError("gpt2 config.json: scale_attn_weights=false / scale_attn_by_inverse_layer_idx=true "
                        "are not supported (kiln scales attention by 1/sqrt(head_dim))")
    if h.get("add_cross_attention"):
        raise KilnError("gpt2 config.json: add_cross_attention=true is not supported")
    d = need("n_embd")
    return ModelConfig(
        arch="decoder", vocab_size=need("vocab_size"), n_layer=need("n_layer"), n_head=need("n_head"),
        n_kv_head=need("n_head"), d_model=d, d_ff=h.get("n_inner") or 4 * d,
        context_length=h.get("n_positions", 1024), position="learned", norm="layernorm",
        norm_eps=h.get("layer_norm_epsilon", 1e-5), pre_norm=True, final_norm=True, embedding_norm=False,
        activation=ACTIVATIONS[act], bias=True, dropout=h.get("resid_pdrop", 0.0),
        tie_embeddings=h.get("tie_word_embeddings", True), type_vocab_size=0, pad_token_id=_map.pad_id(h))


def config_to_hf(cfg: ModelConfig) -> dict:
    cfg = cfg.with_().resolve()
    _map.require(cfg, "gpt2", arch="decoder", position="learned", norm="layernorm", pre_norm=True,
                 final_norm=True, embedding_norm=False, bias=True, mlm_head=False,
                 type_vocab_size=0, embed_scale=False, activation=("gelu_tanh", "gelu", "relu", "silu"))
    if cfg.n_kv_head != cfg.n_head:
        raise KilnError(f"cannot export to gpt2: grouped-query attention (n_kv_head {cfg.n_kv_head} < "
                        f"n_head {cfg.n_head}) has no GPT-2 equivalent")
    act = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}[cfg.activation]
    out = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": cfg.vocab_size, "n_positions": cfg.context_length, "n_embd": cfg.d_model,
        "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": cfg.d_ff, "activation_function": act,
        "layer_norm_epsilon": cfg.norm_eps, "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout, "tie_word_embeddings": cfg.tie_embeddings, "dtype": "float32",
    }
    if cfg.pad_token_id >= 0:
        out["pad_token_id"] = cfg.pad_token_id
    return out


def state_from_hf(hf_state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    ignore = IGNORE if cfg.tie_embeddings else IGNORE[:1]
    return _map.from_hf(hf_state, layout(cfg), cfg, FAMILY, ignore, PREFIX)


def state_to_hf(kiln_state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    return _map.to_hf(kiln_state, layout(cfg), FAMILY)
