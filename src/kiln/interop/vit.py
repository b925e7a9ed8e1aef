"""ViT (HF `vit`: ViTModel, ViTForImageClassification) <-> kiln image model (arch encoder, model.channels > 0).

Pre-LN: layernorm_before is kiln's attn_norm, layernorm_after its mlp_norm, vit.layernorm the final norm; q/k/v
are concatenated into qkv_proj. The patch embedding's convolution [d, C, P, P] is kiln's linear patchify
[d, C*P*P] (the same numbers, flattened); cls_token [1, 1, d] and position_embeddings [1, N+1, d] lose their
leading 1s. ViTModel's pooler is ModelConfig.pooler. Names are those HF saves (`vit.encoder.layer.N...`).

A ViTForImageClassification imports as a `kiln finetune image` run (kind image: kiln eval/predict use it as
it is) and such a run exports back to one; a ViTModel imports as a backbone run (kind pretrain).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from kiln.errors import KilnError
from kiln.interop import _map
from kiln.model.config import ModelConfig

FAMILY = "vit"
PREFIX = "vit."
IGNORE = (r"embeddings\.mask_token$",)  # ViTForMaskedImageModeling's mask token (not kept)
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu",
               "silu": "silu", "swish": "silu"}
PATCH, CLS, POS = ("vit.embeddings.patch_embeddings.projection.weight", "vit.embeddings.cls_token",
                   "vit.embeddings.position_embeddings")
HEAD = ("classifier.weight", "classifier.bias")
PREPROCESSOR = "preprocessor_config.json"


def _layout_rows(cfg: ModelConfig) -> list[tuple]:
    d = cfg.d_model
    layer = "vit.encoder.layer.{}."
    rows = [
        # kiln name                                  HF name(s)
        ("decoder.embed.proj.weight",               PATCH),
        ("decoder.embed.proj.bias",                 "vit.embeddings.patch_embeddings.projection.bias"),
        ("decoder.embed.cls_token",                 CLS),
        ("decoder.embed.positions.weight",          POS),
        ("decoder.blocks.{}.attn_norm.weight",      layer + "layernorm_before.weight"),
        ("decoder.blocks.{}.attn_norm.bias",        layer + "layernorm_before.bias"),
        ("decoder.blocks.{}.attn.qkv_proj.weight",  (layer + "attention.attention.query.weight",
                                                     layer + "attention.attention.key.weight",
                                                     layer + "attention.attention.value.weight"), (d, d, d)),
        ("decoder.blocks.{}.attn.qkv_proj.bias",    (layer + "attention.attention.query.bias",
                                                     layer + "attention.attention.key.bias",
                                                     layer + "attention.attention.value.bias"), (d, d, d)),
        ("decoder.blocks.{}.attn.out_proj.weight",  layer + "attention.output.dense.weight"),
        ("decoder.blocks.{}.attn.out_proj.bias",    layer + "attention.output.dense.bias"),
        ("decoder.blocks.{}.mlp_norm.weight",       layer + "layernorm_after.weight"),
        ("decoder.blocks.{}.mlp_norm.bias",         layer + "layernorm_after.bias"),
        ("decoder.blocks.{}.mlp.up_proj.weight",    layer + "intermediate.dense.weight"),
        ("decoder.blocks.{}.mlp.up_proj.bias",      layer + "intermediate.dense.bias"),
        ("decoder.blocks.{}.mlp.down_proj.weight",  layer + "output.dense.weight"),
        ("decoder.blocks.{}.mlp.down_proj.bias",    layer + "output.dense.bias"),
        ("decoder.norm.weight",                     "vit.layernorm.weight"),
        ("decoder.norm.bias",                       "vit.layernorm.bias"),
    ]
    if cfg.pooler:
        rows += [("pooler.dense.weight", "vit.pooler.dense.weight"), ("pooler.dense.bias", "vit.pooler.dense.bias")]
    return rows


def layout(cfg: ModelConfig) -> list[_map.Entry]:
    return _map.entries(_layout_rows(cfg), cfg.n_layer)


def _square(h: dict, key: str) -> int:
    v = _map.need(h, key, FAMILY)
    if isinstance(v, (list, tuple)):
        if len(set(v)) != 1:
            raise KilnError(f"vit config.json: {key} {v} is not square (kiln's image models are)")
        v = v[0]
    return int(v)


def config_from_hf(h: dict, weight_names=None) -> ModelConfig:
    """`weight_names`, when given, decides whether the pooler exists; otherwise `architectures` does."""
    need = lambda key: _map.need(h, key, FAMILY)  # noqa: E731
    act = h.get("hidden_act", "gelu")
    if act not in ACTIVATIONS:
        raise KilnError(f"vit config.json: hidden_act {act!r} is not supported (kiln knows {', '.join(ACTIVATIONS)})")
    if not h.get("qkv_bias", True):
        raise KilnError("vit config.json: qkv_bias false is not supported (kiln's ViT has q/k/v biases)")
    if weight_names is not None:
        pooler = any(n.removeprefix(PREFIX).startswith("pooler.") for n in weight_names)
    else:
        pooler = "ViTModel" in (h.get("architectures") or ["ViTModel"])
    if pooler and (h.get("pooler_output_size") or need("hidden_size")) != need("hidden_size"):
        raise KilnError("vit config.json: pooler_output_size differs from hidden_size (not supported)")
    if pooler and h.get("pooler_act", "tanh") != "tanh":
        raise KilnError(f"vit config.json: pooler_act {h['pooler_act']!r} is not supported (kiln: tanh)")
    return ModelConfig(
        arch="encoder", vocab_size=0, n_layer=need("num_hidden_layers"), n_head=need("num_attention_heads"),
        d_model=need("hidden_size"), d_ff=need("intermediate_size"), position="learned", norm="layernorm",
        norm_eps=h.get("layer_norm_eps", 1e-12), pre_norm=True, final_norm=True, activation=ACTIVATIONS[act],
        bias=True, dropout=h.get("hidden_dropout_prob", 0.0), tie_embeddings=False, pooler=pooler,
        channels=h.get("num_channels", 3), image_size=_square(h, "image_size"), patch_size=_square(h, "patch_size"),
        class_token=True).resolve()


def config_to_hf(cfg: ModelConfig, labels: list[str] | None = None) -> dict:
    cfg = cfg.with_().resolve()
    _map.require(cfg, "vit", arch="encoder", position="learned", norm="layernorm", pre_norm=True, final_norm=True,
                 bias=True, class_token=True, activation=("gelu", "gelu_tanh", "relu", "silu"))
    if not cfg.channels:
        raise KilnError("cannot export to vit: model.channels is 0 (a text model)")
    if cfg.stem_channels:
        raise KilnError(f"cannot export to vit: model.stem_channels is {cfg.stem_channels} (a convolutional stem); "
                        f"HF's ViT cuts pixels with one linear patch projection")
    if cfg.n_kv_head != cfg.n_head:
        raise KilnError(f"cannot export to vit: n_kv_head {cfg.n_kv_head} != n_head {cfg.n_head}")
    out = {
        "architectures": ["ViTForImageClassification" if labels else "ViTModel"], "model_type": "vit",
        "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
        "intermediate_size": cfg.d_ff, "hidden_act": {"gelu_tanh": "gelu_new"}.get(cfg.activation, cfg.activation),
        "hidden_dropout_prob": cfg.dropout, "attention_probs_dropout_prob": cfg.dropout, "layer_norm_eps": cfg.norm_eps,
        "image_size": cfg.image_size, "patch_size": cfg.patch_size, "num_channels": cfg.channels, "qkv_bias": True,
        "encoder_stride": cfg.patch_size, "pooler_output_size": cfg.d_model, "pooler_act": "tanh", "dtype": "float32",
    }
    if labels:
        out["id2label"] = {str(i): n for i, n in enumerate(labels)}
        out["label2id"] = {n: i for i, n in enumerate(labels)}
    return out


def _hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    d, n = cfg.d_model, (cfg.image_size // cfg.patch_size) ** 2 + 1
    return {PATCH: (d, cfg.channels, cfg.patch_size, cfg.patch_size), CLS: (1, 1, d), POS: (1, n, d)}


def state_from_hf(hf_state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    strip = not any(k.startswith(PREFIX) for k in hf_state)  # ViTModel saves its names without `vit.`
    state = {(PREFIX + k if strip else k): v for k, v in hf_state.items() if k not in HEAD}
    flat = {PATCH: lambda t: t.flatten(1), CLS: lambda t: t.reshape(-1), POS: lambda t: t.reshape(t.shape[1], -1)}
    for name, shape in _hf_shapes(cfg).items():
        if name in state:
            if tuple(state[name].shape) != shape:
                raise KilnError(f"vit checkpoint: weight {name!r} has shape {tuple(state[name].shape)}, config.json "
                                f"implies {shape}")
            state[name] = flat[name](state[name])
    return _map.from_hf(state, layout(cfg), cfg, FAMILY, IGNORE)


def state_to_hf(kiln_state: dict[str, torch.Tensor], cfg: ModelConfig, prefix: bool = False) -> dict[str, torch.Tensor]:
    """ViTModel's names (no `vit.`), or with prefix=True those of ViTForImageClassification's backbone."""
    config_to_hf(cfg)  # refuses, in one line, what HF's ViT cannot hold (a stem, 2-D sin-cos) before any reshape
    out = _map.to_hf(kiln_state, layout(cfg), FAMILY)
    for name, shape in _hf_shapes(cfg).items():
        out[name] = out[name].reshape(shape).contiguous()
    return out if prefix else {k.removeprefix(PREFIX): v for k, v in out.items()}


# ----------------------------------------------------------------------------------------------- classifiers


def is_classifier(hf_state: dict) -> bool:
    return all(k in hf_state for k in HEAD)


def _normalization(src: Path) -> tuple[list[float], list[float]] | None:
    """(mean, std) of an HF folder's preprocessor_config.json, when it has one."""
    f = src / PREPROCESSOR
    if not f.is_file():
        return None
    try:
        p = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise KilnError(f"{f}: cannot read JSON") from None
    if not p.get("do_normalize", True):
        return None
    return list(map(float, p.get("image_mean", [0.5]))), list(map(float, p.get("image_std", [0.5])))


