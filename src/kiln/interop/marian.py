"""Marian (HF `marian`: MarianMTModel, MarianModel; the opus-mt checkpoints) <-> kiln encoder-decoder.

Marian is BART's layout with four differences, each a kiln config value:
- fixed sinusoidal positions, not learned, in MarianSinusoidalPositionalEmbedding's layout: the sines of every
  frequency in the first half of the vector, the cosines in the second (model.position sinusoidal,
  model.sinusoid_layout halves), looked up from position 0 (no offset). transformers does not save them;
  a checkpoint that does (older opus-mt files) must hold that table, which import checks and drops.
- no layernorm_embedding and no final layer norm: post-LN blocks only (embedding_norm false, pre_norm false).
- `final_logits_bias` [1, vocab] (not zero in opus-mt checkpoints) is the LM head's bias (model.head_bias).
  transformers keeps it as a frozen buffer; kiln trains it with the rest when fine-tuning.
- decoder_start_token_id is the pad token and eos is `</s>` (id 0 in opus-mt): carried in the imported
  hf_config.json (and a seq2seq run's seq2seq.json), not in ModelConfig.
Embeddings are scaled by sqrt(d_model) when scale_embedding is set (opus-mt: true), one token table is shared by
encoder and decoder (share_encoder_decoder_embeddings), and tied to the LM head unless tie_word_embeddings is
false. Like transformers, kiln ignores the legacy `normalize_before` / `normalize_embedding` keys.
The tokenizers (source.spm, target.spm, vocab.json) are SentencePiece files that kiln does not read: a run
folder gets a tokenizer only from a tokenizer.json beside config.json.
"""

from __future__ import annotations

import torch

from kiln.errors import KilnError
from kiln.interop import _map
from kiln.interop.bart import ACTIVATIONS, _attn
from kiln.model.config import ModelConfig
from kiln.model.layers import sinusoidal_table

FAMILY = "marian"
PREFIX = "model."
POSITIONS = tuple(f"model.{side}.embed_positions.weight" for side in ("encoder", "decoder"))
TABLES = ("model.shared.weight", "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight")


def _side(side: str, d: int, cross: bool) -> list[tuple]:
    kb, hb = f"{side}.blocks.{{}}", f"model.{side}.layers.{{}}"
    rows = _attn(f"{kb}.attn", f"{hb}.self_attn", d)
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
    top = [("encoder.embed.tokens.weight", "model.shared.weight"), ("lm_head.bias", "final_logits_bias")]
    if not cfg.tie_embeddings:
        top.append(("lm_head.weight", "lm_head.weight"))
    return (_map.entries(top, 0) + _map.entries(_side("encoder", d, cross=False), cfg.n_layer)
            + _map.entries(_side("decoder", d, cross=True), cfg.n_decoder_layer))


def config_from_hf(h: dict) -> ModelConfig:
    need = lambda key: _map.need(h, key, FAMILY)  # noqa: E731
    act = h.get("activation_function", "gelu")
    if act not in ACTIVATIONS:
        raise KilnError(f"marian config.json: activation_function {act!r} is not supported "
                        f"(kiln knows {', '.join(ACTIVATIONS)})")
    for a, b in (("encoder_attention_heads", "decoder_attention_heads"), ("encoder_ffn_dim", "decoder_ffn_dim")):
        if need(a) != need(b):
            raise KilnError(f"marian config.json: {a} ({h[a]}) != {b} ({h[b]}); kiln uses one value for both sides")
    if not h.get("share_encoder_decoder_embeddings", True):
        raise KilnError("marian config.json: share_encoder_decoder_embeddings false (separate source and target "
                        "vocabularies) is not supported; kiln's encoder and decoder share one token table")
    dec_vocab = h.get("decoder_vocab_size") or need("vocab_size")
    if dec_vocab != need("vocab_size"):
        raise KilnError(f"marian config.json: decoder_vocab_size ({dec_vocab}) != vocab_size ({h['vocab_size']}); "
                        "kiln shares one vocabulary between encoder and decoder")
    return ModelConfig(
        arch="encoder-decoder", vocab_size=need("vocab_size"), n_layer=need("encoder_layers"),
        n_decoder_layer=need("decoder_layers"), n_head=need("encoder_attention_heads"), d_model=need("d_model"),
        d_ff=need("encoder_ffn_dim"), context_length=need("max_position_embeddings"), position="sinusoidal",
        sinusoid_layout="halves", norm="layernorm", norm_eps=1e-5, pre_norm=False, final_norm=False,
        embedding_norm=False, activation=ACTIVATIONS[act], bias=True, dropout=h.get("dropout", 0.1),
        tie_embeddings=bool(h.get("tie_word_embeddings", True)), embed_scale=bool(h.get("scale_embedding", False)),
        pad_token_id=_map.pad_id(h), head_bias=True, init_std=h.get("init_std", 0.02))


