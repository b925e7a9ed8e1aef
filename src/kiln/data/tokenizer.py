"""Tokenizers, all Hugging Face `tokenizers` objects saved as real tokenizer.json files.

kinds: "bpe" (byte-level BPE + <|endoftext|>), "wordpiece" (BERT-style, cased), "char" (one token per
character, vocabulary = sorted characters seen: nanoGPT's 65 ids on tiny Shakespeare), or a path to
an existing tokenizer.json.

Reproducibility: every kind trains to a byte-identical tokenizer.json in every process. HF's WordPieceTrainer
alone would not: it numbers its ## continuation pieces in a hash map's order, which differs per process, and
breaks merge ties by those numbers (tokenizers#1794; a fix is open upstream): the same text gave different ids
(110 of 1,500) and sometimes different pieces. kiln reads the text once more first (its characters only: ~25%
more time), registers the ## piece of every character that can continue a word in sorted order (as special
tokens, so the trainer numbers them first; plain vocabulary again afterwards), and so fixes the numbering and
with it the ties. The pieces differ from an HF-trained vocabulary only where merges tie (59 of 1,500 on 300 kB
of Shakespeare, rare name fragments: ##ENBU vs ##ENBURY).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from kiln.errors import KilnError, did_you_mean

KINDS = ("char", "bpe", "wordpiece")
EOT = "<|endoftext|>"
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_ONE_CHAR = r"[\s\S]"  # the char pre-tokenizer isolates every character


def _bert_punctuation(c: str) -> bool:
    """What BertPreTokenizer splits off as a word of its own (ASCII punctuation, Unicode P*): never a ## piece."""
    import unicodedata

    o = ord(c)
    return 33 <= o <= 47 or 58 <= o <= 64 or 91 <= o <= 96 or 123 <= o <= 126 or unicodedata.category(c)[0] == "P"


def char_tokenizer(chars: Iterable[str]) -> Tokenizer:
    """One id per character, in sorted order; decode(encode(s)) == s for text made of these characters."""
    vocab = {c: i for i, c in enumerate(sorted(set(chars)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(_ONE_CHAR), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return tok


def train_tokenizer(kind: str, documents: Iterable[str] | Callable[[], Iterable[str]], vocab_size: int = 8192,
                    lowercase: bool = False) -> Tokenizer:
    """Train a tokenizer of `kind` on texts, or load `kind` when it is a tokenizer.json path. `documents`: an
    iterable, or a function returning a fresh one (wordpiece reads the texts twice; an iterable is then kept
    in memory, a function is called twice)."""
    if kind == "wordpiece" and not callable(documents):
        documents = list(documents)
    read = documents if callable(documents) else (lambda: documents)
    if kind == "char":
        seen: set[str] = set()
        for doc in read():
            seen.update(doc)
        if not seen:
            raise KilnError("no text to build the char vocabulary from")
        return char_tokenizer(seen)
    if kind == "bpe":
        if vocab_size < 257:
            raise KilnError(f"data.vocab_size {vocab_size} too small for byte-level BPE (needs > 256)")
        tok = Tokenizer(models.BPE())
        if lowercase:
            tok.normalizer = normalizers.Lowercase()
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(read(), trainer)
        return tok
    if kind == "wordpiece":
        if vocab_size < len(BERT_SPECIALS) + 1:
            raise KilnError(f"data.vocab_size {vocab_size} too small for wordpiece")
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase, strip_accents=False)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        chars: set[str] = set()  # every character that can continue a word: its ## piece, numbered in sorted order
        for doc in read():
            chars.update(tok.normalizer.normalize_str(doc))
        pieces = [f"##{c}" for c in sorted(chars) if not c.isspace() and not _bert_punctuation(c)]
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=BERT_SPECIALS + pieces,
                                            show_progress=False)
        tok.train_from_iterator(read(), trainer)
        spec = json.loads(tok.to_str())  # the ## pieces are ordinary vocabulary, not special tokens
        spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] in BERT_SPECIALS]
        tok = Tokenizer.from_str(json.dumps(spec))
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
        return tok
    if Path(kind).suffix == ".json" or "/" in kind or Path(kind).exists():
        return load_tokenizer(kind)
    raise KilnError(f"unknown tokenizer {kind!r}{did_you_mean(kind, KINDS)}: "
                    f"use char, bpe, wordpiece or a path to a tokenizer.json")


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise KilnError(f"tokenizer file not found: {path}")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a plain Exception for bad JSON / unknown models
        raise KilnError(f"{path}: not a valid tokenizer.json ({str(e).splitlines()[0]})") from None


