"""Token classification data (NER, POS): CoNLL-style column files or JSONL -> tagged sentences, the tag
scheme, splits, and sub-token ids with a label on the first sub-token of each word.

    sents = read_sentences("train.conll", fmt=cfg.data)       # [Sentence(tokens, tags, text, spans, line)]
    scheme = detect_scheme([s.tags for s in sents])            # IOB1 | IOB2 | BIOES | none (plain tags: POS)
    enc = encode_words(tok, sents, {"O": 0, "B-PER": 1, ...}, max_length=128, ...)

Rules (each a one-line KilnError naming the file and line):
- CoNLL: one token per line, columns separated by whitespace, a blank line between sentences, `-DOCSTART-`
  lines skipped; the tag is column data.tag_column (default -1: the last), the token data.token_column; every
  row has the file's number of columns (a row with fewer is a missing tag column);
- JSONL: one sentence per line with data.tokens_field and data.tags_field lists of one length; with
  data.text_field too, the entities' character spans are given in that text (each token must occur in it, in
  order), and a line with only the text is split into words (`words_of`: whitespace, punctuation apart);
- a tag must follow the scheme (`B-`/`I-` for IOB1/IOB2, `B-`/`I-`/`E-`/`S-` for BIOES, `O`).
TokensConfig (the `kiln finetune tokens` config) lives here, below interop, so `kiln import hf` can write one.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kiln.config import EpochTrainConfig, _classify_train_defaults, _f
from kiln.constants import IGNORE_INDEX
from kiln.data.columns import json_object
from kiln.data.encodings import decode_bytes
from kiln.errors import KilnError
from kiln.model.config import ModelConfig

CONFIG_FILE = "tokens.yaml"  # the config file of a `kiln finetune tokens` run (kiln.tasks.tokens; kiln import hf)
SCHEMES = ("auto", "IOB1", "IOB2", "BIOES", "none")
PREFIXES = {"IOB1": "BI", "IOB2": "BI", "BIOES": "BIES"}


@dataclass
class TokensDataConfig:
    train: str = _f("", "training file: CoNLL columns (.conll/.txt/.tsv, one token per line) or .jsonl (tokens, tags)")
    val: str = _f("", "validation file; empty = split off from train (seeded)")
    test: str = _f("", "test file; empty = split off from train")
    tag_column: int = _f(-1, "CoNLL: the column holding the tag, 0 = the first; negative counts from the end "
                         "(-1 = the last)", range="any")
    token_column: int = _f(0, "CoNLL: the column holding the token", range=">= 0")
    tokens_field: str = _f("tokens", "JSONL: the field holding the list of tokens")
    tags_field: str = _f("tags", "JSONL: the field holding the list of tags")
    text_field: str = _f("text", "JSONL: the field holding the original text (character spans of predictions)")
    scheme: str = _f("auto", "tag scheme of the entity metrics: auto (from the training tags) | IOB1 | IOB2 | "
                     "BIOES | none (plain tags, e.g. POS: token accuracy and per-tag F1)", choices=SCHEMES)
    max_length: int = _f(128, "sub-tokens per sentence (special tokens included); the words of longer ones are "
                         "cut and counted", range=">= 2")
    val_fraction: float = _f(0.1, "share of the sentences held out for validation when data.val is empty", range="[0, 1)")
    test_fraction: float = _f(0.1, "share of the sentences held out for test when data.test is empty", range="[0, 1)")
    split_seed: int = _f(-1, "seed of that split; -1 = the run's seed", range=">= -1")
    dedup: bool = _f(True, "drop exact duplicate sentences; identical sentences always share one split")
    encoding: str = _f("utf-8", "text encoding of the input files (a byte-order mark is read)")


@dataclass
class TokensConfig:
    """`kiln finetune tokens`: a pretrained encoder + a per-token classification head (NER, POS)."""

    name: str = _f("tokens", "run name; the run folder is runs/<name>-<timestamp> unless --out names it")
    out: str = _f("", "run folder (default runs/<name>-<timestamp>)")
    seed: int = _f(1337, "random seed for the split, the head's init, data order and dropout", range=">= 0")
    init: str = _f("", "backbone: a kiln run folder, or a Hugging Face model folder (imported into <run>/base)")
    init_checkpoint: str = _f("latest", "checkpoint of a kiln run used as init: latest | best | a folder")
    head_dropout: float = _f(0.1, "dropout before the classification layer", range="[0, 1)")
    epochs: float = _f(3.0, "passes over the training sentences (sets train.max_steps when that is 0)", range="> 0")
    warmup_fraction: float = _f(0.1, "share of the steps for linear warmup when train.warmup_steps is 0", range="[0, 1)")
    metric: str = _f("val_f1", "validation metric that picks the best checkpoint and drives early stopping "
                     "(val_f1: entity micro F1; tag macro F1 with scheme none)",
                     choices=("val_loss", "val_f1", "val_accuracy"))
    patience: int = _f(0, "stop after this many evaluations without improvement of `metric`; 0 = never", range=">= 0")
    data: TokensDataConfig = field(default_factory=TokensDataConfig)
    train: EpochTrainConfig = field(default_factory=lambda: dataclasses.replace(_classify_train_defaults(), batch_size=16))
    model: ModelConfig = field(default_factory=ModelConfig,
                               metadata={"help": "written by kiln: the backbone's shape (read from init)"})


@dataclass
class Sentence:
    tokens: list[str]
    tags: list[str] | None
    line: int                        # line of the file the sentence starts on
    text: str = ""                   # tokens joined by spaces, or the JSONL text
    spans: list[tuple[int, int]] = field(default_factory=list)  # character span of each token in `text`

    @property
    def key(self) -> tuple:
        return tuple(self.tokens), tuple(self.tags or ())


def _joined(tokens: list[str]) -> tuple[str, list[tuple[int, int]]]:
    spans, pos = [], 0
    for t in tokens:
        spans.append((pos, pos + len(t)))
        pos += len(t) + 1
    return " ".join(tokens), spans


def _read(path: Path, encoding: str) -> str:
    if not path.is_file():
        raise KilnError(f"data file not found: {path}")
    text = decode_bytes(path.read_bytes(), path, encoding or "utf-8").lstrip("\ufeff")
    if not text.strip():
        raise KilnError(f"{path}: file is empty")
    return text


def _conll(path: Path, text: str, d, require_tags: bool) -> list[Sentence]:
    rows = [(n, line.split()) for n, line in enumerate(text.splitlines(), 1)]
    counts = Counter(len(c) for _, c in rows if c and c[0] != "-DOCSTART-")
    if not counts:
        raise KilnError(f"{path}: no token rows")
    n_cols = counts.most_common(1)[0][0]
    tagged = n_cols > 1 or require_tags
    tag = d.tag_column if d.tag_column >= 0 else n_cols + d.tag_column
    if tagged and not (0 <= tag < n_cols and tag != d.token_column):
        raise KilnError(f"{path}: data.tag_column {d.tag_column} is not a tag column of its {n_cols} column(s) "
                        f"(the token is column {d.token_column})" + ("; one column only: no tags" if n_cols == 1 else ""))
    if d.token_column >= n_cols:
        raise KilnError(f"{path}: data.token_column {d.token_column} is beyond its {n_cols} column(s)")
    out, tokens, tags, start = [], [], [], 0
    for lineno, cols in rows + [(len(rows) + 1, [])]:
        if cols and cols[0] == "-DOCSTART-":
            continue
        if not cols:
            if tokens:
                out.append(Sentence(tokens, tags if tagged else None, start, *_joined(tokens)))
            tokens, tags = [], []
            continue
        if len(cols) != n_cols:
            what = "a missing tag column? " if len(cols) < n_cols else ""
            raise KilnError(f"{path}:{lineno}: {len(cols)} column(s), the file has {n_cols} ({what}tags are read "
                            f"from column {tag if tagged else '-'}; a token with spaces cannot be a CoNLL row)")
        start = start if tokens else lineno
        tokens.append(cols[d.token_column])
        if tagged:
            tags.append(cols[tag])
    return out


def _jsonl(path: Path, text: str, d, require_tags: bool) -> list[Sentence]:
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        row = json_object(path, lineno, line)
        tokens, tags, raw = row.get(d.tokens_field), row.get(d.tags_field), row.get(d.text_field)
        if raw is not None and not isinstance(raw, str):
            raise KilnError(f"{path}:{lineno}: field {d.text_field!r} must be a string")
        if tokens is None and raw is not None:
            spans = words_of(raw)
            tokens = [raw[a:b] for a, b in spans]
        elif isinstance(tokens, list) and all(isinstance(t, str) and t and not t.isspace() for t in tokens):
            spans = _spans(path, lineno, raw, tokens) if raw is not None else None
        else:
            raise KilnError(f"{path}:{lineno}: field {d.tokens_field!r} must be a list of non-empty strings"
                            + (f" (or give {d.text_field!r})" if tokens is None else ""))
        if tags is None and require_tags:
            raise KilnError(f"{path}:{lineno}: no field {d.tags_field!r} (the tags; set data.tags_field)")
        if tags is not None and (not isinstance(tags, list) or len(tags) != len(tokens)
                                 or not all(isinstance(t, str) and t for t in tags)):
            raise KilnError(f"{path}:{lineno}: {d.tags_field!r} must be a list of {len(tokens)} tag string(s), one "
                            f"per token")
        if not tokens:
            continue
        text_, spans_ = (raw, spans) if spans is not None else _joined(tokens)
        out.append(Sentence(tokens, tags, lineno, text_, spans_))
    return out


_EDGE = re.compile(r"^([^\w\s]*)(.*?)([^\w\s]*)$", re.S)
_ABBREV = re.compile(r"[A-Z][a-z]{0,2}\.")  # Mr. Dr. St. Mrs. keep their period


def words_of(text: str) -> list[tuple[int, int]]:
    """Character spans of the words of a plain text: split at whitespace, punctuation at a word's ends split
    off as tokens of its own (CoNLL-style tokens)."""
    spans = []
    for m in re.finditer(r"\S+", text):
        chunk, at = m.group(), m.start()
        lead, core, trail = _EDGE.match(chunk).groups()
        if trail.startswith(".") and _ABBREV.fullmatch(core + "."):
            core, trail = core + ".", trail[1:]
        pos = at
        for piece in [*lead, core, *trail]:
            if piece:
                spans.append((pos, pos + len(piece)))
                pos += len(piece)
    return spans


def _spans(path: Path, lineno: int, text: str, tokens: list[str]) -> list[tuple[int, int]]:
    spans, pos = [], 0
    for t in tokens:
        at = text.find(t, pos)
        if at < 0:
            raise KilnError(f"{path}:{lineno}: token {t!r} does not occur in the text after character {pos}")
        spans.append((at, at + len(t)))
        pos = at + len(t)
    return spans


def read_sentences(path: str | Path, d, require_tags: bool = True) -> list[Sentence]:
    """Sentences of a CoNLL or JSONL file (`d`: the data config section: columns, fields, encoding)."""
    path = Path(path)
    text = _read(path, getattr(d, "encoding", "utf-8"))
    out = (_jsonl if path.suffix.lower() == ".jsonl" else _conll)(path, text, d, require_tags)
    if not out:
        raise KilnError(f"{path}: no sentences")
    return out


def detect_scheme(tag_seqs) -> str:
    """IOB2 (every entity starts with B-), IOB1 (an entity may start with I-), BIOES (E-/S- tags) or none (tags
    without a B-/I-/E-/S- prefix: POS tags and the like)."""
    tags = {t for s in tag_seqs for t in s}
    prefixes = {t.split("-", 1)[0] for t in tags if t != "O"}
    if not prefixes or any("-" not in t for t in tags if t != "O") or not prefixes <= set("BIES"):
        return "none"
    if prefixes & set("ES"):
        return "BIOES"
    for s in tag_seqs:
        prev = "O"
        for t in s:
            if t.startswith("I-") and prev[2:] != t[2:]:
                return "IOB1"
            prev = t
    return "IOB2"


def check_tags(sents: list[Sentence], scheme: str, path: str) -> None:
    if scheme == "none":
        return
    allowed = PREFIXES[scheme]
    for s in sents:
        for t in s.tags or ():
            if t != "O" and not (len(t) > 2 and t[1] == "-" and t[0] in allowed):
                raise KilnError(f"{path}:{s.line}: tag {t!r} is not an {scheme} tag (O or "
                                f"{'/'.join(p + '-TYPE' for p in allowed)}); set data.scheme")


def label_names(sents: list[Sentence]) -> list[str]:
    """"O" first, then the tags sorted by entity type and prefix (B- before I-)."""
    tags = {t for s in sents for t in s.tags or ()}
    order = {p: i for i, p in enumerate("BIES")}
    return (["O"] if "O" in tags else []) + sorted(tags - {"O"}, key=lambda t: (t[2:], order.get(t[0], 9), t)
                                                     if len(t) > 2 and t[1] == "-" else (t, 0, t))


def split_sentences(sents: list[Sentence], val_fraction: float, test_fraction: float, seed: int):
    """Seeded, leak-free split: identical sentences form one group (never in two splits)."""
    if val_fraction + test_fraction >= 1.0:
        raise KilnError(f"data.val_fraction + data.test_fraction must be < 1, got {val_fraction + test_fraction}")
    groups: dict[tuple, list[Sentence]] = {}
    for s in sents:
        groups.setdefault(tuple(s.tokens), []).append(s)
    keys = list(groups)
    random.Random(seed).shuffle(keys)
    n = len(keys)
    a = max(int(n * (1.0 - val_fraction - test_fraction)), 1)
    b = max(int(n * (1.0 - test_fraction)), a)
    return tuple([s for k in part for s in groups[k]] for part in (keys[:a], keys[a:b], keys[b:]))


@dataclass
class Words:
    """Sub-token ids of each sentence, the label of each position (IGNORE_INDEX except a word's first
    sub-token), the word each first sub-token starts (-1 elsewhere), and how many sentences lost words."""

    ids: list[list[int]]
    types: list[list[int]] | None
    labels: list[list[int]]
    words: list[np.ndarray]
    truncated: int
    lengths: np.ndarray = field(init=False)

    def __post_init__(self):
        self.lengths = np.array([len(x) for x in self.ids], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.ids)


def encode_words(tok, sents: list[Sentence], index: dict[str, int] | None, max_length: int, vocab_size: int,
                 type_vocab_size: int, where: str) -> Words:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tok.to_str())
    tok.no_padding()
    tok.enable_truncation(max_length)
    try:
        out = tok.encode_batch([s.tokens for s in sents], is_pretokenized=True)
    except Exception as e:
        raise KilnError(f"{where}: the tokenizer cannot encode this data ({str(e).splitlines()[0]})") from None
    ids, types, labels, words, truncated = [], [], [], [], 0
    for s, e in zip(sents, out):
        first = np.full(len(e.ids), -1, dtype=np.int64)
        prev = None
        for p, w in enumerate(e.word_ids):
            if w is not None and w != prev:
                first[p] = w
            prev = w if w is not None else prev
        lab = [IGNORE_INDEX] * len(e.ids)
        if index is not None and s.tags is not None:
            for p in np.flatnonzero(first >= 0):
                lab[p] = index.get(s.tags[first[p]], IGNORE_INDEX)
        truncated += int(len(set(first[first >= 0].tolist())) < len(s.tokens) and bool(e.overflowing))
        ids.append(e.ids or [0])
        types.append([min(t, max(type_vocab_size - 1, 0)) for t in e.type_ids] or [0])
        labels.append(lab or [IGNORE_INDEX])
        words.append(first if len(first) else np.full(1, -1, dtype=np.int64))
    top = max((max(x) for x in ids), default=0)
    if top >= vocab_size:
        raise KilnError(f"{where}: the tokenizer produced id {top}, beyond the model's vocabulary ({vocab_size}); "
                        "tokenizer.json does not belong to this model")
    return Words(ids, types if type_vocab_size else None, labels, words, truncated)
