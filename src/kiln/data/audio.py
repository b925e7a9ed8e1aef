"""Speech for `kiln finetune audio` (labels) and `kiln finetune asr` (transcripts): reading, splitting, batches.

    clips = scan("data/kws/train.csv", "label")        # a class-per-folder tree, or a CSV/TSV/JSONL/Parquet manifest
    waves, report = load_waveforms(clips, 16000, max_seconds=2)  # float32 mono at 16 kHz, each normalised
    batches = AudioBatches(waves, targets, collate, batch_size=32, seed=0)

Inputs (one-line KilnErrors naming the file and what was expected):
- a folder with one subfolder per class holding audio files (labels only); a folder of audio files without
  subfolders is unlabelled (predict only); other files are counted and skipped; a folder without audio is an
  error;
- a manifest with a header and columns `path` (relative to the manifest's folder) and `label` or `text`;
  a row naming a missing file is an error.
Every file is decoded by soundfile (WAV of 8/16/24/32-bit integers or floats, FLAC, OGG/Vorbis), mixed down to
mono (the mean of the channels), resampled by soxr (its high-quality setting) to the model's rate, and normalised
per utterance to zero mean and unit variance (Wav2Vec2FeatureExtractor's do_normalize). A file soundfile cannot
decode, or one with no samples, is an error. Utterances over `max_seconds` are cut (`too_long: cut`), left out
(`skip`) or refused (`error`), with a count. Batches are zero-padded with an attention mask over the samples; batch
i is a pure function of (seed, i), SpecAugment-style time masks included (exact resume).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kiln.data.folders import scan_class_folders
from kiln.errors import KilnError

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga")
MANIFEST_SUFFIXES = (".csv", ".tsv", ".jsonl", ".parquet")
EXPECTED = "a folder of audio files (one subfolder per class) or a CSV/TSV/JSONL/Parquet manifest of path,label|text"


@dataclass
class Clips:
    """What a source names, before decoding: per utterance a file and a target (label or transcript; None:
    unlabelled)."""

    path: Path
    files: list[Path]
    targets: list[str | None]
    skipped: int = 0  # non-audio files in a folder
    lines: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.files)

    def subset(self, index) -> "Clips":
        index = list(index)
        return Clips(self.path, [self.files[i] for i in index], [self.targets[i] for i in index], self.skipped,
                     [self.lines[i] for i in index] if self.lines else [])


def scan(path: str | Path, column: str = "label", require: bool = True) -> Clips:
    """The clips of a folder or manifest; `column` label or text; require=False reads unlabelled input."""
    path = Path(path)
    if not path.exists():
        raise KilnError(f"{path}: not found (expected {EXPECTED})")
    if path.is_dir():
        return _scan_folder(path, column, require)
    if path.suffix.lower() in MANIFEST_SUFFIXES:
        return _scan_manifest(path, column, require)
    if path.suffix.lower() in AUDIO_SUFFIXES:  # one file: predict
        if require:
            raise KilnError(f"{path}: one audio file has no {column}; expected {EXPECTED}")
        return Clips(path.parent, [path], [None])
    raise KilnError(f"{path}: not an audio file ({', '.join(AUDIO_SUFFIXES)}), a folder or a manifest "
                    f"({', '.join(MANIFEST_SUFFIXES)})")


def _scan_folder(path: Path, column: str, require: bool) -> Clips:
    files, names, skipped, classes = scan_class_folders(path, AUDIO_SUFFIXES, "audio files", "file",
                                                        ", ".join(AUDIO_SUFFIXES))
    targets = names if column == "label" else [None] * len(files)  # folders name labels, never transcripts
    if not files:
        raise KilnError(f"{path}: no audio files ({', '.join(AUDIO_SUFFIXES)}); expected {EXPECTED}")
    if require and (not classes or column != "label"):
        what = "transcripts: give a manifest of path,text" if column == "text" else "labels (one subfolder per class)"
        raise KilnError(f"{path}: {len(files)} audio files but no {what}")
    return Clips(path, files, targets, skipped)


def _scan_manifest(path: Path, column: str, require: bool) -> Clips:
    from kiln.data.tables import read_rows

    rows, header = read_rows(path, None, ["path", column])
    if not rows:
        raise KilnError(f"{path}: no data rows")
    if "path" not in header:
        raise KilnError(f"{path}: no column 'path' (columns: {', '.join(map(str, header))}); expected path,{column}")
    has = column in header
    if require and not has:
        raise KilnError(f"{path}: no column {column!r} (columns: {', '.join(map(str, header))}); expected path,{column}")
    files, targets, lines = [], [], []
    for lineno, row in rows:
        name = str(row.get("path") or "").strip()
        if not name:
            raise KilnError(f"{path}:{lineno}: empty path")
        f = Path(name) if Path(name).is_absolute() else path.parent / name
        if not f.is_file():
            raise KilnError(f"{path}:{lineno}: audio file {name!r} not found (paths are relative to the manifest's folder)")
        target = str(row.get(column) if row.get(column) is not None else "").strip() if has else ""
        if require and not target:
            raise KilnError(f"{path}:{lineno}: empty {column}")
        files.append(f)
        targets.append(target or None)
        lines.append(lineno)
    return Clips(path, files, targets, lines=lines)


# ----------------------------------------------------------------------------------------------- decoding


def read_audio(file, sample_rate: int, name: str = "") -> np.ndarray:
    """float32 mono samples of `file` (a path, or a file object such as an upload's bytes, called `name` in
    errors) at `sample_rate` (mixed down, resampled), not normalised."""
    try:
        import soundfile as sf
        import soxr
    except ImportError as e:
        raise KilnError(f"reading audio needs {e.name} (pip install 'kiln[audio]')") from None
    name = name or str(file)
    try:
        x, rate = sf.read(file if hasattr(file, "read") else str(file), dtype="float32", always_2d=True)
    except Exception as e:  # libsndfile's errors: not audio, truncated, an unknown format
        msg = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise KilnError(f"{name}: cannot read audio ({msg}); expected WAV, FLAC or OGG") from None
    if not len(x):
        raise KilnError(f"{name}: holds no samples (an empty recording)")
    x = x.mean(axis=1) if x.shape[1] > 1 else x[:, 0]
    if rate != sample_rate:
        x = soxr.resample(x, rate, sample_rate, quality="HQ")
    return np.ascontiguousarray(x, dtype=np.float32)


def normalise(x: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance (Wav2Vec2FeatureExtractor's zero_mean_unit_var_norm, its 1e-7 included)."""
    x = x.astype(np.float32)
    return ((x - x.mean()) / np.sqrt(x.var() + 1e-7)).astype(np.float32)


