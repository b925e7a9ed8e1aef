"""Text augmentation for distillation transfer sets (Tang et al. 2019, "Distilling Task-Specific Knowledge from
BERT into Simple Neural Networks", section 3.3): new texts made from the training texts, which the teachers label.

Per copy of a text, every word is independently replaced by the mask token with probability `p_mask`, or by a
word drawn from the training texts' own words (their frequency) with probability `p_swap`; then, with
probability `p_ngram`, only a random window of 1 to 5 words is kept. Words are whitespace-separated. Labels are
not carried over as truth: a changed text's label is whatever the teachers say.
"""

from __future__ import annotations

import numpy as np


def augment_texts(texts: list[str], copies: int, seed: int, mask: str | None, p_mask: float = 0.1,
                  p_swap: float = 0.1, p_ngram: float = 0.25, max_ngram: int = 5) -> list[tuple[int, str]]:
    """`copies` new texts per input text, as (source index, text), in source order; seeded, so reproducible.
    `mask` None drops a masked word instead of replacing it (for tokenizers without a shared mask token)."""
    rng = np.random.default_rng([seed, 0xA06])
    split = [t.split() for t in texts]
    pool = [w for words in split for w in words]
    out: list[tuple[int, str]] = []
    if not pool:
        return out
    for i, words in enumerate(split):
        for _ in range(copies):
            new = []
            for w in words:
                u = rng.random()
                if u < p_mask:
                    if mask is not None:
                        new.append(mask)
                elif u < p_mask + p_swap:
                    new.append(pool[int(rng.integers(len(pool)))])
                else:
                    new.append(w)
            if len(new) > 1 and rng.random() < p_ngram:
                n = int(rng.integers(1, min(max_ngram, len(new)) + 1))
                start = int(rng.integers(0, len(new) - n + 1))
                new = new[start:start + n]
            if not new:  # every word masked away: keep one original word rather than an empty text
                new = [words[int(rng.integers(len(words)))]] if words else []
            out.append((i, " ".join(new)))
    return out
