"""Hugging Face checkpoints <-> kiln run folders.

    import_hf("path/to/hf_model", "runs/gpt2")   # config.json + model.safetensors (+ tokenizer.json)
    export_hf("runs/gpt2", "out/gpt2-hf")         # loadable by transformers' Auto*.from_pretrained

The family (gpt2.py, llama.py, bert.py) is picked by `model_type` (or `architectures`); each holds the
explicit name map. Nothing here needs `transformers`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from kiln.errors import KilnError
from kiln.interop import bart, bert, gpt2, llama, marian, vit, wav2vec2

FAMILIES = {"gpt2": gpt2, "llama": llama, "mistral": llama, "qwen2": llama, "bert": bert, "bart": bart, "marian": marian, "vit": vit,
            "wav2vec2": wav2vec2}
ARCHITECTURES = {
    "GPT2LMHeadModel": "gpt2", "GPT2Model": "gpt2",
    "LlamaForCausalLM": "llama", "LlamaModel": "llama", "MistralForCausalLM": "mistral", "MistralModel": "mistral",
    "Qwen2ForCausalLM": "qwen2", "Qwen2Model": "qwen2",
    "BertModel": "bert", "BertForMaskedLM": "bert", "BertForPreTraining": "bert",
    "BertForQuestionAnswering": "bert", "BertForTokenClassification": "bert",
    "BartForConditionalGeneration": "bart", "BartModel": "bart",
    "MarianMTModel": "marian", "MarianModel": "marian",
    "ViTModel": "vit", "ViTForImageClassification": "vit",
    "Wav2Vec2Model": "wav2vec2", "Wav2Vec2ForCTC": "wav2vec2", "Wav2Vec2ForSequenceClassification": "wav2vec2",
}
HF_CONFIG_COPY = "hf_config.json"  # the imported config.json, kept in the run folder (token ids for export)
SEQ2SEQ_CONFIG, SEQ2SEQ_META = "seq2seq.yaml", "seq2seq.json"  # a `kiln finetune seq2seq` run (kiln.tasks.seq2seq)


# ----------------------------------------------------------------------------------------------- reading


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise KilnError(f"{path}: cannot read JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise KilnError(f"{path}: expected a JSON object")
    return data


def family_of(hf_config: dict, where: str = "config.json"):
    """The family module for an HF config (by model_type, else architectures)."""
    model_type = hf_config.get("model_type")
    archs = hf_config.get("architectures") or []
    if model_type is None:
        model_type = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
    if model_type not in FAMILIES:
        name = model_type or (archs[0] if archs else "no model_type")
        raise KilnError(f"{where}: unsupported architecture {name!r}; kiln imports {', '.join(FAMILIES)}")
    return FAMILIES[model_type]


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)  # never unpickles code
    except Exception as e:  # corrupted / truncated / not a weights file
        raise KilnError(f"{path}: cannot read weights ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise KilnError(f"{path}: not a state dict of tensors")
    return state


def read_hf_weights(src: Path) -> dict[str, torch.Tensor]:
    """model.safetensors, sharded safetensors (index), or pytorch_model.bin (weights_only)."""
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (src / single).is_file():
            return _load_file(src / single)
        if (src / index).is_file():
            shards = sorted(set(_read_json(src / index).get("weight_map", {}).values()))
            state = {}
            for shard in shards:
                state.update(_load_file(src / shard))
            return state
    raise KilnError(f"{src}: no weights (expected model.safetensors or pytorch_model.bin)")


# ----------------------------------------------------------------------------------------------- import


def import_hf(src_dir: str | Path, run_dir: str | Path, overwrite: bool = False) -> Path:
    """Write a kiln run folder (config.yaml, tokenizer.json, checkpoints/step_000000) from an HF model folder."""
    from kiln.config import RunConfig, dump_yaml
    from kiln.run.checkpoint import atomic_write_text, save_checkpoint
    from kiln.run.load import build_model

    src, run_dir = Path(src_dir), Path(run_dir)
    if not (src / "config.json").is_file():
        raise KilnError(f"{src}: not a Hugging Face model folder (no config.json)")
    if (run_dir / "config.yaml").exists() and not overwrite:
        raise KilnError(f"{run_dir} already holds a kiln run; pick another folder or pass overwrite=True")
    hf_config = _read_json(src / "config.json")
    family = family_of(hf_config, str(src / "config.json"))
    hf_state = read_hf_weights(src)
    task_arch = next((a for a in hf_config.get("architectures") or [] if a in getattr(family, "HEADS", {})), None)
    if task_arch:  # a task head (BertForQuestionAnswering, ...): a fine-tuned task run (kind qa, tokens, ...)
        return import_task_hf(src, run_dir, hf_config, hf_state, family, task_arch, overwrite)
    if family is wav2vec2:  # Wav2Vec2ForCTC / ForSequenceClassification: a `kiln finetune asr` / `audio` run
        from kiln.interop import wav2vec2_runs

        arch = wav2vec2_runs.task_class(hf_config, hf_state)
        if arch:
            return wav2vec2_runs.import_run(src, run_dir, hf_config, hf_state, arch, overwrite)
    if family is vit and vit.is_classifier(hf_state):  # ViTForImageClassification: a `kiln finetune image` run
        return vit.import_classifier(src, run_dir, hf_config, hf_state, overwrite)
    cfg = (family.config_from_hf(hf_config, list(hf_state)) if family in (bert, vit)
           else family.config_from_hf(hf_config))
    try:
        cfg.validate()
    except KilnError as e:
        raise KilnError(f"{src / 'config.json'}: {e}") from None
    state = family.state_from_hf(hf_state, cfg)

    run = RunConfig(name=src.resolve().name, out=str(run_dir), model=cfg,
                    objective="mlm" if cfg.arch == "encoder" else "clm")
    model = build_model(cfg, "cpu")
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    missing = [m for m in missing if m not in tied]
    assert not missing and not unexpected, (missing, unexpected)  # the family map covers the whole model

    from kiln.run.folder import RunLock, write_run_json

    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run_dir).acquire()  # one writer, as for every run folder
    if (src / "tokenizer.json").is_file():
        shutil.copyfile(src / "tokenizer.json", run_dir / "tokenizer.json")
        run.data.tokenizer = str(run_dir / "tokenizer.json")
    shutil.copyfile(src / "config.json", run_dir / HF_CONFIG_COPY)
    if cfg.arch == "decoder":  # its special tokens and chat template (kiln chat, /v1/chat/completions)
        from kiln.interop.run_files import chat_files, write_chat_files

        write_chat_files(run_dir, *chat_files(src))
    if (src / vit.PREPROCESSOR).is_file():  # image models: the pixel normalisation (kiln finetune image reads it)
        shutil.copyfile(src / vit.PREPROCESSOR, run_dir / vit.PREPROCESSOR)
    atomic_write_text(run_dir / "config.yaml", dump_yaml(run))
    write_run_json(run_dir, "pretrain", "config.yaml", imported_from=str(src.resolve()),
                   hf_model_type=hf_config.get("model_type"))
    save_checkpoint(run_dir, model, 0, trainer_state=None,
                    meta={"imported_from": str(src.resolve()), "hf_model_type": hf_config.get("model_type")})
    lock.release()
    return run_dir


# ----------------------------------------------------------------------------------------------- export


def family_for(cfg):
    """The HF family a kiln ModelConfig exports to."""
    if cfg.channels:
        return vit
    if cfg.audio_conv_dim:
        return wav2vec2
    if cfg.arch == "encoder":
        return bert
    if cfg.arch == "encoder-decoder" and cfg.position == "learned":
        return bart
    if cfg.arch == "encoder-decoder" and cfg.position == "sinusoidal" and cfg.sinusoid_layout == "halves":
        return marian
    if cfg.arch == "decoder" and cfg.position == "learned":
        return gpt2
    if cfg.arch == "decoder" and cfg.position == "rope":
        return llama
    raise KilnError(f"cannot export model.arch={cfg.arch} with model.position={cfg.position}: no matching "
                    "Hugging Face family (kiln exports decoder+learned -> gpt2, decoder+rope -> llama/qwen2, "
                    "encoder -> bert, encoder-decoder+learned -> bart, encoder-decoder+sinusoidal with "
                    "model.sinusoid_layout halves -> marian)")


SPECIAL_TOKENS = {  # token text -> tokenizer_config.json roles
    "[UNK]": ("unk_token",), "[PAD]": ("pad_token",), "[CLS]": ("cls_token",), "[SEP]": ("sep_token",),
    "[MASK]": ("mask_token",), "<unk>": ("unk_token",), "<pad>": ("pad_token",), "<s>": ("bos_token",),
    "</s>": ("eos_token",), "<|endoftext|>": ("bos_token", "eos_token", "unk_token"),
}


def _tokenizer_config(tokenizer_json: Path, cfg) -> dict:
    inputs = ["input_ids"] + (["token_type_ids"] if cfg.type_vocab_size else []) + ["attention_mask"]
    out = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.context_length,
           "model_input_names": inputs}
    try:
        added = json.loads(tokenizer_json.read_text(encoding="utf-8")).get("added_tokens") or []
    except (OSError, json.JSONDecodeError):
        added = []
    for tok in added:
        for role in SPECIAL_TOKENS.get(tok.get("content"), ()):
            out.setdefault(role, tok["content"])
    return out


def _load_seq2seq(run_dir: Path, which: str):
    """(model, None, Seq2SeqConfig) of a `kiln finetune seq2seq` run folder (the model alone: no codec)."""
    from kiln.config import Seq2SeqConfig, load_config
    from kiln.run.checkpoint import find_checkpoint, load_weights
    from kiln.run.load import build_model

    cfg = load_config(run_dir / SEQ2SEQ_CONFIG, cls=Seq2SeqConfig)
    model = build_model(cfg.model, "cpu")
    load_weights(model, find_checkpoint(run_dir, which) / "model.safetensors")
    return model.eval(), None, cfg


def export_hf(run_dir: str | Path, out_dir: str | Path, which: str = "latest") -> Path:
    """Write config.json, model.safetensors, tokenizer.json (+ tokenizer_config.json) for transformers."""
    from safetensors.torch import save_file

    from kiln.run.checkpoint import find_checkpoint
    from kiln.run.load import load

    run_dir, out = Path(run_dir), Path(out_dir)
    if (run_dir / "run.json").is_file() and json.loads((run_dir / "run.json").read_text()).get("kind") == "image":
        # a fine-tuned image classifier: ViTForImageClassification, from the checkpoint kiln eval scores
        return vit.export_classifier(run_dir, out, "best" if which == "latest" else which)
    if (run_dir / "run.json").is_file() and json.loads((run_dir / "run.json").read_text()).get("kind") in ("audio", "asr"):
        from kiln.interop import wav2vec2_runs  # Wav2Vec2ForSequenceClassification / Wav2Vec2ForCTC

        return wav2vec2_runs.export_run(run_dir, out, "best" if which == "latest" else which)
    if (run_dir / "run.json").is_file() and json.loads((run_dir / "run.json").read_text()).get("kind") in TASK_RUNS:
        return export_task_hf(run_dir, out, "best" if which == "latest" else which)  # head + backbone
    seq2seq = (run_dir / SEQ2SEQ_META).is_file()  # a fine-tuned seq2seq run: its best checkpoint, its codec's ids
    model, _, run = (_load_seq2seq(run_dir, "best" if which == "latest" else which) if seq2seq
                     else load(run_dir, which, quantized_ok=False))
    root = run_dir if (run_dir / "config.yaml").is_file() else find_checkpoint(run_dir, which).parent.parent
    cfg = run.model
    family = family_for(cfg)
    hf_config = family.config_to_hf(cfg)
    if (root / HF_CONFIG_COPY).is_file():  # imported: keep the special token ids HF generate relies on
        src = _read_json(root / HF_CONFIG_COPY)
        hf_config.update({k: src[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id",
                                                 "decoder_start_token_id") if k in src})
    if seq2seq:
        ids = _read_json(run_dir / SEQ2SEQ_META)
        hf_config.update(decoder_start_token_id=ids["bos_id"], eos_token_id=ids["eos_id"], pad_token_id=ids["pad_id"])
    state = family.state_to_hf(model.state_dict(), cfg)

    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    if (root / "tokenizer.json").is_file():
        shutil.copyfile(root / "tokenizer.json", out / "tokenizer.json")
        tok_cfg = _tokenizer_config(root / "tokenizer.json", cfg)
        if (root / "tokenizer_config.json").is_file():  # the special tokens an import kept (kiln.interop.run_files)
            tok_cfg.update(_read_json(root / "tokenizer_config.json"))
        (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    if (root / "chat_template.jinja").is_file():
        shutil.copyfile(root / "chat_template.jinja", out / "chat_template.jinja")
    return out


# ----------------------------------------------------------------------------------------------- task heads
#
# A fine-tuned task run <-> an HF *For<Task> folder. A family module lists its heads in HEADS: HF class ->
# (kiln run kind, {HF head tensor: kiln tensor}); the backbone is the family's base model, under its PREFIX in
# HF and under `backbone.` in the kiln task model (kiln.model.heads). TASK_RUNS gives each kind's config
# (class, file): the task's `load` reads what import_task_hf writes.


def _task_config(kind: str):
    if kind == "qa":
        from kiln.data.squad import CONFIG_FILE, QAConfig

        return QAConfig, CONFIG_FILE
    from kiln.data.conll import CONFIG_FILE, TokensConfig

    return TokensConfig, CONFIG_FILE


TASK_RUNS = ("qa", "tokens")


def import_task_hf(src: Path, run_dir: Path, hf_config: dict, hf_state: dict, family, arch: str,
                   overwrite: bool = False) -> Path:
    """An HF task model folder -> a kiln run of the task's kind (its config file, run.json with the labels,
    tokenizer.json, checkpoints/step_000000 holding backbone.* + the head)."""
    from kiln.config import dump_yaml
    from kiln.run.checkpoint import atomic_write_text, save_checkpoint
    from kiln.run.folder import holds_run, write_run_json
    from kiln.run.load import build_model

    kind, names = family.HEADS[arch]
    if holds_run(run_dir) and not overwrite:
        raise KilnError(f"{run_dir} already holds a kiln run; pick another folder or pass overwrite=True")
    state = dict(hf_state)
    missing = [n for n in names if n not in state]
    if missing:
        raise KilnError(f"{src}: {arch} checkpoint without its head weight {missing[0]!r}")
    head = {kiln: state.pop(name) for name, kiln in names.items()}
    cfg = family.config_from_hf(hf_config, list(state))
    try:
        cfg.validate()
    except KilnError as e:
        raise KilnError(f"{src / 'config.json'}: {e}") from None
    backbone = build_model(cfg, "cpu")
    backbone.load_state_dict(family.state_from_hf(state, cfg), strict=False)
    weights = {f"backbone.{k}": v for k, v in backbone.state_dict().items() if k != "lm_head.weight"} | head
    meta = {"imported_from": str(src.resolve()), "hf_model_type": hf_config.get("model_type"), "hf_class": arch}
    n_out = next(iter(head.values())).shape[0]
    if kind != "qa":  # a label per output of the head, in id order
        id2label = hf_config.get("id2label") or {}
        meta["labels"] = [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(n_out)]
    else:
        meta["null_answers"] = False
    config_cls, config_file = _task_config(kind)
    run_dir.mkdir(parents=True, exist_ok=True)
    if (src / "tokenizer.json").is_file():
        shutil.copyfile(src / "tokenizer.json", run_dir / "tokenizer.json")
    shutil.copyfile(src / "config.json", run_dir / HF_CONFIG_COPY)
    atomic_write_text(run_dir / config_file, dump_yaml(config_cls(name=src.resolve().name, out=str(run_dir),
                                                                  init=str(src), model=cfg)))
    write_run_json(run_dir, kind, config_file, **meta)
    save_checkpoint(run_dir, backbone, 0, weights=weights, meta=meta, is_best=True)
    return run_dir


def export_task_hf(run_dir: Path, out: Path, which: str = "best") -> Path:
    """A fine-tuned task run (kind qa / tokens) -> the HF *For<Task> folder of its family (config.json with
    the class and labels, model.safetensors, tokenizer files). The backbone's pooler / MLM head are left out:
    HF's task classes have none."""
    from safetensors.torch import load_file, save_file

    from kiln.config import load_config
    from kiln.run.checkpoint import find_checkpoint
    from kiln.run.folder import read_run_json

    info = read_run_json(run_dir)
    config_cls, config_file = _task_config(info["kind"])
    cfg = load_config(run_dir / config_file, cls=config_cls).model.with_(pooler=False, mlm_head=False)
    family = family_for(cfg)
    arch = next((a for a, (k, _) in getattr(family, "HEADS", {}).items() if k == info["kind"]), None)
    if arch is None:
        raise KilnError(f"cannot export a {info['kind']} run with a {family.FAMILY} backbone: no Hugging Face class")
    weights = load_file(str(find_checkpoint(run_dir, which) / "model.safetensors"))
    backbone = {k.removeprefix("backbone."): v for k, v in weights.items() if k.startswith("backbone.")}
    prefix = getattr(family, "PREFIX", "")
    state = {(k if k.startswith(prefix) else prefix + k): v for k, v in family.state_to_hf(backbone, cfg).items()}
    state.update({name: weights[kiln].contiguous() for name, kiln in family.HEADS[arch][1].items()})
    hf_config = {**family.config_to_hf(cfg), "architectures": [arch]}
    if info.get("labels"):
        hf_config["id2label"] = {str(i): name for i, name in enumerate(info["labels"])}
        hf_config["label2id"] = {name: i for i, name in enumerate(info["labels"])}
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    if (run_dir / "tokenizer.json").is_file():
        shutil.copyfile(run_dir / "tokenizer.json", out / "tokenizer.json")
        tok_cfg = _tokenizer_config(run_dir / "tokenizer.json", cfg)
        (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    return out
