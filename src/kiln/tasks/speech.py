"""What `kiln finetune audio` and `kiln finetune asr` share: reading and splitting the utterances, the backbone
(from scratch, a kiln run or an imported Hugging Face wav2vec2 folder), batched inference in length order, and
loading a finished run.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

from kiln.config import load_config
from kiln.data import audio as adata
from kiln.errors import KilnError
from kiln.tasks.backbone import is_hf_folder, resolve_init
from kiln.tasks.base import EpochTask

# the model keys a speech model does not read (hidden from --help)
TEXT_ONLY = ("vocab_size", "n_decoder_layer", "context_length", "rope_theta", "mlm_head",
             "tie_embeddings", "type_vocab_size", "pad_token_id", "embed_scale", "sinusoid_layout", "head_bias",
             "channels", "image_size", "patch_size", "class_token", "stem_channels", "position", "pooler")


SPEECH_KINDS = ("audio", "asr")


def shows(flag: str) -> bool:
    return not (flag.startswith("--model.") and flag[8:] in TEXT_ONLY)


def check(cfg) -> None:
    """The speech tasks' cross-key checks (ranges were checked when the config loaded)."""
    snr = cfg.augment.noise_snr
    try:
        low, high = (float(v) for v in snr)  # --augment.noise_snr 10,30 arrives as strings
    except (TypeError, ValueError):
        low, high = 1.0, 0.0
    if low > high:
        raise KilnError(f"augment.noise_snr {snr}: two numbers in dB, low then high (e.g. 10,30)")
    cfg.augment.noise_snr = [low, high]


class SpeechTask(EpochTask):
    """What the audio and asr tasks share: batches of utterances, a time budget, the speech keys in --help, the
    checks, and the model config (the init's, or the recipe's)."""

    batch_unit = "utterances"
    time_budget_minutes = staticmethod(lambda cfg: cfg.time_budget)

    def shows(self, flag: str) -> bool:
        return shows(flag)

    def check(self, cfg) -> None:
        check(cfg)

    def model_config(self, cfg):
        model = init_model(cfg, self.name) if cfg.init else cfg.model.with_()
        model.validate()
        return model

    def summary(self, result: dict, trainer) -> dict:
        return {"examples_seen": result["tokens"],
                "examples_per_second": result["tokens"] / max(trainer.train_seconds, 1e-9)}


def min_samples(m) -> int:
    from kiln.model.audio import min_samples as receptive

    return receptive(m.audio_conv_kernels, m.audio_conv_strides)


def init_model(cfg, kind: str):
    """The ModelConfig of cfg.init, read without its weights (every input error before the run folder exists)."""
    from kiln.interop import wav2vec2
    from kiln.interop.hf import _read_json, family_of
    from kiln.run.folder import read_run_json

    path = Path(cfg.init).expanduser()
    if not path.exists():
        raise KilnError(f"init not found: {path}")
    if is_hf_folder(path):
        h = _read_json(path / "config.json")
        if family_of(h, str(path / "config.json")) is not wav2vec2:
            raise KilnError(f"init {path} is a {h.get('model_type')} model; kiln finetune {kind} starts from wav2vec2")
        return wav2vec2.config_from_hf(h).with_(sample_rate=_hf_rate(path))
    run_kind = read_run_json(path).get("kind")
    if run_kind in SPEECH_KINDS:
        from kiln.tasks import get

        other = get(run_kind)
        return load_config(path / other.config_file, cls=other.config_cls).model
    from kiln.run.load import load_run_config

    model = load_run_config(path).model if run_kind == "pretrain" else None
    if model is None or not model.audio_conv_dim:
        raise KilnError(f"init {path} is a {'text or image model' if model is not None else str(run_kind) + ' run'}; "
                        f"kiln finetune {kind} starts from a speech model (a kiln {kind} run, a Wav2Vec 2.0 backbone "
                        "or a Hugging Face wav2vec2 folder)")
    return model


def _hf_rate(path: Path) -> int:
    import json

    f = path / "preprocessor_config.json"
    try:
        return int(json.loads(f.read_text(encoding="utf-8")).get("sampling_rate", 16000)) if f.is_file() else 16000
    except (OSError, ValueError):
        raise KilnError(f"{f}: cannot read JSON") from None


def read_sets(cfg, column: str, model, log, stratify: bool) -> tuple[dict, dict]:
    """({split: (waves, targets, sources)}, report): data.train/val/test read, decoded, split when not given."""
    from kiln.data.images import stratified_split

    d = cfg.data
    if not d.train:
        raise KilnError(f"data.train is empty: name the training audio (--data.train FOLDER or MANIFEST with path,{column})")
    given = {n: adata.scan(getattr(d, n), column) for n in ("train", "val", "test") if getattr(d, n)}
    for name, clips in given.items():
        if clips.skipped:
            log(f"{clips.path}: skipped {clips.skipped} file(s) that are not audio by their extension")
    train = given["train"]
    if d.limit and d.limit < len(train):
        train = given["train"] = train.subset(range(d.limit))
    seed = cfg.seed if d.split_seed < 0 else d.split_seed
    keys = train.targets if stratify else ["all"] * len(train)
    tr, va, te = stratified_split(keys, 0.0 if "val" in given else d.val_fraction,
                                  0.0 if "test" in given else d.test_fraction, seed)
    sets = {"train": train.subset(tr), "val": given.get("val", train.subset(va)), "test": given.get("test", train.subset(te))}
    out, rep = {}, {"files": {n: getattr(d, n) for n in given}, "sample_rate": model.sample_rate, "splits": {}}
    for name, clips in sets.items():
        if not len(clips):
            out[name] = ([], [], [])
            continue
        waves, kept, r = adata.load_waveforms(clips, model.sample_rate, d.max_seconds, d.too_long, min_samples(model), log,
                                    f"{clips.path} ({name})")
        out[name] = (waves, [clips.targets[i] for i in kept], [str(clips.files[i]) for i in kept])
        rep["splits"][name] = r
    log("splits: " + ", ".join(f"{n} {len(s[0])} ({rep['splits'].get(n, {}).get('seconds', 0)} s)" for n, s in out.items())
        + f"; audio at {model.sample_rate} Hz")
    return out, rep


