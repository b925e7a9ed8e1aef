"""The speech backend of `kiln serve`: an ASR run (kiln finetune asr, or an imported Wav2Vec2ForCTC) answering
OpenAI's POST /v1/audio/transcriptions with the transcripts `kiln predict` writes, and an audio classifier run
(kiln finetune audio) answering POST /v1/audio/classifications with its probabilities.

An upload is decoded, mixed down, resampled and normalised as `kiln predict` reads a file (kiln.data.audio), with
the run's data.max_seconds rule (an utterance over it is cut, or refused where the run refuses or skips).
"""

from __future__ import annotations

import io
import threading
from pathlib import Path

from kiln.errors import KilnError
from kiln.serve.jobs import Job

ROUTE = {"transcribe": "POST /v1/audio/transcriptions", "classify_audio": "POST /v1/audio/classifications"}


class SpeechBackend:
    """One upload per job (each runs alone: utterances differ in length). `kind`: transcribe (an ASR run) or
    classify_audio (an audio classifier)."""

    context_length = 0  # jobs never share a batch (Job.batch_key is None for them)
    pairs = False       # what /v1/classify reads of a backend before it hands over a job (refused in run)

    def __init__(self, run_dir: Path, which: str = "best", device: str = "auto"):
        from kiln.run.device import resolve_device
        from kiln.run.folder import read_run_json
        from kiln.tasks import get

        run_kind = read_run_json(Path(run_dir)).get("kind")
        self.kind = "transcribe" if run_kind == "asr" else "classify_audio"
        self.device = resolve_device(device, what="--device")
        self.model, self.cfg, info = get(run_kind).load(Path(run_dir), which, self.device)
        self.vocab, self.labels = list(info.get("vocab", [])), list(info.get("labels", []))
        self.info = {"kind": "transcription" if self.kind == "transcribe" else "audio classifier",
                     "sample_rate": self.cfg.model.sample_rate, "device": self.device,
                     "parameters": sum(p.numel() for p in self.model.parameters()),
                     **({"vocab": len(self.vocab)} if self.vocab else {"labels": self.labels})}

    def waveform(self, data: bytes, name: str):
        """An upload's normalised samples (KilnError: not audio, empty, over the run's limit, too short)."""
        from kiln.data import audio as adata
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
        return adata.normalise(x)

    def answer(self, data: bytes, name: str) -> dict:
        if self.kind == "transcribe":
            from kiln.tasks.asr import transcribe

            return {"text": transcribe(self.model, [self.waveform(data, name)], self.vocab, 1, self.device)[0][0]}
        from kiln.tasks.audio import predict_probs

        return {"probs": predict_probs(self.model, [self.waveform(data, name)], 1, self.device)[0].tolist()}

    def warm_up(self) -> None:
        import numpy as np

        from kiln.tasks.audio import predict_probs
        from kiln.tasks.asr import transcribe

        x = [np.zeros(self.cfg.model.sample_rate // 2, np.float32)]
        transcribe(self.model, x, self.vocab, 1, self.device) if self.kind == "transcribe" else \
            predict_probs(self.model, x, 1, self.device)

    def run(self, jobs: list[Job], stopping: threading.Event) -> None:
        """A speech job's `texts` holds its upload: (file name, bytes)."""
        for j in jobs:
            if j.kind != self.kind:
                j.on_error(KilnError(f"this server serves a {self.info['kind']} run: {ROUTE[self.kind]}"))
                continue
            name, data = j.texts
            try:
                j.on_done(self.answer(data, name))
            except KilnError as e:
                j.on_error(e)
