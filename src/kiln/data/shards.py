"""Token shards on disk: raw little-endian uint16/uint32 files `{split}_{i:03d}.bin` + manifest.json.

    ds = TokenShards("data/shakespeare", "train")
    x = ds.read(1000, 257)          # int64 array, may cross shard files
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from kiln.errors import KilnError

FORMAT = "kiln-shards-1"
MANIFEST = "manifest.json"
SHARD_TOKENS = 100_000_000  # tokens per shard file at most


def dtype_for(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 65535 else "uint32"


class ShardWriter:
    """Appends token arrays to `{split}_000.bin`, `{split}_001.bin`, ... of at most `shard_tokens` each."""

    def __init__(self, folder: str | Path, split: str, dtype: str, shard_tokens: int = SHARD_TOKENS):
        self.folder, self.split, self.shard_tokens = Path(folder), split, int(shard_tokens)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.limit = np.iinfo(self.dtype).max
        self.shards: list[dict] = []
        self.tokens = 0
        self._f = None

    def append(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids)
        if ids.size == 0:
            return
        if ids.min() < 0 or ids.max() > self.limit:
            raise ValueError(f"token id out of range for {self.dtype.name}: {ids.min()}..{ids.max()}")
        ids = ids.astype(self.dtype, copy=False)
        while ids.size:
            if self._f is None or self.shards[-1]["tokens"] >= self.shard_tokens:
                self._next_file()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            part, ids = ids[:room], ids[room:]
            self._f.write(part.tobytes())
            self.shards[-1]["tokens"] += int(part.size)
            self.tokens += int(part.size)

    def _next_file(self) -> None:
        if self._f is not None:
            self._f.close()
        name = f"{self.split}_{len(self.shards):03d}.bin"
        self._f = open(self.folder / name, "wb")
        self.shards.append({"file": name, "tokens": 0})

    def close(self) -> dict:
        """Close the last file; returns the split's manifest entry {"tokens", "shards"}."""
        if self._f is not None:
            self._f.close()
            self._f = None
        return {"tokens": self.tokens, "shards": list(self.shards)}


def read_manifest(folder: str | Path) -> dict:
    """Load and check manifest.json: format, and every shard file present with the right size."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise KilnError(f"{path}: not found; is {folder} a prepared dataset? (run `kiln data prepare` first)")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
        if m.get("format") != FORMAT:
            raise KilnError(f"{path}: unknown format {m.get('format')!r}, expected {FORMAT!r}")
        itemsize = np.dtype(m["dtype"]).itemsize
        splits = m["splits"]
        for split, entry in splits.items():
            for shard in entry["shards"]:
                f = folder / shard["file"]
                if not f.is_file():
                    raise KilnError(f"{f}: shard file missing (listed in {path})")
                if f.stat().st_size != shard["tokens"] * itemsize:
                    raise KilnError(f"{f}: shard has {f.stat().st_size} bytes, manifest says "
                                    f"{shard['tokens']} tokens of {m['dtype']} ({shard['tokens'] * itemsize} bytes)")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError, ValueError) as e:
        raise KilnError(f"{path}: corrupt manifest ({type(e).__name__}: {e})") from None
    return m


def write_manifest(folder: str | Path, manifest: dict) -> None:
    (Path(folder) / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


class TokenShards:
    """Read-only view of one split as a single token sequence; shard files are memory-mapped lazily."""

    def __init__(self, folder: str | Path, split: str = "train", manifest: dict | None = None):
        self.folder, self.split = Path(folder), split
        self.manifest = manifest or read_manifest(folder)
        splits = self.manifest["splits"]
        if split not in splits:
            raise KilnError(f"{self.folder / MANIFEST}: no split {split!r} (has {', '.join(splits)})")
        self.dtype = np.dtype(self.manifest["dtype"]).newbyteorder("<")
        self.files = [self.folder / s["file"] for s in splits[split]["shards"] if s["tokens"] > 0]
        sizes = [s["tokens"] for s in splits[split]["shards"] if s["tokens"] > 0]
        self.starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self._maps: list[np.memmap | None] = [None] * len(self.files)

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    def _map(self, i: int) -> np.memmap:
        if self._maps[i] is None:
            self._maps[i] = np.memmap(self.files[i], dtype=self.dtype, mode="r")
        return self._maps[i]

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start+length) as int64, crossing shard boundaries."""
        start, length = int(start), int(length)
        if start < 0 or length < 0 or start + length > len(self):
            raise IndexError(f"read({start}, {length}) outside {self.split} split of {len(self)} tokens")
        out = np.empty(length, dtype=np.int64)
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        done = 0
        while done < length:
            m = self._map(i)
            lo = start + done - int(self.starts[i])
            n = min(length - done, len(m) - lo)
            out[done:done + n] = m[lo:lo + n]
            done += n
            i += 1
        return out

    def __getstate__(self):  # picklable for DataLoader workers: drop open maps
        d = dict(self.__dict__)
        d["_maps"] = [None] * len(self.files)
        return d
