"""Synthetic spoken digits and command words for keyword spotting, and digit strings for speech recognition, made
with Debian's espeak-ng and sox.

    python -m kiln.data.speech_synth data/kws --task kws                  # 10 classes: zero .. nine
    python -m kiln.data.speech_synth data/cmd --task words                # 10 command words: yes, no, up, ...
    python -m kiln.data.speech_synth data/asr --task asr --per-voice 40   # digit strings, 3-8 digits

The set is synthetic: every utterance is espeak-ng's formant synthesis of a word over a voice, an accent
(en-us, en-gb, en-gb-scotland, ...) times a variant (m1..m7, f1..f4, ...), at a drawn speaking rate, pitch and
word gap; sox resamples it to 16 kHz mono 16-bit and stretches its tempo; white noise at a drawn signal-to-noise
ratio is added (seeded numpy). Splits are by voice: no (accent, variant) of val or test speaks in train.

Written (OUT/):
- train/, val/, test/: the WAV files (kws and words: one subfolder per class, so a split folder is also a
  class-per-folder input for `kiln finetune audio --data.train OUT/train`);
- train.csv, val.csv, test.csv: manifests with columns path (relative to OUT), label (kws, words) or text (asr),
  voice;
- voices.json: the voices of each split and the settings.

To train on real recordings instead, give kiln the same shapes: a folder with one subfolder per class, or a
CSV/JSONL/Parquet manifest of path,label or path,text (kiln.data.audio).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import shutil
import subprocess
import wave
from pathlib import Path

import numpy as np

from kiln.errors import KilnError

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
WORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")  # Speech Commands' ten keywords
ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp", "en-gb-x-gbcwmd", "en-029",
           "en-us-nyc")
VARIANTS = ("", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5")
SAMPLE_RATE = 16000


def need_tools() -> list[str]:
    """The missing programs of espeak-ng and sox (empty when both are installed)."""
    return [t for t in ("espeak-ng", "sox") if shutil.which(t) is None]


def voices() -> list[tuple[str, str]]:
    return [(a, v) for a in ACCENTS for v in VARIANTS]


def voice_name(voice: tuple[str, str]) -> str:
    return voice[0] + (f"+{voice[1]}" if voice[1] else "")


def split_voices(n_voices: int, val_voices: int, test_voices: int, seed: int) -> dict[str, list[tuple[str, str]]]:
    """A seeded draw of n_voices voices, cut test | val | train: no voice is in two splits."""
    pool = voices()
    if n_voices > len(pool):
        raise KilnError(f"--voices {n_voices}: espeak-ng offers {len(pool)} voices here ({len(ACCENTS)} accents x "
                        f"{len(VARIANTS)} variants)")
    if val_voices + test_voices >= n_voices:
        raise KilnError(f"--val-voices {val_voices} + --test-voices {test_voices} leave no training voice of {n_voices}")
    order = np.random.default_rng([seed, 1]).permutation(len(pool))[:n_voices]
    drawn = [pool[i] for i in order]
    return {"test": drawn[:test_voices], "val": drawn[test_voices:test_voices + val_voices],
            "train": drawn[test_voices + val_voices:]}


def speak(text: str, voice: tuple[str, str], rate: int, pitch: int, gap: int, tempo: float) -> np.ndarray:
    """float32 samples at 16 kHz of `text` spoken by `voice` (espeak-ng -> sox: resampled, tempo-stretched)."""
    say = subprocess.run(["espeak-ng", "-v", voice_name(voice), "-s", str(rate), "-p", str(pitch), "-g", str(gap),
                          "--stdout", text], capture_output=True, check=False)
    if say.returncode or not say.stdout:
        raise KilnError(f"espeak-ng -v {voice_name(voice)} failed: {say.stderr.decode(errors='replace').strip()[:200]}")
    sox = subprocess.run(["sox", "-t", "wav", "-", "-t", "wav", "-r", str(SAMPLE_RATE), "-c", "1", "-b", "16", "-",
                          "tempo", f"{tempo:.3f}"], input=say.stdout, capture_output=True, check=False)
    if sox.returncode:
        raise KilnError(f"sox failed: {sox.stderr.decode(errors='replace').strip()[:200]}")
    with wave.open(io.BytesIO(sox.stdout)) as w:
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    return pcm.astype(np.float32) / 32768.0


def write_wav(path: Path, samples: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pcm = (np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(pcm.tobytes())


def utterance(text: str, voice, rng: np.random.Generator, noise_db: tuple[float, float]) -> np.ndarray:
    """One drawn take: rate, pitch, word gap, tempo, lead/tail silence and noise at a drawn SNR (dB)."""
    x = speak(text, voice, rate=int(rng.integers(120, 221)), pitch=int(rng.integers(25, 76)),
              gap=int(rng.integers(0, 6)), tempo=float(rng.uniform(0.85, 1.2)))
    lead, tail = (int(rng.uniform(0.02, 0.25) * SAMPLE_RATE) for _ in range(2))
    x = np.concatenate([np.zeros(lead, np.float32), x, np.zeros(tail, np.float32)])
    x *= float(rng.uniform(0.3, 0.9)) / max(float(np.abs(x).max()), 1e-6)
    snr = float(rng.uniform(*noise_db))
    power = float(np.mean(x ** 2)) / 10 ** (snr / 10)
    return x + rng.normal(0.0, np.sqrt(power), x.shape).astype(np.float32)


def texts(task: str, per_voice: int, rng: np.random.Generator, min_digits: int, max_digits: int) -> list[tuple[str, str]]:
    """(file stem, text) of one voice's utterances: kws (words) every digit (word) per_voice times; asr per_voice
    digit strings."""
    if task in ("kws", "words"):
        return [(f"{d}_{k}", d) for k in range(per_voice) for d in (DIGITS if task == "kws" else WORDS)]
    out = []
    for k in range(per_voice):
        n = int(rng.integers(min_digits, max_digits + 1))
        out.append((f"s{k}", " ".join(DIGITS[int(i)] for i in rng.integers(0, 10, n))))
    return out


def generate(out: str | Path, task: str = "kws", n_voices: int = 48, val_voices: int = 6, test_voices: int = 8,
             per_voice: int = 4, seed: int = 0, noise_db: tuple[float, float] = (15.0, 40.0), min_digits: int = 3,
             max_digits: int = 8, log=print) -> Path:
    """Synthesise a set into `out` (see the module docstring); returns `out`."""
    if task not in ("kws", "words", "asr"):
        raise KilnError(f"task {task!r}: kws (spoken digits, 10 classes), words (10 command words) or asr (digit strings)")
    missing = need_tools()
    if missing:
        raise KilnError(f"synthesising speech needs {' and '.join(missing)} (apt-get install espeak-ng sox)")
    if not 1 <= min_digits <= max_digits:
        raise KilnError(f"digits per string: need 1 <= min ({min_digits}) <= max ({max_digits})")
    out = Path(out)
    if (out / "train.csv").exists():
        raise KilnError(f"{out} already holds a speech set (train.csv); pick another folder")
    splits = split_voices(n_voices, val_voices, test_voices, seed)
    column = "text" if task == "asr" else "label"
    for split, vs in splits.items():
        rows = []
        for vi, voice in enumerate(vs):
            rng = np.random.default_rng([seed, 2, ACCENTS.index(voice[0]), VARIANTS.index(voice[1])])
            for stem, text in texts(task, per_voice, rng, min_digits, max_digits):
                rel = Path(split) / (text if column == "label" else "") / f"{voice_name(voice).replace('+', '_')}_{stem}.wav"
                write_wav(out / rel, utterance(text, voice, rng, noise_db))
                rows.append((rel.as_posix(), text, voice_name(voice)))
        with open(out / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["path", column, "voice"])
            w.writerows(rows)
        log(f"{split}: {len(rows)} utterances from {len(vs)} voices -> {out / (split + '.csv')}")
    (out / "voices.json").write_text(json.dumps({
        "task": task, "seed": seed, "per_voice": per_voice, "noise_db": list(noise_db), "sample_rate": SAMPLE_RATE,
        "splits": {s: [voice_name(v) for v in vs] for s, vs in splits.items()}}, indent=1) + "\n")
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m kiln.data.speech_synth", description=__doc__.split("\n")[0])
    p.add_argument("out", help="output folder (train/ val/ test/ + manifests)")
    p.add_argument("--task", default="kws", choices=("kws", "words", "asr"),
                   help="kws: spoken digits; words: ten command words; asr: digit strings")
    p.add_argument("--voices", type=int, default=48, help="voices drawn (accent x variant)")
    p.add_argument("--val-voices", type=int, default=6)
    p.add_argument("--test-voices", type=int, default=8)
    p.add_argument("--per-voice", type=int, default=4, help="kws/words: takes of each word per voice; asr: strings per voice")
    p.add_argument("--min-digits", type=int, default=3)
    p.add_argument("--max-digits", type=int, default=8)
    p.add_argument("--snr", type=float, nargs=2, default=(15.0, 40.0), metavar=("LOW", "HIGH"),
                   help="signal-to-noise ratio of the added white noise, drawn in [LOW, HIGH] dB")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    try:
        generate(a.out, a.task, a.voices, a.val_voices, a.test_voices, a.per_voice, a.seed, tuple(a.snr),
                 a.min_digits, a.max_digits)
    except KilnError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
