"""Labelled text as model input: a private tokenizer copy that truncates, a split's ids/types/labels, padded
micro-batches, and predictions over length-sorted batches. Shared by the text tasks (classification, and the
teachers of distillation)."""

from __future__ import annotations

import numpy as np
import torch

from kiln.data import tables
from kiln.data.batches import EpochSampler, by_length
from kiln.data.tokenizer import cannot_encode
from kiln.errors import KilnError
from kiln.run.device import autocast
from kiln.train.objectives import model_inputs


class EncodedTexts:
    """Token ids of a split (truncated to max_length), labels as class ids, and how many examples were cut."""

    def __init__(self, ids: list[list[int]], types: list[list[int]] | None, labels: list[int] | None,
                 truncated: int):
        self.ids, self.types, self.labels, self.truncated = ids, types, labels, truncated
        self.lengths = np.array([len(x) for x in ids], dtype=np.int64)
        self.teacher_logits: np.ndarray | None = None  # [n_teachers, n, n_classes] for distillation
        self.hard: np.ndarray | None = None  # per example 1.0 = learn its label too, 0.0 = teachers only

    def __add__(self, other: "EncodedTexts") -> "EncodedTexts":
        types = self.types + other.types if self.types is not None and other.types is not None else None
        labels = self.labels + other.labels if self.labels is not None and other.labels is not None else None
        return EncodedTexts(self.ids + other.ids, types, labels, self.truncated + other.truncated)

    def __len__(self) -> int:
        return len(self.ids)


def prepare_tokenizer(tok, max_length: int):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tok.to_str())  # a private copy: padding/truncation settings are per object
    tok.no_padding()
    try:
        tok.enable_truncation(max_length)
    except Exception as e:
        raise KilnError(f"data.max_length {max_length}: {str(e).splitlines()[0]}") from None
    return tok


def encode_examples(tok, examples: list[tables.Example], label_index: dict[str, int] | None, model_cfg,
                    where: str, problem: str = "single_label") -> EncodedTexts:
    texts = [(e.text, e.pair) if e.pair is not None else e.text for e in examples]
    try:
        out = tok.encode_batch(texts)
    except Exception as e:  # the characters a char vocabulary lacks, named; else the library's first line
        raise cannot_encode(tok, texts, where, e) from None
    ids = [e.ids or [0] for e in out]
    truncated = sum(1 for e in out if e.overflowing)
    top = max((max(x) for x in ids), default=0)
    if top >= model_cfg.vocab_size:
        raise KilnError(f"{where}: the tokenizer produced id {top}, beyond the model's vocabulary "
                        f"({model_cfg.vocab_size}); tokenizer.json does not belong to this model")
    types = None
    if model_cfg.type_vocab_size:
        cap = model_cfg.type_vocab_size - 1
        types = [[min(t, cap) for t in e.type_ids] or [0] for e in out]
    labels = targets(examples, label_index, problem) if label_index is not None else None
    return EncodedTexts(ids, types, labels, truncated)


def targets(examples: list[tables.Example], label_index: dict[str, int], problem: str = "single_label") -> list:
    """The training targets: class ids (single_label), multi-hot rows of floats (multi_label), numbers (regression)."""
    if problem == "regression":
        return [float(e.target) for e in examples]
    if problem == "multi_label":
        return [[1.0 if name in e.target else 0.0 for name in label_index] for e in examples]
    return [label_index[e.label] for e in examples]


def collate(enc: EncodedTexts, index, pad_id: int) -> dict:
    """A batch padded to its longest example (right padding): input_ids, attention_mask, [token_type_ids], labels."""
    index = list(index)
    T = int(max(enc.lengths[i] for i in index))
    B = len(index)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.bool)
    types = torch.zeros((B, T), dtype=torch.long) if enc.types is not None else None
    for r, i in enumerate(index):
        n = len(enc.ids[i])
        ids[r, :n] = torch.as_tensor(enc.ids[i])
        mask[r, :n] = True
        if types is not None:
            types[r, :n] = torch.as_tensor(enc.types[i])
    batch = {"input_ids": ids, "attention_mask": mask}
    if types is not None:
        batch["token_type_ids"] = types
    if enc.labels is not None:  # class ids; multi-hot rows (multi_label) and numbers (regression) as floats
        y = [enc.labels[i] for i in index]
        batch["labels"] = torch.as_tensor(y, dtype=torch.float32 if isinstance(y[0], (list, float)) else torch.long)
    if enc.teacher_logits is not None:
        batch["teacher_logits"] = torch.as_tensor(enc.teacher_logits[:, index], dtype=torch.float32).transpose(0, 1)
    if enc.hard is not None:
        batch["hard"] = torch.as_tensor(enc.hard[index], dtype=torch.float32)
    return batch


class EpochBatches:
    """Micro-batch `i` of a seeded per-epoch shuffle: a pure function of i (resume and determinism).

    token_mask > 0 replaces that share of the ordinary tokens of every example by `mask_id`, drawn from a
    generator seeded by (seed, i): the same batch after a resume."""

    def __init__(self, enc: EncodedTexts, batch_size: int, seed: int, pad_id: int, token_mask: float = 0.0,
                 mask_id: int | None = None, special_ids=(), bucket: int = 0):
        self.enc, self.seed, self.pad_id = enc, seed, pad_id
        self.sampler = EpochSampler(enc.lengths, batch_size, seed, bucket)
        self.token_mask, self.mask_id = token_mask, mask_id
        self.special = torch.tensor(sorted(set(special_ids)), dtype=torch.long)  # padding: attention_mask

    def batch(self, i: int) -> dict:
        batch = collate(self.enc, self.sampler.indices(i), self.pad_id)
        if self.token_mask > 0:
            ids = batch["input_ids"]
            ordinary = batch["attention_mask"] & ~torch.isin(ids, self.special)
            g = torch.Generator().manual_seed(int(np.random.default_rng([self.seed, i, 7]).integers(2**62)))
            chosen = (torch.rand(ids.shape, generator=g) < self.token_mask) & ordinary
            batch["input_ids"] = ids.masked_fill(chosen, self.mask_id)
        return batch


def eval_batches(enc: EncodedTexts, batch_size: int, pad_id: int):
    """(positions, batch) in length order (little padding); positions map rows back to the split's order."""
    for idx in by_length(enc.lengths, batch_size):
        yield idx, collate(enc, idx, pad_id)


@torch.no_grad()
def predict_logits(model, enc: EncodedTexts, batch_size: int, pad_id: int, device: str = "cpu",
                   precision: str = "fp32") -> np.ndarray:
    """Class logits [n, n_classes] (float64) of every example, in the split's order."""
    was_training = model.training
    model.eval()
    out = None
    with autocast(precision, device):
        for idx, batch in eval_batches(enc, batch_size, pad_id):
            z = model(**{k: v.to(device) for k, v in model_inputs(batch).items()}).float().cpu().numpy()
            if out is None:
                out = np.zeros((len(enc), z.shape[1]), dtype=np.float64)
            out[idx] = z
    model.train(was_training)
    return out


def predict_probs(model, enc: EncodedTexts, batch_size: int, pad_id: int, device: str = "cpu",
                  precision: str = "fp32") -> np.ndarray:
    z = predict_logits(model, enc, batch_size, pad_id, device, precision)
    z = np.exp(z - z.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)
