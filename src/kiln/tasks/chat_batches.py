"""Batches of tokenized conversations: one per row, padded, or several packed into one row.

A row's labels are the next token where that token is a target (IGNORE_INDEX elsewhere, and at the last token of
each conversation: nothing follows it within the conversation). A packed row also carries position ids that
restart with each conversation and a block-diagonal causal mask [B, 1, T, T]: a token attends to the earlier
tokens of its own conversation only, so a packed conversation's loss is the loss it has alone (checked in
tests/tasks/test_chat_sft.py); padding is its own block.

Micro-batch i is a pure function of i (kiln.data.batches.EpochSampler over rows; the packing is fixed once from
the seed), so a resumed run takes the batches the uninterrupted one would have.
"""

from __future__ import annotations

import numpy as np
import torch

from kiln.constants import IGNORE_INDEX
from kiln.data.batches import EpochSampler
from kiln.data.chat_data import EncodedChat, pack


def _labels(e: EncodedChat) -> np.ndarray:
    out = np.full(len(e.ids), IGNORE_INDEX, dtype=np.int64)
    out[:-1] = np.where(e.targets[1:], e.ids[1:], IGNORE_INDEX)
    return out


def collate(convs: list[EncodedChat], pad_id: int) -> dict:
    """One conversation per row, right-padded to the longest: input_ids, labels, attention_mask [B, T]."""
    T = max(len(e.ids) for e in convs)
    ids = np.full((len(convs), T), pad_id, dtype=np.int64)
    labels = np.full((len(convs), T), IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros((len(convs), T), dtype=np.int64)
    for r, e in enumerate(convs):
        n = len(e.ids)
        ids[r, :n], labels[r, :n], mask[r, :n] = e.ids, _labels(e), 1
    return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
            "attention_mask": torch.from_numpy(mask)}


def collate_packed(rows: list[list[EncodedChat]], pad_id: int) -> dict:
    """Several conversations per row: input_ids, labels, position_ids [B, T] and a block-diagonal causal
    attention_mask [B, 1, T, T] (True = attend)."""
    T = max(sum(len(e.ids) for e in row) for row in rows)
    ids = np.full((len(rows), T), pad_id, dtype=np.int64)
    labels = np.full((len(rows), T), IGNORE_INDEX, dtype=np.int64)
    pos = np.zeros((len(rows), T), dtype=np.int64)
    seg = np.full((len(rows), T), -1, dtype=np.int64)  # padding: a block of its own
    for r, row in enumerate(rows):
        at = 0
        for k, e in enumerate(row):
            n = len(e.ids)
            ids[r, at:at + n], labels[r, at:at + n] = e.ids, _labels(e)
            pos[r, at:at + n], seg[r, at:at + n] = np.arange(n), k
            at += n
    s = torch.from_numpy(seg)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    mask = (s[:, :, None] == s[:, None, :]) & causal
    return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
            "position_ids": torch.from_numpy(pos), "attention_mask": mask[:, None]}


class ChatBatches:
    """Micro-batch i of the training conversations: `batch_size` rows, each a conversation (padding) or a
    packed sequence of up to `capacity` tokens."""

    def __init__(self, enc: list[EncodedChat], capacity: int, batch_size: int, seed: int, packing: bool, pad_id: int):
        self.enc, self.packing, self.pad_id = enc, packing, pad_id
        lengths = [len(e.ids) for e in enc]
        # packing: the groups are fixed from the data (first-fit decreasing), their order shuffled each epoch
        self.rows = pack(lengths, capacity) if packing else [[i] for i in range(len(enc))]
        row_lengths = [sum(lengths[i] for i in row) for row in self.rows]
        self.sampler = EpochSampler(row_lengths, batch_size, seed, bucket=0 if packing else 8)
        self.tokens, self.capacity = sum(lengths), capacity

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, i: int) -> dict:
        rows = [[self.enc[j] for j in self.rows[k]] for k in self.sampler.indices(i)]
        if self.packing:
            return collate_packed(rows, self.pad_id)
        return collate([r[0] for r in rows], self.pad_id)

    def describe(self) -> str:
        n = len(self.enc)
        if self.packing:
            fill = self.tokens / (len(self.rows) * self.capacity)
            return (f"packing: {n} conversation(s), {self.tokens:,} tokens -> {len(self.rows)} sequence(s) of up to "
                    f"{self.capacity} tokens ({fill:.0%} full)")
        return f"padding: {n} conversation(s), {self.tokens:,} tokens, one per row"