def backbone(cfg, run_dir: Path, kind: str, log):
    """(backbone, the init's head state or None, the init's run.json or None, info) for cfg; cfg.model is set to
    the backbone's shape (saved with the run, so it loads without init)."""
    from kiln.model.transformer import Transformer
    from kiln.run.folder import read_run_json
    from kiln.run.load import load

    if not cfg.init:
        return Transformer(cfg.model.with_()), None, None, {"kind": "scratch"}
    source = Path(cfg.init).expanduser()
    rate = _hf_rate(source) if is_hf_folder(source) else None
    path, which, info = resolve_init(cfg.init, cfg.init_checkpoint, run_dir, log)
    run_kind = read_run_json(path).get("kind")
    if run_kind in SPEECH_KINDS:  # a speech run: its backbone, and its head when it is this task's
        from kiln.tasks import get

        model, _, run_info = get(run_kind).load(path, which)
        cfg.model = copy.deepcopy(model.backbone.config)
        if run_kind != kind:
            return model.backbone.train(), None, None, info
        head = {k: v for k, v in model.state_dict().items() if not k.startswith("backbone.")}
        return model.backbone.train(), head, run_info, info
    model, _, _ = load(path, which, quantized_ok=False)
    cfg.model = copy.deepcopy(model.config).with_(sample_rate=rate or model.config.sample_rate)
    model.config = cfg.model
    return model.train(), None, None, info


def log_augment(a, log) -> None:
    """One line naming the augmentation drawn anew every step (none: nothing)."""
    parts = ([f"time masks of {a.mask_time_length} frames over ~{a.mask_time_prob:.0%} of the frames"]
             if a.mask_time_prob else []) + \
        ([f"feature masks of {a.mask_feature_length} channels over ~{a.mask_feature_prob:.0%}"] if a.mask_feature_prob
         else []) + ([f"white noise at {a.noise_snr[0]:g}-{a.noise_snr[1]:g} dB SNR on {a.noise_prob:.0%} of the "
                      "utterances"] if a.noise_prob else [])
    if parts:
        log("augmentation: " + ", ".join(parts) + ", anew every step")


def batches_in_order(waves: list[np.ndarray], batch_size: int):
    """(indices, samples [B, S], mask [B, S]) in length order: little padding; indices map rows back."""
    from kiln.data.batches import by_length

    for idx in by_length([len(w) for w in waves], batch_size):
        x, m = adata.pad([waves[i] for i in idx])
        yield idx, x, m


def run_model(model, waves, batch_size: int, device: str, fn):
    """fn(output, indices) over every batch, the model in eval mode and no gradients."""
    import torch

    was = model.training
    model.eval()
    with torch.no_grad():
        for idx, x, m in batches_in_order(waves, batch_size):
            fn(model(torch.from_numpy(x).to(device), torch.from_numpy(m).to(device)), idx)
    if was:
        model.train()


def load_checkpoint(run_dir, which: str, kind: str, config_file: str, config_cls, make, device: str = "cpu"):
    """(model, cfg, run.json) of a finished run: `make(backbone, run.json, cfg)` builds the task model."""
    from kiln.run.checkpoint import find_checkpoint, load_weights
    from kiln.run.folder import read_run_json
    from kiln.run.load import build_model

    run_dir = Path(run_dir)
    info = read_run_json(run_dir)
    if info.get("kind") != kind or not (run_dir / config_file).is_file():
        raise KilnError(f"{run_dir} is not a kiln finetune {kind} run (kind {info.get('kind')!r}, no {config_file})")
    cfg = load_config(run_dir / config_file, cls=config_cls)
    ckpt = find_checkpoint(which) if which not in ("best", "latest") else find_checkpoint(run_dir, which)
    model = make(build_model(cfg.model, device), info, cfg)
    load_weights(model.to(device), ckpt / "model.safetensors")
    return model.eval(), cfg, info


def read_for(file, cfg, column: str, require: bool, log):
    """(waves, targets or None, sources) of a file/folder/manifest, as the run's model takes them (predict, eval):
    data.too_long applies, except that `skip` refuses (a prediction per input row)."""
    clips = adata.scan(file, column, require=require)
    too_long = "error" if cfg.data.too_long == "skip" else cfg.data.too_long
    waves, _, _ = adata.load_waveforms(clips, cfg.model.sample_rate, cfg.data.max_seconds, too_long, min_samples(cfg.model), log,
                             str(file))
    has = all(t is not None for t in clips.targets)
    return waves, (list(clips.targets) if has else None), [str(f) for f in clips.files]


def stem(file) -> str:
    p = Path(str(file).rstrip("/"))
    return p.name.rsplit(".", 1)[0] if p.is_file() else p.name
