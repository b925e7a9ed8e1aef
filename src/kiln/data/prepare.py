"""text -> cleaning -> tokenizer -> train/val token shards + manifest.json, streamed (memory stays flat).

Pass 1 (only for a char vocabulary or a tokenizer to train) streams the text into the tokenizer.
Pass 2 streams it again, encodes in batches and appends to the shard files.
Split: a plain text file is cut once, the last `val_fraction` of its bytes (at a line boundary) being
val; the embedded tiny Shakespeare is cut exactly like nanoGPT (first 90% of characters train).
Multi-document inputs send each document to val by a seeded hash of its content, so the split is
reproducible and exact duplicates always land on the same side. A document longer than LONG_DOC_CHARS (a
whole book in a folder of books) is cut at line boundaries into pieces of ~SPLIT_PIECE_CHARS, each hashed on its
own: every book then gives ~val_fraction of its text to val, instead of one whole book being the val set.
Everything is written to a temporary folder that replaces `out_dir` only when complete.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np

from kiln.config import DataConfig
from kiln.data.shards import FORMAT, MANIFEST, SHARD_TOKENS, ShardWriter, dtype_for, write_manifest
from kiln.data.text import Corpus
from kiln.data.tokenizer import KINDS, encoder, eot_id, tokenizer_kind, train_tokenizer, vocab_size
from kiln.errors import KilnError

BATCH_CHARS = 1 << 20      # text per encode_batch call (Encoding objects cost ~200 bytes a token)
PIECE_CHARS = 1 << 18      # longer texts are encoded in pieces of about this size, in parallel
LONG_DOC_CHARS = 1 << 20   # longer documents are split train/val piece by piece (see the module docstring)
SPLIT_PIECE_CHARS = 1 << 16  # the size of those pieces: a 4 MB book gives ~64
_BOUNDARY = re.compile(r"\n(?=\S)")  # cutting here leaves byte-level BPE tokens unchanged


def prepare(cfg: DataConfig, out_dir: str | Path, seed: int = 1337, log=print, *,
            shard_tokens: int = SHARD_TOKENS, tokenizer_sample_bytes: int | None = None) -> dict:
    """Prepare `cfg.source` into `out_dir`; returns the manifest. `tokenizer_sample_bytes` bounds the
    text a bpe/wordpiece tokenizer is trained on (None = all of it)."""
    t0 = time.time()
    out_dir = Path(out_dir)
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise KilnError(f"data.val_fraction must be in [0, 1), got {cfg.val_fraction}")
    _check_out_dir(out_dir)
    corpus = Corpus(cfg.source, cfg.text_field, cfg)
    log(f"prepare: {cfg.source} ({corpus.nbytes / 1e6:.1f} MB, {corpus.kind}) -> {out_dir}")

    tok, kind = _tokenizer(cfg, corpus, log, tokenizer_sample_bytes)
    vs, eot = vocab_size(tok), eot_id(tok)
    dtype = dtype_for(vs)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    writers: dict[str, ShardWriter] = {}
    try:
        tok.save(str(tmp / "tokenizer.json"))
        writers = {s: ShardWriter(tmp, s, dtype, shard_tokens) for s in ("train", "val")}
        progress = _Progress(log, corpus.nbytes, writers)
        corpus.bytes_read = 0
        if corpus.single_file:
            stats = _write_text(corpus, cfg, encoder(tok, str(corpus.path)), writers, progress)
        else:
            stats = _write_documents(corpus, cfg, seed, encoder(tok, str(corpus.path)), eot, writers, progress)
        splits = {s: w.close() for s, w in writers.items()}
        if splits["train"]["tokens"] + splits["val"]["tokens"] == 0:
            raise KilnError(f"{corpus.path}: no text left after cleaning")
        seconds = time.time() - t0
        manifest = {
            "format": FORMAT, "dtype": dtype, "vocab_size": vs,
            "tokenizer": "tokenizer.json", "tokenizer_kind": kind, "eot_token_id": eot,
            "source": cfg.source, "documents": stats["documents"],
            "duplicates_dropped": stats["duplicates_dropped"], "bytes_in": corpus.nbytes,
            "seconds": round(seconds, 3), "mb_per_second": round(corpus.nbytes / 1e6 / max(seconds, 1e-9), 3),
            "split": stats["split"], "val_fraction": cfg.val_fraction, "seed": seed,
            "splits": splits,
        }
        write_manifest(tmp, manifest)
        _install(tmp, out_dir)
    except BaseException:
        for w in writers.values():
            w.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"prepared {stats['documents']} docs ({stats['duplicates_dropped']} duplicates dropped): "
        f"{splits['train']['tokens']:,} train + {splits['val']['tokens']:,} val tokens, {kind} vocab {vs} "
        f"({dtype}), {corpus.nbytes / 1e6:.1f} MB in {seconds:.1f}s = {manifest['mb_per_second']:.2f} MB/s")
    return manifest


# ------------------------------------------------------------------------------------------ tokenizer


def _tokenizer(cfg: DataConfig, corpus: Corpus, log, sample_bytes: int | None):
    if cfg.lowercase and cfg.tokenizer not in ("bpe", "wordpiece"):
        raise KilnError(f"data.lowercase applies to a bpe or wordpiece tokenizer trained here, not to "
                        f"data.tokenizer {cfg.tokenizer!r} (an existing tokenizer.json keeps its own normalizer)")
    if cfg.tokenizer not in KINDS:  # a path to an existing tokenizer.json
        tok = train_tokenizer(cfg.tokenizer, [])
        return tok, tokenizer_kind(tok)
    limit = None if cfg.tokenizer == "char" else sample_bytes  # char needs every character
    what = "all" if limit is None else f"the first {limit / 1e6:.0f} MB"
    log(f"pass 1: building the {cfg.tokenizer} tokenizer from {what} of the text"
        + ("" if cfg.tokenizer == "char" else f" (vocab {cfg.vocab_size}{', lowercased' if cfg.lowercase else ''})"))
    n, finished = 0, False

    def texts():
        nonlocal n, finished
        for t in corpus.texts(limit):
            if t:
                n += 1
                yield t
        finished = True

    try:
        tok = train_tokenizer(cfg.tokenizer, texts, cfg.vocab_size, lowercase=cfg.lowercase)  # wordpiece reads twice
    except KilnError:
        if not (finished and n == 0):  # an input error, not "no text"
            raise
    if n == 0:
        raise KilnError(f"{corpus.path}: no text left after cleaning")
    return tok, cfg.tokenizer


# ------------------------------------------------------------------------------------------ pass 2


def _write_text(corpus: Corpus, cfg: DataConfig, encode, writers, progress) -> dict:
    """One plain text file: contiguous split, no separators (it is one document)."""
    cut = corpus.split_offset(cfg.val_fraction) if cfg.val_fraction > 0 else None
    names = ("train", "val")
    batch: list[tuple[int, str]] = []

    def flush():
        pieces = [(part, p) for part, text in batch for p in _pieces(text)]
        for (part, _), ids in zip(pieces, encode([p for _, p in pieces])):
            writers[names[part]].append(ids)
        batch.clear()
        progress.update(corpus.bytes_read)

    size = 0
    for part, text in corpus.chunks(cut):
        batch.append((part, text))
        size += len(text)
        if size >= BATCH_CHARS:
            flush()
            size = 0
    flush()
    return {"documents": 1, "duplicates_dropped": 0, "split": "contiguous"}


def _write_documents(corpus: Corpus, cfg: DataConfig, seed: int, encode, eot, writers, progress) -> dict:
    """Many documents: hashed split, EOT after every document, optional exact dedup."""
    seen: set[bytes] = set()
    docs = dropped = 0
    held: np.ndarray | None = None  # last train document, held back in case val would be empty
    batch: list[tuple[str, str]] = []
    tail = np.array([eot] if eot is not None else [], dtype=np.int64)

    def flush():
        nonlocal held
        pieces, owner = [], []
        for j, (_, doc) in enumerate(batch):
            for p in _pieces(doc):
                pieces.append(p)
                owner.append(j)
        encoded = encode(pieces)
        parts: list[list[np.ndarray]] = [[] for _ in batch]
        for j, ids in zip(owner, encoded):
            parts[j].append(ids)
        for (split, _), chunks in zip(batch, parts):
            ids = np.concatenate(chunks + [tail])
            if split == "train":
                if held is not None:
                    writers["train"].append(held)
                held = ids
            else:
                writers["val"].append(ids)
        batch.clear()
        progress.update(corpus.bytes_read)

    size = 0
    for doc in corpus.documents():
        if not doc.strip():
            continue
        digest = _digest(doc)
        if cfg.dedup:
            if digest in seen:
                dropped += 1
                continue
            seen.add(digest)
        docs += 1
        if len(doc) > LONG_DOC_CHARS:
            sides: dict[str, list[str]] = {"train": [], "val": []}
            for piece in _pieces(doc, SPLIT_PIECE_CHARS):
                sides["val" if _to_val(_digest(piece), seed, cfg.val_fraction) else "train"].append(piece)
            batch.extend((side, "".join(parts)) for side, parts in sides.items() if parts)
        else:
            batch.append(("val" if _to_val(digest, seed, cfg.val_fraction) else "train", doc))
        size += len(doc)
        if size >= BATCH_CHARS or len(batch) >= 4096:
            flush()
            size = 0
    flush()
    if held is not None:
        if writers["val"].tokens == 0 and cfg.val_fraction > 0:  # tiny corpus: no doc hashed to val
            if writers["train"].tokens == 0:  # a single document: split its tokens
                n = int(len(held) * (1 - cfg.val_fraction))
                writers["train"].append(held[:n])
                held = held[n:]
            writers["val"].append(held)
        else:
            writers["train"].append(held)
    return {"documents": docs, "duplicates_dropped": dropped, "split": "hash"}


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def _to_val(digest: bytes, seed: int, val_fraction: float) -> bool:
    h = hashlib.blake2b(digest, digest_size=8, key=int(seed).to_bytes(8, "little", signed=True)).digest()
    return int.from_bytes(h, "little") / 2.0**64 < val_fraction


def _pieces(text: str, size: int = PIECE_CHARS) -> list[str]:
    """Cut a long document at line boundaries into pieces of about `size` characters."""
    out, start = [], 0
    while len(text) - start > size:
        m = _BOUNDARY.search(text, start + size, start + 4 * size)
        end = m.end() if m else start + 4 * size
        out.append(text[start:end])
        start = end
    out.append(text[start:])
    return out


# ------------------------------------------------------------------------------------------ helpers


class _Progress:
    def __init__(self, log, total: int, writers: dict, every: float = 10.0):
        self.log, self.total, self.writers, self.every = log, max(total, 1), writers, every
        self.t0 = self.last = time.time()

    def update(self, done: int) -> None:
        now = time.time()
        if now - self.last < self.every:
            return
        self.last = now
        tokens = sum(w.tokens for w in self.writers.values())
        self.log(f"pass 2: {done / 1e6:.0f}/{self.total / 1e6:.0f} MB ({100 * done / self.total:.0f}%), "
                 f"{tokens:,} tokens, {done / 1e6 / (now - self.t0):.2f} MB/s")


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and not (out_dir.is_dir() and (not any(out_dir.iterdir()) or (out_dir / MANIFEST).is_file())):
        raise KilnError(f"{out_dir}: exists and is not a prepared dataset; choose another output folder")


def _install(tmp: Path, out_dir: Path) -> None:
    """Move the finished folder into place; an older prepared dataset there is replaced."""
    _check_out_dir(out_dir)
    old = None
    if out_dir.exists():
        if any(out_dir.iterdir()):
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            os.replace(out_dir, old)
        else:
            out_dir.rmdir()
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
