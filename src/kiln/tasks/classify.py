"""`kiln finetune classify`: labelled text -> a fine-tuned classifier, evaluated; `kiln predict`, `kiln eval`.

    kiln finetune classify configs/classify-rotten.yaml --data.train reviews.csv --init runs/minilm

The task on the shared driver (kiln.tasks.driver): read the files (kiln.data.tables) and split them (dedup,
stratified or shuffled, seeded) -> the backbone (a kiln run, or a Hugging Face folder imported into
<run>/base) -> kiln.model.heads.SequenceClassifier -> cross-entropy (kiln.train.objectives; with teachers,
their averaged distributions: kiln.tasks.classify_distill) -> best checkpoint by a val metric -> test metrics
and plots (kiln.eval.classification).

Two variants by `problem` (the same reading, splits, backbone and run folder): multi_label (labels joined by
data.label_sep or a JSONL list; a sigmoid per label, binary cross-entropy, a threshold per label, optionally
tuned on val: tune_thresholds) and regression (a number per text: kiln.model.heads.SequenceRegressor, MSE;
metrics kiln.eval.regression). Both split by one seeded shuffle (a label set or a number is no stratum).

Run folder: classify.yaml, run.json (kind classify; labels, fields, pooling), labels.json, tokenizer.json,
data.json, checkpoints/, eval/ (val.json, test.json, summary.json + PNGs), metrics.csv, plots/, log.txt, base/.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np

from kiln.config import PROBLEM_METRICS, ClassifyConfig
from kiln.data import tables
from kiln.data.targets import target_summary
from kiln.errors import KilnError
from kiln.eval.classification import multilabel_val_metrics, tune_thresholds, val_metrics
from kiln.eval.regression import regression_val_metrics
from kiln.model.heads import SequenceClassifier, SequenceRegressor
from kiln.tasks.base import Data, EpochTask, Prepared, eval_batch_size
from kiln.tasks.classify_files import CONFIG_FILE, LABELS_FILE, evaluate_and_report, evaluate_file, load_classifier, \
    predict_file, run_folders, scores
from kiln.tasks.backbone import load_backbone
from kiln.tasks.text_inputs import EpochBatches, encode_examples, predict_probs, prepare_tokenizer  # noqa: F401 (kiln serve)
from kiln.train.mlm import special_ids
from kiln.train.objectives import ClassificationObjective, MultiLabelObjective, RegressionObjective

SUMMARY_KEYS = ("accuracy", "macro_f1", "micro_f1", "weighted_f1", "samples_f1", "hamming_loss", "roc_auc", "mse",
                "rmse", "mae", "r2", "pearson", "spearman")



class ClassifyTask(EpochTask):
    name, config_cls, config_file = "classify", ClassifyConfig, CONFIG_FILE
    usage = "kiln finetune classify [CONFIG.yaml] --data.train FILE --init RUN_OR_HF_DIR [--section.key VALUE ...]"
    example = "configs/classify-rotten.yaml"
    batch_unit = "examples"

    def check(self, cfg: ClassifyConfig) -> None:
        d = cfg.distill
        if cfg.data.max_length < 2:
            raise KilnError(f"data.max_length must be >= 2, got {cfg.data.max_length}")
        if not 0.0 <= cfg.token_mask < 1.0:
            raise KilnError(f"token_mask must be in [0, 1), got {cfg.token_mask}")
        if d.augment < 0:
            raise KilnError(f"distill.augment must be >= 0, got {d.augment}")
        if d.augment and not d.teacher:
            raise KilnError("distill.augment needs distill.teacher: the teachers label the augmented texts")
        if d.augment and d.alpha == 0.0:
            raise KilnError("distill.augment needs distill.alpha > 0: augmented texts are learned from the teachers alone")
        if cfg.keep_layers:
            from kiln.compress.prune import parse_layers

            parse_layers(cfg.keep_layers)
        if cfg.metric not in ("auto", *PROBLEM_METRICS[cfg.problem]):
            raise KilnError(f"metric {cfg.metric} does not fit problem {cfg.problem}: choose auto, "
                            + ", ".join(PROBLEM_METRICS[cfg.problem]))
        for key, value in (("class_weights", cfg.class_weights.strip() not in ("", "none")),
                           ("positive_label", cfg.positive_label), ("distill.teacher", d.teacher)):
            if value and cfg.problem != "single_label":
                raise KilnError(f"{key} is for problem single_label; this run's problem is {cfg.problem}")
        if cfg.problem == "multi_label" and not cfg.data.label_sep:
            raise KilnError("data.label_sep is empty: problem multi_label splits the label column on it")

    def read(self, cfg: ClassifyConfig, log) -> Data:
        from kiln.run.device import resolve_device

        splits, labels, report = load_splits(cfg, log)
        teachers = _teachers(cfg, labels, resolve_device(cfg.train.device)) if cfg.distill.teacher else []
        weights = tables.class_weights(cfg.class_weights, labels, splits["train"])
        positive = None
        if cfg.positive_label:
            if cfg.positive_label not in labels:
                raise KilnError(f"positive_label {cfg.positive_label!r} is not a label ({', '.join(labels)})")
            positive = labels.index(cfg.positive_label)
        return Data(splits, report, {"labels": labels, "teachers": teachers, "weights": weights, "positive": positive})

    def prepare(self, cfg: ClassifyConfig, run_dir: Path, data: Data, device: str, log) -> Prepared:
        labels, teachers, weights = data.extra["labels"], data.extra["teachers"], data.extra["weights"]
        backbone, tokenizer, init_info = load_backbone(cfg.init, cfg.init_checkpoint, run_dir, log, refuse=(CONFIG_FILE,))
        if backbone.config.arch == "encoder-decoder":
            log("note: encoder-decoder backbone: the classifier uses its encoder only")
        if cfg.keep_layers:
            from kiln.compress.prune import keep_blocks, parse_layers

            n, keep = backbone.config.n_layer, parse_layers(cfg.keep_layers)
            keep_blocks(backbone, keep)
            log(f"student: blocks {','.join(map(str, keep))} of the backbone's {n}")
        mask_id, special = _mask_token(tokenizer, cfg.token_mask)
        if teachers:
            sizes = ", ".join(f"{sum(p.numel() for p in t[0].parameters()) / 1e6:.2f}M" for t in teachers)
            log(f"distillation from {cfg.distill.teacher} ({sizes} parameters"
                + (f"; an ensemble of {len(teachers)}, their distributions averaged" if len(teachers) > 1 else "")
                + f"): alpha {cfg.distill.alpha}, temperature {cfg.distill.temperature}")
        cfg.model = copy.deepcopy(backbone.config)
        if cfg.data.max_length > cfg.model.context_length:
            log(f"note: data.max_length {cfg.data.max_length} > the backbone's context_length "
                f"{cfg.model.context_length}: using {cfg.model.context_length}")
            cfg.data.max_length = cfg.model.context_length
        tok = prepare_tokenizer(tokenizer, cfg.data.max_length)
        index, problem = {name: i for i, name in enumerate(labels)}, cfg.problem
        splits, report = data.splits, data.report
        enc = {name: encode_examples(tok, rows, index, cfg.model, cfg.data.train if name == "train" else name,
                                     problem) for name, rows in splits.items()}
        report["truncated"] = {name: e.truncated for name, e in enc.items()}
        report["max_length"] = cfg.data.max_length
        for name, e in enc.items():
            if e.truncated:
                log(f"truncation: {e.truncated} of {len(e)} {name} example(s) ({100 * e.truncated / len(e):.1f}%) "
                    f"are longer than data.max_length {cfg.data.max_length} tokens and were cut")
        if not sum(report["truncated"].values()):
            log(f"truncation: no example is longer than data.max_length {cfg.data.max_length}")
        counts = report["splits"]
        log("splits: " + ", ".join(f"{n} {counts[n]['n']} (" + ", ".join(f"{k} {v}" for k, v in counts[n]['labels'].items())
                                   + ")" for n in ("train", "val", "test")))
        if teachers:  # the teachers see each training text once, through their own tokenizers
            from kiln.tasks.classify_distill import attach_teachers

            attach_teachers(cfg, teachers, enc, splits, labels, tokenizer, index, device, log)
            data.extra["teachers"] = []  # free them before training

        model, objective, note, extra = _head(cfg, backbone, labels, enc["train"], weights)
        report["init"] = init_info
        if weights:
            log("class weights: " + ", ".join(f"{n} {w:.3f}" for n, w in zip(labels, weights)))
        if cfg.token_mask:
            log(f"augmentation: {cfg.token_mask:.0%} of the training tokens become mask token {mask_id}, anew each step")
        pad_id = cfg.model.pad_id
        positive = data.extra["positive"]
        meta = {"labels": labels, "text_field": cfg.data.text_field, "text_pair_field": cfg.data.text_pair_field,
                "label_field": cfg.data.label_field, "max_length": cfg.data.max_length, "pooling": model.pooling,
                "positive_label": labels[positive if positive is not None else 1] if len(labels) == 2 and
                problem == "single_label" else None, "class_weights": weights, "problem": problem, **extra}

        def save(run_dir: Path) -> None:
            tokenizer.save(str(run_dir / "tokenizer.json"))
            (run_dir / LABELS_FILE).write_text(json.dumps(meta, indent=2) + "\n")

        batches = EpochBatches(enc["train"], cfg.train.batch_size, cfg.seed, pad_id, cfg.token_mask, mask_id, special,
                               cfg.length_buckets)
        eval_bs, val = eval_batch_size(cfg), enc["val"]
        evaluate = None
        if len(val):
            def evaluate(m):
                return _val_metrics(problem, scores(m, val, eval_bs, pad_id, problem, device), val.labels, meta)
        notes = [f"{cfg.model.arch} backbone ({init_info['kind']}: {cfg.init})", f"pooling {model.pooling}", note]
        metric = PROBLEM_METRICS[problem][0] if cfg.metric == "auto" else cfg.metric
        return Prepared(model, objective, batches.batch, len(enc["train"]), evaluate, metric, meta, save, notes=notes,
                        state={"enc": enc, "pad_id": pad_id, "eval_bs": eval_bs, "device": device})

    def summary(self, result: dict, trainer) -> dict:
        examples = result["tokens"]  # the trainer counts targets: here examples
        return {"examples_seen": examples, "examples_per_second": examples / max(trainer.train_seconds, 1e-9)}

    def test(self, cfg, prep: Prepared, model, ckpt: Path, run_dir: Path, log) -> dict:
        from kiln.eval.classification import metrics_table

        st, labels, meta, problem = prep.state, prep.meta["labels"], prep.meta, cfg.problem
        positive = labels.index(prep.meta["positive_label"]) if prep.meta["positive_label"] in labels else None
        results = {}
        # bf16 autocast on a CPU is slower than fp32 for inference (per-op casts): CPU runs evaluate in fp32
        out = {name: scores(model, enc, st["eval_bs"], st["pad_id"], problem, st["device"])
               for name, enc in st["enc"].items() if name != "train" and len(enc)}
        if problem == "multi_label" and cfg.tune_thresholds and "val" in out:
            meta["thresholds"] = tune_thresholds(out["val"], st["enc"]["val"].labels, cfg.threshold)
            (run_dir / LABELS_FILE).write_text(json.dumps(meta, indent=2) + "\n")
            log("thresholds tuned on val (best F1 per label): " + ", ".join(
                f"{n} {t:.3f}" for n, t in zip(labels, meta["thresholds"])))
        for name, probs in out.items():
            enc = st["enc"][name]
            m = evaluate_and_report(probs, enc.labels, labels, run_dir / "eval", name, positive,
                                    extra={"checkpoint": str(ckpt), "truncated": enc.truncated}, problem=problem,
                                    thresholds=meta.get("thresholds"))
            results[name] = {k: m[k] for k in SUMMARY_KEYS if k in m}
            if name == "test":
                log(f"test set ({len(enc)} examples, checkpoint {ckpt.name}):\n" + metrics_table(m))
        return results

    def load(self, run_dir, which: str = "best", device: str = "cpu"):
        return load_classifier(run_dir, which, device)

    def evaluate_file(self, run_dir, file, out=None, which: str = "best", log=print, **kw) -> dict:
        return evaluate_file(run_dir, file, out, which, log=log)

    def predict_file(self, run_dir, file, out=None, which: str = "best", log=print) -> Path:
        return predict_file(run_dir, file, out, which, log=log)


TASK = ClassifyTask()


def _head(cfg: ClassifyConfig, backbone, labels: list[str], train, weights):
    """(model, objective, a note for the model summary, labels.json entries) of the run's `problem`."""
    if cfg.problem == "regression":  # the linear layer learns the standardised target
        y = np.asarray(train.labels)
        scale = {"target_mean": float(y.mean()), "target_std": float(y.std()) or 1.0}
        return (SequenceRegressor(backbone, cfg.pooling, cfg.head_dropout, *scale.values()), RegressionObjective(),
                "regression (one output, MSE)", scale)
    model = SequenceClassifier(backbone, len(labels), cfg.pooling, cfg.head_dropout)
    if cfg.problem == "multi_label":
        return (model, MultiLabelObjective(), f"{len(labels)} labels (multi-label: a sigmoid each, binary "
                "cross-entropy)", {"label_sep": cfg.data.label_sep, "thresholds": [cfg.threshold] * len(labels)})
    return model, ClassificationObjective(weights, cfg.distill.alpha, cfg.distill.temperature), \
        f"{len(labels)} classes", {}


