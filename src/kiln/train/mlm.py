"""Masked-LM pretraining (BERT): dynamic masking of token windows, a loss over the masked positions.

Masking is a pure function of (seed, micro-batch index): a fresh mask every time a window is seen (dynamic,
as in RoBERTa), and an exact resume without replaying the RNG. Of the selected positions (15% by default,
or whole words) 80% become [MASK], 10% a random token, 10% stay unchanged; only they count as targets.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from kiln.errors import KilnError
from kiln.run.checkpoint import unwrap

from kiln.constants import IGNORE_INDEX as IGNORE  # noqa: E402  (the one ignore index, kiln.constants)


class MaskedLM:
    def __init__(self, vocab_size: int, mask_id: int, special_ids: list[int] = (), mask_prob: float = 0.15,
                 continuation: torch.Tensor | None = None, space: torch.Tensor | None = None, seed: int = 0):
        """vocab_size: the model's (including [MASK]); random replacements are drawn below `mask_id` when the
        mask token was appended. continuation[id] True: the token continues the previous word (WordPiece ##,
        BPE without a leading space); space[id] True: a whitespace token (char tokenizers). Either enables
        whole-word masking."""
        if not 0.0 < mask_prob < 1.0:
            raise KilnError(f"mlm.mask_prob must be in (0, 1), got {mask_prob}")
        self.vocab_size, self.mask_id, self.mask_prob, self.seed = vocab_size, mask_id, mask_prob, seed
        self.random_high = mask_id if mask_id == vocab_size - 1 else vocab_size
        self.special = torch.tensor(sorted(set(special_ids)), dtype=torch.long)
        self.continuation, self.space = continuation, space

    # ------------------------------------------------------------------ masking
    def word_starts(self, ids: torch.Tensor) -> torch.Tensor:
        if self.continuation is not None:
            return ~self.continuation[ids]
        prev_space = torch.ones_like(ids, dtype=torch.bool)
        prev_space[:, 1:] = self.space[ids[:, :-1]]
        return self.space[ids] | prev_space  # a char starts a word after whitespace; spaces are their own words

    def mask(self, windows: torch.Tensor, index: int, whole_word: bool = False) -> dict:
        """[B, T+1] token windows (from the causal-LM sampler) -> {input_ids, labels} of length T."""
        ids = windows[:, :-1].clone()
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        r = torch.rand(ids.shape, generator=g)
        if whole_word:
            starts = self.word_starts(ids)
            starts[:, 0] = True  # a window can open inside a word (a ## piece): its first piece starts a word
            word = starts.long().cumsum(1) - 1
            selected = r.gather(1, word) < self.mask_prob
        else:
            selected = r < self.mask_prob
        if len(self.special):
            selected &= ~torch.isin(ids, self.special)
        labels = torch.where(selected, ids, torch.full_like(ids, IGNORE))
        action = torch.rand(ids.shape, generator=g)
        random_tokens = torch.randint(0, self.random_high, ids.shape, generator=g)
        ids = torch.where(selected & (action < 0.8), torch.full_like(ids, self.mask_id), ids)
        ids = torch.where(selected & (action >= 0.8) & (action < 0.9), random_tokens, ids)
        return {"input_ids": ids, "labels": labels}

    # ------------------------------------------------------------------ objective
    def targets(self, batch: dict) -> int:
        return int((batch["labels"] != IGNORE).sum())

    def loss(self, model, batch: dict) -> torch.Tensor:
        if getattr(unwrap(model), "fused_loss", False):  # kiln's Transformer: head on the targets only, fused
            return model(batch["input_ids"], labels=batch["labels"], sparse_labels=True)
        logits = model(batch["input_ids"])
        labels = batch["labels"]
        picked = labels != IGNORE
        per_token = F.cross_entropy(logits[picked], labels[picked], reduction="none")
        return per_token.float().sum()

    def evaluate(self, model, windows, whole_word: bool = False) -> dict:
        """Masked-token loss, perplexity and accuracy on fixed masks (index-seeded: the same every eval)."""
        total, correct, count = self.sums(model, windows, whole_word)
        val = total / max(count, 1)
        return {"val_loss": val, "val_ppl": math.exp(min(val, 50.0)), "mlm_accuracy": correct / max(count, 1)}

    @torch.no_grad()
    def sums(self, model, windows, whole_word: bool = False, per_row: bool = False) -> tuple[float, int, int]:
        """(summed masked-token cross-entropy, correct argmax predictions, masked tokens) on fixed masks, seeded
        by the batch's index, or with per_row by each row's index (the same masks whatever the batch size)."""
        total, count, correct, row = 0.0, 0, 0, 0
        for i, w in enumerate(windows()):
            if per_row:
                rows = [self.mask(w[j:j + 1].cpu(), 10**9 + row + j, whole_word) for j in range(len(w))]
                batch = {k: torch.cat([r[k] for r in rows]) for k in rows[0]}
                row += len(w)
            else:
                batch = self.mask(w.cpu(), 10**9 + i, whole_word)
            batch = {k: v.to(w.device) for k, v in batch.items()}
            logits = model(batch["input_ids"])
            picked = batch["labels"] != IGNORE
            total += float(F.cross_entropy(logits[picked].float(), batch["labels"][picked], reduction="sum"))
            correct += int((logits[picked].argmax(-1) == batch["labels"][picked]).sum())
            count += int(picked.sum())
        return total, correct, count


def special_ids(vocab: dict[str, int]) -> tuple[int | None, list[int]]:
    """(the [MASK]/<mask> id or None, the ids of every bracketed special token such as [CLS] or <s>)."""
    mask_id = next((vocab[t] for t in ("[MASK]", "<mask>") if t in vocab), None)
    special = [i for t, i in vocab.items() if t.startswith(("[", "<")) and t.endswith(("]", ">")) and len(t) > 2]
    return mask_id, special


def from_tokenizer(tokenizer_file: Path, base_vocab: int, mask_prob: float, seed: int) -> MaskedLM:
    """Use the tokenizer's [MASK]/<mask> token, or append one id after the vocabulary (char, BPE)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    vocab = tok.get_vocab()
    mask_id, special = special_ids(vocab)
    size = base_vocab if mask_id is not None else base_vocab + 1
    mask_id = base_vocab if mask_id is None else mask_id
    by_id = {i: t for t, i in vocab.items()}
    names = [by_id.get(i, "") for i in range(size)]
    continuation = space = None
    if any(n.startswith("##") for n in names):  # WordPiece
        continuation = torch.tensor([n.startswith("##") for n in names])
    elif any(n.startswith("Ġ") for n in names):  # byte-level BPE marks a leading space with Ġ
        continuation = torch.tensor([bool(n) and not n.startswith("Ġ") and i not in special
                                     for i, n in enumerate(names)])
    else:  # characters
        space = torch.tensor([n.isspace() if n else False for n in names])
    return MaskedLM(size, mask_id, special, mask_prob, continuation, space, seed)
