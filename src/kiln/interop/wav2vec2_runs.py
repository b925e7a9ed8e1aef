"""Wav2Vec2ForCTC <-> a `kiln finetune asr` run; Wav2Vec2ForSequenceClassification <-> a `kiln finetune audio` run.

Import keeps what the run needs to be used as it is (kiln eval / predict): the CTC vocabulary from the folder's
vocab.json (Wav2Vec2CTCTokenizer's {token: id}; its pad token must be id 0, the CTC blank, as kiln's is), the
labels from config.json's id2label, the sample rate from preprocessor_config.json. Export writes what
transformers' Wav2Vec2Processor loads beside the weights: vocab.json, tokenizer_config.json (a
Wav2Vec2CTCTokenizer: `<pad>` the blank, `|` the word delimiter) and preprocessor_config.json (a
Wav2Vec2FeatureExtractor normalising each utterance, as kiln does, with attention masks).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from kiln.errors import KilnError
from kiln.interop import wav2vec2 as w2v

CTC, CLASSIFIER = "Wav2Vec2ForCTC", "Wav2Vec2ForSequenceClassification"
HEADS = {CTC: {"lm_head.weight": "lm_head.weight", "lm_head.bias": "lm_head.bias"},
         CLASSIFIER: {"projector.weight": "projector.weight", "projector.bias": "projector.bias",
                      "classifier.weight": "classifier.weight", "classifier.bias": "classifier.bias"}}
PREPROCESSOR = "preprocessor_config.json"


def task_class(hf_config: dict, hf_state: dict) -> str | None:
    """The HF task class a folder holds (by its head weights), or None for a bare Wav2Vec2Model."""
    for arch, names in HEADS.items():
        if all(n in hf_state for n in names):
            return arch
    return None


def _sample_rate(src: Path) -> int:
    f = src / PREPROCESSOR
    if not f.is_file():
        return 16000
    return int(_read_json(f).get("sampling_rate", 16000))


def _read_json(f: Path) -> dict:
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise KilnError(f"{f}: cannot read JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise KilnError(f"{f}: expected a JSON object")
    return data


def _vocab(src: Path, size: int) -> list[str]:
    f = src / "vocab.json"
    if not f.is_file():
        raise KilnError(f"{src}: a Wav2Vec2ForCTC folder without vocab.json (its tokenizer's characters)")
    table = _read_json(f)
    vocab = [None] * size
    for token, i in table.items():
        if not isinstance(i, int) or not 0 <= i < size:
            raise KilnError(f"{f}: token {token!r} has id {i!r}, outside the model's {size} outputs")
        vocab[i] = token
    if vocab[0] != "<pad>":
        raise KilnError(f"{f}: id 0 is {vocab[0]!r}; kiln's CTC blank is id 0 and must be the pad token <pad>")
    return [t if t is not None else f"<unused_{i}>" for i, t in enumerate(vocab)]


def import_run(src: Path, run_dir: Path, hf_config: dict, hf_state: dict, arch: str, overwrite: bool = False) -> Path:
    """An HF Wav2Vec2ForCTC / ForSequenceClassification folder -> a kiln asr / audio run (config, run.json,
    vocab.json, checkpoints/step_000000 holding backbone.* + the head)."""
    from kiln.config import dump_yaml
    from kiln.data.audio_config import ASR_CONFIG_FILE, AUDIO_CONFIG_FILE, ASRConfig, AudioConfig
    from kiln.run.checkpoint import atomic_write_text, save_checkpoint
    from kiln.run.folder import RunLock, holds_run, write_run_json
    from kiln.run.load import build_model

    if holds_run(run_dir) and not overwrite:
        raise KilnError(f"{run_dir} already holds a kiln run; pick another folder or pass overwrite=True")
    state = dict(hf_state)
    head = {kiln: state.pop(name) for name, kiln in HEADS[arch].items()}
    cfg = w2v.config_from_hf(hf_config).with_(sample_rate=_sample_rate(src))
    try:
        cfg.validate()
    except KilnError as e:
        raise KilnError(f"{src / 'config.json'}: {e}") from None
    backbone = build_model(cfg, "cpu")
    backbone.load_state_dict(w2v.state_from_hf(state, cfg))
    weights = {f"backbone.{k}": v for k, v in backbone.state_dict().items()} | head
    meta = {"imported_from": str(src.resolve()), "hf_model_type": "wav2vec2", "hf_class": arch,
            "sample_rate": cfg.sample_rate}
    n_out = head["lm_head.weight" if arch == CTC else "classifier.weight"].shape[0]
    if arch == CTC:
        vocab = _vocab(src, n_out)
        lowercase = not any(c.isupper() for t in vocab if not t.startswith("<") for c in t)
        meta.update(vocab=vocab, lowercase=lowercase)
        kind, run = "asr", ASRConfig(name=src.resolve().name, out=str(run_dir), init=str(src), model=cfg,
                                     lowercase=lowercase)
        config_file = ASR_CONFIG_FILE
    else:
        id2label = hf_config.get("id2label") or {}
        meta.update(labels=[str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(n_out)],
                    proj_dim=int(head["projector.weight"].shape[0]))
        kind, config_file = "audio", AUDIO_CONFIG_FILE
        run = AudioConfig(name=src.resolve().name, out=str(run_dir), init=str(src), model=cfg, proj_dim=meta["proj_dim"])
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run_dir).acquire()  # one writer, as for every run folder
    for name in ("config.json", "vocab.json", PREPROCESSOR):
        if (src / name).is_file():
            shutil.copyfile(src / name, run_dir / ("hf_config.json" if name == "config.json" else name))
    atomic_write_text(run_dir / config_file, dump_yaml(run))
    write_run_json(run_dir, kind, config_file, **meta)
    save_checkpoint(run_dir, backbone, 0, weights=weights, meta=meta, is_best=True)
    lock.release()
    return run_dir


def export_run(run_dir: Path, out: Path, which: str = "best") -> Path:
    """A kiln asr / audio run -> a Wav2Vec2ForCTC / Wav2Vec2ForSequenceClassification folder that transformers'
    from_pretrained (and, for CTC, Wav2Vec2Processor) load."""
    from safetensors.torch import load_file, save_file

    from kiln.config import load_config
    from kiln.data.audio_config import ASR_CONFIG_FILE, AUDIO_CONFIG_FILE, ASRConfig, AudioConfig
    from kiln.run.checkpoint import find_checkpoint
    from kiln.run.folder import read_run_json

    info = read_run_json(run_dir)
    config_file, config_cls = (ASR_CONFIG_FILE, ASRConfig) if info["kind"] == "asr" else (AUDIO_CONFIG_FILE, AudioConfig)
    cfg = load_config(Path(run_dir) / config_file, cls=config_cls).model
    weights = load_file(str(find_checkpoint(run_dir, which) / "model.safetensors"))
    backbone = {k.removeprefix("backbone."): v for k, v in weights.items() if k.startswith("backbone.")}
    arch = CTC if info["kind"] == "asr" else CLASSIFIER
    state = w2v.state_to_hf(backbone, cfg, prefix=True)
    state.update({name: weights[kiln].contiguous() for name, kiln in HEADS[arch].items()})
    hf = w2v.config_to_hf(cfg, arch)
    if arch == CTC:
        hf.update(vocab_size=len(info["vocab"]), pad_token_id=0, ctc_loss_reduction="sum", ctc_zero_infinity=True)
    else:
        labels = list(info["labels"])
        hf.update(classifier_proj_size=int(weights["projector.weight"].shape[0]),
                  id2label={str(i): n for i, n in enumerate(labels)}, label2id={n: i for i, n in enumerate(labels)})
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    (out / PREPROCESSOR).write_text(json.dumps({
        "feature_extractor_type": "Wav2Vec2FeatureExtractor", "feature_size": 1, "sampling_rate": cfg.sample_rate,
        "padding_value": 0.0, "padding_side": "right", "do_normalize": True, "return_attention_mask": True,
        **({"processor_class": "Wav2Vec2Processor"} if arch == CTC else {})}, indent=2) + "\n")
    if arch == CTC:
        _write_tokenizer(out, list(info["vocab"]))
    return out


def _write_tokenizer(out: Path, vocab: list[str]) -> None:
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, indent=1, ensure_ascii=False) + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Wav2Vec2CTCTokenizer", "processor_class": "Wav2Vec2Processor", "pad_token": "<pad>",
        "unk_token": "<unk>", "word_delimiter_token": "|", "bos_token": None, "eos_token": None,
        "do_lower_case": False, "replace_word_delimiter_char": " "}, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<pad>", "unk_token": "<unk>"}, indent=2) + "\n")
