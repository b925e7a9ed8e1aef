"""Wav2Vec 2.0 (HF `wav2vec2`: Wav2Vec2Model, Wav2Vec2ForCTC, Wav2Vec2ForSequenceClassification) <-> kiln audio
model (arch encoder, model.audio_conv_dim > 0; kiln.model.audio).

HF's base layout (do_stable_layer_norm false) is post-LN with a norm after the position embedding: kiln's
pre_norm false + embedding_norm (encoder.layer_norm is decoder.embed.norm); the "stable" layout of the large
models is pre-LN with a final norm (encoder.layer_norm is decoder.norm). layer_norm is kiln's attn_norm,
final_layer_norm its mlp_norm; q/k/v are concatenated into qkv_proj. The position convolution's weight norm is
stored as HF saves it today (parametrizations.weight.original0 = g, original1 = v); checkpoints saved before
torch's parametrizations (weight_g / weight_v) import too. kiln's feature encoder has one width: conv_dim must
repeat one value.

A Wav2Vec2Model imports as a backbone run (kind pretrain); Wav2Vec2ForCTC as a `kiln finetune asr` run and
Wav2Vec2ForSequenceClassification as a `kiln finetune audio` run (kiln.interop.wav2vec2_runs), and back.
"""

from __future__ import annotations

import torch

from kiln.errors import KilnError
from kiln.interop import _map
from kiln.model.config import ModelConfig

FAMILY = "wav2vec2"
PREFIX = "wav2vec2."
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu",
               "silu": "silu", "swish": "silu"}
POS = "wav2vec2.encoder.pos_conv_embed.conv."
OLD_POS = {POS + "weight_g": POS + "parametrizations.weight.original0",
           POS + "weight_v": POS + "parametrizations.weight.original1"}
# pretraining-only weights of Wav2Vec2ForPreTraining (quantizer, projections): not part of the encoder
IGNORE = (r"^quantizer\.", r"^project_q\.", r"^project_hid\.")


def _layout_rows(cfg: ModelConfig) -> list[tuple]:
    d, fe, enc, layer = cfg.d_model, "wav2vec2.feature_extractor.conv_layers.", "wav2vec2.encoder.", \
        "wav2vec2.encoder.layers.{}."
    rows = []
    for i in range(len(cfg.audio_conv_kernels)):
        rows.append((f"decoder.embed.convs.{i}.conv.weight", f"{fe}{i}.conv.weight"))
        if cfg.audio_conv_bias:
            rows.append((f"decoder.embed.convs.{i}.conv.bias", f"{fe}{i}.conv.bias"))
        if cfg.audio_conv_norm == "layer" or i == 0:
            rows += [(f"decoder.embed.convs.{i}.norm.weight", f"{fe}{i}.layer_norm.weight"),
                     (f"decoder.embed.convs.{i}.norm.bias", f"{fe}{i}.layer_norm.bias")]
    final = "decoder.norm." if cfg.pre_norm else "decoder.embed.norm."
    rows += [
        # kiln name                                  HF name(s)
        ("decoder.embed.proj_norm.weight",          "wav2vec2.feature_projection.layer_norm.weight"),
        ("decoder.embed.proj_norm.bias",            "wav2vec2.feature_projection.layer_norm.bias"),
        ("decoder.embed.proj.weight",               "wav2vec2.feature_projection.projection.weight"),
        ("decoder.embed.proj.bias",                 "wav2vec2.feature_projection.projection.bias"),
        ("decoder.embed.masked_spec_embed",         "wav2vec2.masked_spec_embed"),
        ("decoder.embed.pos_conv.weight_g",         POS + "parametrizations.weight.original0"),
        ("decoder.embed.pos_conv.weight_v",         POS + "parametrizations.weight.original1"),
        ("decoder.embed.pos_conv.bias",             POS + "bias"),
        (final + "weight",                          enc + "layer_norm.weight"),
        (final + "bias",                            enc + "layer_norm.bias"),
        ("decoder.blocks.{}.attn_norm.weight",      layer + "layer_norm.weight"),
        ("decoder.blocks.{}.attn_norm.bias",        layer + "layer_norm.bias"),
        ("decoder.blocks.{}.attn.qkv_proj.weight",  (layer + "attention.q_proj.weight", layer + "attention.k_proj.weight",
                                                     layer + "attention.v_proj.weight"), (d, d, d)),
        ("decoder.blocks.{}.attn.qkv_proj.bias",    (layer + "attention.q_proj.bias", layer + "attention.k_proj.bias",
                                                     layer + "attention.v_proj.bias"), (d, d, d)),
        ("decoder.blocks.{}.attn.out_proj.weight",  layer + "attention.out_proj.weight"),
        ("decoder.blocks.{}.attn.out_proj.bias",    layer + "attention.out_proj.bias"),
        ("decoder.blocks.{}.mlp_norm.weight",       layer + "final_layer_norm.weight"),
        ("decoder.blocks.{}.mlp_norm.bias",         layer + "final_layer_norm.bias"),
        ("decoder.blocks.{}.mlp.up_proj.weight",    layer + "feed_forward.intermediate_dense.weight"),
        ("decoder.blocks.{}.mlp.up_proj.bias",      layer + "feed_forward.intermediate_dense.bias"),
        ("decoder.blocks.{}.mlp.down_proj.weight",  layer + "feed_forward.output_dense.weight"),
        ("decoder.blocks.{}.mlp.down_proj.bias",    layer + "feed_forward.output_dense.bias"),
    ]
    return rows


