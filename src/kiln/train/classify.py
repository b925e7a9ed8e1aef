"""`kiln finetune classify`: labelled text -> a fine-tuned classifier, evaluated; `kiln predict`, `kiln eval`.

    kiln finetune classify configs/classify-rotten.yaml --data.train reviews.csv --init runs/minilm

Pipeline: read the task files (kiln.data.tasks) -> split (dedup, stratified, seeded) -> backbone from a kiln
run folder or a Hugging Face folder (imported into <run>/base) -> `Classifier` = backbone + pooling + linear
head -> the shared Trainer (one loop; batches padded to their longest example) -> best checkpoint by a
validation metric (early stopping optional) -> test metrics, plots and reports.

Run folder:
  classify.yaml   the config (model: the backbone's shape)      labels.json   label names (index = class id)
  tokenizer.json  data.json (splits, dedup, truncation, skips)   checkpoints/  latest, best (by `metric`)
  eval/           val.json, test.json (+ confusion/ROC/PR PNGs)  metrics.csv, plots/loss.png, log.txt
  base/           the imported Hugging Face backbone (HF init only)
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from kiln.compress.prune import keep_blocks, parse_layers
from kiln.config import ClassifyConfig, dump_yaml, load_config
from kiln.data import tasks
from kiln.errors import KilnError
from kiln.model.transformer import Transformer
from kiln.train.mlm import special_ids
from kiln.train.precision import autocast, choose_precision
from kiln.train.pretrain import RunLog, resolve_device
from kiln.train.trainer import BestByMetric, Trainer

CONFIG_FILE, LABELS_FILE = "classify.yaml", "labels.json"


# ----------------------------------------------------------------------------------------------- model


class Classifier(nn.Module):
    """A kiln Transformer + pooling + dropout + linear layer: (ids, mask, types) -> logits [B, n_classes].

    pooling: mean (over real tokens), cls (first token), pooler (BERT's dense+tanh on the first token),
    last (last real token; decoders, whose last position is the only one that saw the whole text)."""

    def __init__(self, backbone: Transformer, n_classes: int, pooling: str = "mean", dropout: float = 0.1):
        super().__init__()
        cfg = backbone.config
        if pooling == "auto":
            pooling = "last" if cfg.arch == "decoder" else "mean"
        if pooling == "pooler" and backbone.pooler is None:
            raise KilnError("pooling 'pooler' needs a backbone with a BERT pooler (model.pooler); use mean or cls")
        self.backbone, self.pooling = backbone, pooling
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(cfg.d_model, n_classes)
        nn.init.normal_(self.head.weight, std=cfg.init_std)
        nn.init.zeros_(self.head.bias)

    def features(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        b = self.backbone
        if b.config.arch == "decoder":
            h = b.hidden(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        else:
            h = b.encode(input_ids, src_mask=attention_mask, token_type_ids=token_type_ids)
        if attention_mask is None:
            attention_mask = torch.ones(input_ids.shape, dtype=torch.bool, device=input_ids.device)
        if self.pooling == "mean":
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            return (h * m).sum(1) / m.sum(1).clamp_min(1.0)
        if self.pooling == "cls":
            return h[:, 0]
        if self.pooling == "pooler":
            return b.pooler(h)
        last = attention_mask.long().sum(1).clamp_min(1) - 1  # right padding
        return h[torch.arange(h.shape[0], device=h.device), last]

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        return self.head(self.dropout(self.features(input_ids, attention_mask, token_type_ids)))


# ----------------------------------------------------------------------------------------------- data


class Encoded:
    """Token ids of a split (truncated to max_length), labels as class ids, and how many examples were cut."""

    def __init__(self, ids: list[list[int]], types: list[list[int]] | None, labels: list[int] | None,
                 truncated: int):
        self.ids, self.types, self.labels, self.truncated = ids, types, labels, truncated
        self.lengths = np.array([len(x) for x in ids], dtype=np.int64)
        self.teacher_logits: np.ndarray | None = None  # [n_teachers, n, n_classes] for distillation
        self.hard: np.ndarray | None = None  # per example 1.0 = learn its label too, 0.0 = teachers only

    def __add__(self, other: "Encoded") -> "Encoded":
        types = self.types + other.types if self.types is not None and other.types is not None else None
        labels = self.labels + other.labels if self.labels is not None and other.labels is not None else None
        return Encoded(self.ids + other.ids, types, labels, self.truncated + other.truncated)

    def __len__(self) -> int:
        return len(self.ids)


def prepare_tokenizer(tok, max_length: int):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tok.to_str())  # a private copy: padding/truncation settings are per object
    tok.no_padding()
    try:
        tok.enable_truncation(max_length)
    except Exception as e:
        raise KilnError(f"data.max_length {max_length}: {str(e).splitlines()[0]}") from None
    return tok


def encode_examples(tok, examples: list[tasks.Example], label_index: dict[str, int] | None, model_cfg,
                    where: str) -> Encoded:
    texts = [(e.text, e.pair) if e.pair is not None else e.text for e in examples]
    try:
        out = tok.encode_batch(texts)
    except Exception as e:
        raise KilnError(f"{where}: the tokenizer cannot encode this data ({str(e).splitlines()[0]})") from None
    ids = [e.ids or [0] for e in out]
    truncated = sum(1 for e in out if e.overflowing)
    top = max((max(x) for x in ids), default=0)
    if top >= model_cfg.vocab_size:
        raise KilnError(f"{where}: the tokenizer produced id {top}, beyond the model's vocabulary "
                        f"({model_cfg.vocab_size}); tokenizer.json does not belong to this model")
    types = None
    if model_cfg.type_vocab_size:
        cap = model_cfg.type_vocab_size - 1
        types = [[min(t, cap) for t in e.type_ids] or [0] for e in out]
    labels = [label_index[e.label] for e in examples] if label_index is not None else None
    return Encoded(ids, types, labels, truncated)


def collate(enc: Encoded, index, pad_id: int) -> dict:
    """A batch padded to its longest example (right padding): input_ids, attention_mask, [token_type_ids], labels."""
    index = list(index)
    T = int(max(enc.lengths[i] for i in index))
    B = len(index)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.bool)
    types = torch.zeros((B, T), dtype=torch.long) if enc.types is not None else None
    for r, i in enumerate(index):
        n = len(enc.ids[i])
        ids[r, :n] = torch.as_tensor(enc.ids[i])
        mask[r, :n] = True
        if types is not None:
            types[r, :n] = torch.as_tensor(enc.types[i])
    batch = {"input_ids": ids, "attention_mask": mask}
    if types is not None:
        batch["token_type_ids"] = types
    if enc.labels is not None:
        batch["labels"] = torch.as_tensor([enc.labels[i] for i in index], dtype=torch.long)
    if enc.teacher_logits is not None:
        batch["teacher_logits"] = torch.as_tensor(enc.teacher_logits[:, index], dtype=torch.float32).transpose(0, 1)
    if enc.hard is not None:
        batch["hard"] = torch.as_tensor(enc.hard[index], dtype=torch.float32)
    return batch


class EpochBatches:
    """Micro-batch `i` of a seeded per-epoch shuffle: a pure function of i (resume and determinism).

    token_mask > 0 replaces that share of the ordinary tokens of every example by `mask_id`, drawn from a
    generator seeded by (seed, i): the same batch after a resume."""

    def __init__(self, enc: Encoded, batch_size: int, seed: int, pad_id: int, token_mask: float = 0.0,
                 mask_id: int | None = None, special_ids=()):
        self.enc, self.B, self.seed, self.pad_id = enc, batch_size, seed, pad_id
        self.per_epoch = math.ceil(len(enc) / batch_size)
        self._epoch, self._perm = -1, None
        self.token_mask, self.mask_id = token_mask, mask_id
        self.special = torch.tensor(sorted(set(special_ids)), dtype=torch.long)  # padding: attention_mask

    def batch(self, i: int) -> dict:
        epoch, j = divmod(i, self.per_epoch)
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.enc))
            self._epoch = epoch
        batch = collate(self.enc, self._perm[j * self.B:(j + 1) * self.B], self.pad_id)
        if self.token_mask > 0:
            ids = batch["input_ids"]
            ordinary = batch["attention_mask"] & ~torch.isin(ids, self.special)
            g = torch.Generator().manual_seed(int(np.random.default_rng([self.seed, i, 7]).integers(2**62)))
            chosen = (torch.rand(ids.shape, generator=g) < self.token_mask) & ordinary
            batch["input_ids"] = ids.masked_fill(chosen, self.mask_id)
        return batch


def eval_batches(enc: Encoded, batch_size: int, pad_id: int):
    """(positions, batch) in length order (little padding); positions map rows back to the split's order."""
    order = np.argsort(enc.lengths, kind="stable")
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        yield idx, collate(enc, idx, pad_id)


def _inputs(batch: dict) -> dict:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}


