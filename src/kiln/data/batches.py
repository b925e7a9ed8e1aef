"""Deterministic, seekable batches of token windows.

Sample i of the whole run is a pure function of (seed, i): each epoch is a seeded permutation of
non-overlapping windows (with a seeded phase offset, so window boundaries move between epochs). Resuming at
step k therefore seeks straight to sample k * global_batch: no replay, no skipped or repeated data
(the complaints of nanoGPT#294, litgpt#1712, transformers#21934). Each rank takes its own slice of every
global batch, so ranks never overlap.
"""

from __future__ import annotations

import numpy as np
import torch

from kiln.errors import KilnError


class WindowSampler:
    def __init__(self, n_tokens: int, window: int, seed: int, name: str = "train"):
        """window = context_length + 1 tokens (inputs and shifted targets)."""
        self.n_tokens, self.window, self.seed = n_tokens, window, seed
        self.per_epoch = (n_tokens - window) // (window - 1)  # room for any phase offset in [0, window-1)
        if n_tokens < window or self.per_epoch < 1:
            raise KilnError(f"the {name} split has {n_tokens:,} tokens, fewer than context_length + 1 = {window} "
                            f"needed for {'two windows' if n_tokens >= window else 'one window'}: lower "
                            f"model.context_length or give more data")
        self._epoch, self._perm, self._offset = -1, None, 0

    def _load_epoch(self, epoch: int) -> None:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        self._offset = int(torch.randint(0, self.window - 1, (1,), generator=g))
        self._perm = torch.randperm(self.per_epoch, generator=g).numpy()
        self._epoch = epoch

    def start(self, sample_index: int) -> int:
        epoch, i = divmod(sample_index, self.per_epoch)
        if epoch != self._epoch:
            self._load_epoch(epoch)
        return self._offset + int(self._perm[i]) * (self.window - 1)

    def epoch_of(self, sample_index: int) -> float:
        return sample_index / self.per_epoch


class TokenBatches:
    """Batches [B, context+1] of int64 tokens from a token source with `read(start, length)` and `len()`."""

    def __init__(self, source, context_length: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, name: str = "train"):
        self.source, self.batch_size, self.rank, self.world_size = source, batch_size, rank, world_size
        self.window = context_length + 1
        self.sampler = WindowSampler(len(source), self.window, seed, name)

    def batch(self, micro_index: int) -> torch.Tensor:
        """Micro-batch number `micro_index` of the run (counting all micro-batches of all steps)."""
        first = (micro_index * self.world_size + self.rank) * self.batch_size
        rows = [self.source.read(self.sampler.start(first + j), self.window) for j in range(self.batch_size)]
        return torch.from_numpy(np.stack(rows).astype(np.int64, copy=False))


def eval_windows(source, context_length: int, batch_size: int, n_batches: int):
    """Fixed validation batches: windows spread evenly over the whole split, same every eval and every run."""
    window = context_length + 1
    n_windows = (len(source) - 1) // context_length
    if n_windows < 1:
        raise KilnError(f"the validation split has {len(source):,} tokens, fewer than context_length + 1 = {window}: "
                        f"lower model.context_length, raise data.val_fraction or give more data")
    count = min(n_windows, n_batches * batch_size)
    starts = np.linspace(0, (n_windows - 1) * context_length, count).astype(np.int64)
    for i in range(0, count, batch_size):
        rows = [source.read(int(s), window) for s in starts[i:i + batch_size]]
        yield torch.from_numpy(np.stack(rows).astype(np.int64, copy=False))


class ArrayTokens:
    """An in-memory token source (tests, small corpora) with the same interface as data.shards.TokenShards."""

    def __init__(self, tokens):
        self.tokens = np.asarray(tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    def read(self, start: int, length: int) -> np.ndarray:
        return self.tokens[start:start + length].astype(np.int64)


class EpochSampler:
    """Example indices of micro-batch `i` over a labelled set: a pure function of i (resume seeks, never
    replays). Each epoch is a seeded permutation. bucket > 0: the permutation is cut into chunks of
    `bucket` batches, each chunk sorted by length (little padding) and the chunk's batches shuffled."""

    def __init__(self, lengths, batch_size: int, seed: int, bucket: int = 0):
        self.lengths, self.B, self.seed, self.bucket = np.asarray(lengths), batch_size, seed, bucket
        self.per_epoch = -(-len(self.lengths) // batch_size)
        self._epoch, self._batches = -1, []

    def _plan(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        perm = rng.permutation(len(self.lengths))
        if not self.bucket:
            return [perm[j:j + self.B] for j in range(0, len(perm), self.B)]
        batches, chunk = [], self.bucket * self.B
        for c in range(0, len(perm), chunk):
            part = perm[c:c + chunk]
            part = part[np.argsort(self.lengths[part], kind="stable")]
            batches += [part[j:j + self.B] for j in range(0, len(part), self.B)]
        return [batches[k] for k in rng.permutation(len(batches))]

    def indices(self, i: int) -> np.ndarray:
        epoch, j = divmod(i, self.per_epoch)
        if epoch != self._epoch:
            self._batches, self._epoch = self._plan(epoch), epoch
        return self._batches[j]


def by_length(lengths, batch_size: int):
    """Index arrays of `batch_size` in length order (evaluation: little padding); they map rows back."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    for s in range(0, len(order), batch_size):
        yield order[s:s + batch_size]
