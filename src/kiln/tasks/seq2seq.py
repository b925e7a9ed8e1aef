"""`kiln finetune seq2seq`: source/target pairs -> an encoder-decoder, evaluated by decoding; `kiln translate`.

    kiln finetune seq2seq configs/translate-en-es.yaml --data.train pairs.tsv \
        --seq2seq.source_field en --seq2seq.target_field es

The task on the shared driver (kiln.tasks.driver): read, dedup and split the pairs leak-free
(kiln.data.pairs) -> BPE tokenizer(s) trained on the train split -> an encoder-decoder from the config ->
teacher forcing with label smoothing (kiln.train.objectives.Seq2SeqLM) -> at each evaluation the val loss and
a fixed val subset decoded (greedy or beam) and scored (BLEU + chrF for `translate`, ROUGE for `summarize`),
samples logged, the metric plotted -> the best checkpoint decodes the test split. With `init` (a Hugging Face
Marian/BART folder, a kiln run imported from one, or a seq2seq run) the model, its tokenizer.json and its token
ids come from there instead of a new BPE and a random model; `kiln export hf` writes the result back.

Run folder: seq2seq.yaml, run.json (kind seq2seq), seq2seq.json (special ids, fields, tokenizer layout),
tokenizer.json (shared) or tokenizer_source.json + tokenizer_target.json, data.json, samples.txt,
checkpoints/, metrics.csv, plots/loss.png + bleu.png | rouge.png, eval/test.json + test_outputs.tsv, log.txt.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from pathlib import Path

from kiln.config import Seq2SeqConfig, load_config
from kiln.data.pairs import Pair, PairCodec, build_codec, load_pair_splits, read_pairs
from kiln.data.text import clean_text
from kiln.errors import KilnError
from kiln.eval.text_metrics import HEADLINE, TASK_METRICS, text_metrics
from kiln.interop.hf import HF_CONFIG_COPY
from kiln.model.transformer import Transformer
from kiln.report.plots import metric_curve
from kiln.run.checkpoint import find_checkpoint, load_weights, unwrap
from kiln.run.folder import run_kind
from kiln.run.load import build_model
from kiln.tasks.base import Data, Prepared, Task
from kiln.tasks.backbone import load_backbone
from kiln.tasks.seq2seq_decode import EncodedPairs, PairBatches, decode_ids, decode_options, encode_pairs, mean_loss, \
    write_outputs
from kiln.train.objectives import Seq2SeqLM

CONFIG_FILE, META_FILE = "seq2seq.yaml", "seq2seq.json"


class Seq2SeqTask(Task):
    name, config_cls, config_file = "seq2seq", Seq2SeqConfig, CONFIG_FILE
    throughput_unit = "tok"
    usage = ("kiln finetune seq2seq [CONFIG.yaml] --data.train FILE --seq2seq.source_field en "
             "--seq2seq.target_field es [--section.key VALUE ...]")
    example = "configs/translate-en-es.yaml"

    @staticmethod
    def time_budget_minutes(cfg) -> float:
        return cfg.seq2seq.time_budget

    def check(self, cfg: Seq2SeqConfig) -> None:
        cfg.model.resolve()
        m, d = cfg.model, cfg.data
        if cfg.init and cfg.seq2seq.tokenizer != "shared":
            raise KilnError(f"seq2seq.tokenizer {cfg.seq2seq.tokenizer!r} does not apply with init: the init's own "
                            "tokenizer is used")
        if m.arch != "encoder-decoder" and not cfg.init:
            raise KilnError(f"model.arch must be encoder-decoder for seq2seq, got {m.arch!r}")
        if d.max_source_length < 1 or d.max_target_length < 2:
            raise KilnError("data.max_source_length must be >= 1 and data.max_target_length >= 2")
        need = max(d.max_source_length, d.max_target_length)
        if m.context_length < need and not cfg.init:  # with init: checked once its model is loaded
            raise KilnError(f"model.context_length {m.context_length} is shorter than data.max_source_length / "
                            f"max_target_length ({need}); raise it or lower those")
        s = cfg.seq2seq
        if not 0.0 <= s.label_smoothing < 1.0:
            raise KilnError(f"seq2seq.label_smoothing must be in [0, 1), got {s.label_smoothing}")
        if s.num_beams < 1:
            raise KilnError(f"seq2seq.num_beams must be >= 1, got {s.num_beams}")
        if s.time_budget < 0:
            raise KilnError("seq2seq.time_budget must be >= 0 (minutes)")
        metric_name(cfg)

    def read(self, cfg: Seq2SeqConfig, log) -> Data:
        splits, report = load_pair_splits(cfg, log)
        return Data(splits, report)

    def prepare(self, cfg: Seq2SeqConfig, run_dir: Path, data: Data, device: str, log) -> Prepared:
        splits, report, d, s, tc = data.splits, data.report, cfg.data, cfg.seq2seq, cfg.train
        model, init_info, hf_file = None, {}, None
        if cfg.init:  # the pretrained model, its tokenizer and token ids; its shape is the run's model config
            model, codec, init_info, hf_file = init_model(cfg, run_dir, log)
            cfg.model = copy.deepcopy(model.config)
            if max(d.max_source_length, d.max_target_length) > cfg.model.context_length:
                log(f"note: data.max_source_length / max_target_length ({d.max_source_length} / "
                    f"{d.max_target_length}) cut to init's context_length {cfg.model.context_length}")
                d.max_source_length = min(d.max_source_length, cfg.model.context_length)
                d.max_target_length = min(d.max_target_length, cfg.model.context_length)
        else:
            codec = build_codec(cfg, splits["train"], log)
        if cfg.model.vocab_size == 0:
            cfg.model.vocab_size = codec.vocab_size
        elif cfg.model.vocab_size < codec.vocab_size:
            raise KilnError(f"model.vocab_size {cfg.model.vocab_size} is smaller than the tokenizer's {codec.vocab_size}")
        enc = {n: encode_pairs(codec, p, d.max_source_length, d.max_target_length, n) for n, p in splits.items()}
        report["truncated"] = {n: e.truncated for n, e in enc.items()}
        for n, e in enc.items():
            if e.truncated:
                log(f"truncation: {e.truncated} of {len(e)} {n} pair(s) exceed data.max_source_length "
                    f"{d.max_source_length} / max_target_length {d.max_target_length} tokens and were cut")
        log("splits: " + ", ".join(f"{n} {len(p)} pairs ({report['splits'][n]['unique_sources']} unique sources)"
                                   for n, p in splits.items()) + f"; seed {cfg.seed}")
        model = model if model is not None else Transformer(cfg.model)
        notes = [f"init {cfg.init}"] if cfg.init else []
        notes += [f"encoder-decoder {cfg.model.n_layer}+{cfg.model.n_decoder_layer} layers, d_model {cfg.model.d_model}, "
                 f"vocab {cfg.model.vocab_size}", f"label smoothing {s.label_smoothing}"]
        if s.time_budget:
            notes.append(f"time budget {s.time_budget:g} min")
        meta = {"task": s.task, "source_field": s.source_field, "target_field": s.target_field,
                "max_source_length": d.max_source_length, "max_target_length": d.max_target_length, **init_info}

        def save(run_dir: Path) -> None:
            meta.update(codec.save(run_dir), **meta)
            if hf_file is not None:  # the pretrained model's HF config: `kiln export hf` keeps its settings
                shutil.copyfile(hf_file, run_dir / HF_CONFIG_COPY)
            (run_dir / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")

        step = [0]  # the step whose samples evaluate() logs
        evaluate, on_eval, history = _validation(cfg, splits["val"], enc["val"], codec, device, run_dir, log, step)
        batches = PairBatches(enc["train"], tc.batch_size, cfg.seed, codec.pad, codec.bos, codec.eos)

        def batch(i: int) -> dict:
            step[0] = i // tc.grad_accum + 1
            return batches.batch(i)

        return Prepared(model, Seq2SeqLM(s.label_smoothing), batch, len(enc["train"]),
                        evaluate if len(enc["val"]) else None, metric_name(cfg), meta, save, on_eval, notes,
                        state={"enc": enc, "codec": codec, "history": history, "device": device,
                               "test_pairs": splits["test"]})

    def summary(self, result: dict, trainer) -> dict:
        return {"target_tokens": result["tokens"]}

    def test(self, cfg, prep: Prepared, model, ckpt: Path, run_dir: Path, log) -> dict:
        s, st = cfg.seq2seq, prep.state
        train = dict(st.get("summary", {}), history=[{"step": k, **m} for k, m in st["history"]])
        results = {"train": train, "checkpoint": str(ckpt)}
        test_pairs = st["test_pairs"]
        if s.test_examples:
            test_pairs = test_pairs[:s.test_examples]
        out_dir = run_dir / "eval"
        out_dir.mkdir(exist_ok=True)
        if test_pairs:
            opt = decode_options(cfg)
            t0 = time.perf_counter()
            hyps = decode_ids(unwrap(model), st["codec"], st["enc"]["test"].src[:len(test_pairs)], opt, st["device"])
            scores = text_metrics(s.task, hyps, [p.target for p in test_pairs])
            results["test"] = {"examples": len(test_pairs), "num_beams": opt.num_beams, **scores,
                               "decode_seconds": time.perf_counter() - t0}
            write_outputs(out_dir / "test_outputs.tsv", test_pairs, hyps)
            how = "greedy" if opt.num_beams == 1 else f"beam {opt.num_beams}"
            log(f"test ({len(test_pairs)} pairs, {ckpt.name}, {how}): " + ", ".join(f"{k} {v:.2f}" for k, v in scores.items()))
        (out_dir / "test.json").write_text(json.dumps(results, indent=2) + "\n")
        return {k: v for k, v in results.items() if k == "test"}

    def load(self, run_dir, which: str = "best", device: str = "cpu"):
        return load_seq2seq(run_dir, which, device)

    def evaluate_file(self, run_dir, file, out=None, which: str = "best", log=print, num_beams=None, **kw) -> dict:
        return evaluate_pairs(run_dir, file, out, which, num_beams, log=log)


def _validation(cfg: Seq2SeqConfig, val_pairs, val_enc, codec, device: str, run_dir: Path, log, step: list):
    """(evaluate, on_eval, history): the val loss on a fixed subset, and a fixed subset decoded at every evaluation
    (BLEU/chrF or ROUGE, a few samples). Samples are logged and appended to samples.txt in on_eval, which only
    rank 0 runs (under FSDP every rank evaluates) and which a resume replays without them."""
    s, tc = cfg.seq2seq, cfg.train
    n_dec = min(s.eval_examples, len(val_pairs))
    dec_src, dec_refs = val_enc.src[:n_dec], [p.target for p in val_pairs[:n_dec]]
    n_loss = min(len(val_enc), max(tc.eval_batches * tc.batch_size, n_dec))
    loss_enc = EncodedPairs(val_enc.src[:n_loss], val_enc.tgt[:n_loss])
    train_opt, keys = decode_options(cfg, training=True), TASK_METRICS[s.task]
    history: list[tuple[int, dict]] = []
    samples: list[str] = []

    def evaluate(m) -> dict:
        out = {"val_loss": mean_loss(m, loss_enc, codec, max(tc.batch_size, 16), device)}
        out["val_ppl"] = math.exp(min(out["val_loss"], 50.0))
        if n_dec:
            hyps = decode_ids(m, codec, dec_src, train_opt, device)
            out.update({f"val_{k}": v for k, v in text_metrics(s.task, hyps, dec_refs).items()})
            how = "greedy" if train_opt.num_beams == 1 else f"beam {train_opt.num_beams}"
            samples[:] = [f"step {step[0]} samples ({how}):"]
            for i in range(min(s.samples, n_dec)):
                samples.extend([f"  src: {val_pairs[i].source}", f"  ref: {dec_refs[i]}", f"  out: {hyps[i]}"])
        return out

    def on_eval(st: int, m: dict) -> None:
        history.append((st, dict(m)))
        if samples:
            for line in samples:
                log(line)
            with open(run_dir / "samples.txt", "a", encoding="utf-8") as f:
                f.write("\n".join(samples) + "\n")
            samples.clear()
        if n_dec:
            metric_curve(history, keys, run_dir / "plots" / ("bleu.png" if s.task == "translate" else "rouge.png"),
                         title=f"{run_dir.name}: validation {'/'.join(keys)} ({n_dec} examples)")

    return evaluate, on_eval, history


TASK = Seq2SeqTask()


def metric_name(cfg: Seq2SeqConfig) -> str:
    m = cfg.seq2seq.metric
    if m == "auto":
        return f"val_{HEADLINE[cfg.seq2seq.task]}"
    if m == "val_loss":
        return m
    name = m.removeprefix("val_")
    if name not in TASK_METRICS[cfg.seq2seq.task]:
        raise KilnError(f"seq2seq.metric {m!r} is not a {cfg.seq2seq.task} metric (auto, val_loss, "
                        f"{', '.join(TASK_METRICS[cfg.seq2seq.task])})")
    return f"val_{name}"


def init_model(cfg: Seq2SeqConfig, run_dir: Path, log):
    """(model, codec, info, HF config file or None) of `init`: a seq2seq run (its model and codec), or an
    encoder-decoder kiln run / HF folder (kiln.tasks.backbone.load_backbone) whose tokenizer.json is the shared
    codec, with the decoder start, eos and pad ids of its HF config (Marian: <pad>, </s>, <pad>)."""
    path = Path(cfg.init).expanduser()
    if (path / CONFIG_FILE).is_file():
        model, codec, _, _ = load_seq2seq(path, cfg.init_checkpoint)
        hf = path / HF_CONFIG_COPY
        return model, codec, {"init": str(path), "init_kind": "seq2seq"}, hf if hf.is_file() else None
    if not (path / "tokenizer.json").is_file() and any((path / f).is_file() for f in ("config.json", "config.yaml")):
        raise KilnError(f"init {path} has no tokenizer.json: seq2seq fine-tuning needs the model's own tokenizer as "
                        "a tokenizers JSON file with the model's ids (for BART, transformers' fast tokenizer "
                        "save_pretrained writes one; Marian ships SentencePiece source.spm/target.spm + vocab.json, "
                        "which kiln does not read: convert them to a tokenizer.json with vocab.json's ids)")
    backbone, tok, info = load_backbone(cfg.init, cfg.init_checkpoint, run_dir, log)
    if backbone.config.arch != "encoder-decoder":
        raise KilnError(f"init {path} is a {backbone.config.arch} model; seq2seq needs an encoder-decoder "
                        "(a Marian or BART model, or a seq2seq run)")
    hf = Path(info.get("imported_to", path)) / HF_CONFIG_COPY
    h = json.loads(hf.read_text(encoding="utf-8")) if hf.is_file() else {}
    first = lambda v: v[0] if isinstance(v, list) and v else v  # noqa: E731  (eos may be a list)
    ids = {k: first(h.get(name)) for k, name in (("eos_id", "eos_token_id"), ("pad_id", "pad_token_id"),
                                                  ("bos_id", "decoder_start_token_id"))}
    codec = PairCodec(tok, ids={k: v for k, v in ids.items() if isinstance(v, int)},
                      source_eos=h.get("model_type") == "marian")
    for name, i in (("eos", codec.eos), ("decoder start", codec.bos), ("pad", codec.pad)):
        if not 0 <= i < backbone.config.vocab_size or (i < codec.vocab_size and tok.id_to_token(i) is None):
            raise KilnError(f"init {path}: the {name} id {i} is not a token of its tokenizer.json / model "
                            f"(vocab {backbone.config.vocab_size}); the tokenizer does not belong to this model")
    log(f"tokenizer: init's tokenizer.json ({codec.vocab_size} ids), shared by source and target; decoder start "
        f"{tok.id_to_token(codec.bos)!r}, eos {tok.id_to_token(codec.eos)!r}")
    info = {("init_kind" if k == "kind" else k): v for k, v in info.items()}  # run.json has its own kind
    return backbone, codec, info, hf if hf.is_file() else None


def load_seq2seq(run_dir: str | Path, which: str = "best", device: str = "cpu"):
    """(model, codec, Seq2SeqConfig, meta) of a `kiln finetune seq2seq` run folder."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        try:
            holds = f" (it holds a {run_kind(run_dir)} run)"
        except KilnError:
            holds = f" (no {CONFIG_FILE})"
        raise KilnError(f"{run_dir} is not a seq2seq run folder{holds}; train one with `kiln finetune seq2seq`")
    cfg = load_config(run_dir / CONFIG_FILE, cls=Seq2SeqConfig)
    try:
        meta = json.loads((run_dir / META_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise KilnError(f"{run_dir / META_FILE}: cannot read ({type(e).__name__})") from None
    ckpt = find_checkpoint(run_dir, which)
    model = build_model(cfg.model, device)
    load_weights(model, ckpt / "model.safetensors")
    model.eval()
    return model, PairCodec.load(run_dir, meta), cfg, meta


def translate(run_dir, texts: list[str], num_beams: int | None = None, which: str = "best",
              max_new_tokens: int | None = None) -> list[str]:
    """Outputs of a seq2seq run (a run folder, or what load_seq2seq returned) for a list of source texts."""
    model, codec, cfg, meta = load_seq2seq(run_dir, which) if isinstance(run_dir, (str, Path)) else run_dir
    opt = decode_options(cfg)
    if num_beams is not None:
        opt.num_beams = max(1, num_beams)
    if max_new_tokens:
        opt.max_new_tokens = max_new_tokens
    texts = [clean_text(t).strip() for t in texts]
    src = codec.encode_source(texts, "input")
    src = [ids[:meta.get("max_source_length", cfg.data.max_source_length)] or [codec.eos] for ids in src]
    return decode_ids(model, codec, src, opt)


def translate_from_cli(run_dir: str, text: list[str] | None, file: str | None, num_beams: int | None,
                       which: str, out: str | None, log=print) -> None:
    loaded = load_seq2seq(run_dir, which)
    if not text and not file:
        raise KilnError("give --text \"...\" (repeatable) or --file FILE (.txt: one source per line; "
                        ".tsv/.csv/.jsonl: the run's source column)")
    model_meta = loaded[3]
    pairs: list[Pair] = [Pair(t, "", 0) for t in (text or [])]
    if file:
        got, report = read_pairs(file, model_meta["source_field"], model_meta["target_field"], require_target=False,
                                 fmt=loaded[2].data)
        for line in report.lines():
            log(line)
        pairs += got
    hyps = translate(loaded, [p.source for p in pairs], num_beams)
    if out:
        write_outputs(Path(out), pairs, hyps)
        log(f"wrote {len(hyps)} output(s) to {out}")
    else:
        for h in hyps:
            print(h)
    refs = [p.target for p in pairs]
    if file and all(refs):
        scores = text_metrics(model_meta.get("task", "translate"), hyps, refs)
        log(f"{file}: " + ", ".join(f"{k} {v:.2f}" for k, v in scores.items()) + f" ({len(refs)} references)")


def evaluate_pairs(run_dir: str | Path, file: str | Path, out: str | Path | None = None, which: str = "best",
                   num_beams: int | None = None, log=print) -> dict:
    """Decode a pair file's sources with a seq2seq run and score the outputs against its targets (BLEU/chrF
    for translation, ROUGE for summarization); printed and written as JSON (default RUN_DIR/eval/<stem>.json),
    the outputs beside it as <stem>.tsv."""
    run_dir, file = Path(run_dir), Path(file)
    loaded = load_seq2seq(run_dir, which)
    meta = loaded[3]
    pairs, report = read_pairs(file, meta["source_field"], meta["target_field"], require_target=True,
                               fmt=loaded[2].data)
    for line in report.lines():
        log(line)
    if not pairs or not all(p.target for p in pairs):
        raise KilnError(f"{file}: no target text to score the outputs against; kiln eval needs a .tsv/.csv/.jsonl "
                        f"with the run's source and target columns ({meta['source_field']!r}, "
                        f"{meta['target_field']!r}); `kiln translate --file` translates sources alone")
    hyps = translate(loaded, [p.source for p in pairs], num_beams)
    task = loaded[2].seq2seq.task
    scores = text_metrics(task, hyps, [p.target for p in pairs])
    out = Path(out) if out else run_dir / "eval" / f"{file.stem}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_outputs(out.with_suffix(".tsv"), pairs, hyps)
    beams = max(1, num_beams if num_beams is not None else loaded[2].seq2seq.num_beams)
    result = {"file": str(file), "run": str(run_dir), "task": task, "pairs": len(pairs), "num_beams": beams,
              **scores, "outputs": str(out.with_suffix(".tsv"))}
    out.write_text(json.dumps(result, indent=2) + "\n")
    log(f"{file}: {len(pairs)} pair(s), {task}, {'greedy' if beams <= 1 else f'beam {beams}'}")
    log("\n".join(f"  {k:<8} {v:8.2f}" for k, v in scores.items()))
    log(f"wrote {out} (outputs: {out.with_suffix('.tsv')})")
    return result
