"""BERT (HF `bert`: BertModel, BertForMaskedLM, BertForPreTraining) <-> kiln encoder.

Post-LN: attention.output.LayerNorm is kiln's attn_norm, output.LayerNorm its mlp_norm; the embedding
LayerNorm is embed.norm; token types are embed.token_types. q/k/v are concatenated into qkv_proj.
Optional heads: the pooler (ModelConfig.pooler) and the MLM transform + output bias (ModelConfig.mlm_head).
"""

from __future__ import annotations

import torch

from kiln.errors import KilnError
from kiln.interop import _map
from kiln.model.config import ModelConfig

FAMILY = "bert"
PREFIX = "bert."
IGNORE = (r"embeddings\.position_ids$", r"^cls\.seq_relationship\.",   # buffer; next-sentence head (not kept)
          r"^cls\.predictions\.decoder\.weight$")                      # tied to the word embeddings
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu",
               "silu": "silu", "swish": "silu"}


def _layout_rows(cfg: ModelConfig) -> list[tuple]:
    d = cfg.d_model
    layer = "bert.encoder.layer.{}."
    rows = [
        # kiln name                                  HF name(s)
        ("decoder.embed.tokens.weight",             "bert.embeddings.word_embeddings.weight"),
        ("decoder.embed.positions.weight",          "bert.embeddings.position_embeddings.weight"),
        ("decoder.embed.token_types.weight",        "bert.embeddings.token_type_embeddings.weight"),
        ("decoder.embed.norm.weight",               "bert.embeddings.LayerNorm.weight"),
        ("decoder.embed.norm.bias",                 "bert.embeddings.LayerNorm.bias"),
        ("decoder.blocks.{}.attn.qkv_proj.weight",  (layer + "attention.self.query.weight",
                                                     layer + "attention.self.key.weight",
                                                     layer + "attention.self.value.weight"), (d, d, d)),
        ("decoder.blocks.{}.attn.qkv_proj.bias",    (layer + "attention.self.query.bias",
                                                     layer + "attention.self.key.bias",
                                                     layer + "attention.self.value.bias"), (d, d, d)),
        ("decoder.blocks.{}.attn.out_proj.weight",  layer + "attention.output.dense.weight"),
        ("decoder.blocks.{}.attn.out_proj.bias",    layer + "attention.output.dense.bias"),
        ("decoder.blocks.{}.attn_norm.weight",      layer + "attention.output.LayerNorm.weight"),
        ("decoder.blocks.{}.attn_norm.bias",        layer + "attention.output.LayerNorm.bias"),
        ("decoder.blocks.{}.mlp.up_proj.weight",    layer + "intermediate.dense.weight"),
        ("decoder.blocks.{}.mlp.up_proj.bias",      layer + "intermediate.dense.bias"),
        ("decoder.blocks.{}.mlp.down_proj.weight",  layer + "output.dense.weight"),
        ("decoder.blocks.{}.mlp.down_proj.bias",    layer + "output.dense.bias"),
        ("decoder.blocks.{}.mlp_norm.weight",       layer + "output.LayerNorm.weight"),
        ("decoder.blocks.{}.mlp_norm.bias",         layer + "output.LayerNorm.bias"),
    ]
    if cfg.pooler:
        rows += [("pooler.dense.weight", "bert.pooler.dense.weight"),
                 ("pooler.dense.bias", "bert.pooler.dense.bias")]
    if cfg.mlm_head:
        rows += [("head_transform.dense.weight", "cls.predictions.transform.dense.weight"),
                 ("head_transform.dense.bias", "cls.predictions.transform.dense.bias"),
                 ("head_transform.norm.weight", "cls.predictions.transform.LayerNorm.weight"),
                 ("head_transform.norm.bias", "cls.predictions.transform.LayerNorm.bias"),
                 ("lm_head.bias", "cls.predictions.bias")]
    return rows


def layout(cfg: ModelConfig) -> list[_map.Entry]:
    return _map.entries(_layout_rows(cfg), cfg.n_layer)


