"""Speech runs -> ONNX, checked in onnxruntime: `kiln export onnx RUN_DIR OUT` for a `kiln finetune audio` or
`kiln finetune asr` run.

The graph takes what `kiln predict` gives the model: input_values [batch, samples] (float32, each utterance
normalised to zero mean and unit variance, right-padded with zeros) and attention_mask [batch, samples] (int64,
1 = a sample). It gives, for an audio classifier, logits [batch, n_classes]; for an ASR run, logits [batch,
frames, vocab] and frames [batch] (int64: each utterance's valid frames; greedy decoding takes the argmax of the
first `frames`, collapses repeats and drops the blank, id 0). Batch and samples are dynamic axes. Attention is
written as kiln's plain matmul-softmax (kiln.interop.onnx_graph.exportable).

OUT holds model.onnx [model.int8.onnx], kiln-onnx.json (inputs, outputs, labels or vocab, sample rate) and
report.json (sizes and kiln-vs-onnxruntime parity on random padded batches, over the valid frames).
"""

from __future__ import annotations

import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from kiln.errors import KilnError
from kiln.interop.onnx_graph import (INT8_FILE, MODEL_FILE, OPSET, _check_out, _temp_folder, exportable,
                                     finish_export, quantize_int8, session)

KINDS = ("audio", "asr")


class _CTC(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_values, attention_mask):
        logits, frames = self.model(input_values, attention_mask)
        return logits, frames.long()


def load_speech(run_dir: Path, which: str):
    """(model, run.json, model config, checkpoint) of a speech run, built from its files (interop sits below the
    tasks, so it does not call their `load`)."""
    from kiln.config import load_config
    from kiln.data.audio_config import ASR_CONFIG_FILE, AUDIO_CONFIG_FILE, ASRConfig, AudioConfig
    from kiln.model.audio import AudioClassifier, CTCModel
    from kiln.run.checkpoint import find_checkpoint, load_weights
    from kiln.run.folder import read_run_json
    from kiln.run.load import build_model

    info = read_run_json(run_dir)
    asr = info["kind"] == "asr"
    cfg = load_config(run_dir / (ASR_CONFIG_FILE if asr else AUDIO_CONFIG_FILE), cls=ASRConfig if asr else AudioConfig)
    backbone = build_model(cfg.model, "cpu")
    model = CTCModel(backbone, len(info["vocab"])) if asr else \
        AudioClassifier(backbone, len(info["labels"]), info.get("proj_dim", cfg.proj_dim))
    ckpt = find_checkpoint(run_dir, which)
    load_weights(model, ckpt / "model.safetensors")
    return model.eval(), info, cfg.model, ckpt


def random_batch(sample_rate: int, lengths, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = np.zeros((len(lengths), max(lengths)), np.float32)
    m = np.zeros(x.shape, np.int64)
    for i, n in enumerate(lengths):
        x[i, :n], m[i, :n] = rng.standard_normal(n), 1
    return {"input_values": x, "attention_mask": m}


def parity(module, sess, sample_rate: int, asr: bool) -> dict:
    """Max |kiln - onnxruntime| of the logits (valid frames) and the share of equal argmaxes, on two padded
    batches of random utterances of 0.5-2 s."""
    worst, agree, n = 0.0, 0, 0
    for seed, secs in enumerate(([1.0, 0.6, 1.7], [2.0])):
        feed = random_batch(sample_rate, [int(s * sample_rate) for s in secs], seed)
        with torch.no_grad():
            ref = module(torch.from_numpy(feed["input_values"]), torch.from_numpy(feed["attention_mask"]))
        got = sess.run(None, feed)
        if asr:
            frames = ref[1].numpy()
            if not np.array_equal(frames, got[1]):
                raise KilnError(f"onnxruntime counts frames {got[1].tolist()}, kiln {frames.tolist()}")
            keep = np.arange(ref[0].shape[1])[None, :] < frames[:, None]
            r, g = ref[0].numpy()[keep], got[0][keep]
        else:
            r, g = ref.numpy(), got[0]
        worst = max(worst, float(np.abs(r - g).max()))
        agree += int((r.argmax(-1) == g.argmax(-1)).sum())
        n += r.argmax(-1).size
    return {"max_abs_diff": worst, "argmax_agreement": agree / max(n, 1)}


def export_speech_onnx(run_dir: str | Path, out: str | Path, int8: bool = False, which: str | None = None,
                       log=print) -> dict:
    """Export a speech run to OUT (module docstring); returns the report."""
    run_dir, out = Path(run_dir), Path(out)
    _check_out(out)
    model, info, m, ckpt = load_speech(run_dir, which or "best")
    asr = info["kind"] == "asr"
    module = exportable(_CTC(model) if asr else model)
    outputs = ["logits", "frames"] if asr else ["logits"]
    dyn = {"input_values": {0: "batch", 1: "samples"}, "attention_mask": {0: "batch", 1: "samples"},
           "logits": {0: "batch", **({1: "frames"} if asr else {})}, **({"frames": {0: "batch"}} if asr else {})}
    example = random_batch(m.sample_rate, [int(0.9 * m.sample_rate), int(0.5 * m.sample_rate)], 0)
    tmp = _temp_folder(out)
    try:
        t0 = time.perf_counter()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # TracerWarnings about Python scalars that are constants here
            torch.onnx.export(module, tuple(torch.from_numpy(v) for v in example.values()), str(tmp / MODEL_FILE),
                              dynamo=False, opset_version=OPSET, input_names=list(example), output_names=outputs,
                              dynamic_axes=dyn, do_constant_folding=True)
        seconds = time.perf_counter() - t0
        checks = {"fp32": parity(module, session(tmp / MODEL_FILE), m.sample_rate, asr)}
        if int8:
            quantize_int8(tmp / MODEL_FILE, tmp / INT8_FILE)
            checks["int8"] = parity(module, session(tmp / INT8_FILE), m.sample_rate, asr)
        meta = {"kind": info["kind"], "inputs": list(example), "outputs": outputs, "sample_rate": m.sample_rate,
                "normalise": "each utterance to zero mean, unit variance (1e-7 in the variance)",
                **({"vocab": info["vocab"], "blank": 0} if asr else {"labels": info["labels"]})}
        result = {"run": str(run_dir), "checkpoint": str(ckpt), "kind": info["kind"], "opset": OPSET,
                  "export_seconds": round(seconds, 2), "parity": checks, "torch": torch.__version__}
        return finish_export(tmp, out, meta, result, log)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
