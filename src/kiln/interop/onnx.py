"""kiln run folders -> ONNX, checked in onnxruntime: `kiln export onnx RUN_DIR OUT [--int8]`.

    export_onnx("runs/clf", "out/clf-onnx", int8=True)

The TorchScript-based exporter (`torch.onnx.export(..., dynamo=False)`, opset 17) writes the plain fp32 forward
(no fused loss, no packed or int8 weights), with dynamic batch and sequence axes:
- a classifier run (`kiln finetune classify`): input_ids, attention_mask[, token_type_ids] [batch, sequence]
  (int64, right padding) -> logits [batch, n_classes];
- a decoder language model (a pretraining run): input_ids [batch, sequence], attention_mask [batch, past +
  sequence] and past_key_values.{i}.key / .value [batch, n_kv_head, past, head_dim] -> logits [batch, sequence,
  vocab] and present.{i}.key / .value [batch, n_kv_head, past + sequence, head_dim]. One graph serves the prompt
  (a past of length 0) and every decoding step (the presents fed back as the next pasts); positions come from
  the attention mask as in kiln generate, so left-padded batches decode as they do in kiln;
- an encoder language model (masked-LM pretraining): input_ids, attention_mask[, token_type_ids] -> logits.
Two things are written as plain ops for the exporter: RMSNorm (ONNX has RMSNormalization only from opset 23)
and attention (kiln's matmul-softmax form; the exporter's scaled_dot_product_attention has no grouped-query form).
--int8: onnxruntime.quantization.quantize_dynamic (int8 weights, activations quantized per batch at run time).

OUT holds model.onnx [model.int8.onnx], tokenizer.json, kiln-onnx.json (what the graph takes and gives: inputs,
outputs, labels, fields, max_length, the cache's shape) and report.json (sizes, kiln-vs-onnxruntime parity on
random inputs, accuracy on the run's test split, examples/s). It is written to a temporary folder next to OUT
and moved into place when complete. Layer: interop (below tasks), so the classifier's test split is read by
the function the caller passes (the CLI passes kiln.tasks.classify.load_splits: the task's own reading).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from kiln.errors import KilnError, require
from kiln.interop.onnx_graph import (  # noqa: F401  (re-exported: the graph side of `kiln export onnx`)
    BATCH, EXPORTABLE, FORMAT, INT8_FILE, META_FILE, MODEL_FILE, OPSET, REPORT_FILE, CachedDecoder, EncoderLM,
    Exported, _check_out, _export_graph, _install, _names, _temp_folder, exportable, kiln_outputs, load_run, parity,
    quantize_int8, random_inputs, session)


def export_onnx(run_dir: str | Path, out: str | Path, int8: bool = False, which: str | None = None,
                read_splits=None, report: bool = True, log=print) -> dict:
    """Export a run to OUT (module docstring); returns the report. `which`: best, latest or a checkpoint folder
    (default: best for a classifier, latest for a language model). `read_splits(cfg, log) -> (splits, labels,
    data report)`: the classifier task's reading of its data, for the test-split accuracy (None: no accuracy)."""
    require("onnx", "onnx", "`kiln export onnx`")
    require("onnxruntime", "onnx", "`kiln export onnx`")
    run_dir, out = Path(run_dir), Path(out)
    kind = json.loads((run_dir / "run.json").read_text()).get("kind") if (run_dir / "run.json").is_file() else None
    if kind in ("audio", "asr"):
        from kiln.interop.onnx_audio import export_speech_onnx  # waveforms in, logits (and frames) out

        return export_speech_onnx(run_dir, out, int8, which, log)
    if kind == "image":
        from kiln.interop.onnx_image import export_image_onnx  # normalised pixels in, logits out

        return export_image_onnx(run_dir, out, int8, which, log)
    _check_out(out)
    ex = load_run(run_dir, which)
    tmp = _temp_folder(out)
    try:
        t0 = time.perf_counter()
        _export_graph(ex, tmp / MODEL_FILE)
        seconds = time.perf_counter() - t0
        fp32 = session(tmp / MODEL_FILE)
        checks = {"fp32": parity(ex, fp32)}
        if checks["fp32"]["max_abs_diff"] > 1e-3:
            log(f"warning: onnxruntime differs from kiln by up to {checks['fp32']['max_abs_diff']:.2e} on random inputs")
        log(f"exported {run_dir} ({ex.kind}, checkpoint {ex.ckpt.name}) in {seconds:.1f}s: {MODEL_FILE} "
            f"{_mb(tmp / MODEL_FILE):.1f} MB, max |kiln - onnxruntime| {checks['fp32']['max_abs_diff']:.2e}")
        sessions = {"onnxruntime fp32": fp32}
        if int8:
            quantize_int8(tmp / MODEL_FILE, tmp / INT8_FILE)
            sessions["onnxruntime int8"] = session(tmp / INT8_FILE)
            checks["int8"] = parity(ex, sessions["onnxruntime int8"])
            log(f"{INT8_FILE} {_mb(tmp / INT8_FILE):.1f} MB (onnxruntime quantize_dynamic), argmax agreement with "
                f"kiln {100 * checks['int8']['argmax_agreement']:.1f}%")
        _write_meta(ex, tmp, int8)
        result = {"run": str(run_dir), "checkpoint": str(ex.ckpt), "kind": ex.kind, "opset": OPSET,
                  "exporter": "torch.onnx.export(dynamo=False)", "export_seconds": round(seconds, 2),
                  "size_mb": {f: round(_mb(tmp / f), 3) for f in (MODEL_FILE, INT8_FILE) if (tmp / f).is_file()},
                  "parity": checks, "torch": torch.__version__, "onnxruntime": _ort_version(),
                  "threads": torch.get_num_threads()}
        if report:
            result.update(measure(ex, sessions, read_splits, log))
        (tmp / REPORT_FILE).write_text(json.dumps(result, indent=2) + "\n")
        _install(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {out}")
    return result


def _write_meta(ex: Exported, folder: Path, int8: bool) -> None:
    from kiln._version import __version__

    inputs, outputs, _ = _names(ex)
    meta = {"format": FORMAT, "kind": ex.kind, "model": MODEL_FILE, "model_int8": INT8_FILE if int8 else None,
            "tokenizer": "tokenizer.json" if ex.tokenizer is not None else None, "inputs": inputs,
            "outputs": outputs, "input_dtype": "int64", "opset": OPSET, **ex.meta,
            "source": {"run": str(ex.root.resolve()), "checkpoint": ex.ckpt.name, "kiln": __version__}}
    if ex.tokenizer is not None:
        ex.tokenizer.save(str(folder / "tokenizer.json"))
    (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def _mb(path: Path) -> float:
    return path.stat().st_size / 1e6


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


# ----------------------------------------------------------------------------------------------- the report


def encode(tokenizer, examples, max_length: int, type_vocab_size: int) -> tuple[list, list | None]:
    """Token ids (and type ids) of labelled examples, cut at max_length, as kiln.tasks.text_inputs encodes them."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer.to_str())
    tok.no_padding()
    tok.enable_truncation(max_length)
    enc = tok.encode_batch([(e.text, e.pair) if e.pair is not None else e.text for e in examples])
    ids = [e.ids or [0] for e in enc]
    types = [[min(t, type_vocab_size - 1) for t in e.type_ids] or [0] for e in enc] if type_vocab_size else None
    return ids, types


def batches(ids: list, types: list | None, pad_id: int, batch_size: int = BATCH):
    """(positions, feed) in length order, right-padded to the longest of each batch."""
    lengths = np.array([len(x) for x in ids])
    order = np.argsort(lengths, kind="stable")
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        T = int(lengths[idx].max())
        feed = {"input_ids": np.full((len(idx), T), pad_id, dtype=np.int64),
                "attention_mask": np.zeros((len(idx), T), dtype=np.int64)}
        if types is not None:
            feed["token_type_ids"] = np.zeros((len(idx), T), dtype=np.int64)
        for r, i in enumerate(idx):
            n = len(ids[i])
            feed["input_ids"][r, :n], feed["attention_mask"][r, :n] = ids[i], 1
            if types is not None:
                feed["token_type_ids"][r, :n] = types[i]
        yield idx, feed


def run_batches(fn, feeds: list, n: int) -> tuple[np.ndarray, float]:
    """(logits in the split's order, seconds) of fn(feed) -> logits over prepared batches."""
    out, t0 = None, time.perf_counter()
    for idx, feed in feeds:
        z = fn(feed)
        if out is None:
            out = np.zeros((n, z.shape[-1]), dtype=np.float32)
        out[idx] = z
    return out, time.perf_counter() - t0


def kiln_fn(model):
    @torch.no_grad()
    def fn(feed):
        types = feed.get("token_type_ids")
        return model(torch.from_numpy(feed["input_ids"]), torch.from_numpy(feed["attention_mask"]),
                     torch.from_numpy(types) if types is not None else None).float().numpy()
    return fn


def ort_fn(sess):
    names = [i.name for i in sess.get_inputs()]
    return lambda feed: sess.run(["logits"], {k: feed[k] for k in names})[0]


def read_test_split(ex: Exported, read_splits, log) -> tuple[list | None, str | None]:
    """The run's test examples re-read by the task (`read_splits`), checked against the run's data.json
    fingerprint; (None, why) when they cannot be."""
    if read_splits is None:
        return None, "no test split reader given"
    try:
        splits, labels, _ = read_splits(ex.run_cfg, lambda *_: None)
    except KilnError as e:
        return None, f"cannot re-read the run's data: {e}"
    test = splits["test"]
    if not test:
        return None, "the run has no test split"
    if labels != ex.meta["labels"]:
        return None, f"the data now has labels {labels}, the run {ex.meta['labels']}"
    try:
        recorded = json.loads((ex.root / "data.json").read_text())["splits"]["test"]["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        recorded = None
    from kiln.data.tables import fingerprint

    if recorded is not None and fingerprint(test) != recorded:
        return None, "the test split re-read from the data differs from the run's (data.json fingerprint)"
    return test, None


def measure(ex: Exported, sessions: dict, read_splits=None, log=print) -> dict:
    if ex.kind == "classifier":
        return _measure_classifier(ex, sessions, read_splits, log)
    return _measure_language_model(ex, sessions, log)


def _measure_classifier(ex: Exported, sessions: dict, read_splits, log) -> dict:
    examples, why = read_test_split(ex, read_splits, log)
    pad = ex.meta["pad_token_id"]
    if examples is not None:
        ids, types = encode(ex.tokenizer, examples, ex.meta["max_length"], ex.cfg.type_vocab_size)
        index = {n: i for i, n in enumerate(ex.meta["labels"])}
        y = np.array([index[e.label] for e in examples])
        data = f"the run's test split ({len(examples)} examples)"
    else:
        log(f"note: accuracy not measured ({why}); speed on 256 random examples of {ex.meta['max_length']} tokens")
        feed = random_inputs(ex, 256, ex.meta["max_length"])
        ids = [list(r) for r in feed["input_ids"]]
        types = [list(r) for r in feed["token_type_ids"]] if ex.types else None
        y, data = None, f"256 random examples of {ex.meta['max_length']} tokens ({why})"
    feeds = list(batches(ids, types, pad))
    rows = {}
    fns = {"kiln fp32": kiln_fn(ex.model), **{k: ort_fn(s) for k, s in sessions.items()}}
    for name, fn in fns.items():
        fn(feeds[0][1])  # warm up
        logits, sec = run_batches(fn, feeds, len(ids))
        rows[name] = {"examples_per_second": round(len(ids) / sec, 2)}
        if y is not None:
            rows[name]["accuracy"] = round(float((logits.argmax(-1) == y).mean()), 6)
    recorded = _recorded_accuracy(ex.root)
    _log_table(log, data, rows, "examples/s")
    return {"data": data, "batch_size": BATCH, "results": rows, "run_test_accuracy": recorded}


def _recorded_accuracy(root: Path) -> float | None:
    try:
        return json.loads((root / "eval" / "test.json").read_text())["accuracy"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _measure_language_model(ex: Exported, sessions: dict, log) -> dict:
    """Sequences/s of a forward over random windows; for a decoder also greedy tokens/s with the KV cache."""
    T = min(128, ex.cfg.context_length)
    feeds = [random_inputs(ex, 8, T, seed=s) for s in range(4)]
    rows = {}
    for name, sess in {"kiln fp32": None, **sessions}.items():
        fn = (lambda f: kiln_outputs(ex, f)[0]) if sess is None else (lambda f, s=sess: s.run(["logits"], f)[0])
        fn(feeds[0])
        t0 = time.perf_counter()
        for f in feeds:
            fn(f)
        rows[name] = {"sequences_per_second": round(8 * len(feeds) / (time.perf_counter() - t0), 2)}
        if ex.cached:
            rows[name]["greedy_tokens_per_second"] = round(_decode_speed(ex, sess), 2)
    data = f"random token windows [8, {T}]" + (", greedy decoding batch 1 (prompt 16, 32 new)" if ex.cached else "")
    _log_table(log, data, rows, "sequences/s")
    return {"data": data, "results": rows}


def _decode_speed(ex: Exported, sess, prompt: int = 16, new: int = 32) -> float:
    new = max(1, min(new, ex.cfg.context_length - prompt))
    ids = np.random.default_rng(0).integers(0, ex.cfg.vocab_size, (1, prompt), dtype=np.int64)
    if sess is None:
        x = torch.from_numpy(ids)
        ex.model.generate(x, 2, greedy=True)
        t0 = time.perf_counter()
        ex.model.generate(x, new, greedy=True)
        return new / (time.perf_counter() - t0)
    greedy(sess, ex.meta["cache"], ids, 2)
    t0 = time.perf_counter()
    greedy(sess, ex.meta["cache"], ids, new)
    return new / (time.perf_counter() - t0)


def greedy(sess, cache: dict, ids: np.ndarray, new: int, attention_mask: np.ndarray | None = None) -> np.ndarray:
    """Greedy decoding through an exported decoder with its KV cache: the prompt with a past of length 0, then
    one token a step, the presents fed back as pasts. Returns [B, T + new] ids."""
    B = ids.shape[0]
    mask = np.ones_like(ids) if attention_mask is None else attention_mask.astype(np.int64)
    feed = {"input_ids": ids, "attention_mask": mask,
            **{n: np.zeros((B, cache["n_kv_head"], 0, cache["head_dim"]), np.float32) for n in cache["inputs"]}}
    out = [ids]
    for _ in range(new):
        logits, *presents = sess.run(None, feed)
        token = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        out.append(token)
        mask = np.concatenate([mask, np.ones((B, 1), np.int64)], axis=1)
        feed = {"input_ids": token, "attention_mask": mask, **dict(zip(cache["inputs"], presents))}
    return np.concatenate(out, axis=1)


def _log_table(log, data: str, rows: dict, unit: str) -> None:
    keys = sorted({k for r in rows.values() for k in r})
    log(f"{data}:")
    log(f"  {'':18s}" + "".join(f"{k:>26s}" for k in keys))
    for name, r in rows.items():
        log(f"  {name:18s}" + "".join(f"{r[k]:>26.4g}" if k in r else f"{'':>26s}" for k in keys))
