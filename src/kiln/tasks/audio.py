"""`kiln finetune audio`: labelled utterances -> a Wav2Vec 2.0-shaped classifier, evaluated; `kiln eval`, `kiln predict`.

    kiln finetune audio configs/kws-digits.yaml
    kiln finetune audio --data.train speech/ --init hf-wav2vec2-folder/

The task on the shared driver (kiln.tasks.driver): read the audio (kiln.data.audio: a class-per-folder tree or a
manifest of path,label; decoded, mixed down, resampled to the model's rate, normalised) and split it (stratified,
seeded, where no val/test is given) -> the backbone: kiln's Transformer with the convolutional feature encoder
(model.audio_conv_dim > 0), from scratch, from a kiln run, or from a Hugging Face wav2vec2 folder imported into
<run>/base (a Wav2Vec2ForSequenceClassification's head is kept when its labels are these) ->
kiln.model.audio.AudioClassifier (projection, mean over the valid frames, linear) -> cross-entropy, batches with
seeded SpecAugment time masks -> best checkpoint by a val metric -> test metrics and a confusion matrix PNG.

Run folder: audio.yaml, run.json (kind audio; labels, sample rate), data.json, checkpoints/, eval/ (val.json,
test.json, summary.json + confusion PNGs), metrics.csv, plots/, log.txt, base/.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch.nn.functional as F

from kiln.data.audio import AudioBatches
from kiln.data.audio_config import AUDIO_CONFIG_FILE, AudioConfig
from kiln.errors import KilnError
from kiln.tasks import speech
from kiln.tasks.base import Data, Prepared


class AudioObjective:
    """Cross-entropy (a SUM over the batch's utterances; optional label smoothing) of the classifier's logits."""

    def __init__(self, label_smoothing: float = 0.0):
        self.label_smoothing = label_smoothing

    def targets(self, batch) -> int:
        return int(batch["labels"].shape[0])

    def loss(self, model, batch):
        logits = model(batch["input_values"], batch["attention_mask"], batch.get("time_mask"),
                       batch.get("feature_mask")).float()
        return F.cross_entropy(logits, batch["labels"], label_smoothing=self.label_smoothing, reduction="sum")


def predict_probs(model, waves, batch_size: int = 32, device: str = "cpu") -> np.ndarray:
    """Softmax probabilities [N, n_classes] of normalised waveforms (batched in length order)."""
    out = [None] * len(waves)

    def keep(logits, idx):
        for row, i in zip(logits.float().softmax(-1).cpu().numpy(), idx):
            out[i] = row

    speech.run_model(model, waves, batch_size, device, keep)
    return np.stack(out) if out else np.zeros((0, 0), np.float32)


class AudioTask(speech.SpeechTask):
    name, config_cls, config_file = "audio", AudioConfig, AUDIO_CONFIG_FILE
    usage = ("kiln finetune audio [CONFIG.yaml] --data.train FOLDER|MANIFEST [--init RUN_OR_HF_DIR] "
             "[--section.key VALUE ...]")
    example = "configs/kws-digits.yaml"
    def read(self, cfg: AudioConfig, log) -> Data:
        model = self.model_config(cfg)
        sets, rep = speech.read_sets(cfg, "label", model, log, stratify=True)
        labels = _sorted_labels(sets["train"][1])
        if len(labels) < 2:
            raise KilnError(f"{cfg.data.train}: a classifier needs at least 2 labels; found {len(labels)}")
        splits = {}
        for name, (waves, targets, sources) in sets.items():
            splits[name] = (waves, _label_ids(targets, labels, getattr(cfg.data, name) or cfg.data.train), sources)
        rep["labels"] = {n: {lab: int((s[1] == i).sum()) for i, lab in enumerate(labels)} for n, s in splits.items()}
        log(f"{len(labels)} classes: {', '.join(labels)}")
        return Data(splits, rep, {"labels": labels})

    def prepare(self, cfg: AudioConfig, run_dir: Path, data: Data, device: str, log) -> Prepared:
        from kiln.eval.classification import val_metrics
        from kiln.model.audio import AudioClassifier, frame_lengths

        labels = data.extra["labels"]
        backbone, head, init_info, info = speech.backbone(cfg, run_dir, self.name, log)
        model = AudioClassifier(backbone, len(labels), cfg.proj_dim, cfg.head_dropout)
        if head is not None:
            if list(init_info["labels"]) == labels and head["projector.weight"].shape[0] == cfg.proj_dim:
                model.load_state_dict({**model.state_dict(), **head})
                log(f"head: the init's classifier (the same {len(labels)} labels)")
            else:
                log(f"head: new ({len(labels)} labels; the init's head has other labels or width)")
        (x_tr, y_tr, _), (x_va, y_va, _) = data.splits["train"], data.splits["val"]
        m, a = cfg.model, cfg.augment
        frames = lambda n: frame_lengths(n, m.audio_conv_kernels, m.audio_conv_strides)  # noqa: E731
        batches = AudioBatches(x_tr, lambda idx: {"labels": _tensor(y_tr[idx])}, cfg.train.batch_size, cfg.seed,
                               frames, a, m.d_model)
        speech.log_augment(a, log)
        evaluate = None
        if len(y_va):
            def evaluate(mod):
                return val_metrics(predict_probs(mod, x_va, cfg.eval_batch_size, device), y_va, len(labels))
        data.report["init"] = info
        notes = [f"Wav2Vec 2.0-shaped encoder: {len(m.audio_conv_kernels)} convolutions x {m.audio_conv_dim} "
                 f"({m.audio_conv_norm} norm), {m.n_layer}x{m.d_model} blocks ({info['kind']}"
                 f"{': ' + cfg.init if cfg.init else ''})", f"mean pooling, {len(labels)} classes"]
        meta = {"labels": labels, "sample_rate": m.sample_rate, "proj_dim": cfg.proj_dim}
        return Prepared(model, AudioObjective(cfg.label_smoothing), batches.batch, len(y_tr), evaluate, cfg.metric,
                        meta, notes=notes, state={"splits": data.splits, "device": device})

    def test(self, cfg, prep: Prepared, model, ckpt: Path, run_dir: Path, log) -> dict:
        from kiln.eval.classification import metrics_table

        results = {}
        for name in ("val", "test"):
            x, y, _ = prep.state["splits"][name]
            if not len(y):
                continue
            probs = predict_probs(model, x, cfg.eval_batch_size, prep.state["device"])
            m = _report(y, probs, prep.meta["labels"], run_dir / "eval", name, {"checkpoint": str(ckpt)})
            results[name] = {k: m[k] for k in ("accuracy", "macro_f1", "micro_f1", "weighted_f1") if k in m}
            if name == "test":
                log(f"test set ({len(y)} utterances, checkpoint {ckpt.name}):\n" + metrics_table(m))
        return results

    def load(self, run_dir, which: str = "best", device: str = "cpu"):
        """(AudioClassifier, AudioConfig, run.json) of an audio run (or an imported Wav2Vec2ForSequenceClassification)."""
        from kiln.model.audio import AudioClassifier

        return speech.load_checkpoint(run_dir, which, self.name, AUDIO_CONFIG_FILE, AudioConfig, lambda b, info, cfg:
                                      AudioClassifier(b, len(info["labels"]), info.get("proj_dim", cfg.proj_dim)), device)

    def evaluate_file(self, run_dir, file, out=None, which: str = "best", log=print, **kw) -> dict:
        from kiln.eval.classification import metrics_table

        model, cfg, info = self.load(run_dir, which)
        labels = list(info["labels"])
        waves, targets, _ = speech.read_for(file, cfg, "label", True, log)
        y = _label_ids(targets, labels, str(file), known=labels)
        probs = predict_probs(model, waves, cfg.eval_batch_size)
        out = Path(out) if out else Path(run_dir) / "eval" / f"{speech.stem(file)}.json"
        m = _report(y, probs, labels, out.parent, out.stem, {"file": str(file), "run": str(run_dir)})
        log(f"{file}: {len(y)} utterance(s)\n" + metrics_table(m))
        log(f"wrote {out} (+ {out.stem}_confusion.png)")
        return m

    def predict_file(self, run_dir, file, out=None, which: str = "best", log=print) -> Path:
        model, cfg, info = self.load(run_dir, which)
        labels = list(info["labels"])
        waves, targets, sources = speech.read_for(file, cfg, "label", False, log)
        probs = predict_probs(model, waves, cfg.eval_batch_size)
        out = Path(out) if out else Path(run_dir) / "predictions" / f"{speech.stem(file)}.csv"
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["path"] + (["label"] if targets else []) + ["prediction"] + [f"p_{n}" for n in labels])
            for i, p in enumerate(probs):
                w.writerow([sources[i]] + ([targets[i]] if targets else []) + [labels[int(p.argmax())]]
                           + [f"{v:.6f}" for v in p])
        log(f"wrote {len(probs)} prediction(s) to {out}")
        return out


TASK = AudioTask()


def _tensor(a):
    import torch

    return torch.from_numpy(np.ascontiguousarray(a))


def _sorted_labels(found) -> list[str]:
    names = {x for x in found if x is not None}
    return sorted(names, key=int) if all(n.isdigit() for n in names) else sorted(names)


def _label_ids(targets, labels: list[str], where: str, known=None) -> np.ndarray:
    index = {n: i for i, n in enumerate(labels)}
    for lab in targets:
        if lab not in index:
            raise KilnError(f"{where}: label {lab!r} is not one of the {len(labels)} classes of "
                            f"{'the run' if known else 'the training data'} ({', '.join(labels)})")
    return np.array([index[lab] for lab in targets], dtype=np.int64)


def _report(y, probs, labels, out_dir: Path, prefix: str, extra: dict) -> dict:
    from kiln.eval.classification import classification_metrics, write_report

    m = classification_metrics(y, probs, labels)
    write_report(m, y, probs, labels, out_dir, prefix, extra)
    return m