def eot_id(tok: Tokenizer) -> int | None:
    """Id of the document separator (<|endoftext|>, else [SEP]), or None (char tokenizers)."""
    for t in (EOT, "[SEP]"):
        i = tok.token_to_id(t)
        if i is not None:
            return i
    return None


def vocab_size(tok: Tokenizer) -> int:
    """Number of ids needed: largest id + 1 (ids of a loaded file need not be contiguous)."""
    return max(tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1


def tokenizer_kind(tok: Tokenizer) -> str:
    """'char' for char tokenizers built here, else the model type in lower case (bpe, wordpiece, ...)."""
    spec = json.loads(tok.to_str())
    model = spec.get("model", {})
    pre = spec.get("pre_tokenizer") or {}
    if (model.get("type") == "WordLevel" and pre.get("type") == "Split"
            and pre.get("pattern", {}).get("Regex") == _ONE_CHAR and not spec.get("normalizer")
            and all(len(t) == 1 for t in model.get("vocab", {}))):
        return "char"
    return str(model.get("type", "unknown")).lower()


def unknown_characters(where: str, chars: Iterable[str], vocab_size: int | None = None) -> KilnError:
    """One line naming the characters (the first few, in order of appearance) a char vocabulary lacks, and
    what to do about them."""
    chars = list(dict.fromkeys(chars))
    shown = [f"{c!r} (U+{ord(c):04X})" for c in chars[:6]]
    others = ""
    if len(chars) > 1:
        others = f" (nor are {', '.join(shown[1:])}{f' and {len(chars) - 6} more' if len(chars) > 6 else ''})"
    size = f" of {vocab_size} characters" if vocab_size else ""
    return KilnError(f"{where}: character {shown[0]} is not in the char tokenizer's vocabulary{size}{others}; "
                     f"a char-level run knows only the characters of its training text: replace or remove these, "
                     f"or train on data that has them (data.tokenizer bpe encodes any text)")


def cannot_encode(tok: Tokenizer, texts: Iterable[str], where: str, error: Exception) -> KilnError:
    """The one-line error for texts that `tok` failed to encode: the characters a char vocabulary lacks when
    that is the reason, else the library's first line."""
    if tokenizer_kind(tok) == "char":
        vocab = tok.get_vocab()
        missing = [c for t in texts for c in (t if isinstance(t, str) else "".join(t)) if c not in vocab]
        if missing:
            return unknown_characters(where, missing, len(vocab))
    return KilnError(f"{where}: the tokenizer cannot encode this text ({str(error).splitlines()[0]})")


def encode_text(tok: Tokenizer, text: str, where: str = "input") -> list[int]:
    """Token ids of one text (a prompt, a --text), or a one-line KilnError naming what the tokenizer cannot
    represent (the characters outside a char vocabulary) instead of the tokenizers library's exception."""
    if tokenizer_kind(tok) == "char":
        vocab = tok.get_vocab()
        missing = [c for c in text if c not in vocab]
        if missing:
            raise unknown_characters(where, missing, len(vocab))
    try:
        return tok.encode(text).ids
    except Exception as e:  # e.g. a WordLevel vocabulary without an unknown token
        raise KilnError(f"{where}: the tokenizer cannot encode this text ({str(e).splitlines()[0]})") from None


class CharEncoder:
    """Fast encoder for char tokenizers: a code point -> id table (same ids as the tokenizer, ~50x faster)."""

    def __init__(self, tok: Tokenizer, where: str = "input"):
        self.where = where
        vocab = tok.get_vocab()
        self.table = np.full(max(map(ord, vocab)) + 1, -1, dtype=np.int64)
        for c, i in vocab.items():
            self.table[ord(c)] = i

    def __call__(self, text: str) -> np.ndarray:
        cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        ids = self.table[np.minimum(cps, len(self.table) - 1)]
        bad = (ids < 0) | (cps >= len(self.table))
        if bad.any():
            raise unknown_characters(self.where, (chr(int(c)) for c in cps[bad][:10_000]), int((self.table >= 0).sum()))
        return ids


def encoder(tok: Tokenizer, where: str = "input"):
    """texts -> list of int64 id arrays, without special tokens (encode_batch; table lookup for char).
    `where` (the source) starts the message of a KilnError when the tokenizer cannot encode the text."""
    if tokenizer_kind(tok) == "char":
        enc = CharEncoder(tok, where)
        return lambda texts: [enc(t) for t in texts]

    def encode(texts: list[str]) -> list[np.ndarray]:
        try:
            out = tok.encode_batch(texts, add_special_tokens=False)
        except Exception as e:
            raise KilnError(f"{where}: the tokenizer cannot encode this text: {str(e).splitlines()[0]}") from None
        return [np.asarray(e.ids, dtype=np.int64) for e in out]

    return encode