def _val_metrics(problem: str, out, y, meta: dict) -> dict:
    if problem == "multi_label":
        return multilabel_val_metrics(out, y, meta["thresholds"])
    return regression_val_metrics(out, y) if problem == "regression" else val_metrics(out, y, len(meta["labels"]))


def _mask_token(tokenizer, token_mask: float) -> tuple[int | None, list[int]]:
    """The tokenizer's mask token id and its special token ids, for `token_mask` augmentation."""
    if not token_mask:
        return None, []
    mask_id, special = special_ids(tokenizer.get_vocab(with_added_tokens=True))
    if mask_id is None:
        raise KilnError("token_mask needs a tokenizer with a [MASK] or <mask> token; this one has none "
                        "(a WordPiece tokenizer or a BERT-style checkpoint has one)")
    return mask_id, special


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


def read_file(path: str, cfg: ClassifyConfig, log, require_label: bool = True):
    rows, report = tables.read_examples(path, cfg.data.text_field, cfg.data.label_field, cfg.data.text_pair_field,
                                       require_label=require_label, fmt=cfg.data, problem=cfg.problem)
    for line in report.lines():
        log(line)
    return rows, report


def load_splits(cfg: ClassifyConfig, log) -> tuple[dict, list[str], dict]:
    """({train,val,test: examples}, label names, data report)."""
    d = cfg.data
    if not d.train:
        raise KilnError("data.train is empty: name the training file (--data.train FILE)")
    report: dict = {"files": {}, "skipped_empty_text": {}}
    given = {}
    for name in ("train", "val", "test"):
        path = getattr(d, name)
        if path:
            given[name], r = read_file(path, cfg, log)
            report["files"][name] = path
            report["skipped_empty_text"][path] = r.empty_text
    train = given.pop("train")
    if d.dedup:
        train, dropped = tables.dedup(train)
        report["duplicates_dropped"] = dropped
        if dropped:
            log(f"{d.train}: dropped {dropped} exact duplicate row(s)")
    regression = cfg.problem == "regression"
    labels = [d.label_field] if regression else tables.label_names(train)
    if len(labels) < 2 and not regression:
        raise KilnError(f"{d.train}: a classifier needs at least 2 labels in column {d.label_field!r}; "
                        f"found {len(labels)} ({', '.join(labels)})")
    for name, rows in given.items():
        if not regression:
            tables.check_labels(rows, labels, getattr(d, name), d.train)
    split_seed = cfg.seed if d.split_seed < 0 else d.split_seed
    tr, va, te, info = tables.split_examples(train, 0.0 if "val" in given else d.val_fraction,
                                            0.0 if "test" in given else d.test_fraction, split_seed, log=log,
                                            method=d.split if cfg.problem == "single_label" else "shuffle")
    report.update(groups=info["groups"], conflicting_texts=info["conflicting_texts"],
                  single_example_labels=info["single_example_labels"])
    if info["conflicting_texts"]:
        log(f"warning: {info['conflicting_texts']} text(s) occur with more than one label (kept, each in one split)")
    splits = {"train": tr, "val": given.get("val", va), "test": given.get("test", te)}
    for name in ("val", "test"):
        if name in given:
            n = tables.overlap(splits["train"], splits[name])
            report[f"{name}_texts_also_in_train"] = n
            if n:
                log(f"warning: {n} {name} example(s) in {getattr(d, name)} have a text that is also in train")
    report["splits"] = {name: {"n": len(rows), "labels": target_summary(rows) if regression else
                               tables.label_counts(rows, labels),
                               "fingerprint": tables.fingerprint(rows)} for name, rows in splits.items()}
    return splits, labels, report
