"""Wav2Vec 2.0 on kiln's one encoder against transformers' own: Wav2Vec2Model (both layer-norm layouts),
Wav2Vec2ForCTC and Wav2Vec2ForSequenceClassification round-trip through `kiln import hf` / `kiln export hf` with
outputs within 1e-4 both ways on padded batches; transformers' Wav2Vec2Processor decodes an exported kiln ASR run
to the transcripts `kiln predict` writes.

Models are small random configs built in the test (no download); audio is synthesised with numpy.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from kiln.cli import main

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.usefixtures("one_thread")
import transformers
import soundfile as sf
TOL = 1e-4
VOCAB = ["<pad>", "<unk>", "|", "e", "f", "i", "n", "o", "r", "t", "u", "v", "w", "x", "z", "h", "s"]


def hf_config(stable: bool, **kw):
    norm = "layer" if stable else "group"
    return transformers.Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, conv_dim=(24,) * 7,
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, do_stable_layer_norm=stable,
        feat_extract_norm=norm, hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        feat_proj_dropout=0.0, final_dropout=0.0, layerdrop=0.0, conv_bias=stable, **kw)


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 9000, generator=g)
    mask = torch.ones(3, 9000, dtype=torch.long)
    mask[1, 6000:], mask[2, 2500:] = 0, 0
    return x * mask, mask


def valid_max(a, b, mask):
    """max |a - b| over the valid frames (HF leaves padded frames' outputs unspecified)."""
    from kiln.model.audio import frame_lengths

    n = frame_lengths(mask.sum(-1), [10, 3, 3, 3, 3, 2, 2], [5, 2, 2, 2, 2, 2, 2])
    keep = torch.arange(a.shape[1])[None, :] < n[:, None]
    return float(((a - b).abs() * keep[..., None]).max())


def save_hf(model, folder: Path, vocab=None) -> Path:
    model.save_pretrained(folder)
    if vocab:
        (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    return folder


@pytest.mark.parametrize("stable", [False, True])
def test_wav2vec2_model_round_trip(tmp_path, stable):
    from kiln.model.audio import run_stack
    from kiln.run.load import load

    torch.manual_seed(0)
    hf = transformers.Wav2Vec2Model(hf_config(stable)).eval()
    x, mask = batch()
    with torch.no_grad():
        want = hf(x, attention_mask=mask).last_hidden_state
    assert main(["import", "hf", str(save_hf(hf, tmp_path / "hf")), str(tmp_path / "run")]) == 0
    model, _, cfg = load(tmp_path / "run")
    assert cfg.model.audio_conv_dim == 24 and cfg.model.pre_norm == stable and cfg.model.embedding_norm != stable
    with torch.no_grad():
        got, frames = run_stack(model.decoder, x, mask)
    assert valid_max(got, want, mask) < TOL
    assert frames.sum(-1).tolist() == hf._get_feat_extract_output_lengths(mask.sum(-1)).tolist()
    assert main(["export", "hf", str(tmp_path / "run"), str(tmp_path / "back")]) == 0
    again = transformers.Wav2Vec2Model.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        assert valid_max(again(x, attention_mask=mask).last_hidden_state, want, mask) < TOL


def test_ctc_round_trip(tmp_path):
    from kiln.tasks import get

    torch.manual_seed(1)
    hf = transformers.Wav2Vec2ForCTC(hf_config(False, vocab_size=len(VOCAB), pad_token_id=0)).eval()
    x, mask = batch(1)
    with torch.no_grad():
        want = hf(x, attention_mask=mask).logits
    assert main(["import", "hf", str(save_hf(hf, tmp_path / "hf", VOCAB)), str(tmp_path / "run")]) == 0
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["kind"] == "asr" and info["vocab"] == VOCAB
    model, _, _ = get("asr").load(tmp_path / "run")
    with torch.no_grad():
        got, n = model(x, mask)
    assert valid_max(got, want, mask) < TOL
    assert main(["export", "hf", str(tmp_path / "run"), str(tmp_path / "back")]) == 0
    again = transformers.Wav2Vec2ForCTC.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        assert valid_max(again(x, attention_mask=mask).logits, want, mask) < TOL


def test_sequence_classification_round_trip(tmp_path):
    from kiln.tasks import get

    torch.manual_seed(2)
    labels = ["yes", "no", "up"]
    hf = transformers.Wav2Vec2ForSequenceClassification(hf_config(True, num_labels=3, classifier_proj_size=16,
                                                                  id2label=dict(enumerate(labels)))).eval()
    x, mask = batch(2)
    with torch.no_grad():
        want = hf(x, attention_mask=mask).logits
    assert main(["import", "hf", str(save_hf(hf, tmp_path / "hf")), str(tmp_path / "run")]) == 0
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["kind"] == "audio" and info["labels"] == labels
    model, _, _ = get("audio").load(tmp_path / "run")
    with torch.no_grad():
        assert float((model(x, mask) - want).abs().max()) < TOL
    assert main(["export", "hf", str(tmp_path / "run"), str(tmp_path / "back")]) == 0
    again = transformers.Wav2Vec2ForSequenceClassification.from_pretrained(tmp_path / "back").eval()
    assert again.config.id2label[1] == "no"
    with torch.no_grad():
        assert float((again(x, attention_mask=mask).logits - want).abs().max()) < TOL


def test_exported_asr_run_decodes_the_same_with_wav2vec2_processor(tmp_path):
    """A random CTC model (so the transcripts are not empty) imported into kiln: `kiln predict` on WAV files of
    several rates and bit depths, then the export read by Wav2Vec2ForCTC + Wav2Vec2Processor (its own feature
    extractor: normalisation; the test resamples with soxr as kiln does) gives the same transcripts."""
    import soxr

    torch.manual_seed(3)
    hf = transformers.Wav2Vec2ForCTC(hf_config(True, vocab_size=len(VOCAB), pad_token_id=0)).eval()
    save_hf(hf, tmp_path / "hf", VOCAB)
    assert main(["import", "hf", str(tmp_path / "hf"), str(tmp_path / "run")]) == 0
    rng = np.random.default_rng(0)
    wavs = tmp_path / "wavs"
    wavs.mkdir()
    for i, (rate, subtype) in enumerate([(16000, "PCM_16"), (22050, "PCM_24"), (8000, "FLOAT"), (16000, "PCM_U8")]):
        t = np.arange(int(rate * (0.6 + 0.3 * i))) / rate
        sf.write(wavs / f"{i}.wav", (0.3 * np.sin(2 * np.pi * (200 + 90 * i) * t) + 0.05 * rng.normal(size=t.shape)),
                 rate, subtype=subtype)
    assert main(["predict", str(tmp_path / "run"), str(wavs), "--out", str(tmp_path / "pred.csv")]) == 0
    kiln_text = {Path(r["path"]).name: r["transcript"] for r in csv.DictReader(open(tmp_path / "pred.csv"))}
    assert main(["export", "hf", str(tmp_path / "run"), str(tmp_path / "back")]) == 0
    processor = transformers.Wav2Vec2Processor.from_pretrained(tmp_path / "back")
    model = transformers.Wav2Vec2ForCTC.from_pretrained(tmp_path / "back").eval()
    for name, text in kiln_text.items():
        x, rate = sf.read(wavs / name, dtype="float32")
        x = soxr.resample(x, rate, 16000, quality="HQ") if rate != 16000 else x
        inputs = processor(x, sampling_rate=16000, return_tensors="pt")
        with torch.no_grad():
            ids = model(inputs.input_values).logits.argmax(-1)
        assert processor.batch_decode(ids)[0] == text, name
    assert any(kiln_text.values())  # a random model says something: the comparison is not of empty strings


@pytest.mark.parametrize("kind", ["asr", "audio"])
def test_onnx_export_of_both_tasks(tmp_path, kind):
    """`kiln export onnx` of an ASR and an audio-classifier run (imported from random HF models, the group-norm
    layout): onnxruntime's outputs on a padded batch of real files equal kiln's, and its greedy transcripts (or
    labels) are `kiln predict`'s."""
    import onnxruntime as ort
    from kiln.data.audio import normalise, pad, read_audio
    from kiln.eval.speech import greedy_decode

    torch.manual_seed(5)
    if kind == "asr":
        hf = transformers.Wav2Vec2ForCTC(hf_config(False, vocab_size=len(VOCAB), pad_token_id=0))
    else:
        hf = transformers.Wav2Vec2ForSequenceClassification(hf_config(False, num_labels=4, classifier_proj_size=8))
    assert main(["import", "hf", str(save_hf(hf.eval(), tmp_path / "hf", VOCAB if kind == "asr" else None)),
                 str(tmp_path / "run")]) == 0
    assert main(["export", "onnx", str(tmp_path / "run"), str(tmp_path / "onnx")]) == 0
    report = json.loads((tmp_path / "onnx" / "report.json").read_text())
    assert report["parity"]["fp32"]["max_abs_diff"] < TOL
    meta = json.loads((tmp_path / "onnx" / "kiln-onnx.json").read_text())
    rng = np.random.default_rng(1)
    for i, seconds in enumerate([0.8, 1.3]):
        sf.write(tmp_path / f"{i}.wav", 0.2 * rng.normal(size=int(16000 * seconds)), 16000)
    assert main(["predict", str(tmp_path / "run"), str(tmp_path / "0.wav"), "--out", str(tmp_path / "p0.csv")]) == 0
    assert main(["predict", str(tmp_path / "run"), str(tmp_path / "1.wav"), "--out", str(tmp_path / "p1.csv")]) == 0
    sess = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    for i in range(2):  # one file a batch: the group-norm layout's features depend on a batch's padding (as in HF)
        x, m = pad([normalise(read_audio(tmp_path / f"{i}.wav", 16000))])
        out = sess.run(None, {"input_values": x, "attention_mask": m})
        row = next(csv.DictReader(open(tmp_path / f"p{i}.csv")))
        if kind == "asr":
            assert greedy_decode(out[0][0, :out[1][0]].argmax(-1), meta["vocab"]) == row["transcript"] != ""
        else:
            assert meta["labels"][int(out[0][0].argmax())] == row["prediction"]


def test_finetune_from_hugging_face_folders(tmp_path, capsys):
    """`--init` an HF Wav2Vec2ForCTC folder (its head kept: the same vocabulary), an HF Wav2Vec2Model (a new
    head) and a kiln asr run for `kiln finetune audio` (its backbone): each trains from the imported weights."""
    from safetensors.torch import load_file

    rng = np.random.default_rng(0)
    texts = ["one two", "two one", "one one two", "two two", "one", "two one one"]
    lines = ["path,text,label"]
    for i, t in enumerate(texts):
        sf.write(tmp_path / f"{i}.wav", 0.2 * rng.normal(size=12000 + 1000 * i), 16000)
        lines.append(f"{i}.wav,{t},{t.split()[0]}")
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    vocab = ["<pad>", "<unk>", "|", "e", "n", "o", "t", "w"]
    torch.manual_seed(0)
    ctc = transformers.Wav2Vec2ForCTC(hf_config(True, vocab_size=len(vocab), pad_token_id=0)).eval()
    save_hf(ctc, tmp_path / "ctc", vocab)
    save_hf(transformers.Wav2Vec2Model(hf_config(False)).eval(), tmp_path / "base")
    fast = ["--train.threads", "1", "--train.precision", "fp32", "--train.tensorboard", "false", "--train.max_steps",
            "1", "--train.batch_size", "3", "--train.lr", "0", "--data.val_fraction", "0", "--data.test_fraction", "0"]
    capsys.readouterr()
    assert main(["finetune", "asr", "--data.train", str(tmp_path / "m.csv"), "--init", str(tmp_path / "ctc"),
                 "--out", str(tmp_path / "asr"), *fast]) == 0
    assert "head: the init's CTC layer (the same vocabulary)" in capsys.readouterr().out
    w = load_file(tmp_path / "asr" / "checkpoints" / "step_000001" / "model.safetensors")
    assert torch.equal(w["lm_head.weight"], ctc.lm_head.weight)  # lr 0: the imported weights, unchanged
    assert main(["finetune", "audio", "--data.train", str(tmp_path / "m.csv"), "--init", str(tmp_path / "base"),
                 "--out", str(tmp_path / "kws"), *fast]) == 0
    assert main(["finetune", "audio", "--data.train", str(tmp_path / "m.csv"), "--init", str(tmp_path / "asr"),
                 "--out", str(tmp_path / "kws2"), *fast]) == 0
    k = load_file(tmp_path / "kws2" / "checkpoints" / "step_000001" / "model.safetensors")
    assert torch.equal(k["backbone.decoder.embed.proj.weight"], w["backbone.decoder.embed.proj.weight"])
