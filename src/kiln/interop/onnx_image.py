"""Image runs -> ONNX, checked in onnxruntime: `kiln export onnx RUN_DIR OUT` for a `kiln finetune image` run
(any ViT kiln trains, the convolutional stem included: the one export route of a model with a stem, which HF's
ViT cannot hold).

The graph takes what `kiln predict` gives the model: pixel_values [batch, channels, size, size] (float32, resized
to the run's image size, scaled to [0, 1] and normalised by the run's mean and std, which kiln-onnx.json
records) and gives logits [batch, n_classes]. Batch is a dynamic axis. BatchNorm runs with its running
statistics (the model in eval mode); attention is kiln's plain matmul-softmax (kiln.interop.onnx_graph.exportable).

OUT holds model.onnx [model.int8.onnx], kiln-onnx.json (inputs, outputs, labels, image size, channels, mean, std)
and report.json (sizes and kiln-vs-onnxruntime parity on random images).
"""

from __future__ import annotations

import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from kiln.interop.onnx_graph import (INT8_FILE, MODEL_FILE, OPSET, _check_out, _temp_folder, exportable,
                                     finish_export, quantize_int8, session)


def load_image(run_dir: Path, which: str):
    """(ImageClassifier in eval mode, run.json, checkpoint) of an image run, built from its files (interop sits
    below the tasks, so it does not call their `load`)."""
    from kiln.config import load_config
    from kiln.data.images import CONFIG_FILE, ImageConfig
    from kiln.model.heads import ImageClassifier
    from kiln.run.checkpoint import find_checkpoint, load_weights
    from kiln.run.folder import read_run_json
    from kiln.run.load import build_model

    info = read_run_json(run_dir)
    cfg = load_config(run_dir / CONFIG_FILE, cls=ImageConfig)
    model = ImageClassifier(build_model(cfg.model, "cpu"), len(info["labels"]), info["pooling"], cfg.head_dropout)
    ckpt = find_checkpoint(which) if which not in ("best", "latest") else find_checkpoint(run_dir, which)
    load_weights(model, ckpt / "model.safetensors")
    return model.eval(), info, ckpt


def random_images(n: int, channels: int, size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, channels, size, size)).astype(np.float32)


def parity(module, sess, channels: int, size: int) -> dict:
    """Max |kiln - onnxruntime| of the logits and the share of equal argmaxes on two batches of random images."""
    worst, agree, n = 0.0, 0, 0
    for seed, batch in enumerate((5, 1)):
        x = random_images(batch, channels, size, seed)
        with torch.no_grad():
            ref = module(torch.from_numpy(x)).numpy()
        got = sess.run(None, {"pixel_values": x})[0]
        worst = max(worst, float(np.abs(ref - got).max()))
        agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
        n += batch
    return {"max_abs_diff": worst, "argmax_agreement": agree / n}


def export_image_onnx(run_dir: str | Path, out: str | Path, int8: bool = False, which: str | None = None,
                      log=print) -> dict:
    """Export an image run to OUT (module docstring); returns the report."""
    run_dir, out = Path(run_dir), Path(out)
    _check_out(out)
    model, info, ckpt = load_image(run_dir, which or "best")
    channels, size = int(info["channels"]), int(info["image_size"])
    module = exportable(model)
    example = torch.from_numpy(random_images(2, channels, size, 0))
    tmp = _temp_folder(out)
    try:
        t0 = time.perf_counter()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # TracerWarnings about Python scalars that are constants here
            torch.onnx.export(module, (example,), str(tmp / MODEL_FILE), dynamo=False, opset_version=OPSET,
                              input_names=["pixel_values"], output_names=["logits"],
                              dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}},
                              do_constant_folding=True)
        seconds = time.perf_counter() - t0
        checks = {"fp32": parity(module, session(tmp / MODEL_FILE), channels, size)}
        if int8:
            quantize_int8(tmp / MODEL_FILE, tmp / INT8_FILE)
            checks["int8"] = parity(module, session(tmp / INT8_FILE), channels, size)
        meta = {"kind": "image", "inputs": ["pixel_values"], "outputs": ["logits"], "labels": info["labels"],
                "image_size": size, "channels": channels, "mean": info["mean"], "std": info["std"],
                "normalise": "resize to image_size, x / 255, then (x - mean) / std per channel"}
        result = {"run": str(run_dir), "checkpoint": str(ckpt), "kind": "image", "opset": OPSET,
                  "export_seconds": round(seconds, 2), "parity": checks, "torch": torch.__version__}
        return finish_export(tmp, out, meta, result, log)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