def config_to_hf(cfg: ModelConfig) -> dict:
    """MarianMTModel's config.json. Token ids: pad from the model config (the decoder start token too);
    export_hf then sets them from the imported config or the seq2seq run's codec."""
    cfg = cfg.with_().resolve()
    _map.require(cfg, FAMILY, arch="encoder-decoder", position="sinusoidal", sinusoid_layout="halves",
                 norm="layernorm", pre_norm=False, embedding_norm=False, bias=True, mlm_head=False,
                 type_vocab_size=0, activation=("gelu", "gelu_tanh", "relu", "silu"))
    if cfg.n_kv_head != cfg.n_head:
        raise KilnError(f"cannot export to marian: n_kv_head {cfg.n_kv_head} != n_head {cfg.n_head}")
    if abs(cfg.norm_eps - 1e-5) > 1e-12:
        raise KilnError(f"cannot export to marian: model.norm_eps is {cfg.norm_eps}, Marian's LayerNorms use 1e-5")
    pad = cfg.pad_token_id if cfg.pad_token_id >= 0 else None
    return {
        "architectures": ["MarianMTModel"], "model_type": "marian", "vocab_size": cfg.vocab_size,
        "decoder_vocab_size": cfg.vocab_size, "d_model": cfg.d_model, "encoder_layers": cfg.n_layer,
        "decoder_layers": cfg.n_decoder_layer, "encoder_attention_heads": cfg.n_head,
        "decoder_attention_heads": cfg.n_head, "encoder_ffn_dim": cfg.d_ff, "decoder_ffn_dim": cfg.d_ff,
        "activation_function": {"gelu_tanh": "gelu_new", "silu": "swish"}.get(cfg.activation, cfg.activation),
        "max_position_embeddings": cfg.context_length, "scale_embedding": cfg.embed_scale,
        "dropout": cfg.dropout, "attention_dropout": 0.0, "activation_dropout": 0.0, "init_std": cfg.init_std,
        "share_encoder_decoder_embeddings": True, "tie_word_embeddings": cfg.tie_embeddings,
        "is_encoder_decoder": True, "pad_token_id": pad, "decoder_start_token_id": pad, "dtype": "float32",
        "forced_eos_token_id": None,  # MarianConfig's default (0) is opus-mt's eos, not necessarily this model's
    }


def _normalize(hf_state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Add the `model.` prefix of a MarianModel checkpoint, find the shared embedding under whichever tied name
    was saved, flatten final_logits_bias (zeros when absent, as transformers starts it), and check then drop the
    sinusoidal position tables some checkpoints hold."""
    if not any(k.startswith(PREFIX) for k in hf_state):
        hf_state = {(k if k in ("final_logits_bias", "lm_head.weight") else PREFIX + k): v for k, v in hf_state.items()}
    state = dict(hf_state)
    names = [n for n in TABLES + (("lm_head.weight",) if cfg.tie_embeddings else ()) if n in state]
    for name in names[1:]:  # transformers unties all of them when tie_word_embeddings is false
        if not torch.equal(state[name], state[names[0]]):
            raise KilnError(f"marian checkpoint: {name!r} differs from {names[0]!r}; kiln has one token table for "
                            "encoder and decoder" + (" and the tied LM head" if cfg.tie_embeddings else ""))
    if names:
        state["model.shared.weight"] = state[names[0]]
    for name in names[1:]:
        state.pop(name)
    bias = state.get("final_logits_bias", torch.zeros(1, cfg.vocab_size))
    if bias.dim() != 2 or bias.shape[0] != 1:
        raise KilnError(f"marian checkpoint: weight 'final_logits_bias' has shape {tuple(bias.shape)}, "
                        f"config.json implies (1, {cfg.vocab_size})")
    state["final_logits_bias"] = bias[0]
    for name in POSITIONS:
        if name in state:
            t, want = state.pop(name), sinusoidal_table(cfg.context_length, cfg.d_model, "halves")
            if tuple(t.shape) != tuple(want.shape) or not torch.allclose(t.float(), want, atol=1e-4):
                raise KilnError(f"marian checkpoint: {name!r} is not Marian's sinusoidal table for "
                                f"max_position_embeddings {cfg.context_length} x d_model {cfg.d_model} (shape "
                                f"{tuple(t.shape)}); kiln computes these positions, it does not load them")
    return state


def state_from_hf(hf_state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    return _map.from_hf(_normalize(hf_state, cfg), layout(cfg), cfg, FAMILY, (), PREFIX)


def state_to_hf(kiln_state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """MarianMTModel's layout: the shared embedding once when tied (transformers re-ties the others), all three
    tables when not; final_logits_bias [1, vocab] (zeros for a model without a head bias); no position tables
    (transformers computes them)."""
    cfg = cfg.with_().resolve()
    if "lm_head.bias" not in kiln_state:
        kiln_state = {**kiln_state, "lm_head.bias": torch.zeros(cfg.vocab_size)}
    out = _map.to_hf(kiln_state, layout(cfg), FAMILY)
    out["final_logits_bias"] = out["final_logits_bias"].reshape(1, -1)
    if not cfg.tie_embeddings:  # transformers then unties the encoder's and decoder's tables too: write them
        for name in TABLES[1:]:
            out[name] = out["model.shared.weight"].clone()
    return out
