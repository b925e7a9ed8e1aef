"""A kiln LoRA run -> Hugging Face PEFT's LoRA format: `kiln export peft RUN OUT`.

    OUT/adapter_config.json, OUT/adapter_model.safetensors   peft.PeftModel.from_pretrained(base, OUT) loads them
    OUT/base/                                                the frozen base as `kiln export hf` writes a model
    OUT/head.safetensors, OUT/head.json                      a classifier head transformers has no class for

The layer names come from the family's name map (gpt2.py, bert.py, llama.py): an adapter on kiln's `X` goes to
the HF module(s) the map makes `X.weight` from. One HF module (GPT-2's fused `c_attn`, `c_proj`, BERT's
`attention.output.dense`): the same A and B. Several (kiln's fused `qkv_proj` is BERT's and Llama's separate
query/key/value): each gets the same A and its rows of B, so B_q @ A, B_k @ A, B_v @ A are exactly the rows of
kiln's B @ A (three rank-r adapters in PEFT, one in kiln; outputs equal). GPT-2's Conv1D layers set
`fan_in_fan_out` (PEFT transposes the update itself; A and B are stored as for nn.Linear).

What trains besides the adapters (a task's head, train.lora.modules_to_save) goes to PEFT's `modules_to_save`
where the base model class has the module: a BERT classifier with `pooling: pooler` is exactly
BertForSequenceClassification (pooler -> dropout -> `classifier`), so the base is exported as one and the head
is its `classifier`. Other heads (mean / cls / last-token pooling, which no transformers class does) are written
beside as head.safetensors (`weight`, `bias`) with head.json (pooling, labels): logits = head(pool(hidden)).
An int8 base (train.lora.int8_base) is exported dequantized (fp32).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from kiln.config_loader import read_yaml, update_dataclass
from kiln.errors import KilnError
from kiln.interop import bert
from kiln.interop.hf import HF_CONFIG_COPY, _read_json, _tokenizer_config, family_for
from kiln.model.config import ModelConfig
from kiln.model.lora import adapter_names, merge_state
from kiln.run.checkpoint import find_checkpoint, read_lora_checkpoint
from kiln.run.folder import read_run_json

PEFT_PREFIX = "base_model.model."  # PEFT's names: the base model inside PeftModel (LoraModel)


def _model_config(root: Path, info: dict) -> ModelConfig:
    cfg_file = root / info.get("config", "config.yaml")
    values = read_yaml(cfg_file).get("model")
    if not isinstance(values, dict):
        raise KilnError(f"{cfg_file}: no model section")
    cfg = ModelConfig()
    update_dataclass(cfg, values, "model.", str(cfg_file))
    return cfg


def _hf_name(name: str, hf_state: dict, family) -> str:
    """`name` as the exported state has it (a BertModel export drops the `bert.` prefix of the name map)."""
    if name in hf_state:
        return name
    short = name.removeprefix(getattr(family, "PREFIX", ""))
    if short in hf_state:
        return short
    raise KilnError(f"{family.FAMILY} export has no tensor {name!r}")


def _entry(family, cfg: ModelConfig, kiln_name: str):
    for e in family.layout(cfg):
        if e.kiln == kiln_name:
            return e
    raise KilnError(f"{kiln_name}: the {family.FAMILY} name map has no Hugging Face equivalent of this tensor")


def _short(module: str, family) -> str:
    return module.removeprefix(getattr(family, "PREFIX", ""))


def export_peft(run_dir: str | Path, out_dir: str | Path, which: str = "best") -> Path:
    """Write OUT (adapter_config.json, adapter_model.safetensors, base/, head files where needed)."""
    from safetensors.torch import save_file

    run_dir, out = Path(run_dir), Path(out_dir)
    ckpt = find_checkpoint(run_dir, which)
    root = ckpt.parent.parent
    info = read_run_json(root)
    spec, base, trained = read_lora_checkpoint(ckpt)
    cfg = _model_config(root, info)
    family = family_for(cfg)
    prefix = "backbone." if any(k.startswith("backbone.") for k in base) else ""  # a task's model: backbone + head
    base = merge_state(base, spec)  # no adapters in it: int8 weights dequantized
    backbone = {k[len(prefix):]: v for k, v in base.items() if k.startswith(prefix)}
    hf_config = family.config_to_hf(cfg)
    hf_state = family.state_to_hf(backbone, cfg)
    labels = info.get("labels") or []
    seq_cls = bool(prefix) and family is bert and info.get("pooling") == "pooler"
    if seq_cls:  # exactly BertForSequenceClassification: bert.* (no MLM head) + classifier
        hf_state = {(k if k.startswith("bert.") else "bert." + k): v for k, v in hf_state.items()
                    if not k.startswith("cls.")}
        head_w = trained["head.weight"]  # the base keeps the head as it started; the trained one is PEFT's
        hf_state["classifier.weight"] = base.get("head.weight", torch.zeros_like(head_w)).contiguous()
        hf_state["classifier.bias"] = base.get("head.bias", torch.zeros_like(trained["head.bias"])).contiguous()
        hf_config.update(architectures=["BertForSequenceClassification"], num_labels=len(labels) or head_w.shape[0],
                         id2label={str(i): n for i, n in enumerate(labels)}, label2id={n: i for i, n in enumerate(labels)},
                         problem_type="single_label_classification")

    adapters, targets, transposed = {}, set(), set()
    for name in adapter_names(trained):
        e = _entry(family, cfg, name[len(prefix):] + ".weight")
        a, b = trained[f"{name}.lora_A"], trained[f"{name}.lora_B"]
        parts = b.split(list(e.split), 0) if e.split else [b]
        for hf_weight, b_part in zip(e.hf, parts):
            module = _hf_name(hf_weight, hf_state, family).removesuffix(".weight")
            adapters[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a.detach().float().contiguous().clone()
            adapters[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b_part.detach().float().contiguous().clone()
            targets.add(_short(module, family))
        transposed.add(e.transpose)
    if len(transposed) > 1:
        raise KilnError(f"the adapted layers mix {family.FAMILY} Conv1D and Linear layers: PEFT's fan_in_fan_out "
                        "is one setting for all; adapt one kind")

    saved, head = set(), {}
    for k, v in trained.items():
        if k.endswith((".lora_A", ".lora_B")):
            continue
        if prefix and not k.startswith(prefix):  # the task's head
            if seq_cls and k in ("head.weight", "head.bias"):
                adapters[PEFT_PREFIX + "classifier." + k.split(".")[-1]] = v.detach().float().contiguous().clone()
                saved.add("classifier")
            else:
                head[k.removeprefix("head.")] = v.detach().contiguous().clone()
            continue
        e = _entry(family, cfg, k[len(prefix):])  # a module of the backbone trained in full (modules_to_save)
        parts = v.split(list(e.split), 0) if e.split else [v]
        for hf_name, part in zip(e.hf, parts):
            hf_name = _hf_name(hf_name, hf_state, family)
            adapters[PEFT_PREFIX + hf_name] = (part.t() if e.transpose else part).detach().float().contiguous().clone()
            saved.add(_short(hf_name.rsplit(".", 1)[0], family))

    out.mkdir(parents=True, exist_ok=True)
    base_dir = out / "base"
    _write_base(base_dir, root, cfg, hf_config, hf_state)
    save_file(adapters, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    adapter_config = {
        "peft_type": "LORA", "task_type": "SEQ_CLS" if seq_cls else None, "r": spec.rank, "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout, "target_modules": sorted(targets), "modules_to_save": sorted(saved) or None,
        "fan_in_fan_out": bool(transposed and transposed.pop()), "bias": "none", "use_rslora": False,
        "use_dora": False, "init_lora_weights": True, "inference_mode": True, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
        "base_model_name_or_path": str(base_dir.resolve()),
    }
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
    if head:  # pooling transformers has no class for: logits = weight @ pool(hidden) + bias
        save_file(head, str(out / "head.safetensors"), metadata={"format": "pt"})
        (out / "head.json").write_text(json.dumps({"pooling": info.get("pooling"), "labels": labels, "kind": info.get(
            "kind"), "logits": "pool(last_hidden_state) @ weight.T + bias"}, indent=2) + "\n")
    return out


def _write_base(out: Path, root: Path, cfg: ModelConfig, hf_config: dict, hf_state: dict) -> None:
    """The frozen base as `kiln export hf` writes a model: config.json, model.safetensors, tokenizer files."""
    from safetensors.torch import save_file

    for src in (root / HF_CONFIG_COPY, root / "base" / HF_CONFIG_COPY):  # imported: HF's special token ids
        if src.is_file():
            hf_src = _read_json(src)
            hf_config.update({k: hf_src[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in hf_src})
            break
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in hf_state.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    if (root / "tokenizer.json").is_file():
        shutil.copyfile(root / "tokenizer.json", out / "tokenizer.json")
        (out / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(root / "tokenizer.json", cfg),
                                                              indent=2) + "\n")