def load_waveforms(clips: Clips, sample_rate: int, max_seconds: float = 0.0, too_long: str = "cut", min_samples: int = 1,
         log=None, what: str = "") -> tuple[list[np.ndarray], list[int], dict]:
    """(normalised waveforms, the indices of the clips kept, a report); `too_long` cut | skip | error."""
    limit = int(max_seconds * sample_rate) if max_seconds > 0 else 0
    waves, kept, cut, skipped, longest, short = [], [], 0, 0, 0, []
    for i, f in enumerate(clips.files):
        x = read_audio(f, sample_rate)
        longest = max(longest, len(x))
        if len(x) < min_samples:
            short.append(f)
            continue
        if limit and len(x) > limit:
            if too_long == "error":
                raise KilnError(f"{f}: {len(x) / sample_rate:.1f} s, over data.max_seconds {max_seconds:g} (set "
                                "data.too_long cut or skip, or raise data.max_seconds)")
            if too_long == "skip":
                skipped += 1
                continue
            x, cut = x[:limit], cut + 1
        waves.append(normalise(x))
        kept.append(i)
    if short:
        raise KilnError(f"{short[0]}: shorter than the model's {min_samples} samples ({min_samples / sample_rate * 1000:.0f} "
                        f"ms at {sample_rate} Hz), the fewest that make one frame ({len(short)} such file(s))")
    if not waves:
        raise KilnError(f"{what or clips.path}: every utterance is over data.max_seconds {max_seconds:g} (skipped)")
    report = {"n": len(waves), "cut": cut, "skipped_too_long": skipped, "seconds": round(sum(map(len, waves)) / sample_rate, 1),
              "longest_seconds": round(longest / sample_rate, 2)}
    if log is not None and (cut or skipped):
        log(f"{what or clips.path}: {cut} utterance(s) cut to {max_seconds:g} s, {skipped} over it left out "
            f"(data.too_long)")
    return waves, kept, report


