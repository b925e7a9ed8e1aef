"""`kiln serve` of an ASR run: the real `openai` client's audio.transcriptions.create gets the transcript
`kiln predict` writes for the same file (WAV of several rates and bit depths); bad uploads are 400s naming the
problem, and the server keeps serving.

The run is a random Wav2Vec2ForCTC (a small config, no download) imported with `kiln import hf`, so its
transcripts are not empty.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from kiln.cli import main

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import transformers
import soundfile as sf
import openai
import fastapi  # noqa: F401  (dev dependencies: missing, the file fails to load, not skipped)


@pytest.fixture(scope="module")
def asr_run(tmp_path_factory) -> Path:
    from test_audio_interop import VOCAB, hf_config, save_hf

    tmp = tmp_path_factory.mktemp("asr_serve")
    torch.manual_seed(4)
    hf = transformers.Wav2Vec2ForCTC(hf_config(True, vocab_size=len(VOCAB), pad_token_id=0)).eval()
    save_hf(hf, tmp / "hf", VOCAB)
    assert main(["import", "hf", str(tmp / "hf"), str(tmp / "run")]) == 0
    return tmp / "run"


def test_openai_client_transcribes_as_kiln_predict(asr_run, tmp_path):
    from test_serve import Server

    rng = np.random.default_rng(5)
    wavs = tmp_path / "wavs"
    wavs.mkdir()
    for i, (rate, subtype) in enumerate([(16000, "PCM_16"), (44100, "PCM_24"), (8000, "FLOAT")]):
        t = np.arange(int(rate * (0.7 + 0.4 * i))) / rate
        sf.write(wavs / f"{i}.wav", 0.3 * np.sin(2 * np.pi * (150 + 120 * i) * t) + 0.05 * rng.normal(size=t.shape),
                 rate, subtype=subtype)
    assert main(["predict", str(asr_run), str(wavs), "--out", str(tmp_path / "p.csv")]) == 0
    want = {Path(r["path"]).name: r["transcript"] for r in csv.DictReader(open(tmp_path / "p.csv"))}
    assert any(want.values())
    server = Server(asr_run)
    try:
        client = server.client()
        for name, text in want.items():
            with open(wavs / name, "rb") as f:
                got = client.audio.transcriptions.create(model=asr_run.name, file=f)
            assert got.text == text, name
        with open(wavs / "0.wav", "rb") as f:
            assert client.audio.transcriptions.create(model=asr_run.name, file=f, response_format="text").strip() == \
                want["0.wav"]
        (tmp_path / "bad.wav").write_text("not audio")
        with open(tmp_path / "bad.wav", "rb") as f, pytest.raises(openai.BadRequestError, match="cannot read audio"):
            client.audio.transcriptions.create(model=asr_run.name, file=f)
        with open(wavs / "1.wav", "rb") as f, pytest.raises(openai.NotFoundError):
            client.audio.transcriptions.create(model="another-model", file=f)
        with open(wavs / "1.wav", "rb") as f:  # still serving
            assert client.audio.transcriptions.create(model=asr_run.name, file=f).text == want["1.wav"]
    finally:
        assert server.stop() == 0


def test_audio_classifier_answers_with_kiln_predicts_probabilities(tmp_path):
    """POST /v1/audio/classifications of an audio classifier run: the probabilities of `kiln predict`; a
    transcription request to it is a 404, a text /v1/classify request a 400 naming the audio route."""
    import httpx

    from test_audio_interop import hf_config, save_hf
    from test_serve import Server

    torch.manual_seed(6)
    labels = ["yes", "no", "up", "down"]
    hf = transformers.Wav2Vec2ForSequenceClassification(hf_config(True, num_labels=4, classifier_proj_size=8,
                                                                  id2label=dict(enumerate(labels)))).eval()
    assert main(["import", "hf", str(save_hf(hf, tmp_path / "hf")), str(tmp_path / "run")]) == 0
    rng = np.random.default_rng(7)
    sf.write(tmp_path / "a.wav", 0.2 * rng.normal(size=20000), 22050, subtype="PCM_24")
    assert main(["predict", str(tmp_path / "run"), str(tmp_path / "a.wav"), "--out", str(tmp_path / "p.csv")]) == 0
    row = next(csv.DictReader(open(tmp_path / "p.csv")))
    server = Server(tmp_path / "run")
    try:
        with open(tmp_path / "a.wav", "rb") as f:
            r = httpx.post(f"{server.url}/v1/audio/classifications", files={"file": ("a.wav", f.read())},
                           data={"model": "run"}, timeout=60)
        assert r.status_code == 200, r.text
        got = r.json()["data"][0]
        assert got["label"] == row["prediction"] and got["label"] in labels
        assert all(abs(got["probabilities"][n] - float(row[f"p_{n}"])) < 1e-5 for n in labels)
        with open(tmp_path / "a.wav", "rb") as f, pytest.raises(openai.NotFoundError):
            server.client().audio.transcriptions.create(model="run", file=f)
        r = httpx.post(f"{server.url}/v1/classify", json={"input": "hello"}, timeout=60)
        assert r.status_code == 400 and "/v1/audio/classifications" in r.json()["error"]["message"]
    finally:
        assert server.stop() == 0
