"""BART (HF `bart`: BartForConditionalGeneration, BartModel) <-> kiln encoder-decoder.

BART maps onto kiln's Transformer without a model change: post-LN blocks (self_attn_layer_norm = attn_norm,
encoder_attn_layer_norm = cross_norm, final_layer_norm = mlp_norm), layernorm_embedding = embed.norm,
scale_embedding = embed_scale (sqrt(d_model)), one shared token embedding tied to the LM head, learned
positions. BART's position tables have 2 extra leading rows (positions are looked up at index + 2; rows 0-1
are never read): import drops them, export writes them as zeros. q/k/v are concatenated into qkv_proj, the
cross-attention k/v into kv_proj. `final_logits_bias` must be zero (it is in BART checkpoints; Marian's is
not, which is one reason Marian is not mapped here, the other being its sin|cos position layout).
"""

from __future__ import annotations

import torch

from kiln.errors import KilnError
from kiln.interop import _map
from kiln.model.config import ModelConfig

FAMILY = "bart"
PREFIX = "model."
OFFSET = 2  # BartLearnedPositionalEmbedding's offset
IGNORE = (r"^final_logits_bias$", r"^lm_head\.weight$", r"^model\.(encoder|decoder)\.embed_tokens\.weight$")
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu",
               "silu": "silu", "swish": "silu"}


def _attn(kiln: str, hf: str, d: int, cross: bool = False) -> list[tuple]:
    rows = []
    for p in ("weight", "bias"):
        if cross:
            rows += [(f"{kiln}.q_proj.{p}", f"{hf}.q_proj.{p}"),
                     (f"{kiln}.kv_proj.{p}", (f"{hf}.k_proj.{p}", f"{hf}.v_proj.{p}"), (d, d))]
        else:
            rows.append((f"{kiln}.qkv_proj.{p}", (f"{hf}.q_proj.{p}", f"{hf}.k_proj.{p}", f"{hf}.v_proj.{p}"),
                         (d, d, d)))
        rows.append((f"{kiln}.out_proj.{p}", f"{hf}.out_proj.{p}"))
    return rows


def _side(side: str, d: int, cross: bool) -> list[tuple]:
    kb, hb = f"{side}.blocks.{{}}", f"model.{side}.layers.{{}}"
    rows = [(f"{side}.embed.positions.weight", f"model.{side}.embed_positions.weight"),
            (f"{side}.embed.norm.weight", f"model.{side}.layernorm_embedding.weight"),
            (f"{side}.embed.norm.bias", f"model.{side}.layernorm_embedding.bias")]
    rows += _attn(f"{kb}.attn", f"{hb}.self_attn", d)
    rows += [(f"{kb}.attn_norm.{p}", f"{hb}.self_attn_layer_norm.{p}") for p in ("weight", "bias")]
    if cross:
        rows += _attn(f"{kb}.cross_attn", f"{hb}.encoder_attn", d, cross=True)
        rows += [(f"{kb}.cross_norm.{p}", f"{hb}.encoder_attn_layer_norm.{p}") for p in ("weight", "bias")]
    rows += [(f"{kb}.mlp.up_proj.{p}", f"{hb}.fc1.{p}") for p in ("weight", "bias")]
    rows += [(f"{kb}.mlp.down_proj.{p}", f"{hb}.fc2.{p}") for p in ("weight", "bias")]
    rows += [(f"{kb}.mlp_norm.{p}", f"{hb}.final_layer_norm.{p}") for p in ("weight", "bias")]
    return rows


def layout(cfg: ModelConfig) -> list[_map.Entry]:
    cfg = cfg.with_().resolve()
    d = cfg.d_model
    return (_map.entries([("encoder.embed.tokens.weight", "model.shared.weight")], 0)
            + _map.entries(_side("encoder", d, cross=False), cfg.n_layer)
            + _map.entries(_side("decoder", d, cross=True), cfg.n_decoder_layer))