# ----------------------------------------------------------------------------------------------- batches


def pad(waves: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(samples [B, S] zero-padded, attention mask [B, S] of 0/1)."""
    n = max(len(w) for w in waves)
    x, m = np.zeros((len(waves), n), np.float32), np.zeros((len(waves), n), np.int64)
    for i, w in enumerate(waves):
        x[i, :len(w)], m[i, :len(w)] = w, 1
    return x, m


def spans(lengths, width: int, prob: float, length: int, rng: np.random.Generator) -> np.ndarray:
    """[B, width] bool: about prob * n / length spans of `length` per row, within its first n = lengths[b] (Wav2Vec
    2.0's mask_time_prob / mask_feature_prob with their lengths; the expected count rounded at random)."""
    out = np.zeros((len(lengths), width), bool)
    for b, n in enumerate(lengths):
        n = int(n)
        if n <= length:
            continue
        count = int(prob * n / length + rng.random())
        for s in rng.choice(n - length, size=min(count, n - length), replace=False):
            out[b, s:s + length] = True
    return out


def add_noise(waves: list[np.ndarray], prob: float, snr, rng: np.random.Generator) -> list[np.ndarray]:
    """White noise at an SNR drawn in [snr[0], snr[1]] dB on a `prob` share of (unit-variance) utterances,
    normalised again."""
    out = []
    for w in waves:
        if rng.random() < prob:
            sigma = 10 ** (-float(rng.uniform(float(snr[0]), float(snr[1]))) / 20)
            w = normalise(w + sigma * rng.standard_normal(len(w)).astype(np.float32))
        out.append(w)
    return out


class AudioBatches:
    """Training micro-batch i: a pure function of (seed, i), its augmentation (`augment`: a SpecAugmentConfig, or
    None) drawn from (seed, i) too. `collate(indices)` makes the targets; `frames(lengths)` gives the frame counts
    the time masks need; `n_features` the width the feature masks cover (d_model)."""

    def __init__(self, waves: list[np.ndarray], collate, batch_size: int, seed: int, frames=None, augment=None,
                 n_features: int = 0):
        from kiln.data.batches import EpochSampler

        self.waves, self.collate, self.seed, self.frames = waves, collate, seed, frames
        self.augment, self.n_features = augment, n_features
        self.sampler = EpochSampler([len(w) for w in waves], batch_size, seed, bucket=8)

    def batch(self, i: int) -> dict:
        import torch

        idx = self.sampler.indices(i)
        a, rng = self.augment, np.random.default_rng([self.seed, 13, i])
        waves = [self.waves[j] for j in idx]
        if a is not None and a.noise_prob > 0:
            waves = add_noise(waves, a.noise_prob, a.noise_snr, rng)
        x, m = pad(waves)
        out = {"input_values": torch.from_numpy(x), "attention_mask": torch.from_numpy(m), **self.collate(idx)}
        if a is not None and a.mask_time_prob > 0 and self.frames is not None:
            t = spans(self.frames(m.sum(1)), int(self.frames(x.shape[1])), a.mask_time_prob, a.mask_time_length, rng)
            out["time_mask"] = torch.from_numpy(t)
        if a is not None and a.mask_feature_prob > 0 and self.n_features:
            f = spans([self.n_features] * len(idx), self.n_features, a.mask_feature_prob, a.mask_feature_length, rng)
            out["feature_mask"] = torch.from_numpy(f)
        return out