def import_classifier(src: Path, run_dir: Path, hf_config: dict, hf_state: dict, overwrite: bool = False) -> Path:
    """A ViTForImageClassification folder -> a kiln image run (image.yaml, run.json, checkpoints/step_000000)."""
    from kiln.config import dump_yaml
    from kiln.data.images import CONFIG_FILE, ImageConfig
    from kiln.model.heads import ImageClassifier
    from kiln.run.checkpoint import atomic_write_text, save_checkpoint
    from kiln.run.folder import RunLock, write_run_json
    from kiln.run.load import build_model

    if (run_dir / CONFIG_FILE).exists() and not overwrite:
        raise KilnError(f"{run_dir} already holds a kiln run; pick another folder or pass overwrite=True")
    cfg = config_from_hf(hf_config, list(hf_state))
    state = {f"backbone.{k}": v for k, v in state_from_hf(hf_state, cfg).items()}
    w = hf_state[HEAD[0]]
    if w.dim() != 2 or w.shape[1] != cfg.d_model:
        raise KilnError(f"vit checkpoint: classifier.weight has shape {tuple(w.shape)}, expected [labels, {cfg.d_model}]")
    state.update({"head.weight": w, "head.bias": hf_state[HEAD[1]]})
    id2label = hf_config.get("id2label") or {}
    labels = [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(w.shape[0])]
    mean, std = _normalization(src) or ([0.5] * cfg.channels, [0.5] * cfg.channels)
    model = ImageClassifier(build_model(cfg), len(labels), "cls")
    model.load_state_dict(state)

    run = ImageConfig(name=src.resolve().name, out=str(run_dir), model=cfg, pooling="cls")
    run.data.label_names, run.data.mean, run.data.std = labels, mean, std
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run_dir).acquire()  # one writer, as for every run folder
    shutil.copyfile(src / "config.json", run_dir / "hf_config.json")
    atomic_write_text(run_dir / CONFIG_FILE, dump_yaml(run))
    write_run_json(run_dir, "image", CONFIG_FILE, labels=labels, pooling="cls", mean=mean, std=std,
                   image_size=cfg.image_size, channels=cfg.channels, imported_from=str(src.resolve()),
                   hf_model_type="vit")
    save_checkpoint(run_dir, model, 0, trainer_state=None, meta={"imported_from": str(src.resolve())})
    lock.release()
    return run_dir


