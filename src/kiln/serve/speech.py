"""The speech backend of `kiln serve`: an ASR run (kiln finetune asr, or an imported Wav2Vec2ForCTC) answering
OpenAI's POST /v1/audio/transcriptions with the transcripts `kiln predict` writes.

An upload is decoded, mixed down, resampled and normalised as `kiln predict` reads a file (kiln.data.audio), with
the run's data.max_seconds rule (an utterance over it is cut, or refused where the run refuses or skips).
"""

from __future__ import annotations

import io
import threading
from pathlib import Path

from kiln.errors import KilnError
from kiln.serve.jobs import Job


def speech_kind(run_dir) -> str | None:
    """"asr" / "audio" for a speech run folder, else None (another kind, or not a run: open_run says why)."""
    import json

    f = Path(run_dir) / "run.json"
    try:
        kind = json.loads(f.read_text(encoding="utf-8")).get("kind") if f.is_file() else None
    except (OSError, ValueError):
        return None
    return kind if kind in ("asr", "audio") else None


class SpeechBackend:
    """Transcribes one upload per job (each runs alone: utterances differ in length)."""

    kind = "transcribe"
    context_length = 0  # jobs never share a batch (Job.batch_key is None for them)
    pairs, labels = False, []  # what /v1/classify reads of a backend before it hands over a job (refused in run)

    def __init__(self, run_dir: Path, which: str = "best", device: str = "auto"):
        from kiln.run.device import resolve_device
        from kiln.tasks import get

        run_dir = Path(run_dir)
        if speech_kind(run_dir) == "audio":
            raise KilnError(f"{run_dir} is an audio classifier run: kiln serve transcribes speech with an ASR run "
                            f"(kiln finetune asr); use kiln predict {run_dir} FILE for its labels")
        self.device = resolve_device(device, what="--device")
        self.model, self.cfg, info = get("asr").load(run_dir, which, self.device)
        self.vocab = list(info["vocab"])
        self.info = {"kind": "transcription", "vocab": len(self.vocab), "sample_rate": self.cfg.model.sample_rate,
                     "device": self.device, "parameters": sum(p.numel() for p in self.model.parameters())}

    def transcribe(self, data: bytes, name: str) -> str:
        """The transcript of an uploaded file's bytes (KilnError: not audio, empty, over the run's limit)."""
        from kiln.data import audio as adata
        from kiln.tasks.asr import transcribe
        from kiln.tasks.speech import min_samples

        m, d = self.cfg.model, self.cfg.data
        x = adata.read_audio(io.BytesIO(data), m.sample_rate, name)
        limit = int(d.max_seconds * m.sample_rate) if d.max_seconds > 0 else 0
        if limit and len(x) > limit:
            if d.too_long != "cut":
                raise KilnError(f"{name}: {len(x) / m.sample_rate:.1f} s, over the run's data.max_seconds {d.max_seconds:g}")
            x = x[:limit]
        if len(x) < min_samples(m):
            raise KilnError(f"{name}: shorter than the model's {min_samples(m)} samples")
        return transcribe(self.model, [adata.normalise(x)], self.vocab, 1, self.device)[0][0]

    def warm_up(self) -> None:
        import numpy as np

        from kiln.tasks.asr import transcribe

        transcribe(self.model, [np.zeros(self.cfg.model.sample_rate // 2, np.float32)], self.vocab, 1, self.device)

    def run(self, jobs: list[Job], stopping: threading.Event) -> None:
        """A transcription job's `texts` holds its upload: (file name, bytes)."""
        for j in jobs:
            if j.kind != "transcribe":
                j.on_error(KilnError("this server transcribes speech: POST /v1/audio/transcriptions"))
                continue
            name, data = j.texts
            try:
                j.on_done({"text": self.transcribe(data, name)})
            except KilnError as e:
                j.on_error(e)
