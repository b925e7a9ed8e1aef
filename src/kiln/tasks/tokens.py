"""`kiln finetune tokens`: token classification (NER, POS) on the shared driver; `kiln predict` writes each
sentence's tags and entities with their character spans, `kiln eval` entity precision/recall/F1.

    kiln finetune tokens configs/ner-austen.yaml --data.train train.conll --init path/to/minilm

Read the sentences (kiln.data.conll: CoNLL columns or JSONL; the tag scheme from data.scheme or the tags) ->
the backbone (a kiln run, or a Hugging Face folder imported into <run>/base) -> sub-tokens with a label on
each word's first sub-token (the others IGNORE_INDEX) -> kiln.model.heads.TokenClassifier -> cross-entropy
over the labelled positions -> best checkpoint by val entity F1 -> seqeval metrics (kiln.eval.tokens).

Run folder: tokens.yaml, run.json (kind tokens; labels, scheme), tokenizer.json, data.json, checkpoints/, eval/
(val.json, test.json, *_predictions.jsonl, summary.json), metrics.csv, log.txt, base/.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kiln.constants import IGNORE_INDEX
from kiln.data import conll
from kiln.data.conll import CONFIG_FILE, TokensConfig
from kiln.errors import KilnError
from kiln.eval.tokens import entities, metrics_table, token_metrics
from kiln.model.heads import TokenClassifier
from kiln.tasks.base import Data, EpochTask, Prepared, eval_batch_size
from kiln.tasks.backbone import adopt_backbone
from kiln.tasks.qa import FINETUNED, load_task_run, pad_rows
from kiln.train.objectives import model_inputs


def collate(w, index, pad_id: int) -> dict:
    index = [int(i) for i in index]
    batch = {"input_ids": pad_rows([w.ids[i] for i in index], pad_id),
             "attention_mask": pad_rows([[1] * len(w.ids[i]) for i in index], 0).bool(),
             "labels": pad_rows([w.labels[i] for i in index], IGNORE_INDEX)}
    if w.types is not None:
        batch["token_type_ids"] = pad_rows([w.types[i] for i in index], 0)
    return batch


class TokenObjective:
    """Cross-entropy of every labelled position (a word's first sub-token), summed; the count is the target."""

    def targets(self, batch) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def loss(self, model, batch) -> torch.Tensor:
        logits = model(**model_inputs(batch)).float()
        return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum")


class WordBatches:
    """Micro-batch `i` of a seeded per-epoch shuffle of the training sentences (batches of similar lengths): a
    pure function of i."""

    def __init__(self, w, batch_size: int, seed: int, pad_id: int):
        from kiln.data.batches import EpochSampler

        self.w, self.pad_id, self.sampler = w, pad_id, EpochSampler(w.lengths, batch_size, seed, bucket=8)

    def batch(self, i: int) -> dict:
        return collate(self.w, self.sampler.indices(i), self.pad_id)


@torch.no_grad()
def predict_tags(model, w, sents, labels: list[str], batch_size: int, pad_id: int, device: str = "cpu"):
    """(a tag per word of every sentence, mean loss per labelled word). A word the model never saw (cut at
    max_length, or no sub-token) is tagged O."""
    from kiln.data.batches import by_length

    was_training = model.training
    model.eval()
    default = "O" if "O" in labels else labels[0]
    tags, total, n = [[default] * len(s.tokens) for s in sents], 0.0, 0
    for idx in by_length(w.lengths, batch_size):
        batch = {k: v.to(device) for k, v in collate(w, idx, pad_id).items()}
        z = model(**model_inputs(batch)).float()
        total += float(F.cross_entropy(z.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX,
                                       reduction="sum"))
        n += int((batch["labels"] != IGNORE_INDEX).sum())
        best = z.argmax(-1).cpu().numpy()
        for r, i in enumerate(idx):
            first = w.words[i]
            for p in np.flatnonzero(first >= 0):
                tags[i][first[p]] = labels[best[r, p]]
    model.train(was_training)
    return tags, total / max(n, 1)


def scheme_of_labels(labels: list[str]) -> str:
    prefixes = {t[0] for t in labels if len(t) > 2 and t[1] == "-"}
    return "BIOES" if prefixes & set("ES") else "IOB2" if prefixes else "none"


class TokensTask(EpochTask):
    name, config_cls, config_file = "tokens", TokensConfig, CONFIG_FILE
    usage = "kiln finetune tokens [CONFIG.yaml] --data.train FILE --init RUN_OR_HF_DIR [--section.key VALUE ...]"
    example = "configs/ner-austen.yaml"
    batch_unit = "sentences"

    def read(self, cfg: TokensConfig, log) -> Data:
        d = cfg.data
        if not d.train:
            raise KilnError("data.train is empty: name the training file (--data.train FILE)")
        given = {n: conll.read_sentences(getattr(d, n), d) for n in ("train", "val", "test") if getattr(d, n)}
        for n, s in given.items():
            log(f"{getattr(d, n)}: {len(s)} sentence(s), {sum(len(x.tokens) for x in s)} token(s)")
        train = given.pop("train")
        dropped = 0
        if d.dedup:
            keep = list({s.key: s for s in reversed(train)}.values())[::-1]
            train, dropped = keep, len(train) - len(keep)
        scheme = conll.detect_scheme([s.tags for s in train]) if d.scheme == "auto" else d.scheme
        for n, s in [("train", train), *given.items()]:
            conll.check_tags(s, scheme, getattr(d, n))
        labels = conll.label_names(train)
        for n, sents in given.items():
            for s in sents:
                if unknown := [t for t in s.tags if t not in labels]:
                    raise KilnError(f"{getattr(d, n)}:{s.line}: tag {unknown[0]!r} does not occur in {d.train} "
                                    f"(known: {', '.join(labels)})")
        seed = cfg.seed if d.split_seed < 0 else d.split_seed
        tr, va, te = conll.split_sentences(train, 0.0 if "val" in given else d.val_fraction,
                                           0.0 if "test" in given else d.test_fraction, seed)
        splits = {"train": tr, "val": given.get("val", va), "test": given.get("test", te)}
        log(f"scheme {scheme}{' (from the training tags)' if d.scheme == 'auto' else ''}; {len(labels)} labels: "
            + ", ".join(labels) + "; splits: " + ", ".join(f"{n} {len(s)}" for n, s in splits.items())
            + (f"; dropped {dropped} duplicate sentence(s)" if dropped else ""))
        report = {"files": {n: getattr(d, n) for n in ("train", "val", "test") if getattr(d, n)}, "scheme": scheme,
                  "labels": labels, "duplicates_dropped": dropped, "splits": {n: len(s) for n, s in splits.items()}}
        return Data(splits, report, {"labels": labels, "scheme": scheme})

    def prepare(self, cfg: TokensConfig, run_dir: Path, data: Data, device: str, log) -> Prepared:
        backbone, tokenizer, init_info = adopt_backbone(cfg, run_dir, log, refuse=FINETUNED)
        labels, scheme = data.extra["labels"], data.extra["scheme"]
        index = {t: i for i, t in enumerate(labels)}
        enc = {n: _encode(tokenizer, s, index, cfg, cfg.data.train if n == "train" else n)
               for n, s in data.splits.items()}
        data.report["truncated"] = {n: w.truncated for n, w in enc.items()}
        if any(w.truncated for w in enc.values()):
            log("truncation: " + ", ".join(f"{n} {w.truncated}" for n, w in enc.items()) + " sentence(s) longer than "
                f"data.max_length {cfg.data.max_length} sub-tokens: their last words are never seen (tagged O)")
        model, pad_id = TokenClassifier(backbone, len(labels), cfg.head_dropout), cfg.model.pad_id
        data.report["init"] = init_info
        meta = {"labels": labels, "scheme": scheme, "max_length": cfg.data.max_length}

        def save(run_dir: Path) -> None:
            tokenizer.save(str(run_dir / "tokenizer.json"))

        val, val_rows, evaluate = enc["val"], data.splits["val"], None
        if len(val):
            def evaluate(m):
                tags, loss = predict_tags(m, val, val_rows, labels, eval_batch_size(cfg), pad_id, device)
                r = token_metrics([s.tags for s in val_rows], tags, scheme)
                return {"val_loss": loss, "val_f1": r["f1"], "val_precision": r["precision"],
                        "val_recall": r["recall"], "val_accuracy": r["accuracy"]}
        notes = [f"{cfg.model.arch} backbone ({init_info['kind']}: {cfg.init})", f"{len(labels)} labels ({scheme})"]
        return Prepared(model, TokenObjective(), WordBatches(enc["train"], cfg.train.batch_size, cfg.seed, pad_id).batch,
                        len(enc["train"]), evaluate, cfg.metric, meta, save, notes=notes,
                        state={"enc": enc, "rows": data.splits, "device": device})

    def test(self, cfg, prep: Prepared, model, ckpt: Path, run_dir: Path, log) -> dict:
        results = {}
        for name, w, rows in self.held_out(prep):
            m = _score(model, rows, w, cfg, prep.meta, prep.state["device"], run_dir / "eval" / f"{name}.json",
                       {"checkpoint": str(ckpt)}, log if name == "test" else None)
            results[name] = {k: m[k] for k in ("f1", "precision", "recall", "accuracy", "macro_f1") if k in m}
        return results

    def load(self, run_dir, which: str = "best", device: str = "cpu"):
        """(TokenClassifier, tokenizer or None, TokensConfig, run.json) of a tokens run (trained, or imported)."""
        model, tok, cfg, info = load_task_run(run_dir, which, device, CONFIG_FILE, TokensConfig,
                                              lambda b, cfg, info: TokenClassifier(b, len(info["labels"]),
                                                                                   cfg.head_dropout))
        info.setdefault("scheme", scheme_of_labels(info["labels"]))
        return model, tok, cfg, info

    def evaluate_file(self, run_dir, file, out=None, which: str = "best", log=print, **kw) -> dict:
        model, cfg, info, rows, w = _run_on(run_dir, file, which, True)
        for s in rows:
            if unknown := [t for t in s.tags if t not in info["labels"]]:
                raise KilnError(f"{file}:{s.line}: tag {unknown[0]!r} is not a label of this run "
                                f"({', '.join(info['labels'])})")
        out = Path(out) if out else Path(run_dir) / "eval" / f"{Path(file).stem}.json"
        return _score(model, rows, w, cfg, info, "cpu", out, {"file": str(file)}, log)

    def predict_file(self, run_dir, file, out=None, which: str = "best", log=print) -> Path:
        model, cfg, info, rows, w = _run_on(run_dir, file, which, False)
        tags, _ = predict_tags(model, w, rows, info["labels"], eval_batch_size(cfg), cfg.model.pad_id)
        out = Path(out) if out else Path(run_dir) / "predictions" / f"{Path(file).stem}.jsonl"
        _write(out, rows, tags, info["scheme"])
        log(f"wrote the tags of {len(rows)} sentence(s) to {out}")
        return out


TASK = TokensTask()


def _encode(tokenizer, sents, index, cfg, where: str):
    return conll.encode_words(tokenizer, sents, index, cfg.data.max_length, cfg.model.vocab_size,
                              cfg.model.type_vocab_size, where)


def _run_on(run_dir, file, which, require_tags: bool):
    model, tokenizer, cfg, info = TASK.load(run_dir, which)
    if tokenizer is None:
        raise KilnError(f"{run_dir} has no tokenizer.json: copy the model's tokenizer.json into it")
    rows = conll.read_sentences(file, cfg.data, require_tags=require_tags)
    index = {t: i for i, t in enumerate(info["labels"])}
    return model, cfg, info, rows, _encode(tokenizer, rows, index, cfg, str(file))


def _write(out: Path, rows, tags, scheme: str) -> None:
    """JSONL: per sentence its line, text, tokens, predicted tags and entities (type, text, character span in
    the text, token span)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for s, t in zip(rows, tags):
            ents = [{"type": k, "text": s.text[s.spans[a][0]:s.spans[b - 1][1]], "start": s.spans[a][0],
                     "end": s.spans[b - 1][1], "tokens": [a, b]} for k, a, b in entities(t, scheme)]
            f.write(json.dumps({"line": s.line, "text": s.text, "tokens": s.tokens, "tags": t, "entities": ents},
                               ensure_ascii=False) + "\n")


def _score(model, rows, w, cfg, meta: dict, device: str, out: Path, extra: dict, log) -> dict:
    tags, loss = predict_tags(model, w, rows, meta["labels"], eval_batch_size(cfg), cfg.model.pad_id, device)
    m = {**token_metrics([s.tags for s in rows], tags, meta["scheme"]), "loss": loss, "truncated": w.truncated,
         **extra}
    _write(out.with_name(out.stem + "_predictions.jsonl"), rows, tags, meta["scheme"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(m, indent=2) + "\n")
    if log is not None:
        log(metrics_table(m))
        log(f"wrote {out}")
    return m