@torch.no_grad()
def predict_logits(model, enc: Encoded, batch_size: int, pad_id: int, device: str = "cpu",
                   precision: str = "fp32") -> np.ndarray:
    """Class logits [n, n_classes] (float64) of every example, in the split's order."""
    was_training = model.training
    model.eval()
    out = None
    with autocast(precision, device):
        for idx, batch in eval_batches(enc, batch_size, pad_id):
            z = model(**{k: v.to(device) for k, v in _inputs(batch).items()}).float().cpu().numpy()
            if out is None:
                out = np.zeros((len(enc), z.shape[1]), dtype=np.float64)
            out[idx] = z
    model.train(was_training)
    return out


def predict_probs(model, enc: Encoded, batch_size: int, pad_id: int, device: str = "cpu",
                  precision: str = "fp32") -> np.ndarray:
    z = predict_logits(model, enc, batch_size, pad_id, device, precision)
    z = np.exp(z - z.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


class ClassificationObjective:
    """Cross-entropy over the batch's labels (a SUM; optionally class-weighted). With teachers' logits in the
    batch (`teacher_logits` [B, n_teachers, n_classes], fine-tuned classifiers run once before training):
    alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy, per example, where teacher_T is the
    mean of the teachers' distributions at temperature T (an ensemble). A `hard` weight per example (augmented
    texts: 0) switches the cross-entropy term off where the label is not known to hold."""

    def __init__(self, weights: list[float] | None = None, alpha: float = 0.5, temperature: float = 2.0):
        self.weights = torch.tensor(weights, dtype=torch.float32) if weights else None
        self.alpha, self.temperature = alpha, temperature

    def targets(self, batch) -> int:
        return int(batch["labels"].shape[0])

    def loss(self, model, batch) -> torch.Tensor:
        logits = model(**_inputs(batch)).float()
        w = self.weights.to(logits.device) if self.weights is not None else None
        if "hard" in batch:
            hard = batch["hard"].to(logits.device)
            ce = (F.cross_entropy(logits, batch["labels"], weight=w, reduction="none") * hard).sum()
        else:
            ce = F.cross_entropy(logits, batch["labels"], weight=w, reduction="sum")
        if "teacher_logits" not in batch or self.alpha == 0.0:
            return ce
        T = self.temperature
        t = batch["teacher_logits"].to(logits.device).float()
        t_logp = torch.logsumexp(F.log_softmax(t / T, -1), dim=1) - math.log(t.shape[1])  # log of the mean
        kd = F.kl_div(F.log_softmax(logits / T, -1), t_logp, log_target=True, reduction="sum") * (T * T)
        return self.alpha * kd + (1.0 - self.alpha) * ce


def val_metrics(probs: np.ndarray, labels, n_classes: int) -> dict:
    """Loss, accuracy and macro F1 during training (numpy; equal to scikit-learn's with zero_division=0)."""
    y = np.asarray(labels)
    pred = probs.argmax(1)
    loss = float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, 1.0)).mean())
    tp = np.bincount(y[pred == y], minlength=n_classes).astype(float)
    n_pred, n_true = np.bincount(pred, minlength=n_classes), np.bincount(y, minlength=n_classes)
    f1 = np.divide(2 * tp, n_pred + n_true, out=np.zeros(n_classes), where=(n_pred + n_true) > 0)
    return {"val_loss": loss, "val_accuracy": float((pred == y).mean()), "val_macro_f1": float(f1.mean())}


