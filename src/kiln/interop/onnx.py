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

import copy
import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from kiln.errors import KilnError, filesystem_error, require
from kiln.model.layers import Attention

FORMAT = "kiln-onnx/1"
OPSET = 17
MODEL_FILE, INT8_FILE, META_FILE, REPORT_FILE = "model.onnx", "model.int8.onnx", "kiln-onnx.json", "report.json"
BATCH = 32  # examples per batch when the report measures accuracy and speed
EXPORTABLE = "a classifier run (kiln finetune classify) or a language model (kiln pretrain: decoder or encoder)"


# ----------------------------------------------------------------------------------------------- the graphs


class _Discard(list):
    """An Attention.captured that keeps nothing: it routes kiln's attention through its plain-matmul form."""

    def append(self, _):
        pass


class _RMSNorm(nn.Module):
    """nn.RMSNorm as the ops it computes (the exporter has no aten::rms_norm before opset 23)."""

    def __init__(self, norm: nn.RMSNorm):
        super().__init__()
        self.weight = norm.weight
        self.eps = norm.eps if norm.eps is not None else torch.finfo(torch.float32).eps

    def forward(self, x):
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return y * self.weight if self.weight is not None else y


def exportable(module: nn.Module) -> nn.Module:
    """An fp32 copy of `module` whose forward the TorchScript exporter can write (RMSNorm and attention as
    plain ops); the same function as the original."""
    m = copy.deepcopy(module).float().eval()
    for parent in list(m.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.RMSNorm):
                setattr(parent, name, _RMSNorm(child))
    for mod in m.modules():
        if isinstance(mod, Attention):
            mod.captured = _Discard()
    return m


class _ConcatCache:
    """kiln's KVCache interface (append -> all keys/values so far) by concatenation: traceable, no buffers."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v

    def append(self, k, v):
        self.k, self.v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        return self.k, self.v


class CachedDecoder(nn.Module):
    """A decoder Transformer as (input_ids, attention_mask, *pasts) -> (logits, *presents), kiln's own blocks.

    attention_mask covers past + new tokens (1 = a real token); positions are its running count, as kiln
    generate computes them, and the mask is causal over the past as build_mask makes it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, *past):
        st, cfg = self.model.decoder, self.model.config
        T, P = input_ids.shape[1], past[0].shape[2]
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, P:]
        x = st.embed(input_ids, position_ids, None)
        rope = None
        if cfg.position == "rope":
            rope = (st.rope_cos[position_ids].unsqueeze(1), st.rope_sin[position_ids].unsqueeze(1))
        rows = torch.arange(T, device=input_ids.device)[:, None] + P
        cols = torch.arange(attention_mask.shape[1], device=input_ids.device)[None, :]
        keep = (attention_mask[:, None, None, :].bool() & (cols <= rows)) | (rows == cols)
        caches = [_ConcatCache(past[2 * i], past[2 * i + 1]) for i in range(len(st.blocks))]
        for block, cache in zip(st.blocks, caches):
            x = block(x, keep, False, rope, cache)
        if st.norm is not None:
            x = st.norm(x)
        if self.model.head_transform is not None:
            x = self.model.head_transform(x)
        return (self.model.lm_head(x), *[t for c in caches for t in (c.k, c.v)])


