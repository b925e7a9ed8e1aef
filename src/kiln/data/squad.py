"""Extractive question answering data: SQuAD v1.1 / v2.0 JSON (or the same fields as JSONL) -> questions,
split by context, and the tokenized windows a span head trains on.

    examples, report = read_squad("train-v2.0.json")
    train, val, test = split_by_context(examples, 0.1, 0.1, seed=0)
    win = encode_windows(tok, train, max_length=384, doc_stride=128, max_question_length=64)

Rules (each a one-line KilnError):
- JSON: SQuAD's {"data": [{"title", "paragraphs": [{"context", "qas": [{"id", "question", "answers":
  [{"text", "answer_start"}], "is_impossible"}]}]}]}; JSONL: one question per line with id, question, context
  and answers as a list of {"text", "answer_start"} or as {"text": [...], "answer_start": [...]} (Hugging
  Face datasets); `is_impossible` true or no answers = unanswerable (SQuAD v2.0);
- every answer_start must point at its answer text in the context (the error names the question);
- ids are unique (a missing id becomes `<file line or position>`).
Windows: the question and the context are encoded as a pair, the context alone cut into windows of
`max_length` tokens that overlap by `doc_stride` tokens (the fast tokenizer's overflow), with each token's
character offsets into the context. A window's labels are the answer's first and last token when the window
holds the whole answer, else the first position (the [CLS] token: "no answer here").
QAConfig (the `kiln finetune qa` config) lives here, below interop, so `kiln import hf` can write a qa run.
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kiln.config import EpochTrainConfig, _classify_train_defaults, _f
from kiln.data.encodings import decode_bytes
from kiln.errors import KilnError
from kiln.model.config import ModelConfig

CONFIG_FILE = "qa.yaml"  # the config file of a `kiln finetune qa` run (kiln.tasks.qa; kiln import hf writes it)


@dataclass
class QADataConfig:
    train: str = _f("", "training file: SQuAD v1.1/v2.0 .json, or .jsonl with id, question, context, answers")
    val: str = _f("", "validation file; empty = split off from train (whole contexts, seeded)")
    test: str = _f("", "test file; empty = split off from train")
    val_fraction: float = _f(0.1, "share of the contexts held out for validation when data.val is empty", range="[0, 1)")
    test_fraction: float = _f(0.1, "share of the contexts held out for test when data.test is empty", range="[0, 1)")
    split_seed: int = _f(-1, "seed of that split; -1 = the run's seed", range=">= -1")
    max_length: int = _f(384, "tokens per window: [CLS] question [SEP] a piece of the context [SEP]", range=">= 8")
    doc_stride: int = _f(128, "tokens that consecutive windows of a long context share", range=">= 0")
    max_question_length: int = _f(64, "question tokens kept; longer questions are cut and counted", range=">= 1")


@dataclass
class QAHeadConfig:
    n_best: int = _f(20, "start and end candidates per window, and spans kept per question", range=">= 1")
    max_answer_length: int = _f(30, "longest answer in tokens", range=">= 1")
    null_answers: str = _f("auto", "predict 'no answer' (SQuAD v2.0): auto (when the training data has "
                           "unanswerable questions) | true | false", choices=("auto", "true", "false"))
    null_threshold: float = _f(0.0, "answer nothing when the null score beats the best span by more than this",
                               range="any")


@dataclass
class QAConfig:
    """`kiln finetune qa`: a pretrained encoder + a start/end span head, fine-tuned on SQuAD-format data."""

    name: str = _f("qa", "run name; the run folder is runs/<name>-<timestamp> unless --out names it")
    out: str = _f("", "run folder (default runs/<name>-<timestamp>)")
    seed: int = _f(1337, "random seed for the split, the head's init, data order and dropout", range=">= 0")
    init: str = _f("", "backbone: a kiln run folder, or a Hugging Face model folder (imported into <run>/base)")
    init_checkpoint: str = _f("latest", "checkpoint of a kiln run used as init: latest | best | a folder")
    epochs: float = _f(2.0, "passes over the training windows (sets train.max_steps when that is 0)", range="> 0")
    warmup_fraction: float = _f(0.1, "share of the steps for linear warmup when train.warmup_steps is 0", range="[0, 1)")
    metric: str = _f("val_f1", "validation metric that picks the best checkpoint and drives early stopping",
                     choices=("val_loss", "val_exact_match", "val_f1"))
    patience: int = _f(0, "stop after this many evaluations without improvement of `metric`; 0 = never", range=">= 0")
    data: QADataConfig = field(default_factory=QADataConfig)
    qa: QAHeadConfig = field(default_factory=QAHeadConfig)
    train: EpochTrainConfig = field(default_factory=lambda: dataclasses.replace(_classify_train_defaults(), batch_size=16))
    model: ModelConfig = field(default_factory=ModelConfig,
                               metadata={"help": "written by kiln: the backbone's shape (read from init)"})


@dataclass
class QAExample:
    id: str
    question: str
    context: str
    answers: list[tuple[str, int]]  # (text, answer_start) of every gold answer; [] = unanswerable
    where: str = ""                 # "file: question 'id'" for errors
    title: str = ""

    @property
    def impossible(self) -> bool:
        return not self.answers


@dataclass
class QAReport:
    path: str
    questions: int = 0
    unanswerable: int = 0
    contexts: int = 0

    def line(self) -> str:
        return (f"{self.path}: {self.questions} question(s) over {self.contexts} context(s), "
                f"{self.unanswerable} unanswerable")


def _answers(raw, where: str) -> list[tuple[str, int]]:
    if isinstance(raw, dict):  # Hugging Face datasets: {"text": [...], "answer_start": [...]}
        texts, starts = raw.get("text") or [], raw.get("answer_start") or []
        if not isinstance(texts, list) or not isinstance(starts, list) or len(texts) != len(starts):
            raise KilnError(f"{where}: answers needs lists 'text' and 'answer_start' of one length")
        raw = [{"text": t, "answer_start": s} for t, s in zip(texts, starts)]
    if not isinstance(raw, list):
        raise KilnError(f"{where}: answers must be a list of {{text, answer_start}}, got {type(raw).__name__}")
    out = []
    for a in raw:
        if not isinstance(a, dict) or not isinstance(a.get("text"), str) or "answer_start" not in a:
            raise KilnError(f"{where}: an answer needs 'text' (a string) and 'answer_start'")
        s = a["answer_start"]
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise KilnError(f"{where}: answer_start must be an integer >= 0, got {s!r}")
        out.append((a["text"], s))
    return out


def _example(row: dict, where: str, context: str | None = None, title: str = "", ids: set | None = None,
             fallback_id: str = "") -> QAExample:
    if not isinstance(row, dict):
        raise KilnError(f"{where}: expected a JSON object for the question, got {type(row).__name__}")
    qid = str(row.get("id") if row.get("id") is not None else fallback_id)
    where = f"{where.split(':')[0]}: question {qid!r}"
    context = row.get("context") if context is None else context
    question = row.get("question")
    for name, v in (("context", context), ("question", question)):
        if not isinstance(v, str) or not v.strip():
            raise KilnError(f"{where}: '{name}' must be a non-empty string")
    if ids is not None:
        if qid in ids:
            raise KilnError(f"{where}: duplicate question id {qid!r}")
        ids.add(qid)
    answers = [] if row.get("is_impossible") else _answers(row.get("answers", []), where)
    for text, start in answers:
        found = context[start:start + len(text)]
        if found != text or not text.strip():
            raise KilnError(f"{where}: answer_start {start} does not point at the answer text {text[:60]!r} (the "
                            f"context has {found[:60]!r} there)")
    return QAExample(qid, question.strip(), context, answers, where, title)


def read_squad(path: str | Path) -> tuple[list[QAExample], QAReport]:
    """Questions of a SQuAD-format .json file, or a .jsonl file with one question per line."""
    path = Path(path)
    if not path.is_file():
        raise KilnError(f"data file not found: {path}")
    text = decode_bytes(path.read_bytes(), path, "utf-8").lstrip("\ufeff")
    if not text.strip():
        raise KilnError(f"{path}: file is empty")
    out, ids = [], set()
    if path.suffix.lower() == ".jsonl":
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise KilnError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                out.append(_example(row, f"{path}:{lineno}", ids=ids, fallback_id=f"line-{lineno}"))
    else:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise KilnError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        data = doc.get("data") if isinstance(doc, dict) else None
        if not isinstance(data, list):
            raise KilnError(f"{path}: expected SQuAD's JSON ({{\"data\": [{{\"paragraphs\": [...]}}]}}), or use "
                            ".jsonl with one question per line")
        for a, article in enumerate(data):
            paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
            if not isinstance(paragraphs, list):
                raise KilnError(f"{path}: data[{a}] has no list 'paragraphs'")
            for p, par in enumerate(paragraphs):
                where = f"{path}: data[{a}].paragraphs[{p}]"
                if not isinstance(par, dict) or not isinstance(par.get("qas"), list):
                    raise KilnError(f"{where}: expected an object with 'context' and a list 'qas'")
                context = par.get("context")
                if not isinstance(context, str) or not context.strip():
                    raise KilnError(f"{where}: 'context' must be a non-empty string")
                for q, row in enumerate(par["qas"]):
                    out.append(_example(row, f"{where}.qas[{q}]", context, str(article.get("title", "")), ids,
                                        f"{a}-{p}-{q}"))
    if not out:
        raise KilnError(f"{path}: no questions")
    report = QAReport(str(path), len(out), sum(e.impossible for e in out), len({e.context for e in out}))
    return out, report


def split_by_context(examples: list[QAExample], val_fraction: float, test_fraction: float,
                     seed: int) -> tuple[list[QAExample], list[QAExample], list[QAExample]]:
    """Seeded, leak-free split: all questions on one context land in one split (SQuAD splits by article)."""
    if val_fraction + test_fraction >= 1.0:
        raise KilnError(f"data.val_fraction + data.test_fraction must be < 1, got {val_fraction + test_fraction}")
    contexts = list(dict.fromkeys(e.context for e in examples))
    random.Random(seed).shuffle(contexts)
    n = len(contexts)
    n_val, n_test = round(n * val_fraction), round(n * test_fraction)
    while n_val + n_test >= n and n_val + n_test:  # keep at least one context in train
        n_test, n_val = (n_test - 1, n_val) if n_test >= n_val else (n_test, n_val - 1)
    part = {c: 1 for c in contexts[:n_val]} | {c: 2 for c in contexts[n_val:n_val + n_test]}
    splits: tuple[list, list, list] = ([], [], [])
    for e in examples:
        splits[part.get(e.context, 0)].append(e)
    return splits


@dataclass
class Windows:
    """The tokenized windows of a split: ids, token types, context offsets (-1 outside the context), the
    example each window belongs to, and the training labels (start/end token; 0 = no answer in the window)."""

    ids: list[list[int]]
    types: list[list[int]] | None
    offsets: list[np.ndarray]
    example: np.ndarray
    starts: np.ndarray
    ends: np.ndarray
    questions_cut: int = 0
    lengths: np.ndarray = field(init=False)

    def __post_init__(self):
        self.lengths = np.array([len(x) for x in self.ids], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.ids)


def windowing_tokenizer(tok, max_length: int, doc_stride: int):
    """A private copy of `tok` that cuts the second sequence (the context) into overlapping windows."""
    from tokenizers import Tokenizer

    n_special = tok.num_special_tokens_to_add(True)
    if max_length - n_special <= doc_stride + 1:
        raise KilnError(f"data.doc_stride {doc_stride} leaves no room: a window of data.max_length {max_length} "
                        f"holds {n_special} special tokens; lower doc_stride or raise max_length")
    tok = Tokenizer.from_str(tok.to_str())
    tok.no_padding()
    tok.no_truncation()
    return tok


def _cut_question(tok, question: str, max_tokens: int) -> tuple[str, bool]:
    enc = tok.encode(question, add_special_tokens=False)
    if len(enc.ids) <= max_tokens:
        return question, False
    return question[:enc.offsets[max_tokens - 1][1]], True


def _span(off: np.ndarray, start: int, end: int) -> tuple[int, int]:
    """(first, last) token of the characters [start, end) in a window, or (0, 0) when it is not all inside."""
    ctx = np.flatnonzero(off[:, 0] >= 0)
    if not len(ctx) or off[ctx[0], 0] > start or off[ctx[-1], 1] < end:
        return 0, 0
    first = ctx[np.flatnonzero(off[ctx, 0] <= start)[-1]]
    last = ctx[np.flatnonzero(off[ctx, 1] >= end)[0]]
    return int(first), int(max(last, first))


def encode_windows(tok, examples: list[QAExample], max_length: int, doc_stride: int, max_question_length: int,
                   vocab_size: int, type_vocab_size: int, where: str) -> Windows:
    """Every window of every example (question + a piece of the context), labelled with the first answer."""
    tok = windowing_tokenizer(tok, max_length, doc_stride)
    n_special = tok.num_special_tokens_to_add(True)
    max_q = max(1, min(max_question_length, max_length - n_special - doc_stride - 2))
    pairs, cut = [], 0
    for e in examples:
        q, was_cut = _cut_question(tok, e.question, max_q)
        cut += was_cut
        pairs.append((q, e.context))
    tok.enable_truncation(max_length, stride=doc_stride, strategy="only_second")
    try:
        encoded = tok.encode_batch(pairs)
    except Exception as err:
        raise KilnError(f"{where}: the tokenizer cannot encode this data ({str(err).splitlines()[0]})") from None
    ids, types, offsets, example, starts, ends = [], [], [], [], [], []
    for i, (e, enc) in enumerate(zip(examples, encoded)):
        for w in [enc] + list(enc.overflowing):
            seq = w.sequence_ids
            if seq[0] is not None:
                raise KilnError("finetune qa needs a tokenizer whose pair encoding starts with a special token "
                                "([CLS] question [SEP] context [SEP]): its first position is the null answer")
            off = np.array([o if s == 1 else (-1, -1) for o, s in zip(w.offsets, seq)], dtype=np.int64)
            s, t = (0, 0) if e.impossible else _span(off, e.answers[0][1], e.answers[0][1] + len(e.answers[0][0]))
            ids.append(w.ids)
            types.append([min(x, max(type_vocab_size - 1, 0)) for x in w.type_ids])
            offsets.append(off)
            example.append(i)
            starts.append(s)
            ends.append(t)
    top = max((max(x) for x in ids), default=0)
    if top >= vocab_size:
        raise KilnError(f"{where}: the tokenizer produced id {top}, beyond the model's vocabulary ({vocab_size}); "
                        "tokenizer.json does not belong to this model")
    return Windows(ids, types if type_vocab_size else None, offsets, np.array(example, dtype=np.int64),
                   np.array(starts, dtype=np.int64), np.array(ends, dtype=np.int64), cut)