class ClassifyTrainer(BestByMetric, Trainer):
    """The shared Trainer, with the `best` checkpoint chosen by a validation metric and early stopping."""

    throughput_unit = "ex"

    def __init__(self, *a, metric: str = "val_loss", patience: int = 0, **kw):
        super().__init__(*a, **kw)
        self.metric, self.patience = metric, patience
        self.bad_evals = 0
        self.stopped_early_at: int | None = None
        self.eval_seconds = 0.0
        self.train_seconds = 0.0  # time inside optimizer steps only (batches, forward, backward, update)

    def train_step(self):
        t0 = time.perf_counter()
        out = super().train_step()
        self.train_seconds += time.perf_counter() - t0
        return out

    def run_eval(self) -> dict:
        t0 = time.perf_counter()
        m = super().run_eval()
        self.eval_seconds += time.perf_counter() - t0
        improved = self.update_best(m)
        if improved:
            self.bad_evals = 0
        elif improved is False:
            self.bad_evals += 1
            if self.patience and self.bad_evals >= self.patience and self.state.step < self.cfg.max_steps:
                self.log(f"early stopping at step {self.state.step}: {self.metric} has not improved for "
                         f"{self.bad_evals} evaluation(s) (best {self.best_metric:.4f} at step {self.best_step})")
                self.stopped_early_at = self.state.step
                self.cfg.max_steps = self.state.step  # the loop ends after this step's checkpoint
        return m


# ----------------------------------------------------------------------------------------------- backbone


def is_hf_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and not (path / "config.yaml").is_file()


def load_backbone(cfg: ClassifyConfig, run_dir: Path, log) -> tuple[Transformer, object, dict]:
    """(backbone, tokenizer, info) from cfg.init: a kiln run folder, or an HF folder imported into run_dir/base."""
    from kiln.api import load

    if not cfg.init:
        raise KilnError("init is empty: name a kiln run folder or a Hugging Face model folder (--init PATH)")
    init = Path(cfg.init).expanduser()
    if not init.exists():
        raise KilnError(f"init not found: {init}")
    info = {"init": str(init)}
    if (init / CONFIG_FILE).is_file():
        raise KilnError(f"init {init} is a classifier run; start from its backbone (a kiln run or HF folder)")
    if is_hf_folder(init):
        from kiln.interop.hf import import_hf

        base = run_dir / "base"
        if (base / "config.yaml").is_file():
            log(f"using the backbone already imported into {base}")
        else:
            log(f"importing Hugging Face model {init} -> {base}")
            import_hf(init, base)
        info.update(kind="huggingface", imported_to=str(base))
        backbone, tokenizer, run_cfg = load(base)
    else:
        backbone, tokenizer, run_cfg = load(init, cfg.init_checkpoint, quantized_ok=False)
        info.update(kind="kiln", checkpoint=cfg.init_checkpoint)
    if tokenizer is None:
        raise KilnError(f"init {init} has no tokenizer.json; a classifier needs the backbone's tokenizer")
    if run_cfg.model.arch == "encoder-decoder":
        log("note: encoder-decoder backbone: the classifier uses its encoder only")
    return backbone, tokenizer, info