def layout(cfg: ModelConfig) -> list[_map.Entry]:
    return _map.entries(_layout_rows(cfg), cfg.n_layer)


def config_from_hf(h: dict, weight_names=None) -> ModelConfig:
    need = lambda key: _map.need(h, key, FAMILY)  # noqa: E731
    act = h.get("hidden_act", "gelu")
    if act not in ACTIVATIONS:
        raise KilnError(f"wav2vec2 config.json: hidden_act {act!r} is not supported (kiln knows {', '.join(ACTIVATIONS)})")
    conv = list(need("conv_dim"))
    if len(set(conv)) != 1:
        raise KilnError(f"wav2vec2 config.json: conv_dim {conv} has several widths; kiln's feature encoder has one")
    for key, want in (("feat_extract_activation", "gelu"), ("add_adapter", False), ("use_weighted_layer_sum", False)):
        if h.get(key, want) != want:
            raise KilnError(f"wav2vec2 config.json: {key} {h[key]!r} is not supported (kiln: {want!r})")
    stable = bool(h.get("do_stable_layer_norm", False))
    return ModelConfig(
        arch="encoder", vocab_size=0, n_layer=need("num_hidden_layers"), n_head=need("num_attention_heads"),
        d_model=need("hidden_size"), d_ff=need("intermediate_size"), position="learned", norm="layernorm",
        norm_eps=h.get("layer_norm_eps", 1e-5), pre_norm=stable, final_norm=stable, embedding_norm=not stable,
        activation=ACTIVATIONS[act], bias=True, dropout=h.get("hidden_dropout", 0.0), tie_embeddings=False,
        audio_conv_dim=conv[0], audio_conv_kernels=list(need("conv_kernel")), audio_conv_strides=list(need("conv_stride")),
        audio_conv_norm=h.get("feat_extract_norm", "group"), audio_conv_bias=bool(h.get("conv_bias", False)),
        audio_pos_kernel=h.get("num_conv_pos_embeddings", 128), audio_pos_groups=h.get("num_conv_pos_embedding_groups", 16),
    ).resolve()


def config_to_hf(cfg: ModelConfig, arch: str = "Wav2Vec2Model") -> dict:
    cfg = cfg.with_().resolve()
    _map.require(cfg, FAMILY, arch="encoder", norm="layernorm", bias=True, activation=tuple(set(ACTIVATIONS.values())))
    if not cfg.audio_conv_dim:
        raise KilnError("cannot export to wav2vec2: model.audio_conv_dim is 0 (not an audio model)")
    if cfg.pre_norm != cfg.final_norm or cfg.pre_norm == cfg.embedding_norm:
        raise KilnError("cannot export to wav2vec2: it is post-LN with model.embedding_norm (base) or pre-LN with "
                        "model.final_norm (stable layer norm); this model is neither")
    if cfg.n_kv_head != cfg.n_head:
        raise KilnError(f"cannot export to wav2vec2: n_kv_head {cfg.n_kv_head} != n_head {cfg.n_head}")
    n = len(cfg.audio_conv_kernels)
    return {
        "architectures": [arch], "model_type": "wav2vec2", "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head, "intermediate_size": cfg.d_ff,
        "hidden_act": {"gelu_tanh": "gelu_new"}.get(cfg.activation, cfg.activation), "hidden_dropout": cfg.dropout,
        "attention_dropout": cfg.dropout, "activation_dropout": 0.0, "feat_proj_dropout": 0.0, "final_dropout": 0.0,
        "layerdrop": 0.0, "layer_norm_eps": cfg.norm_eps, "feat_extract_norm": cfg.audio_conv_norm,
        "feat_extract_activation": "gelu", "conv_dim": [cfg.audio_conv_dim] * n,
        "conv_kernel": list(cfg.audio_conv_kernels), "conv_stride": list(cfg.audio_conv_strides),
        "num_feat_extract_layers": n, "conv_bias": cfg.audio_conv_bias,
        "num_conv_pos_embeddings": cfg.audio_pos_kernel, "num_conv_pos_embedding_groups": cfg.audio_pos_groups,
        "do_stable_layer_norm": cfg.pre_norm, "apply_spec_augment": True, "mask_time_prob": 0.05,
        "mask_feature_prob": 0.0, "vocab_size": 32, "pad_token_id": 0, "dtype": "float32",
    }


def state_from_hf(hf_state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF names with `wav2vec2.` (a task class) or without (Wav2Vec2Model), heads already taken out."""
    strip = not any(k.startswith(PREFIX) for k in hf_state)
    state = {(PREFIX + k if strip else k): v for k, v in hf_state.items()}
    state = {OLD_POS.get(k, k): v for k, v in state.items()}
    if PREFIX + "masked_spec_embed" not in state:  # saved without SpecAugment (mask_time_prob 0): a fresh vector
        state[PREFIX + "masked_spec_embed"] = torch.rand(cfg.d_model)
    state = {k: v for k, v in state.items() if k.startswith(PREFIX) or not strip}
    return _map.from_hf(state, layout(cfg), cfg, FAMILY, IGNORE)


def state_to_hf(kiln_state: dict[str, torch.Tensor], cfg: ModelConfig, prefix: bool = False) -> dict[str, torch.Tensor]:
    """Wav2Vec2Model's names (no `wav2vec2.`), or with prefix=True those of a task class's backbone."""
    out = _map.to_hf(kiln_state, layout(cfg), FAMILY)
    return out if prefix else {k.removeprefix(PREFIX): v for k, v in out.items()}
