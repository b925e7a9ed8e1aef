"""Source/target pairs for seq2seq (translation, summarization): reading, dedup, a leak-free split, and the
codec that turns both sides into ids (one shared tokenizer, or two with the target ids offset).

Rows are read by kiln.data.tables (CSV/TSV/JSONL/Parquet, the same bad-row handling as labelled text); a .txt file is
one source per line.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kiln.config import Seq2SeqConfig
from kiln.data import tables
from kiln.data.columns import column_hint
from kiln.data.text import clean_text
from kiln.errors import KilnError, did_you_mean


@dataclass
class Pair:
    source: str
    target: str
    line: int = 0


@dataclass
class PairReport:
    path: str
    rows: int = 0
    empty_source: int = 0
    empty_target: int = 0
    empty_lines: list[int] = field(default_factory=list)

    def lines(self) -> list[str]:
        if not self.empty_lines:
            return []
        what = " or ".join(w for w, n in (("source", self.empty_source), ("target", self.empty_target)) if n)
        shown = ", ".join(map(str, self.empty_lines[:5])) + (" ..." if len(self.empty_lines) > 5 else "")
        return [f"{self.path}: skipped {len(self.empty_lines)} row(s) with an empty {what} "
                f"({self.empty_source} empty source, {self.empty_target} empty target; line {shown})"]


def read_pairs(path: str | Path, source_field: str, target_field: str | None,
               require_target: bool = True, fmt=None) -> tuple[list[Pair], PairReport]:
    """Pairs of a .tsv/.csv/.jsonl file (.txt: one source per line, no target). Rows with an empty source or
    target are skipped and counted; a wrong field count names file and line; a missing column lists the
    columns present; a non-UTF-8 file is a one-line error. `fmt`: the data config section (data.encoding,
    header, columns, delimiter; None = the defaults)."""
    path = Path(path)
    text = tables._read_text(path, fmt) if path.suffix.lower() != ".parquet" else ""
    report = PairReport(str(path))
    if path.suffix.lower() == ".txt":
        out = []
        for lineno, line in enumerate(text.splitlines(), 1):
            s = clean_text(line).strip()
            report.rows += 1
            if s:
                out.append(Pair(s, "", lineno))
            elif line.strip() or lineno < len(text.splitlines()):
                report.empty_source += 1
                report.empty_lines.append(lineno)
        return out, report
    rows, header = tables.read_rows(path, fmt, [source_field, target_field], text)
    if not rows:
        raise KilnError(f"{path}: no data rows")
    for what, name, key in (("source", source_field, "source_field"), ("target", target_field, "target_field")):
        if name and name not in header and (what == "source" or require_target):
            cols = ", ".join(repr(c) for c in header) or "(none)"
            hint = "" if path.suffix.lower() in (".jsonl", ".parquet") else column_hint(header, getattr(fmt, "header", True),
                                                                          getattr(fmt, "columns", None))
            raise KilnError(f"{path}: no {what} column {name!r}{did_you_mean(name, header)}; columns present: "
                            f"{cols} (set seq2seq.{key}){hint}")
    has_target = bool(target_field) and target_field in header
    out = []
    for lineno, row in rows:
        report.rows += 1
        s = clean_text(tables._field(path, lineno, row, source_field)).strip()
        t = clean_text(tables._field(path, lineno, row, target_field)).strip() if has_target else ""
        if not s:
            report.empty_source += 1
            report.empty_lines.append(lineno)
            continue
        if has_target and not t and require_target:
            report.empty_target += 1
            report.empty_lines.append(lineno)
            continue
        out.append(Pair(s, t, lineno))
    if not out:
        raise KilnError(f"{path}: no usable pair (every row has an empty {source_field!r} or {target_field!r})")
    return out, report


def dedup(pairs: list[Pair]) -> tuple[list[Pair], int]:
    seen, out = set(), []
    for p in pairs:
        if (p.source, p.target) not in seen:
            seen.add((p.source, p.target))
            out.append(p)
    return out, len(pairs) - len(out)


def split_pairs(pairs: list[Pair], n_val: int, n_test: int, seed: int) -> tuple[list[Pair], list[Pair], list[Pair], dict]:
    """Seeded split by unique source: all pairs with one source land in one split (no source is both trained
    on and evaluated). n_val/n_test count unique sources."""
    groups: dict[str, list[Pair]] = {}
    for p in pairs:
        groups.setdefault(p.source, []).append(p)
    keys = list(groups)
    random.Random(seed).shuffle(keys)
    if n_val + n_test >= len(keys):
        raise KilnError(f"cannot hold out {n_val} val + {n_test} test sources: the data has only {len(keys)} unique "
                        f"sources (lower data.val_size/test_size or the fractions)")
    val, test, train = keys[:n_val], keys[n_val:n_val + n_test], keys[n_val + n_test:]
    take = lambda ks: [p for k in ks for p in groups[k]]  # noqa: E731
    return take(train), take(val), take(test), {"unique_sources": len(keys)}


def fingerprint(pairs: list[Pair]) -> str:
    import hashlib

    h = hashlib.sha256()
    for p in pairs:
        h.update(f"{p.source}\x1f{p.target}\x1e".encode())
    return h.hexdigest()[:16]


class PairCodec:
    """Text <-> ids for both sides. Shared: one tokenizer. Separate: target ids are offset by the source
    vocabulary (one embedding table, disjoint rows); decoding never emits a source id.
    The tokenizer's end-of-text token (<|endoftext|>, [SEP], else </s>) is decoder start, eos and padding,
    unless `ids` (bos_id = decoder start, eos_id, pad_id) name them: a pretrained model's own (Marian: start =
    <pad>, eos = </s>). `source_eos`: sources end with eos too (Marian's tokenizer appends </s>)."""

    def __init__(self, src_tok, tgt_tok=None, ids: dict | None = None, source_eos: bool = False):
        from kiln.data.tokenizer import eot_id, vocab_size

        self.src_tok, self.tgt_tok = src_tok, tgt_tok or src_tok
        self.separate = tgt_tok is not None
        self.offset = vocab_size(src_tok) if self.separate else 0
        ids = ids or {}
        eot = eot_id(self.tgt_tok)
        eot = self.tgt_tok.token_to_id("</s>") if eot is None else eot
        if eot is None and "eos_id" not in ids:
            raise KilnError("the tokenizer has no end-of-text token (<|endoftext|>, [SEP] or </s>) to start and end "
                            "targets; use seq2seq.tokenizer shared or separate (BPE)")
        self.eos = ids.get("eos_id", self.offset + (eot or 0))
        self.bos, self.pad = ids.get("bos_id", self.eos), ids.get("pad_id", self.eos)
        self.source_eos = source_eos
        self.vocab_size = self.offset + vocab_size(self.tgt_tok)

    @staticmethod
    def _ids(tok, texts: list[str], where: str) -> list[list[int]]:
        try:
            return [e.ids for e in tok.encode_batch(list(texts), add_special_tokens=False)]
        except Exception as e:
            from kiln.data.tokenizer import cannot_encode

            raise cannot_encode(tok, texts, where, e) from None

    def encode_source(self, texts: list[str], where: str = "source") -> list[list[int]]:
        ids = self._ids(self.src_tok, texts, where)
        return [x + [self.eos] for x in ids] if self.source_eos else ids

    def encode_target(self, texts: list[str], where: str = "target") -> list[list[int]]:
        return [[i + self.offset for i in ids] for ids in self._ids(self.tgt_tok, texts, where)]

    def decode_target(self, ids: list[int]) -> str:
        special = {self.eos, self.pad, self.bos}
        return self.tgt_tok.decode([i - self.offset for i in ids if i >= self.offset and i not in special]).strip()

    def suppress_source(self):
        """A log-prob processor forbidding source ids (separate tokenizers), else None."""
        if not self.separate:
            return None
        n = self.offset

        def processor(logp: torch.Tensor) -> torch.Tensor:
            logp = logp.clone()
            logp[:, :n] = float("-inf")
            return logp

        return processor

    def save(self, run_dir: Path) -> dict:
        if self.separate:
            self.src_tok.save(str(run_dir / "tokenizer_source.json"))
            self.tgt_tok.save(str(run_dir / "tokenizer_target.json"))
        else:
            self.src_tok.save(str(run_dir / "tokenizer.json"))
        return {"tokenizer": "separate" if self.separate else "shared", "offset": self.offset, "bos_id": self.bos,
                "eos_id": self.eos, "pad_id": self.pad, "vocab_size": self.vocab_size, "source_eos": self.source_eos}

    @classmethod
    def load(cls, run_dir: Path, meta: dict) -> "PairCodec":
        from kiln.data.tokenizer import load_tokenizer

        ids = {k: meta[k] for k in ("bos_id", "eos_id", "pad_id") if isinstance(meta.get(k), int)}
        kw = dict(ids=ids, source_eos=bool(meta.get("source_eos")))
        if meta.get("tokenizer") == "separate":
            return cls(load_tokenizer(run_dir / "tokenizer_source.json"), load_tokenizer(run_dir / "tokenizer_target.json"),
                       **kw)
        return cls(load_tokenizer(run_dir / "tokenizer.json"), **kw)


def build_codec(cfg: Seq2SeqConfig, train: list[Pair], log) -> PairCodec:
    from kiln.data.tokenizer import load_tokenizer, train_tokenizer

    s = cfg.seq2seq
    if s.tokenizer == "shared":
        t0 = time.perf_counter()
        tok = train_tokenizer("bpe", (x for p in train for x in (p.source, p.target)), s.vocab_size)
        log(f"tokenizer: shared byte-level BPE, {tok.get_vocab_size()} tokens, trained on the train split "
            f"({time.perf_counter() - t0:.1f}s)")
        return PairCodec(tok)
    if s.tokenizer == "separate":
        src = train_tokenizer("bpe", (p.source for p in train), s.vocab_size)
        tgt = train_tokenizer("bpe", (p.target for p in train), s.vocab_size)
        log(f"tokenizer: separate byte-level BPEs, source {src.get_vocab_size()} + target {tgt.get_vocab_size()} tokens")
        return PairCodec(src, tgt)
    if s.tokenizer.endswith(".json") or Path(s.tokenizer).exists():
        return PairCodec(load_tokenizer(s.tokenizer))
    raise KilnError(f"seq2seq.tokenizer must be shared, separate or a tokenizer.json path; got {s.tokenizer!r}"
                    f"{did_you_mean(s.tokenizer, ['shared', 'separate'])}")


def _held_out(n_sources: int, size: int, fraction: float, name: str) -> int:
    if size < 0:
        raise KilnError(f"data.{name}_size must be >= 0, got {size}")
    if not 0.0 <= fraction < 1.0:
        raise KilnError(f"data.{name}_fraction must be in [0, 1), got {fraction}")
    return size if size else round(n_sources * fraction)


def load_pair_splits(cfg: Seq2SeqConfig, log) -> tuple[dict[str, list[Pair]], dict]:
    d, s = cfg.data, cfg.seq2seq
    if not d.train:
        raise KilnError("data.train is empty: name the pair file (--data.train FILE)")
    report: dict = {"files": {}, "skipped": {}}

    def read(path: str, name: str) -> list[Pair]:
        pairs, r = read_pairs(path, s.source_field, s.target_field, fmt=d)
        for line in r.lines():
            log(line)
        report["files"][name] = path
        report["skipped"][path] = {"rows": r.rows, "empty_source": r.empty_source, "empty_target": r.empty_target}
        return pairs

    train = read(d.train, "train")
    if d.limit:
        train = train[:d.limit]
    given = {name: read(getattr(d, name), name) for name in ("val", "test") if getattr(d, name)}
    if d.dedup:
        train, dropped = dedup(train)
        report["duplicates_dropped"] = dropped
        if dropped:
            log(f"{d.train}: dropped {dropped} exact duplicate pair(s)")
    n_sources = len({p.source for p in train})
    n_val = 0 if "val" in given else _held_out(n_sources, d.val_size, d.val_fraction, "val")
    n_test = 0 if "test" in given else _held_out(n_sources, d.test_size, d.test_fraction, "test")
    tr, va, te, info = split_pairs(train, n_val, n_test, cfg.seed)
    report.update(info)
    splits = {"train": tr, "val": given.get("val", va), "test": given.get("test", te)}
    held = {p.source for name in ("val", "test") if name in given for p in given[name]}
    if held:  # given val/test files: keep their sources out of train
        before = len(splits["train"])
        splits["train"] = [p for p in splits["train"] if p.source not in held]
        report["train_pairs_dropped_for_leakage"] = before - len(splits["train"])
        if before - len(splits["train"]):
            log(f"dropped {before - len(splits['train'])} train pair(s) whose source is in the val/test file")
    if not splits["train"]:
        raise KilnError(f"{d.train}: no training pairs left after the split")
    report["splits"] = {n: {"pairs": len(p), "unique_sources": len({x.source for x in p}),
                            "fingerprint": fingerprint(p)} for n, p in splits.items()}
    return splits, report