def export_classifier(run_dir: Path, out: Path, which: str = "best") -> Path:
    """A kiln image run (pooling cls) -> a ViTForImageClassification folder (+ preprocessor_config.json)."""
    from safetensors.torch import load_file, save_file

    from kiln.config import load_config
    from kiln.data.images import CONFIG_FILE, ImageConfig
    from kiln.run.checkpoint import find_checkpoint
    from kiln.run.folder import read_run_json

    info = read_run_json(run_dir)
    if info.get("pooling") != "cls":
        raise KilnError(f"cannot export {run_dir} to ViTForImageClassification: its head pools by "
                        f"{info.get('pooling')!r}; HF's classifies the class token (pooling cls)")
    cfg = load_config(run_dir / CONFIG_FILE, cls=ImageConfig)
    labels = list(info["labels"])
    ckpt = find_checkpoint(run_dir, which)
    weights = load_file(str(ckpt / "model.safetensors"))
    backbone = {k.removeprefix("backbone."): v for k, v in weights.items() if k.startswith("backbone.")}
    state = state_to_hf(backbone, cfg.model, prefix=True)
    state.update({"classifier.weight": weights["head.weight"].contiguous(), "classifier.bias": weights["head.bias"].contiguous()})
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config_to_hf(cfg.model, labels), indent=2) + "\n")
    size = cfg.model.image_size
    (out / PREPROCESSOR).write_text(json.dumps({
        "image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": size, "width": size},
        "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": info.get("mean"), "image_std": info.get("std")}, indent=2) + "\n")
    return out
