"""`kiln finetune qa`: extractive question answering (SQuAD v1.1 / v2.0) on the shared driver; `kiln predict`
writes each answer with its character span and score, `kiln eval` exact match and F1.

    kiln finetune qa configs/qa-shakespeare.yaml --data.train train-v2.0.json --init path/to/minilm

Read the questions (kiln.data.squad; split by context, seeded) -> the backbone (a kiln run, or a Hugging Face
folder imported into <run>/base) -> windows of question + context piece (data.max_length, data.doc_stride) ->
kiln.model.heads.SpanHead -> cross-entropy of the start and end token (the [CLS] position where the window
does not hold the answer) -> best checkpoint by val F1 -> n-best answers over all windows of a question and
SQuAD's exact match / F1 (kiln.eval.qa).

Run folder: qa.yaml, run.json (kind qa; null_answers), tokenizer.json, data.json, checkpoints/, eval/ (val.json,
test.json, *_predictions.jsonl, summary.json), metrics.csv, log.txt, base/.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kiln.data.squad import CONFIG_FILE, QAConfig, encode_windows, read_squad, split_by_context
from kiln.errors import KilnError
from kiln.eval.qa import best_answers, squad_scores
from kiln.model.heads import SpanHead
from kiln.tasks.base import Data, EpochTask, Prepared, eval_batch_size
from kiln.tasks.backbone import adopt_backbone
from kiln.train.objectives import model_inputs

FINETUNED = ("qa.yaml", "tokens.yaml", "classify.yaml", "seq2seq.yaml")  # run kinds that are no backbone


def pad_rows(rows: list[list[int]], value: int) -> torch.Tensor:
    """Right-padded [len(rows), longest] tensor."""
    out = torch.full((len(rows), max(len(r) for r in rows)), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.as_tensor(r, dtype=torch.long)
    return out


def collate(win, index, pad_id: int) -> dict:
    index = [int(i) for i in index]
    ids = pad_rows([win.ids[i] for i in index], pad_id)
    batch = {"input_ids": ids, "attention_mask": pad_rows([[1] * len(win.ids[i]) for i in index], 0).bool()}
    if win.types is not None:
        batch["token_type_ids"] = pad_rows([win.types[i] for i in index], 0)
    batch["start_positions"] = torch.as_tensor(win.starts[index])
    batch["end_positions"] = torch.as_tensor(win.ends[index])
    return batch


class SpanObjective:
    """Cross-entropy of the start token plus that of the end token, halved (Hugging Face's QA loss), summed
    over windows; padding positions are never a candidate."""

    def targets(self, batch) -> int:
        return int(batch["start_positions"].shape[0])

    def loss(self, model, batch) -> torch.Tensor:
        return span_loss(model(**model_inputs(batch)), batch)


def span_loss(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    logits = logits.float().masked_fill(~batch["attention_mask"].unsqueeze(-1), -1e4)
    return (F.cross_entropy(logits[..., 0], batch["start_positions"], reduction="sum")
            + F.cross_entropy(logits[..., 1], batch["end_positions"], reduction="sum")) / 2


@torch.no_grad()
def predict_spans(model, win, batch_size: int, pad_id: int, device: str = "cpu"):
    """(start logits, end logits) per window (numpy, the window's length) and the mean loss per window."""
    from kiln.data.batches import by_length

    was_training = model.training
    model.eval()
    starts, ends, total = [None] * len(win), [None] * len(win), 0.0
    for idx in by_length(win.lengths, batch_size):
        batch = {k: v.to(device) for k, v in collate(win, idx, pad_id).items()}
        z = model(**model_inputs(batch)).float()
        total += float(span_loss(z, batch))
        z = z.cpu().numpy()
        for r, i in enumerate(idx):
            n = int(win.lengths[i])
            starts[i], ends[i] = z[r, :n, 0], z[r, :n, 1]
    model.train(was_training)
    return starts, ends, total / max(len(win), 1)


def answer(model, examples, win, cfg: QAConfig, null_answers: bool, pad_id: int, device: str = "cpu"):
    starts, ends, loss = predict_spans(model, win, eval_batch_size(cfg), pad_id, device)
    q = cfg.qa
    return best_answers(examples, win, starts, ends, q.n_best, q.max_answer_length, null_answers,
                        q.null_threshold), loss


class QABatches:
    """Micro-batch `i` of a seeded per-epoch shuffle of the training windows (batches of similar lengths): a
    pure function of i."""

    def __init__(self, win, batch_size: int, seed: int, pad_id: int):
        from kiln.data.batches import EpochSampler

        self.win, self.pad_id = win, pad_id
        self.sampler = EpochSampler(win.lengths, batch_size, seed, bucket=8)  # little padding

    def batch(self, i: int) -> dict:
        return collate(self.win, self.sampler.indices(i), self.pad_id)


def _encode(tokenizer, rows, cfg: QAConfig, where: str):
    d, m = cfg.data, cfg.model
    return encode_windows(tokenizer, rows, d.max_length, d.doc_stride, d.max_question_length, m.vocab_size,
                          m.type_vocab_size, where)


class QATask(EpochTask):
    name, config_cls, config_file = "qa", QAConfig, CONFIG_FILE
    usage = "kiln finetune qa [CONFIG.yaml] --data.train FILE.json --init RUN_OR_HF_DIR [--section.key VALUE ...]"
    example = "configs/qa-shakespeare.yaml"
    batch_unit = "windows"

    def check(self, cfg: QAConfig) -> None:
        if cfg.data.doc_stride >= cfg.data.max_length // 2:
            raise KilnError(f"data.doc_stride {cfg.data.doc_stride} must be < half of data.max_length "
                            f"{cfg.data.max_length} (consecutive windows share doc_stride tokens)")

    def read(self, cfg: QAConfig, log) -> Data:
        d = cfg.data
        if not d.train:
            raise KilnError("data.train is empty: name the training file (--data.train FILE.json)")
        given = {}
        for name in ("train", "val", "test"):
            if getattr(d, name):
                given[name], report = read_squad(getattr(d, name))
                log(report.line())
        seed = cfg.seed if d.split_seed < 0 else d.split_seed
        tr, va, te = split_by_context(given["train"], 0.0 if "val" in given else d.val_fraction,
                                      0.0 if "test" in given else d.test_fraction, seed)
        splits = {"train": tr, "val": given.get("val", va), "test": given.get("test", te)}
        if not tr:
            raise KilnError(f"{d.train}: no training questions left after the split")
        null = cfg.qa.null_answers == "true" or (cfg.qa.null_answers == "auto" and any(e.impossible for e in tr))
        counts = {n: {"questions": len(r), "unanswerable": sum(e.impossible for e in r),
                      "contexts": len({e.context for e in r})} for n, r in splits.items()}
        log("splits: " + ", ".join(f"{n} {c['questions']} ({c['contexts']} contexts, {c['unanswerable']} "
                                   "unanswerable)" for n, c in counts.items())
            + f"; null answers {'on' if null else 'off'}")
        report = {"files": {n: getattr(d, n) for n in given}, "splits": counts, "null_answers": null}
        return Data(splits, report, {"null_answers": null})

    def prepare(self, cfg: QAConfig, run_dir: Path, data: Data, device: str, log) -> Prepared:
        backbone, tokenizer, init_info = adopt_backbone(cfg, run_dir, log, refuse=FINETUNED)
        enc = {n: _encode(tokenizer, rows, cfg, cfg.data.train if n == "train" else n)
               for n, rows in data.splits.items()}
        report = data.report
        report["windows"] = {}
        for n, w in enc.items():
            per = np.bincount(w.example, minlength=len(data.splits[n])) if len(w) else np.zeros(0, dtype=int)
            held = np.zeros(len(data.splits[n]), dtype=bool)
            held[w.example[w.starts > 0]] = True
            lost = sum(1 for i, e in enumerate(data.splits[n]) if not e.impossible and not held[i])
            report["windows"][n] = {"windows": len(w), "questions_over_several_windows": int((per > 1).sum()),
                                    "answers_in_no_window": lost, "questions_cut": w.questions_cut}
            log(f"windows: {n} {len(w)} for {len(data.splits[n])} questions ({int((per > 1).sum())} over several "
                f"windows; max_length {cfg.data.max_length}, doc_stride {cfg.data.doc_stride})"
                + (f"; {lost} answer(s) fit no window" if lost else "")
                + (f"; {w.questions_cut} question(s) cut" if w.questions_cut else ""))
        if not len(enc["train"]):
            raise KilnError(f"{cfg.data.train}: no training windows")
        model, pad_id, null = SpanHead(backbone), cfg.model.pad_id, data.extra["null_answers"]
        report["init"] = init_info
        meta = {"null_answers": null, "max_length": cfg.data.max_length, "doc_stride": cfg.data.doc_stride}

        def save(run_dir: Path) -> None:
            tokenizer.save(str(run_dir / "tokenizer.json"))

        val, val_rows, evaluate = enc["val"], data.splits["val"], None
        if len(val):
            def evaluate(m):
                answers, loss = answer(m, val_rows, val, cfg, null, pad_id, device)
                s = squad_scores({a["id"]: a["answer"] for a in answers}, val_rows)
                return {"val_loss": loss, "val_exact_match": s["exact_match"], "val_f1": s["f1"]}
        notes = [f"{cfg.model.arch} backbone ({init_info['kind']}: {cfg.init})", "start/end span head"]
        return Prepared(model, SpanObjective(), QABatches(enc["train"], cfg.train.batch_size, cfg.seed, pad_id).batch,
                        len(enc["train"]), evaluate, cfg.metric, meta, save, notes=notes,
                        state={"enc": enc, "rows": data.splits, "device": device})

    def test(self, cfg, prep: Prepared, model, ckpt: Path, run_dir: Path, log) -> dict:
        return {name: _score(model, rows, win, cfg, prep.meta["null_answers"], prep.state["device"],
                             run_dir / "eval" / f"{name}.json", {"checkpoint": str(ckpt)}, log if name == "test" else None)
                for name, win, rows in self.held_out(prep)}

    def load(self, run_dir, which: str = "best", device: str = "cpu"):
        """(SpanHead, tokenizer or None, QAConfig, run.json) of a qa run (trained, or imported from HF)."""
        return load_task_run(run_dir, which, device, CONFIG_FILE, QAConfig, lambda b, cfg, info: SpanHead(b))

    def evaluate_file(self, run_dir, file, out=None, which: str = "best", log=print, **kw) -> dict:
        model, tokenizer, cfg, info, rows, win = _run_on(run_dir, file, which)
        if all(e.impossible for e in rows) and not info.get("null_answers", False):
            raise KilnError(f"{file}: no question has a gold answer to score against (kiln predict writes the "
                            "answers alone)")
        out = Path(out) if out else Path(run_dir) / "eval" / f"{Path(file).stem}.json"
        return _score(model, rows, win, cfg, info.get("null_answers", False), "cpu", out, {"file": str(file)}, log)

    def predict_file(self, run_dir, file, out=None, which: str = "best", log=print) -> Path:
        model, tokenizer, cfg, info, rows, win = _run_on(run_dir, file, which)
        answers, _ = answer(model, rows, win, cfg, info.get("null_answers", False), cfg.model.pad_id)
        out = Path(out) if out else Path(run_dir) / "predictions" / f"{Path(file).stem}.jsonl"
        _write_answers(out, rows, answers)
        log(f"wrote {len(answers)} answer(s) to {out}")
        return out


TASK = QATask()


def load_task_run(run_dir, which, device, config_file, config_cls, make_model):
    """(model, tokenizer or None, config, run.json) of a fine-tuned task run: `make_model(backbone, config,
    run.json)` builds the head on the backbone the config describes; the checkpoint's weights load strictly."""
    from kiln.config import load_config
    from kiln.run.checkpoint import find_checkpoint, load_weights
    from kiln.run.folder import read_run_json
    from kiln.run.load import build_model, load_tokenizer_of

    run_dir = Path(run_dir)
    if not (run_dir / config_file).is_file():
        raise KilnError(f"{run_dir} is not a {config_file.split('.')[0]} run folder (no {config_file})")
    cfg, info = load_config(run_dir / config_file, cls=config_cls), read_run_json(run_dir)
    ckpt = find_checkpoint(which) if which not in ("best", "latest") else find_checkpoint(run_dir, which)
    model = make_model(build_model(cfg.model, device), cfg, info).to(device)
    load_weights(model, ckpt / "model.safetensors")
    model.eval()
    return model, load_tokenizer_of(run_dir), cfg, info


def _run_on(run_dir, file, which):
    model, tokenizer, cfg, info = TASK.load(run_dir, which)
    if tokenizer is None:
        raise KilnError(f"{run_dir} has no tokenizer.json: copy the model's tokenizer.json into it")
    rows, report = read_squad(file)
    return model, tokenizer, cfg, info, rows, _encode(tokenizer, rows, cfg, str(file))


def _write_answers(out: Path, rows, answers: list[dict]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for e, a in zip(rows, answers):
            f.write(json.dumps({"id": e.id, "question": e.question, **{k: v for k, v in a.items() if k != "id"}},
                               ensure_ascii=False) + "\n")


def _score(model, rows, win, cfg, null: bool, device: str, out: Path, extra: dict, log) -> dict:
    """EM/F1 of a run on questions: written as JSON (predictions beside it as JSONL), printed when `log`."""
    answers, loss = answer(model, rows, win, cfg, null, cfg.model.pad_id, device)
    s = squad_scores({a["id"]: a["answer"] for a in answers}, rows)
    m = {**s, "loss": loss, "windows": len(win), "null_answers": null, **extra}
    _write_answers(out.with_name(out.stem + "_predictions.jsonl"), rows, answers)
    out.write_text(json.dumps(m, indent=2) + "\n")
    if log is not None:
        log(f"{s['n']} question(s): exact match {s['exact_match']:.2f}, F1 {s['f1']:.2f}" + "".join(
            f"; {k.replace('_', ' ')} EM {s[k + '_exact_match']:.2f} F1 {s[k + '_f1']:.2f} ({s[k + '_n']})"
            for k in ("has_answer", "no_answer") if k + "_f1" in s))
        log(f"wrote {out}")
    return {k: v for k, v in m.items() if k in ("exact_match", "f1", "n", "has_answer_f1", "no_answer_f1")}
