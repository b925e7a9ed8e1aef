"""Using a finished classifier run: loading it, and a run (or an ensemble of runs, "RUN1,RUN2,...") on a file: `kiln predict` writes class
probabilities as CSV, `kiln eval` scores a labelled file (table, JSON and plots). The file is read once; each run
encodes it through its own tokenizer and the ensemble averages their class probabilities (multi_label: label
probabilities, regression: predictions)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from kiln.config import ClassifyConfig, load_config
from kiln.data import tables
from kiln.errors import KilnError
from kiln.model.heads import SequenceClassifier, SequenceRegressor
from kiln.run.checkpoint import find_checkpoint, load_weights
from kiln.run.load import build_model
from kiln.tasks.base import eval_batch_size
from kiln.tasks.text_inputs import encode_examples, predict_logits, predict_probs, prepare_tokenizer


CONFIG_FILE, LABELS_FILE = "classify.yaml", "labels.json"


def evaluate_and_report(probs, y, labels, out_dir: Path, prefix: str, positive: int | None = None,
                        extra: dict | None = None, problem: str = "single_label", thresholds=None) -> dict:
    from kiln.eval.classification import classification_metrics, multilabel_metrics, write_report

    if problem == "regression":
        from kiln.eval.regression import regression_metrics, write_regression_report

        m = regression_metrics(y, probs)
        write_regression_report(m, y, probs, out_dir, prefix, extra)
        return m
    m = multilabel_metrics(y, probs, labels, thresholds) if problem == "multi_label" else \
        classification_metrics(y, probs, labels, positive)
    write_report(m, y, probs, labels, out_dir, prefix, extra)
    return m


def scores(model, enc, batch_size: int, pad_id: int, problem: str, device: str = "cpu") -> np.ndarray:
    """Class probabilities [n, k] (single_label: softmax), label probabilities [n, k] (multi_label: a sigmoid
    each) or predictions [n] (regression) of an encoded split, in fp32."""
    if problem == "single_label":
        return predict_probs(model, enc, batch_size, pad_id, device, "fp32")
    z = predict_logits(model, enc, batch_size, pad_id, device, "fp32")
    return 1.0 / (1.0 + np.exp(-z)) if problem == "multi_label" else z[:, 0]


def read_meta(run_dir: Path) -> dict:
    """labels.json of a classifier run: labels, fields, pooling, problem, thresholds / target scale."""
    try:
        meta = json.loads((run_dir / LABELS_FILE).read_text(encoding="utf-8"))
        meta["labels"] = list(meta["labels"])
        return meta
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise KilnError(f"{run_dir / LABELS_FILE}: cannot read the label names ({type(e).__name__})") from None


def load_classifier(run_dir: str | Path, which: str = "best", device: str = "cpu"):
    """(SequenceClassifier, tokenizer, ClassifyConfig, label names) of a `kiln finetune classify` run folder."""
    from kiln.data.tokenizer import load_tokenizer

    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        hint = " (a pretraining run: fine-tune it first with `kiln finetune classify --init`)" \
            if (run_dir / "config.yaml").is_file() else ""
        raise KilnError(f"{run_dir} is not a classifier run folder (no {CONFIG_FILE}){hint}")
    cfg = load_config(run_dir / CONFIG_FILE, cls=ClassifyConfig)
    meta = read_meta(run_dir)
    labels = meta["labels"]
    ckpt = find_checkpoint(which) if which not in ("best", "latest") else find_checkpoint(run_dir, which)
    backbone, pooling = build_model(cfg.model, device), meta.get("pooling", cfg.pooling)
    model = (SequenceRegressor(backbone, pooling, cfg.head_dropout, meta["target_mean"], meta["target_std"])
             if cfg.problem == "regression" else
             SequenceClassifier(backbone, len(labels), pooling, cfg.head_dropout)).to(device)
    load_weights(model, ckpt / "model.safetensors")
    model.eval()
    return model, load_tokenizer(run_dir / "tokenizer.json"), cfg, labels


def run_folders(run_dir: str | Path, what: str = "") -> list[Path]:
    """One classifier run folder, or several comma-separated (an ensemble)."""
    text = str(run_dir)
    if "," not in text or Path(text).exists():
        return [Path(text)]
    runs = [Path(r.strip()) for r in text.split(",") if r.strip()]
    if not runs:
        raise KilnError(f"{what + ' ' if what else ''}{text!r} names no run folder")
    return runs


def write_predictions(out: Path, cfg, labels: list[str], rows, probs: np.ndarray, thresholds=None) -> None:
    """multi_label: the prediction is the labels at or above their thresholds, joined by data.label_sep;
    regression: the predicted number (no probability columns)."""
    pair, reg = bool(cfg.data.text_pair_field), cfg.problem == "regression"
    has_label = any(r.label is not None for r in rows)
    header = ["line", cfg.data.text_field] + ([cfg.data.text_pair_field] if pair else []) + \
             ([cfg.data.label_field] if has_label else []) + ["prediction"] + ([] if reg else [f"p_{n}" for n in labels])
    with open(out, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r, p in zip(rows, probs):
            pred = [f"{p:.6g}"] if reg else [labels[int(p.argmax())]] if thresholds is None else \
                [cfg.data.label_sep.join(n for n, x, t in zip(labels, p, thresholds) if x >= t)]
            w.writerow([r.line, r.text] + ([r.pair] if pair else []) + ([r.label or ""] if has_label else [])
                       + pred + ([] if reg else [f"{x:.6f}" for x in p]))


def _predict_file(runs: list[Path], file: Path, which: str, require_label: bool, log):
    """(config, label names, rows, data report, encoded rows, class probabilities, thresholds) of a run on a
    file; for several runs (an ensemble) the mean of their class probabilities (multi_label: label probabilities
    and thresholds; regression: predictions). The file is read once; each run encodes it through its own
    tokenizer."""
    probs, thresholds, rows = [], [], None
    for r in runs:
        model, tokenizer, cfg_r, labels_r = load_classifier(r, which)
        fields = (cfg_r.data.text_field, cfg_r.data.text_pair_field)
        if rows is None:
            cfg, labels = cfg_r, labels_r
            problem = cfg.problem
            rows, report = tables.read_examples(file, cfg.data.text_field, cfg.data.label_field,
                                               cfg.data.text_pair_field, require_label=require_label, fmt=cfg.data,
                                               problem=problem)
            for line in report.lines():
                log(line)
            if require_label and problem != "regression":
                tables.check_labels(rows, labels, str(file), "the training data of this run")
            index = {name: i for i, name in enumerate(labels)}
            known = all(row.target is not None if problem != "single_label" else row.label in index
                        for row in rows)  # labels to score against (else predictions only)
        elif labels_r != labels or cfg_r.problem != problem:
            raise KilnError(f"{r} has labels {labels_r}, {runs[0]} has {labels}: an ensemble needs the same "
                            "labels in the same order" if labels_r != labels else f"{r} is a {cfg_r.problem} run, "
                            f"{runs[0]} a {problem} run: an ensemble needs the same problem")
        elif fields != (cfg.data.text_field, cfg.data.text_pair_field):
            raise KilnError(f"{r} reads the text columns {fields}, {runs[0]} reads "
                            f"{(cfg.data.text_field, cfg.data.text_pair_field)}: an ensemble needs the same")
        enc_r = encode_examples(prepare_tokenizer(tokenizer, cfg_r.data.max_length), rows, index if known else None,
                                cfg_r.model, str(file), problem)
        if not probs:
            enc = enc_r  # the first run's encoding: its labels and truncation count are reported
        pad = cfg_r.model.pad_id
        probs.append(scores(model, enc_r, eval_batch_size(cfg_r), pad, problem))
        thresholds.append(read_meta(r).get("thresholds") or [cfg_r.threshold] * len(labels))
        del model
    if len(runs) > 1:
        log(f"ensemble of {len(runs)} runs: their " + ("predictions" if problem == "regression" else
                                                       "class probabilities") + " averaged")
    thresholds = np.mean(thresholds, axis=0).tolist() if problem == "multi_label" else None
    return cfg, labels, rows, report, enc, np.mean(probs, axis=0), thresholds


def _default_name(runs: list[Path], file: Path) -> str:
    return f"{file.stem}-ensemble{len(runs)}" if len(runs) > 1 else file.stem


def predict_file(run_dir: str | Path, file: str | Path, out: str | Path | None = None, which: str = "best",
                 log=print) -> Path:
    """Write a CSV: line, text, [text_pair], [label], prediction, p_<label> for every label. `run_dir` may
    name several runs, comma-separated: their ensemble (class probabilities averaged)."""
    runs, file = run_folders(run_dir), Path(file)
    cfg, labels, rows, report, enc, probs, thresholds = _predict_file(runs, file, which, False, log)
    out = Path(out) if out else runs[0] / "predictions" / f"{_default_name(runs, file)}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_predictions(out, cfg, labels, rows, probs, thresholds)
    log(f"wrote {len(rows)} prediction(s) to {out}" + (f" (skipped {report.empty_text} empty text(s))"
                                                        if report.empty_text else ""))
    return out


def evaluate_file(run_dir: str | Path, file: str | Path, out: str | Path | None = None, which: str = "best",
                  log=print) -> dict:
    """Metrics of a run (or of comma-separated runs: their ensemble) on a labelled file: printed as a table,
    written as JSON (+ plots beside it)."""
    from kiln.eval.classification import metrics_table

    runs, file = run_folders(run_dir), Path(file)
    cfg, labels, rows, report, enc, probs, thresholds = _predict_file(runs, file, which, True, log)
    out = Path(out) if out else runs[0] / "eval" / f"{_default_name(runs, file)}.json"
    positive = labels.index(cfg.positive_label) if cfg.positive_label in labels else None
    m = evaluate_and_report(probs, enc.labels, labels, out.parent, out.stem, positive,
                            extra={"file": str(file), "skipped_empty_text": report.empty_text,
                                   "truncated": enc.truncated, "runs": [str(r) for r in runs]},
                            problem=cfg.problem, thresholds=thresholds)
    log(f"{file}: {len(rows)} example(s)" + (f", {enc.truncated} cut at max_length {cfg.data.max_length}"
                                             if enc.truncated else ""))
    log(metrics_table(m))
    log(f"wrote {out}")
    return m
