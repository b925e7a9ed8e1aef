"""Dataset mixtures: several prepared datasets, each drawn with a given weight, deterministically.

    data:
      mixture: {data/web: 0.7, data/code: 0.2, data/books: 0.1}

Sample i of the run is a pure function of (seed, i), as with a single dataset (kiln.data.batches), so a
resume seeks straight to sample k and every rank takes its own slice. The samples are cut into blocks of
K; each block holds a fixed number of samples of each dataset (K * weight, by largest remainder) in a
seeded random order, one permutation per block. So within every block the proportions match the weights
to 1/K, sample i's dataset is known without replaying the draws before it, and so is its rank among that
dataset's samples: each dataset walks its own WindowSampler (its own seeded epochs) in order, with no
window repeated before its epoch ends.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kiln.errors import KilnError
from kiln.data.batches import WindowSampler

BLOCK = 4096  # samples per block (more when a weight is below 1/BLOCK)


@dataclass
class MixtureDataset:
    name: str
    folder: Path
    weight: float  # normalised: the weights sum to 1
    manifest: dict


def _check_weights(mixture: dict) -> dict[str, float]:
    if not isinstance(mixture, dict) or not mixture:
        raise KilnError(f"data.mixture must map prepared folders to weights, got {mixture!r}")
    weights = {}
    for folder, w in mixture.items():
        if isinstance(w, str):
            try:
                w = float(w)
            except ValueError:
                pass
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise KilnError(f"data.mixture: the weight of {folder} is {w!r}; expected a number >= 0")
        if w < 0:
            raise KilnError(f"data.mixture: the weight of {folder} is {w}; weights must be >= 0")
        weights[str(folder)] = float(w)
    total = sum(weights.values())
    if not total > 0:
        raise KilnError(f"data.mixture: the weights sum to {total}; they must sum to a positive number")
    return {k: v / total for k, v in weights.items()}


def _names(folders: list[str]) -> list[str]:
    """Short names for metrics (val_loss_<name>): the folder name, made unique and identifier-like."""
    names = []
    for f in folders:
        base = re.sub(r"\W+", "_", Path(f).name or Path(f).resolve().name).strip("_") or "data"
        name, i = base, 2
        while name in names:
            name, i = f"{base}_{i}", i + 1
        names.append(name)
    return names


def _tokenizer_id(folder: Path, manifest: dict) -> tuple[str, str]:
    """(identity used to compare, description for the error message)."""
    kind, vocab = manifest.get("tokenizer_kind", "?"), manifest.get("vocab_size", "?")
    desc = f"{kind} tokenizer, vocab {vocab}"
    tok = folder / manifest.get("tokenizer", "tokenizer.json")
    if tok.is_file():
        return hashlib.sha256(tok.read_bytes()).hexdigest(), desc
    return f"{kind}/{vocab}", desc


def read_mixture(mixture: dict) -> list[MixtureDataset]:
    """Check a data.mixture mapping before any work: weights, folders, shards, one shared tokenizer."""
    from kiln.data.shards import read_manifest

    weights = _check_weights(mixture)
    folders = list(weights)
    out, ids = [], []
    for name, folder in zip(_names(folders), folders, strict=True):
        path = Path(folder)
        if not path.is_dir():
            raise KilnError(f"data.mixture: prepared dataset {folder} not found (prepare it with "
                            f"`kiln data prepare --out {folder}`)")
        try:
            manifest = read_manifest(path)
        except KilnError as e:
            raise KilnError(f"data.mixture: {e}") from None
        out.append(MixtureDataset(name, path, weights[folder], manifest))
        ids.append(_tokenizer_id(path, manifest))
    for d, (ident, desc) in zip(out[1:], ids[1:]):
        if ident != ids[0][0]:
            raise KilnError(f"data.mixture: {out[0].folder} ({ids[0][1]}) and {d.folder} ({desc}) use different "
                            f"tokenizers; prepare every dataset with the same one (data.tokenizer: "
                            f"{out[0].folder / 'tokenizer.json'})")
    return out


def apportion(total: int, weights: np.ndarray) -> np.ndarray:
    """Integer counts summing to `total`, proportional to `weights` (largest remainder)."""
    exact = weights * total
    counts = np.floor(exact).astype(np.int64)
    rest = total - int(counts.sum())
    if rest:
        order = np.argsort(-(exact - counts), kind="stable")
        counts[order[:rest]] += 1
    return counts


class MixtureTokens:
    """Batches [B, context+1] drawn from several token sources by weight; the same `batch(micro_index)`
    interface (and the same per-rank slicing) as TokenBatches."""

    def __init__(self, sources: list, weights, context_length: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, names: list[str] | None = None, block: int | None = None):
        weights = np.asarray(weights, dtype=np.float64)
        if len(sources) != len(weights) or len(sources) == 0:
            raise ValueError("one weight per source")
        if (weights < 0).any() or not weights.sum() > 0:
            raise KilnError(f"mixture weights must be >= 0 and sum to a positive number, got {weights.tolist()}")
        self.weights = weights / weights.sum()
        self.names = names or [f"data{i}" for i in range(len(sources))]
        self.sources, self.batch_size, self.rank, self.world_size, self.seed = sources, batch_size, rank, world_size, seed
        self.window = context_length + 1
        smallest = self.weights[self.weights > 0].min()
        self.block = block or max(BLOCK, math.ceil(4 / smallest))
        self.counts = apportion(self.block, self.weights)  # samples of each dataset in every block
        self.samplers = [WindowSampler(len(src), self.window, seed * 7919 + 104_729 * (d + 1), name) if c else None
                         for d, (src, c, name) in enumerate(zip(sources, self.counts, self.names, strict=True))]
        self._template = np.repeat(np.arange(len(sources)), self.counts)
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(dataset of each sample of block b, its rank among that dataset's samples in the block)."""
        if b not in self._cache:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + b * 7_368_787 + 1) % (1 << 62))
            labels = self._template[torch.randperm(self.block, generator=g).numpy()]
            within = np.empty(self.block, dtype=np.int64)
            for d in range(len(self.sources)):
                where = np.flatnonzero(labels == d)
                within[where] = np.arange(len(where))
            if len(self._cache) >= 4:
                self._cache.pop(next(iter(self._cache)))
            self._cache[b] = (labels, within)
        return self._cache[b]

    def locate(self, i: int) -> tuple[int, int]:
        """(dataset, index of the sample within that dataset's own sequence) of global sample i."""
        b, o = divmod(int(i), self.block)
        labels, within = self._block(b)
        d = int(labels[o])
        return d, b * int(self.counts[d]) + int(within[o])

    def sample(self, i: int) -> np.ndarray:
        d, k = self.locate(i)
        return self.sources[d].read(self.samplers[d].start(k), self.window)

    def batch(self, micro_index: int) -> torch.Tensor:
        first = (micro_index * self.world_size + self.rank) * self.batch_size
        rows = [self.sample(first + j) for j in range(self.batch_size)]
        return torch.from_numpy(np.stack(rows).astype(np.int64, copy=False))

    def counts_upto(self, n: int) -> np.ndarray:
        """How many of the samples [0, n) come from each dataset (computed per block, no replay)."""
        full, part = divmod(int(n), self.block)
        counts = self.counts * full
        if part:
            labels, _ = self._block(full)
            counts = counts + np.bincount(labels[:part], minlength=len(self.sources))
        return counts

    def report(self, n: int) -> str:
        """One line: realised share of each dataset over the first n samples, its weight and epochs."""
        counts = self.counts_upto(n)
        parts = []
        for d, name in enumerate(self.names):
            epochs = self.samplers[d].epoch_of(int(counts[d])) if self.samplers[d] else 0.0
            parts.append(f"{name} {counts[d] / max(n, 1):.3f} (weight {self.weights[d]:.3f}, {epochs:.2f} epochs)")
        return f"mixture over {n:,} sequences: " + ", ".join(parts)
