"""The ONNX graphs of kiln runs (kiln.interop.onnx is the verb and its report): exportable forms of the
models, the export itself, onnxruntime sessions and parity on random inputs."""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from kiln.errors import KilnError, filesystem_error
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
            "pad_token_id": cfg.model.pad_id}
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
            "pad_token_id": cfg.pad_id}
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

    import logging

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its advice to run shape pre-processing first goes to the root logger
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)


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
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        line = filesystem_error(e, "export")
        raise KilnError(line or f"cannot write {out}: {e}") from None
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the export is an ordinary folder
    return tmp


def finish_export(tmp: Path, out: Path, meta: dict, result: dict, log) -> dict:
    """The end a speech or image export shares: kiln-onnx.json (meta), report.json (result + the files' sizes),
    moved into place; then the log lines. Returns the report."""
    import json

    result["size_mb"] = {f: round((tmp / f).stat().st_size / 1e6, 3) for f in (MODEL_FILE, INT8_FILE)
                         if (tmp / f).is_file()}
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    (tmp / REPORT_FILE).write_text(json.dumps(result, indent=2) + "\n")
    _install(tmp, out)
    fp32 = result["parity"]["fp32"]
    log(f"exported {result['run']} ({result['kind']}, checkpoint {Path(result['checkpoint']).name}) in "
        f"{result['export_seconds']:.1f}s: {MODEL_FILE}, max |kiln - onnxruntime| {fp32['max_abs_diff']:.2e} "
        f"(argmax agreement {100 * fp32['argmax_agreement']:.1f}%)")
    log(f"wrote {out}")
    return result


def _install(tmp: Path, out: Path) -> None:
    _check_out(out)
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