# ----------------------------------------------------------------------------------------------- pipeline


def _teachers(cfg: ClassifyConfig, labels: list[str], device: str) -> list:
    """(classifier, tokenizer, config) of each distill.teacher run (comma-separated: an ensemble), checked
    before any work: classifier runs with the same labels in the same order."""
    d = cfg.distill
    if not 0.0 <= d.alpha <= 1.0:
        raise KilnError(f"distill.alpha must be in [0, 1], got {d.alpha}")
    if d.temperature <= 0:
        raise KilnError(f"distill.temperature must be > 0, got {d.temperature}")
    teachers = []
    for run in run_folders(d.teacher, "distill.teacher"):
        model, tok, t_cfg, t_labels = load_classifier(run, d.checkpoint, device=device)
        if t_labels != labels:
            raise KilnError(f"distill.teacher {run} has labels {t_labels}; this data has {labels}")
        teachers.append((model, tok, t_cfg))
    return teachers


def augmented_examples(rows: list, copies: int, seed: int, tokenizers: list) -> list:
    """`copies` augmented versions of each training example (kiln.data.augment), the label carried along
    only as a placeholder. A masked word becomes the mask token every tokenizer knows, or is dropped."""
    from kiln.data.augment import augment_texts

    masks = [special_ids(t.get_vocab(with_added_tokens=True))[0] for t in tokenizers]
    names = {t.id_to_token(m) if m is not None else None for t, m in zip(tokenizers, masks)}
    mask = names.pop() if len(names) == 1 else None
    return [tasks.Example(text=text, label=rows[i].label, pair=rows[i].pair)
            for i, text in augment_texts([r.text for r in rows], copies, seed, mask)]


def teacher_logits(teachers: list, examples: list, labels: list[str], device: str) -> np.ndarray:
    """[n_teachers, n, n_classes]: each teacher's class logits for the examples, each through its own tokenizer
    and max_length (teachers need not share the student's tokenizer)."""
    index = {name: i for i, name in enumerate(labels)}
    out = []
    for model, tok, t_cfg in teachers:
        enc = encode_examples(prepare_tokenizer(tok, t_cfg.data.max_length), examples, index, t_cfg.model, "teacher")
        pad = t_cfg.model.pad_token_id if t_cfg.model.pad_token_id >= 0 else 0
        out.append(predict_logits(model, enc, 64, pad, device))
    return np.stack(out)


def _new_run_dir(cfg: ClassifyConfig) -> Path:
    if cfg.out:
        return Path(cfg.out)
    return Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _read(path: str, cfg: ClassifyConfig, log, require_label: bool = True):
    rows, report = tasks.read_examples(path, cfg.data.text_field, cfg.data.label_field, cfg.data.text_pair_field,
                                       require_label=require_label)
    for line in report.lines():
        log(line)
    return rows, report


def load_splits(cfg: ClassifyConfig, log) -> tuple[dict, list[str], dict]:
    """({train,val,test: examples}, label names, data report)."""
    d = cfg.data
    if not d.train:
        raise KilnError("data.train is empty: name the training file (--data.train FILE)")
    report: dict = {"files": {}, "skipped_empty_text": {}}
    train, r = _read(d.train, cfg, log)
    report["files"]["train"] = d.train
    report["skipped_empty_text"][d.train] = r.empty_text
    given = {}
    for name in ("val", "test"):
        path = getattr(d, name)
        if path:
            given[name], r = _read(path, cfg, log)
            report["files"][name] = path
            report["skipped_empty_text"][path] = r.empty_text
    if d.dedup:
        train, dropped = tasks.dedup(train)
        report["duplicates_dropped"] = dropped
        if dropped:
            log(f"{d.train}: dropped {dropped} exact duplicate row(s)")
    labels = tasks.label_names(train)
    if len(labels) < 2:
        raise KilnError(f"{d.train}: a classifier needs at least 2 labels in column {d.label_field!r}; "
                        f"found {len(labels)} ({', '.join(labels)})")
    for name, rows in given.items():
        tasks.check_labels(rows, labels, getattr(d, name), d.train)
    vf = 0.0 if "val" in given else d.val_fraction
    tf = 0.0 if "test" in given else d.test_fraction
    split_seed = cfg.seed if d.split_seed < 0 else d.split_seed
    tr, va, te, info = tasks.split_examples(train, vf, tf, split_seed, log=log, method=d.split)
    report.update(groups=info["groups"], conflicting_texts=info["conflicting_texts"],
                  single_example_labels=info["single_example_labels"])
    if info["conflicting_texts"]:
        log(f"warning: {info['conflicting_texts']} text(s) occur with more than one label (kept, each in one split)")
    splits = {"train": tr, "val": given.get("val", va), "test": given.get("test", te)}
    for name in ("val", "test"):
        if name in given:
            n = tasks.overlap(splits["train"], splits[name])
            report[f"{name}_texts_also_in_train"] = n
            if n:
                log(f"warning: {n} {name} example(s) in {getattr(d, name)} have a text that is also in train")
    report["splits"] = {name: {"n": len(rows), "labels": tasks.label_counts(rows, labels),
                               "fingerprint": tasks.fingerprint(rows)} for name, rows in splits.items()}
    return splits, labels, report


