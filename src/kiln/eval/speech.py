"""Scoring speech recognition: the character vocabulary of a CTC model, greedy CTC decoding, and WER/CER computed
by jiwer (the library the Hugging Face speech examples score with).

The vocabulary is Wav2Vec2CTCTokenizer's layout: id 0 `<pad>` (also the CTC blank, as Wav2Vec2ForCTC's
pad_token_id), 1 `<unk>`, 2 `|` (the word delimiter: a space), then the characters of the training transcripts.
Greedy decoding is that tokenizer's decode of the argmax ids: repeats collapsed, blanks dropped, `|` made a
space, the ends stripped.
"""

from __future__ import annotations

from itertools import groupby

import numpy as np

from kiln.errors import KilnError

PAD, UNK, DELIMITER = "<pad>", "<unk>", "|"


def clean(text: str, lowercase: bool) -> str:
    text = " ".join(text.split())
    return text.lower() if lowercase else text


def build_vocab(transcripts) -> list[str]:
    chars = sorted({c for t in transcripts for c in t} - {" "})
    if DELIMITER in chars:
        raise KilnError(f"the transcripts hold {DELIMITER!r}, the word delimiter of the CTC vocabulary")
    return [PAD, UNK, DELIMITER] + chars


def encode(text: str, index: dict[str, int]) -> list[int]:
    unk = index.get(UNK, 1)
    return [index.get(DELIMITER if c == " " else c, unk) for c in text]


def unknown_chars(texts, vocab: list[str]) -> list[str]:
    known = set(vocab) | {" "}
    return sorted({c for t in texts for c in t if c not in known})


def greedy_decode(ids, vocab: list[str]) -> str:
    tokens = [vocab[int(i)] for i, _ in groupby(ids)]
    return "".join(" " if t == DELIMITER else t for t in tokens if t != PAD).strip()


def decode_batch(logits, frames, vocab: list[str]) -> list[str]:
    """Transcripts of logits [B, T, V] (a tensor) with their valid frame counts [B]."""
    ids = logits.argmax(-1).cpu().numpy()
    n = np.asarray(frames.cpu() if hasattr(frames, "cpu") else frames)
    return [greedy_decode(row[:int(k)], vocab) for row, k in zip(ids, n)]


def error_rates(references: list[str], hypotheses: list[str]) -> dict:
    """{"wer", "cer"} of the hypotheses against the references (jiwer; an empty hypothesis counts its deletions)."""
    try:
        import jiwer
    except ImportError:
        raise KilnError("scoring speech recognition needs jiwer (pip install 'kiln[audio]')") from None
    out = jiwer.process_words(references, hypotheses)
    chars = jiwer.process_characters(references, hypotheses)
    return {"wer": float(out.wer), "cer": float(chars.cer), "substitutions": out.substitutions,
            "deletions": out.deletions, "insertions": out.insertions, "exact": float(np.mean(
                [r == h for r, h in zip(references, hypotheses)])) if references else 0.0}