def config_from_hf(h: dict) -> ModelConfig:
    need = lambda key: _map.need(h, key, FAMILY)  # noqa: E731
    act = h.get("activation_function", "gelu")
    if act not in ACTIVATIONS:
        raise KilnError(f"bart config.json: activation_function {act!r} is not supported "
                        f"(kiln knows {', '.join(ACTIVATIONS)})")
    for a, b in (("encoder_attention_heads", "decoder_attention_heads"), ("encoder_ffn_dim", "decoder_ffn_dim")):
        if need(a) != need(b):
            raise KilnError(f"bart config.json: {a} ({h[a]}) != {b} ({h[b]}); kiln uses one value for both sides")
    if not h.get("tie_word_embeddings", True):
        raise KilnError("bart config.json: tie_word_embeddings false is not supported (kiln ties the LM head to "
                        "the shared embedding)")
    return ModelConfig(
        arch="encoder-decoder", vocab_size=need("vocab_size"), n_layer=need("encoder_layers"),
        n_decoder_layer=need("decoder_layers"), n_head=need("encoder_attention_heads"), d_model=need("d_model"),
        d_ff=need("encoder_ffn_dim"), context_length=need("max_position_embeddings"), position="learned",
        norm="layernorm", norm_eps=1e-5, pre_norm=False, final_norm=False, embedding_norm=True,
        activation=ACTIVATIONS[act], bias=True, dropout=h.get("dropout", 0.1), tie_embeddings=True,
        embed_scale=bool(h.get("scale_embedding", False)), pad_token_id=_map.pad_id(h),
        init_std=h.get("init_std", 0.02))


def config_to_hf(cfg: ModelConfig) -> dict:
    cfg = cfg.with_().resolve()
    _map.require(cfg, FAMILY, arch="encoder-decoder", position="learned", norm="layernorm", pre_norm=False,
                 embedding_norm=True, bias=True, tie_embeddings=True, mlm_head=False, type_vocab_size=0,
                 activation=("gelu", "gelu_tanh", "relu", "silu"))
    if cfg.n_kv_head != cfg.n_head:
        raise KilnError(f"cannot export to bart: n_kv_head {cfg.n_kv_head} != n_head {cfg.n_head}")
    if abs(cfg.norm_eps - 1e-5) > 1e-12:
        raise KilnError(f"cannot export to bart: model.norm_eps is {cfg.norm_eps}, BART's LayerNorms use 1e-5")
    return {
        "architectures": ["BartForConditionalGeneration"], "model_type": "bart", "vocab_size": cfg.vocab_size,
        "d_model": cfg.d_model, "encoder_layers": cfg.n_layer, "decoder_layers": cfg.n_decoder_layer,
        "encoder_attention_heads": cfg.n_head, "decoder_attention_heads": cfg.n_head,
        "encoder_ffn_dim": cfg.d_ff, "decoder_ffn_dim": cfg.d_ff,
        "activation_function": {"gelu_tanh": "gelu_new"}.get(cfg.activation, cfg.activation),
        "max_position_embeddings": cfg.context_length, "scale_embedding": cfg.embed_scale,
        "dropout": cfg.dropout, "attention_dropout": 0.0, "activation_dropout": 0.0, "init_std": cfg.init_std,
        "tie_word_embeddings": True, "is_encoder_decoder": True, "forced_eos_token_id": None, "dtype": "float32",
        **({"pad_token_id": cfg.pad_token_id} if cfg.pad_token_id >= 0 else {}),
    }


def _normalize(hf_state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Add the `model.` prefix of a BartModel checkpoint, find the shared embedding under whichever tied name
    was saved, drop BART's 2 unused position rows, and check final_logits_bias is zero."""
    if not any(k.startswith(PREFIX) for k in hf_state):
        hf_state = {(k if k == "final_logits_bias" else PREFIX + k): v for k, v in hf_state.items()}
    state = dict(hf_state)
    if "model.shared.weight" not in state:
        for alias in ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight", "lm_head.weight"):
            if alias in state:
                state["model.shared.weight"] = state[alias]
                break
    bias = state.get("final_logits_bias")
    if bias is not None and bool(bias.abs().max() > 0):
        raise KilnError("bart checkpoint: final_logits_bias is not zero; kiln's LM head has no such bias")
    for side in ("encoder", "decoder"):
        name = f"model.{side}.embed_positions.weight"
        if name in state:
            t = state[name]
            if t.shape[0] != cfg.context_length + OFFSET:
                raise KilnError(f"bart checkpoint: weight {name!r} has {t.shape[0]} rows, config.json's "
                                f"max_position_embeddings {cfg.context_length} implies {cfg.context_length + OFFSET}")
            state[name] = t[OFFSET:]
    return state


def state_from_hf(hf_state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    return _map.from_hf(_normalize(hf_state, cfg), layout(cfg), cfg, FAMILY, IGNORE, PREFIX)


def state_to_hf(kiln_state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """BartForConditionalGeneration's layout; the shared embedding once (transformers re-ties the others)."""
    out = _map.to_hf(kiln_state, layout(cfg), FAMILY)
    for side in ("encoder", "decoder"):
        name = f"model.{side}.embed_positions.weight"
        t = out[name]
        out[name] = torch.cat([torch.zeros(OFFSET, t.shape[1], dtype=t.dtype), t], 0)
    out["final_logits_bias"] = torch.zeros(1, cfg.vocab_size, dtype=out["model.shared.weight"].dtype)
    return out