def run_finetune_classify(cfg: ClassifyConfig, quiet: bool = False) -> Path:
    run_dir = _new_run_dir(cfg)
    if (run_dir / "checkpoints").exists():
        raise KilnError(f"run folder {run_dir} already holds checkpoints; pick another --out")
    # check everything the user gave before creating anything
    tc = cfg.train
    if tc.batch_size < 1 or tc.grad_accum < 1:
        raise KilnError("train.batch_size and train.grad_accum must be >= 1")
    if getattr(tc, "batch_tokens", 0) or getattr(tc, "lr_scaling", "none") != "none":
        raise KilnError("train.batch_tokens and train.lr_scaling are for pretraining; finetune classify counts "
                        "batches in examples (train.batch_size x train.grad_accum)")
    if cfg.data.max_length < 2:
        raise KilnError(f"data.max_length must be >= 2, got {cfg.data.max_length}")
    if not 0.0 <= cfg.token_mask < 1.0:
        raise KilnError(f"token_mask must be in [0, 1), got {cfg.token_mask}")
    if cfg.distill.augment < 0:
        raise KilnError(f"distill.augment must be >= 0, got {cfg.distill.augment}")
    if cfg.distill.augment and not cfg.distill.teacher:
        raise KilnError("distill.augment needs distill.teacher: the teachers label the augmented texts")
    if cfg.distill.augment and cfg.distill.alpha == 0.0:
        raise KilnError("distill.augment needs distill.alpha > 0: augmented texts are learned from the teachers alone")
    keep = parse_layers(cfg.keep_layers) if cfg.keep_layers else None
    log0: list[str] = []
    splits, labels, report = load_splits(cfg, log0.append)
    teachers = _teachers(cfg, labels, resolve_device(tc.device)) if cfg.distill.teacher else []
    weights = tasks.class_weights(cfg.class_weights, labels, splits["train"])
    positive = None
    if cfg.positive_label:
        if cfg.positive_label not in labels:
            raise KilnError(f"positive_label {cfg.positive_label!r} is not a label ({', '.join(labels)})")
        positive = labels.index(cfg.positive_label)

    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    log = RunLog(run_dir, quiet)
    log(f"kiln finetune classify -> {run_dir}")
    for line in log0:
        log(line)
    torch.manual_seed(cfg.seed)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    device = resolve_device(tc.device)
    try:  # errors found once the backbone is loaded: leave no run folder behind
        backbone, tokenizer, init_info = load_backbone(cfg, run_dir, log)
        if keep is not None:
            n = backbone.config.n_layer
            keep_blocks(backbone, keep)
            log(f"student: blocks {','.join(map(str, keep))} of the backbone's {n}")
        mask_id, special = _mask_token(tokenizer, cfg.token_mask)
    except KilnError:
        if created:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    if teachers:
        sizes = ", ".join(_count(sum(p.numel() for p in t[0].parameters())) for t in teachers)
        log(f"distillation from {cfg.distill.teacher} ({sizes} parameters"
            + (f"; an ensemble of {len(teachers)}, their distributions averaged" if len(teachers) > 1 else "")
            + f"): alpha {cfg.distill.alpha}, temperature {cfg.distill.temperature}")
    cfg.model = copy.deepcopy(backbone.config)
    if cfg.data.max_length > cfg.model.context_length:
        log(f"note: data.max_length {cfg.data.max_length} > the backbone's context_length "
            f"{cfg.model.context_length}: using {cfg.model.context_length}")
        cfg.data.max_length = cfg.model.context_length
    tok = prepare_tokenizer(tokenizer, cfg.data.max_length)
    index = {name: i for i, name in enumerate(labels)}
    enc = {name: encode_examples(tok, rows, index, cfg.model, cfg.data.train if name == "train" else name)
           for name, rows in splits.items()}
    report["truncated"] = {name: e.truncated for name, e in enc.items()}
    report["max_length"] = cfg.data.max_length
    for name, e in enc.items():
        if e.truncated:
            log(f"truncation: {e.truncated} of {len(e)} {name} example(s) ({100 * e.truncated / len(e):.1f}%) "
                f"are longer than data.max_length {cfg.data.max_length} tokens and were cut")
    if not report["truncated"]["train"] + report["truncated"]["val"] + report["truncated"]["test"]:
        log(f"truncation: no example is longer than data.max_length {cfg.data.max_length}")
    counts = report["splits"]
    log("splits: " + ", ".join(f"{n} {counts[n]['n']} " + "(" + ", ".join(f"{k} {v}" for k, v in counts[n]['labels'].items()) + ")"
                             for n in ("train", "val", "test")))
    if teachers:  # the teachers see each training text once, through their own tokenizers
        t0 = time.perf_counter()
        rows = splits["train"]
        if cfg.distill.augment:
            extra = augmented_examples(rows, cfg.distill.augment, cfg.seed, [tokenizer] + [t[1] for t in teachers])
            n = len(enc["train"])
            enc["train"] = enc["train"] + encode_examples(tok, extra, index, cfg.model, "augmented")
            enc["train"].hard = np.r_[np.ones(n), np.zeros(len(extra))]
            rows = rows + extra
            log(f"augmentation: {len(extra)} augmented copies of the {n} training texts "
                f"({cfg.distill.augment} each), labelled by the teachers alone")
        enc["train"].teacher_logits = teacher_logits(teachers, rows, labels, device)
        log(f"teacher logits for {len(enc['train'])} training examples in {time.perf_counter() - t0:.1f}s")
        del teachers

    # steps and schedule
    steps_per_epoch = math.ceil(len(enc["train"]) / tc.batch_size / tc.grad_accum)
    tcfg = dataclasses.replace(tc)  # the trainer's own copy (early stopping shortens its max_steps)
    if tcfg.max_steps <= 0:
        if cfg.epochs <= 0:
            raise KilnError("set epochs > 0 or train.max_steps > 0")
        tcfg.max_steps = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    if tcfg.warmup_steps <= 0:
        tcfg.warmup_steps = int(cfg.warmup_fraction * tcfg.max_steps)
    if tcfg.eval_every <= 0:
        tcfg.eval_every = min(steps_per_epoch, tcfg.max_steps)
    if tcfg.save_every <= 0:
        tcfg.save_every = tcfg.max_steps
    precision, reason = choose_precision(tc.precision, device)
    log(reason)

    pad_id = cfg.model.pad_token_id if cfg.model.pad_token_id >= 0 else 0
    model = Classifier(backbone, len(labels), cfg.pooling, cfg.head_dropout).to(device)
    model.train()
    log(f"model: {cfg.model.arch} backbone ({init_info['kind']}: {cfg.init}), {_count(sum(p.numel() for p in model.parameters()))} parameters, "
        f"pooling {model.pooling}, {len(labels)} classes; {tcfg.max_steps} steps ({tcfg.max_steps / steps_per_epoch:.2f} "
        f"epochs of {steps_per_epoch}), batch {tc.batch_size} x {tc.grad_accum}, lr {tc.lr:g}, warmup {tcfg.warmup_steps}")
    if weights:
        log("class weights: " + ", ".join(f"{n} {w:.3f}" for n, w in zip(labels, weights)))

    # the run folder: everything predict/eval need, written before training starts
    tokenizer.save(str(run_dir / "tokenizer.json"))
    (run_dir / CONFIG_FILE).write_text(dump_yaml(cfg))
    (run_dir / LABELS_FILE).write_text(json.dumps({
        "labels": labels, "text_field": cfg.data.text_field, "text_pair_field": cfg.data.text_pair_field,
        "label_field": cfg.data.label_field, "max_length": cfg.data.max_length, "pooling": model.pooling,
        "positive_label": labels[positive if positive is not None else 1] if len(labels) == 2 else None,
        "class_weights": weights}, indent=2) + "\n")
    report["init"] = init_info
    report["schedule"] = {"max_steps": tcfg.max_steps, "steps_per_epoch": steps_per_epoch,
                          "warmup_steps": tcfg.warmup_steps, "eval_every": tcfg.eval_every}
    (run_dir / "data.json").write_text(json.dumps(report, indent=2) + "\n")

    if cfg.token_mask:
        log(f"augmentation: {cfg.token_mask:.0%} of the training tokens become mask token {mask_id}, anew each step")
    batches = EpochBatches(enc["train"], tc.batch_size, cfg.seed, pad_id, cfg.token_mask, mask_id, special)
    eval_bs = max(2 * tc.batch_size, 16)
    n_classes = len(labels)
    val = enc["val"]
    evaluate = None
    if len(val):
        evaluate = lambda m: val_metrics(predict_probs(m, val, eval_bs, pad_id, device, "fp32"), val.labels, n_classes)  # noqa: E731
    else:
        log("warning: the validation split is empty: no early stopping; the last checkpoint is used")
    objective = ClassificationObjective(weights, cfg.distill.alpha, cfg.distill.temperature)
    trainer = ClassifyTrainer(model, objective, tcfg, run_dir, batches.batch,
                              evaluate=evaluate, device=device, precision=precision, log=log,
                              metric=cfg.metric, patience=cfg.patience)
    result = trainer.fit()
    train_seconds = max(trainer.train_seconds, 1e-9)
    examples = result["tokens"]
    summary = {"steps": result["step"], "examples_seen": examples, "seconds": result["elapsed"],
               "train_seconds": train_seconds, "eval_seconds": trainer.eval_seconds,
               "examples_per_second": examples / train_seconds,
               "best_step": trainer.best_step, "best_" + cfg.metric: trainer.best_metric,
               "stopped_early_at": trainer.stopped_early_at, "precision": precision}
    log(f"trained {result['step']} steps, {examples:,} examples in {result['elapsed']:.1f}s "
        f"({summary['examples_per_second']:.1f} examples/s, evaluation excluded); best {cfg.metric} "
        f"{trainer.best_metric if trainer.best_metric is not None else float('nan'):.4f} at step {trainer.best_step}")

    # final evaluation with the best checkpoint
    from kiln.train.checkpoint import find_checkpoint, load_weights

    ckpt = find_checkpoint(run_dir, "best")
    load_weights(model, ckpt / "model.safetensors")
    summary["checkpoint"] = str(ckpt)
    results = {"train": summary}
    for name in ("val", "test"):
        if not len(enc[name]):
            continue
        # bf16 autocast on a CPU is slower than fp32 for inference (per-op casts): evaluate CPU runs in fp32
        probs = predict_probs(model, enc[name], eval_bs, pad_id, device, precision if device != "cpu" else "fp32")
        results[name] = evaluate_and_report(probs, enc[name].labels, labels, run_dir / "eval", name, positive,
                                            extra={"checkpoint": str(ckpt), "truncated": enc[name].truncated})
        if name == "test":
            from kiln.eval.classification import metrics_table

            log(f"test set ({len(enc[name])} examples, checkpoint {ckpt.name}):\n" + metrics_table(results[name]))
    (run_dir / "eval").mkdir(exist_ok=True)
    (run_dir / "eval" / "summary.json").write_text(json.dumps(
        {"train": summary, **{k: {m: v[m] for m in ("accuracy", "macro_f1", "micro_f1", "weighted_f1", "roc_auc")
                                  if m in v} for k, v in results.items() if k != "train"}}, indent=2) + "\n")
    log(f"done: run folder {run_dir}")
    return run_dir