def config_from_hf(h: dict, weight_names=None) -> ModelConfig:
    """`weight_names` (the checkpoint's tensor names), when given, decides which heads exist; otherwise
    `architectures` does (BertModel: pooler; BertForMaskedLM: MLM head; BertForPreTraining: both)."""
    need = lambda key: _map.need(h, key, FAMILY)  # noqa: E731
    act = h.get("hidden_act", "gelu")
    if act not in ACTIVATIONS:
        raise KilnError(f"bert config.json: hidden_act {act!r} is not supported (kiln knows {', '.join(ACTIVATIONS)})")
    if h.get("position_embedding_type", "absolute") != "absolute":
        raise KilnError(f"bert config.json: position_embedding_type {h['position_embedding_type']!r} is not "
                        "supported (kiln: absolute)")
    if h.get("is_decoder") or h.get("add_cross_attention"):
        raise KilnError("bert config.json: is_decoder/add_cross_attention BERT is not supported")
    if weight_names is not None:
        names = [n.removeprefix(PREFIX) for n in weight_names]
        pooler = any(n.startswith("pooler.") for n in names)
        mlm = any(n.startswith("cls.predictions.transform.") for n in names)
    else:
        archs = h.get("architectures") or ["BertModel"]
        pooler = any(a in ("BertModel", "BertForPreTraining") for a in archs)
        mlm = any(a in ("BertForMaskedLM", "BertForPreTraining") for a in archs)
    return ModelConfig(
        arch="encoder", vocab_size=need("vocab_size"), n_layer=need("num_hidden_layers"),
        n_head=need("num_attention_heads"), d_model=need("hidden_size"), d_ff=need("intermediate_size"),
        context_length=h.get("max_position_embeddings", 512), position="learned", norm="layernorm",
        norm_eps=h.get("layer_norm_eps", 1e-12), pre_norm=False, final_norm=False, embedding_norm=True,
        activation=ACTIVATIONS[act], bias=True, dropout=h.get("hidden_dropout_prob", 0.1),
        tie_embeddings=h.get("tie_word_embeddings", True), type_vocab_size=h.get("type_vocab_size", 2),
        pad_token_id=_map.pad_id(h), mlm_head=mlm, pooler=pooler)


def config_to_hf(cfg: ModelConfig) -> dict:
    cfg = cfg.with_().resolve()
    _map.require(cfg, "bert", arch="encoder", position="learned", norm="layernorm", pre_norm=False,
                 embedding_norm=True, bias=True, tie_embeddings=True, embed_scale=False,
                 activation=("gelu", "gelu_tanh", "relu", "silu"))
    if cfg.n_kv_head != cfg.n_head:
        raise KilnError(f"cannot export to bert: n_kv_head {cfg.n_kv_head} != n_head {cfg.n_head}")
    if cfg.type_vocab_size == 0:
        raise KilnError("cannot export to bert: model.type_vocab_size is 0 (BERT always has token-type embeddings)")
    out = {
        "architectures": ["BertForMaskedLM" if cfg.mlm_head else "BertModel"], "model_type": "bert",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head, "intermediate_size": cfg.d_ff,
        "hidden_act": {"gelu_tanh": "gelu_new"}.get(cfg.activation, cfg.activation),
        "max_position_embeddings": cfg.context_length, "type_vocab_size": cfg.type_vocab_size,
        "layer_norm_eps": cfg.norm_eps, "hidden_dropout_prob": cfg.dropout,
        "attention_probs_dropout_prob": cfg.dropout, "position_embedding_type": "absolute",
        "tie_word_embeddings": True, "dtype": "float32",
    }
    if cfg.pad_token_id >= 0:
        out["pad_token_id"] = cfg.pad_token_id
    return out


def _normalize(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Old TF-converted checkpoints name LayerNorm parameters gamma/beta; cls.predictions.decoder.bias is an
    alias of cls.predictions.bias."""
    out = {}
    for k, v in hf_state.items():
        if k.endswith(".gamma") or k.endswith(".beta"):
            k = k.rsplit(".", 1)[0] + (".weight" if k.endswith(".gamma") else ".bias")
        if k == "cls.predictions.decoder.bias":
            if "cls.predictions.bias" in hf_state:
                continue
            k = "cls.predictions.bias"
        out[k] = v
    return out


def state_from_hf(hf_state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    return _map.from_hf(_normalize(hf_state), layout(cfg), cfg, FAMILY, IGNORE, PREFIX)


def state_to_hf(kiln_state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """BertForMaskedLM layout (`bert.` + `cls.`) with an MLM head, else BertModel's (no prefix)."""
    out = _map.to_hf(kiln_state, layout(cfg), FAMILY)
    if not cfg.mlm_head:
        out = {k.removeprefix(PREFIX): v for k, v in out.items()}
    return out


# Task heads (kiln.interop.hf.import_task_hf / export_task_hf): HF class -> (the kiln run kind, {HF head tensor:
# kiln tensor}); the encoder is `bert.` in HF and `backbone.` in the kiln task model (kiln.model.heads).
HEADS = {
    "BertForQuestionAnswering": ("qa", {"qa_outputs.weight": "head.weight", "qa_outputs.bias": "head.bias"}),
    "BertForTokenClassification": ("tokens", {"classifier.weight": "head.weight", "classifier.bias": "head.bias"}),
}