class EncoderLM(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        return self.model(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)


# ----------------------------------------------------------------------------------------------- loading


class Exported:
    """What was loaded from the run: the kiln module, its kind and the graph's interface."""

    def __init__(self, kind: str, model: nn.Module, cfg, run_cfg, ckpt: Path, root: Path, tokenizer, meta: dict):
        self.kind, self.model, self.cfg, self.run_cfg, self.ckpt, self.root = kind, model, cfg, run_cfg, ckpt, root
        self.tokenizer, self.meta = tokenizer, meta

    @property
    def types(self) -> bool:
        return bool(self.cfg.type_vocab_size)

    @property
    def cached(self) -> bool:
        return self.kind == "decoder"


def _load_classifier(run_dir: Path, which: str) -> Exported:
    """A `kiln finetune classify` run (as kiln.tasks.classify_files.load_classifier loads it; interop sits
    below tasks)."""
    from kiln.config import ClassifyConfig, load_config
    from kiln.data.tokenizer import load_tokenizer
    from kiln.model.heads import SequenceClassifier
    from kiln.run.checkpoint import find_checkpoint, load_weights
    from kiln.run.load import build_model

    cfg = load_config(run_dir / "classify.yaml", cls=ClassifyConfig)
    try:
        meta = json.loads((run_dir / "labels.json").read_text(encoding="utf-8"))
        labels = list(meta["labels"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise KilnError(f"{run_dir / 'labels.json'}: cannot read the label names ({type(e).__name__})") from None
    ckpt = find_checkpoint(run_dir, which) if which in ("best", "latest") else find_checkpoint(which)
    model = SequenceClassifier(build_model(cfg.model, "cpu"), len(labels), meta.get("pooling", cfg.pooling),
                               cfg.head_dropout)
    load_weights(model, ckpt / "model.safetensors")
    d = cfg.data
    info = {"labels": labels, "text_field": d.text_field, "text_pair_field": d.text_pair_field or None,
            "label_field": d.label_field, "max_length": d.max_length, "pooling": model.pooling,
            "positive_label": meta.get("positive_label"), "padding": "right",
            "pad_token_id": cfg.model.pad_token_id if cfg.model.pad_token_id >= 0 else 0}
    return Exported("classifier", model.eval(), cfg.model, cfg, ckpt, run_dir, load_tokenizer(run_dir / "tokenizer.json"),
                    info)


def _load_language_model(run_dir: Path, which: str) -> Exported:
    from kiln.data.tokenizer import eot_id
    from kiln.run.checkpoint import find_checkpoint
    from kiln.run.load import checkpoint_meta, load

    ckpt = find_checkpoint(run_dir, which) if which in ("best", "latest") else find_checkpoint(which)
    if checkpoint_meta(ckpt).get("quantization"):
        source = checkpoint_meta(ckpt).get("source") or "its source run"
        raise KilnError(f"{run_dir} holds kiln quantize's int8 weights, which the ONNX graph does not take: export "
                        f"{source} instead, with --int8 for onnxruntime's own int8 quantization")
    model, tokenizer, run_cfg = load(run_dir, which, quantized_ok=False)
    cfg = run_cfg.model
    if cfg.arch == "encoder-decoder":
        raise KilnError(f"{run_dir} is an encoder-decoder language model: kiln export onnx exports {EXPORTABLE}")
    kind = "decoder" if cfg.arch == "decoder" else "encoder"
    info = {"vocab_size": cfg.vocab_size, "context_length": cfg.context_length,
            "eot_token_id": eot_id(tokenizer) if tokenizer is not None else None,
            "pad_token_id": cfg.pad_token_id if cfg.pad_token_id >= 0 else 0}
    if kind == "decoder":
        info["padding"] = "left"
        info["cache"] = {"n_layer": cfg.n_layer, "n_kv_head": cfg.n_kv_head, "head_dim": cfg.head_dim,
                         "dtype": "float32", "inputs": [f"past_key_values.{i}.{kv}" for i in range(cfg.n_layer)
                                                       for kv in ("key", "value")],
                         "outputs": [f"present.{i}.{kv}" for i in range(cfg.n_layer) for kv in ("key", "value")]}
    else:
        info["padding"] = "right"
    return Exported(kind, model.float().eval(), cfg, run_cfg, ckpt, run_dir, tokenizer, info)


def load_run(run_dir: str | Path, which: str | None = None) -> Exported:
    """The run's model, or a one-line KilnError naming why it cannot be exported."""
    from kiln.run.folder import read_run_json

    run_dir = Path(run_dir)
    kind = read_run_json(run_dir)["kind"]
    if kind == "classify":
        return _load_classifier(run_dir, which or "best")
    if kind == "pretrain":
        return _load_language_model(run_dir, which or "latest")
    raise KilnError(f"{run_dir} is a {kind} run: kiln export onnx exports {EXPORTABLE}"
                    + (" (an encoder-decoder needs an encoder graph and a decoder graph with a cross-attention "
                       "cache: not supported yet)" if kind == "seq2seq" else ""))


# ----------------------------------------------------------------------------------------------- export


def _names(ex: Exported) -> tuple[list[str], list[str], dict]:
    seq = {0: "batch", 1: "sequence"}
    if ex.cached:
        pasts, presents = ex.meta["cache"]["inputs"], ex.meta["cache"]["outputs"]
        dyn = {"input_ids": seq, "attention_mask": {0: "batch", 1: "total_sequence"}, "logits": seq,
               **{n: {0: "batch", 2: "past_sequence"} for n in pasts},
               **{n: {0: "batch", 2: "total_sequence"} for n in presents}}
        return ["input_ids", "attention_mask", *pasts], ["logits", *presents], dyn
    inputs = ["input_ids", "attention_mask"] + (["token_type_ids"] if ex.types else [])
    dyn = {n: seq for n in inputs}
    dyn["logits"] = {0: "batch"} if ex.kind == "classifier" else seq
    return inputs, ["logits"], dyn


def random_inputs(ex: Exported, batch: int, length: int, past: int = 0, seed: int = 0) -> dict[str, np.ndarray]:
    """Random token ids with some padding (right, or left for a decoder), as numpy arrays named as the graph's
    inputs; a decoder gets a random past of `past` positions."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, ex.cfg.vocab_size, (batch, length), dtype=np.int64)
    mask = np.ones((batch, past + length), dtype=np.int64)
    if batch > 1 and length > 2:  # the first row shorter: padding on the model's side
        if ex.cached:
            mask[0, :2] = 0
        else:
            mask[0, -2:] = 0
    feed = {"input_ids": ids, "attention_mask": mask}
    if ex.cached:
        c = ex.meta["cache"]
        for n in c["inputs"]:
            feed[n] = rng.standard_normal((batch, c["n_kv_head"], past, c["head_dim"])).astype(np.float32)
    elif ex.types:
        feed["token_type_ids"] = rng.integers(0, ex.cfg.type_vocab_size, (batch, length), dtype=np.int64)
    return feed


@torch.no_grad()
def kiln_outputs(ex: Exported, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    """kiln's own outputs for an input of the graph (the reference the ONNX graph must match)."""
    t = {k: torch.from_numpy(v) for k, v in feed.items()}
    if ex.kind == "classifier":
        return [ex.model(t["input_ids"], t["attention_mask"], t.get("token_type_ids")).numpy()]
    if ex.kind == "encoder":
        return [ex.model(t["input_ids"], attention_mask=t["attention_mask"],
                         token_type_ids=t.get("token_type_ids")).numpy()]
    # a decoder: kiln's forward with its preallocated KV cache holding the given past
    mask, ids = t["attention_mask"], t["input_ids"]
    c = ex.meta["cache"]
    P = feed[c["inputs"][0]].shape[2]
    caches = ex.model.new_caches(ids.shape[0], P + ids.shape[1], dtype=torch.float32)
    for i, cache in enumerate(caches):
        if P:
            cache.append(t[c["inputs"][2 * i]], t[c["inputs"][2 * i + 1]])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, P:]
    logits = ex.model(ids, attention_mask=mask.bool(), position_ids=pos, caches=caches)
    return [logits.numpy()] + [x.numpy() for cache in caches for x in (cache.k, cache.v)]


def _export_graph(ex: Exported, path: Path) -> None:
    inputs, outputs, dyn = _names(ex)
    if ex.kind == "classifier":
        module = exportable(ex.model)
    elif ex.kind == "encoder":
        module = EncoderLM(exportable(ex.model))
    else:
        module = CachedDecoder(exportable(ex.model))
    example = random_inputs(ex, 2, 5, past=3 if ex.cached else 0)  # distinct sizes: nothing traced as equal
    args = tuple(torch.from_numpy(example[n]) for n in inputs)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings about Python scalars that are constants here
        try:
            torch.onnx.export(module, args, str(path), dynamo=False, opset_version=OPSET, input_names=inputs,
                              output_names=outputs, dynamic_axes=dyn, do_constant_folding=True)
        except torch.onnx.errors.UnsupportedOperatorError as e:  # a model variant kiln does not write as ops yet
            raise KilnError(f"cannot export this {ex.kind} to ONNX opset {OPSET}: {str(e).splitlines()[0]}") from None


def session(path: Path, threads: int | None = None):
    """An onnxruntime CPU session with `threads` intra-op threads (default: torch's)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or torch.get_num_threads()
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def quantize_int8(src: Path, dst: Path) -> None:
    """onnxruntime's dynamic quantization: int8 weights of the MatMul/Gemm/Gather nodes, per-batch activations."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)


def parity(ex: Exported, sess, shapes=((3, 7), (1, 19))) -> dict:
    """Max |kiln - onnxruntime| over every output for random inputs of two batch sizes and lengths (and, for a
    decoder, a past of 4 positions), and the share of equal argmaxes of the logits."""
    worst, agree, n = 0.0, 0, 0
    ctx = ex.meta.get("max_length") or ex.cfg.context_length
    for i, (b, t) in enumerate(shapes):
        for past in ((0, 4) if ex.cached else (0,)):
            t = min(t, ctx - past)
            feed = random_inputs(ex, b, t, past, seed=i + 10 * past)
            ref, got = kiln_outputs(ex, feed), sess.run(None, feed)
            worst = max([worst] + [float(np.abs(r - g).max()) for r, g in zip(ref, got)])
            agree += int((ref[0].argmax(-1) == got[0].argmax(-1)).sum())
            n += ref[0].argmax(-1).size
    return {"max_abs_diff": worst, "argmax_agreement": agree / max(n, 1)}


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise KilnError(f"cannot write {out}: it is a file, not a folder (kiln export onnx)")
    if out.is_dir() and any(out.iterdir()) and not (out / META_FILE).is_file():
        raise KilnError(f"{out} exists and is not a kiln ONNX export; choose another folder")


def _temp_folder(out: Path) -> Path:
    """A fresh folder beside `out` (the export is moved into place when complete), or a one-line error."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        line = filesystem_error(e, "export")
        raise KilnError(line or f"cannot write {out}: {e}") from None


def _install(tmp: Path, out: Path) -> None:
    _check_out(out)
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_onnx(run_dir: str | Path, out: str | Path, int8: bool = False, which: str | None = None,
                read_splits=None, report: bool = True, log=print) -> dict:
    """Export a run to OUT (module docstring); returns the report. `which`: best, latest or a checkpoint folder
    (default: best for a classifier, latest for a language model). `read_splits(cfg, log) -> (splits, labels,
    data report)`: the classifier task's reading of its data, for the test-split accuracy (None: no accuracy)."""
    require("onnx", "onnx", "`kiln export onnx`")
    require("onnxruntime", "onnx", "`kiln export onnx`")
    run_dir, out = Path(run_dir), Path(out)
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
    """Token ids (and type ids) of labelled examples, cut at max_length, as kiln.tasks.text encodes them."""
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
    from kiln.data.tasks import fingerprint

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