def _mask_token(tokenizer, token_mask: float) -> tuple[int | None, list[int]]:
    """The tokenizer's mask token id and its special token ids, for `token_mask` augmentation."""
    if not token_mask:
        return None, []
    mask_id, special = special_ids(tokenizer.get_vocab(with_added_tokens=True))
    if mask_id is None:
        raise KilnError("token_mask needs a tokenizer with a [MASK] or <mask> token; this one has none "
                        "(a WordPiece tokenizer or a BERT-style checkpoint has one)")
    return mask_id, special


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 100_000 else f"{n:,}"


def evaluate_and_report(probs, y, labels, out_dir: Path, prefix: str, positive: int | None = None,
                        extra: dict | None = None) -> dict:
    from kiln.eval.classification import classification_metrics, write_report

    m = classification_metrics(y, probs, labels, positive)
    write_report(m, y, probs, labels, out_dir, prefix, extra)
    return m


# ----------------------------------------------------------------------------------------------- using a run


def load_classifier(run_dir: str | Path, which: str = "best", device: str = "cpu"):
    """(Classifier, tokenizer, ClassifyConfig, label names) from a `kiln finetune classify` run folder."""
    from kiln.api import _rebuild_buffers
    from kiln.data.tokenizer import load_tokenizer
    from kiln.train.checkpoint import find_checkpoint, load_weights

    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        hint = " (a pretraining run: fine-tune it first with `kiln finetune classify --init`)" \
            if (run_dir / "config.yaml").is_file() else ""
        raise KilnError(f"{run_dir} is not a classifier run folder (no {CONFIG_FILE}){hint}")
    cfg = load_config(run_dir / CONFIG_FILE, cls=ClassifyConfig)
    try:
        meta = json.loads((run_dir / LABELS_FILE).read_text(encoding="utf-8"))
        labels = list(meta["labels"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise KilnError(f"{run_dir / LABELS_FILE}: cannot read the label names ({type(e).__name__})") from None
    ckpt = find_checkpoint(which) if which not in ("best", "latest") else find_checkpoint(run_dir, which)
    with torch.device("meta"):
        backbone = Transformer(cfg.model)
    backbone = backbone.to_empty(device=device)
    _rebuild_buffers(backbone, cfg)
    model = Classifier(backbone, len(labels), meta.get("pooling", cfg.pooling), cfg.head_dropout).to(device)
    load_weights(model, ckpt / "model.safetensors")
    model.eval()
    tokenizer = load_tokenizer(run_dir / "tokenizer.json")
    return model, tokenizer, cfg, labels


def run_folders(run_dir: str | Path, what: str = "") -> list[Path]:
    """One classifier run folder, or several comma-separated (an ensemble)."""
    text = str(run_dir)
    if "," not in text or Path(text).exists():
        return [Path(text)]
    runs = [Path(r.strip()) for r in text.split(",") if r.strip()]
    if not runs:
        raise KilnError(f"{what + ' ' if what else ''}{text!r} names no run folder")
    return runs


def _predict_file(runs: list[Path], file: Path, which: str, require_label: bool, log):
    """(config, label names, rows, data report, encoded rows, class probabilities) of a run on a file; for
    several runs (an ensemble) the mean of their class probabilities. The file is read once; each run
    encodes it through its own tokenizer."""
    probs, rows = [], None
    for r in runs:
        model, tokenizer, cfg_r, labels_r = load_classifier(r, which)
        fields = (cfg_r.data.text_field, cfg_r.data.text_pair_field)
        if rows is None:
            cfg, labels = cfg_r, labels_r
            rows, report = tasks.read_examples(file, cfg.data.text_field, cfg.data.label_field,
                                               cfg.data.text_pair_field, require_label=require_label)
            for line in report.lines():
                log(line)
            if require_label:
                tasks.check_labels(rows, labels, str(file), "the training data of this run")
            index = {name: i for i, name in enumerate(labels)}
            known = all(row.label in index for row in rows)  # labels to score against (else predictions only)
        elif labels_r != labels:
            raise KilnError(f"{r} has labels {labels_r}, {runs[0]} has {labels}: an ensemble needs the same "
                            "labels in the same order")
        elif fields != (cfg.data.text_field, cfg.data.text_pair_field):
            raise KilnError(f"{r} reads the text columns {fields}, {runs[0]} reads "
                            f"{(cfg.data.text_field, cfg.data.text_pair_field)}: an ensemble needs the same")
        enc_r = encode_examples(prepare_tokenizer(tokenizer, cfg_r.data.max_length), rows, index if known else None,
                                cfg_r.model, str(file))
        if not probs:
            enc = enc_r  # the first run's encoding: its labels and truncation count are reported
        pad = cfg_r.model.pad_token_id if cfg_r.model.pad_token_id >= 0 else 0
        probs.append(predict_probs(model, enc_r, max(2 * cfg_r.train.batch_size, 16), pad))
        del model
    if len(runs) > 1:
        log(f"ensemble of {len(runs)} runs: their class probabilities averaged")
    return cfg, labels, rows, report, enc, np.mean(probs, axis=0)


def _default_name(runs: list[Path], file: Path) -> str:
    return f"{file.stem}-ensemble{len(runs)}" if len(runs) > 1 else file.stem


def predict_file(run_dir: str | Path, file: str | Path, out: str | Path | None = None, which: str = "best",
                 log=print) -> Path:
    """Write a CSV: line, text, [text_pair], [label], prediction, p_<label> for every label. `run_dir` may
    name several runs, comma-separated: their ensemble (class probabilities averaged)."""
    import csv

    runs, file = run_folders(run_dir), Path(file)
    cfg, labels, rows, report, enc, probs = _predict_file(runs, file, which, False, log)
    out = Path(out) if out else runs[0] / "predictions" / f"{_default_name(runs, file)}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    pair = bool(cfg.data.text_pair_field)
    has_label = any(r.label is not None for r in rows)
    header = ["line", cfg.data.text_field] + ([cfg.data.text_pair_field] if pair else []) + \
             ([cfg.data.label_field] if has_label else []) + ["prediction"] + [f"p_{n}" for n in labels]
    with open(out, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r, p in zip(rows, probs):
            w.writerow([r.line, r.text] + ([r.pair] if pair else []) + ([r.label or ""] if has_label else [])
                       + [labels[int(p.argmax())]] + [f"{x:.6f}" for x in p])
    log(f"wrote {len(rows)} prediction(s) to {out}" + (f" (skipped {report.empty_text} empty text(s))"
                                                        if report.empty_text else ""))
    return out


def evaluate_file(run_dir: str | Path, file: str | Path, out: str | Path | None = None, which: str = "best",
                  log=print) -> dict:
    """Metrics of a run (or of comma-separated runs: their ensemble) on a labelled file: printed as a table,
    written as JSON (+ plots beside it)."""
    from kiln.eval.classification import metrics_table

    runs, file = run_folders(run_dir), Path(file)
    cfg, labels, rows, report, enc, probs = _predict_file(runs, file, which, True, log)
    out = Path(out) if out else runs[0] / "eval" / f"{_default_name(runs, file)}.json"
    positive = labels.index(cfg.positive_label) if cfg.positive_label in labels else None
    m = evaluate_and_report(probs, enc.labels, labels, out.parent, out.stem, positive,
                            extra={"file": str(file), "skipped_empty_text": report.empty_text,
                                   "truncated": enc.truncated, "runs": [str(r) for r in runs]})
    log(f"{file}: {len(rows)} example(s)" + (f", {enc.truncated} cut at max_length {cfg.data.max_length}"
                                             if enc.truncated else ""))
    log(metrics_table(m))
    log(f"wrote {out}")
    return m


# ----------------------------------------------------------------------------------------------- CLI


def classify_from_cli(config: str | None, overrides: list[str]) -> Path:
    cfg = load_config(config, overrides, cls=ClassifyConfig)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return run_finetune_classify(cfg)
