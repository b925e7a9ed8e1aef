"""`kiln finetune seq2seq`: source/target pairs -> an encoder-decoder, evaluated by decoding; `kiln translate`.

    kiln finetune seq2seq configs/translate-en-es.yaml --data.train pairs.tsv \
        --seq2seq.source_field en --seq2seq.target_field es

Pipeline: read the pair file (TSV/CSV/JSONL; UTF-8; empty sides skipped and counted) -> dedup -> seeded
leak-free split (identical sources never straddle splits) -> BPE tokenizer(s) trained on the train split
(kiln.data.tokenizer) -> encoder-decoder from the config -> the shared Trainer with teacher forcing and label
smoothing -> at each evaluation: val loss, then a fixed val subset decoded (greedy or beam search) and scored
(BLEU + chrF for `translate`, ROUGE-1/2/L for `summarize`), sample outputs logged, the metric plotted ->
the best checkpoint (by that metric) decodes the test split.

Translation and summarization are the same code; `seq2seq.task` only picks the metrics.

Run folder:
  seq2seq.yaml  the config                     seq2seq.json  special ids, fields, tokenizer layout
  tokenizer.json (shared) or tokenizer_source.json + tokenizer_target.json
  data.json     splits, skips, truncation      samples.txt   sample outputs of every evaluation
  checkpoints/  latest, best (by the metric)   metrics.csv, plots/loss.png, plots/bleu.png | rouge.png
  eval/test.json, eval/test_outputs.tsv        log.txt
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kiln.config import Seq2SeqConfig, dump_yaml, load_config
from kiln.data import tasks
from kiln.data.text import clean_text
from kiln.errors import KilnError, did_you_mean
from kiln.eval.text_metrics import HEADLINE, TASK_METRICS, text_metrics
from kiln.model.beam import beam_search, greedy, strip
from kiln.model.transformer import Transformer
from kiln.train.checkpoint import unwrap
from kiln.train.precision import choose_precision
from kiln.train.pretrain import RunLog, resolve_device
from kiln.train.trainer import BestByMetric, Trainer

CONFIG_FILE, META_FILE = "seq2seq.yaml", "seq2seq.json"
IGNORE = -100


# ----------------------------------------------------------------------------------------------- reading pairs


@dataclass
class Pair:
    source: str
    target: str
    line: int = 0


@dataclass
class PairReport:
    path: str
    rows: int = 0
    empty_source: int = 0
    empty_target: int = 0
    empty_lines: list[int] = field(default_factory=list)

    def lines(self) -> list[str]:
        if not self.empty_lines:
            return []
        what = " or ".join(w for w, n in (("source", self.empty_source), ("target", self.empty_target)) if n)
        shown = ", ".join(map(str, self.empty_lines[:5])) + (" ..." if len(self.empty_lines) > 5 else "")
        return [f"{self.path}: skipped {len(self.empty_lines)} row(s) with an empty {what} "
                f"({self.empty_source} empty source, {self.empty_target} empty target; line {shown})"]


def read_pairs(path: str | Path, source_field: str, target_field: str | None,
               require_target: bool = True) -> tuple[list[Pair], PairReport]:
    """Pairs of a .tsv/.csv/.jsonl file (.txt: one source per line, no target). Rows with an empty source or
    target are skipped and counted; a wrong field count names file and line; a missing column lists the
    columns present; a non-UTF-8 file is a one-line error."""
    path = Path(path)
    text = tasks._read_text(path)
    report = PairReport(str(path))
    if path.suffix.lower() == ".txt":
        out = []
        for lineno, line in enumerate(text.splitlines(), 1):
            s = clean_text(line).strip()
            report.rows += 1
            if s:
                out.append(Pair(s, "", lineno))
            elif line.strip() or lineno < len(text.splitlines()):
                report.empty_source += 1
                report.empty_lines.append(lineno)
        return out, report
    rows, header = tasks._jsonl_rows(path, text) if path.suffix.lower() == ".jsonl" else tasks._table_rows(path, text)
    if not rows:
        raise KilnError(f"{path}: no data rows")
    for what, name, key in (("source", source_field, "source_field"), ("target", target_field, "target_field")):
        if name and name not in header and (what == "source" or require_target):
            cols = ", ".join(repr(c) for c in header) or "(none)"
            raise KilnError(f"{path}: no {what} column {name!r}{did_you_mean(name, header)}; columns present: "
                            f"{cols} (set seq2seq.{key})")
    has_target = bool(target_field) and target_field in header
    out = []
    for lineno, row in rows:
        report.rows += 1
        s = clean_text(tasks._field(path, lineno, row, source_field)).strip()
        t = clean_text(tasks._field(path, lineno, row, target_field)).strip() if has_target else ""
        if not s:
            report.empty_source += 1
            report.empty_lines.append(lineno)
            continue
        if has_target and not t and require_target:
            report.empty_target += 1
            report.empty_lines.append(lineno)
            continue
        out.append(Pair(s, t, lineno))
    if not out:
        raise KilnError(f"{path}: no usable pair (every row has an empty {source_field!r} or {target_field!r})")
    return out, report


def dedup(pairs: list[Pair]) -> tuple[list[Pair], int]:
    seen, out = set(), []
    for p in pairs:
        if (p.source, p.target) not in seen:
            seen.add((p.source, p.target))
            out.append(p)
    return out, len(pairs) - len(out)


def split_pairs(pairs: list[Pair], n_val: int, n_test: int, seed: int) -> tuple[list[Pair], list[Pair], list[Pair], dict]:
    """Seeded split by unique source: all pairs with one source land in one split (no source is both trained
    on and evaluated). n_val/n_test count unique sources."""
    groups: dict[str, list[Pair]] = {}
    for p in pairs:
        groups.setdefault(p.source, []).append(p)
    keys = list(groups)
    random.Random(seed).shuffle(keys)
    if n_val + n_test >= len(keys):
        raise KilnError(f"cannot hold out {n_val} val + {n_test} test sources: the data has only {len(keys)} unique "
                        f"sources (lower data.val_size/test_size or the fractions)")
    val, test, train = keys[:n_val], keys[n_val:n_val + n_test], keys[n_val + n_test:]
    take = lambda ks: [p for k in ks for p in groups[k]]  # noqa: E731
    return take(train), take(val), take(test), {"unique_sources": len(keys)}


def fingerprint(pairs: list[Pair]) -> str:
    import hashlib

    h = hashlib.sha256()
    for p in pairs:
        h.update(f"{p.source}\x1f{p.target}\x1e".encode())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------- tokenizers


class PairCodec:
    """Text <-> ids for both sides. Shared: one tokenizer. Separate: target ids are offset by the source
    vocabulary (one embedding table, disjoint rows); decoding never emits a source id.
    The tokenizer's end-of-text token is decoder start, eos and padding."""

    def __init__(self, src_tok, tgt_tok=None):
        from kiln.data.tokenizer import eot_id, vocab_size

        self.src_tok, self.tgt_tok = src_tok, tgt_tok or src_tok
        self.separate = tgt_tok is not None
        self.offset = vocab_size(src_tok) if self.separate else 0
        eot = eot_id(self.tgt_tok)
        if eot is None:
            raise KilnError("the tokenizer has no end-of-text token (<|endoftext|> or [SEP]) to start and end "
                            "targets; use seq2seq.tokenizer shared or separate (BPE)")
        self.bos = self.eos = self.pad = self.offset + eot
        self.vocab_size = self.offset + vocab_size(self.tgt_tok)

    @staticmethod
    def _ids(tok, texts: list[str], where: str) -> list[list[int]]:
        try:
            return [e.ids for e in tok.encode_batch(list(texts), add_special_tokens=False)]
        except Exception as e:
            raise KilnError(f"{where}: the tokenizer cannot encode this text ({str(e).splitlines()[0]})") from None

    def encode_source(self, texts: list[str], where: str = "source") -> list[list[int]]:
        return self._ids(self.src_tok, texts, where)

    def encode_target(self, texts: list[str], where: str = "target") -> list[list[int]]:
        return [[i + self.offset for i in ids] for ids in self._ids(self.tgt_tok, texts, where)]

    def decode_target(self, ids: list[int]) -> str:
        return self.tgt_tok.decode([i - self.offset for i in ids if i >= self.offset and i != self.eos]).strip()

    def suppress_source(self):
        """A log-prob processor forbidding source ids (separate tokenizers), else None."""
        if not self.separate:
            return None
        n = self.offset

        def processor(logp: torch.Tensor) -> torch.Tensor:
            logp = logp.clone()
            logp[:, :n] = float("-inf")
            return logp

        return processor

    def save(self, run_dir: Path) -> dict:
        if self.separate:
            self.src_tok.save(str(run_dir / "tokenizer_source.json"))
            self.tgt_tok.save(str(run_dir / "tokenizer_target.json"))
        else:
            self.src_tok.save(str(run_dir / "tokenizer.json"))
        return {"tokenizer": "separate" if self.separate else "shared", "offset": self.offset, "bos_id": self.bos,
                "eos_id": self.eos, "pad_id": self.pad, "vocab_size": self.vocab_size}

    @classmethod
    def load(cls, run_dir: Path, meta: dict) -> "PairCodec":
        from kiln.data.tokenizer import load_tokenizer

        if meta.get("tokenizer") == "separate":
            return cls(load_tokenizer(run_dir / "tokenizer_source.json"), load_tokenizer(run_dir / "tokenizer_target.json"))
        return cls(load_tokenizer(run_dir / "tokenizer.json"))


def build_codec(cfg: Seq2SeqConfig, train: list[Pair], log) -> PairCodec:
    from kiln.data.tokenizer import load_tokenizer, train_tokenizer

    s = cfg.seq2seq
    if s.tokenizer == "shared":
        t0 = time.perf_counter()
        tok = train_tokenizer("bpe", (x for p in train for x in (p.source, p.target)), s.vocab_size)
        log(f"tokenizer: shared byte-level BPE, {tok.get_vocab_size()} tokens, trained on the train split "
            f"({time.perf_counter() - t0:.1f}s)")
        return PairCodec(tok)
    if s.tokenizer == "separate":
        src = train_tokenizer("bpe", (p.source for p in train), s.vocab_size)
        tgt = train_tokenizer("bpe", (p.target for p in train), s.vocab_size)
        log(f"tokenizer: separate byte-level BPEs, source {src.get_vocab_size()} + target {tgt.get_vocab_size()} tokens")
        return PairCodec(src, tgt)
    if s.tokenizer.endswith(".json") or Path(s.tokenizer).exists():
        return PairCodec(load_tokenizer(s.tokenizer))
    raise KilnError(f"seq2seq.tokenizer must be shared, separate or a tokenizer.json path; got {s.tokenizer!r}"
                    f"{did_you_mean(s.tokenizer, ['shared', 'separate'])}")


@dataclass
class Encoded:
    src: list[list[int]]
    tgt: list[list[int]]       # without eos
    truncated: int = 0

    def __len__(self) -> int:
        return len(self.src)


def encode_pairs(codec: PairCodec, pairs: list[Pair], max_src: int, max_tgt: int, where: str) -> Encoded:
    src = codec.encode_source([p.source for p in pairs], where)
    tgt = codec.encode_target([p.target for p in pairs], where)
    cut = 0
    for i in range(len(pairs)):
        if len(src[i]) > max_src or len(tgt[i]) > max_tgt - 1:
            cut += 1
            src[i], tgt[i] = src[i][:max_src], tgt[i][:max_tgt - 1]
        if not src[i]:
            src[i] = [codec.eos]  # a source of only unknown bytes cannot happen with byte BPE; be safe anyway
    return Encoded(src, tgt, cut)


# ----------------------------------------------------------------------------------------------- batches


def collate(src: list[list[int]], tgt: list[list[int]] | None, pad: int, bos: int, eos: int) -> dict:
    """Right-padded batch: input_ids, attention_mask (source), decoder_input_ids = bos + target,
    labels = target + eos (padding = -100)."""
    B, S = len(src), max(len(s) for s in src)
    ids = torch.full((B, S), pad, dtype=torch.long)
    mask = torch.zeros((B, S), dtype=torch.bool)
    for r, s in enumerate(src):
        ids[r, :len(s)] = torch.as_tensor(s)
        mask[r, :len(s)] = True
    batch = {"input_ids": ids, "attention_mask": mask}
    if tgt is not None:
        T = max(len(t) for t in tgt) + 1
        dec = torch.full((B, T), pad, dtype=torch.long)
        labels = torch.full((B, T), IGNORE, dtype=torch.long)
        for r, t in enumerate(tgt):
            dec[r, :len(t) + 1] = torch.as_tensor([bos] + t)
            labels[r, :len(t) + 1] = torch.as_tensor(t + [eos])
        batch.update(decoder_input_ids=dec, labels=labels)
    return batch


class PairBatches:
    """Micro-batch `i`: a pure function of i (resume, determinism). Each epoch is a seeded shuffle cut into
    chunks of 50 batches; a chunk is sorted by length (little padding) and its batches are shuffled."""

    def __init__(self, enc: Encoded, batch_size: int, seed: int, pad: int, bos: int, eos: int):
        self.enc, self.B, self.seed, self.ids = enc, batch_size, seed, (pad, bos, eos)
        self.lengths = np.array([len(s) + len(t) for s, t in zip(enc.src, enc.tgt)])
        self.per_epoch = math.ceil(len(enc) / batch_size)
        self._epoch, self._batches = -1, []

    def _plan(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        perm = rng.permutation(len(self.enc))
        chunk = 50 * self.B
        batches = []
        for c in range(0, len(perm), chunk):
            part = perm[c:c + chunk]
            part = part[np.argsort(self.lengths[part], kind="stable")]
            batches += [part[j:j + self.B] for j in range(0, len(part), self.B)]
        order = rng.permutation(len(batches))
        return [batches[k] for k in order]

    def batch(self, i: int) -> dict:
        epoch, j = divmod(i, self.per_epoch)
        if epoch != self._epoch:
            self._batches, self._epoch = self._plan(epoch), epoch
        idx = self._batches[j]
        return collate([self.enc.src[k] for k in idx], [self.enc.tgt[k] for k in idx], *self.ids)


def sorted_batches(src: list[list[int]], batch_size: int):
    """(positions, slice) in source-length order; positions map rows back."""
    order = np.argsort([len(s) for s in src], kind="stable")
    for s in range(0, len(order), batch_size):
        yield order[s:s + batch_size]


# ----------------------------------------------------------------------------------------------- objective


class Seq2SeqLM:
    """Teacher forcing: cross-entropy of labels given decoder_input_ids and the source (a SUM over the
    non-padding target tokens, with optional label smoothing)."""

    def __init__(self, label_smoothing: float = 0.0):
        self.label_smoothing = label_smoothing

    def targets(self, batch) -> int:
        return int((batch["labels"] != IGNORE).sum())

    def loss(self, model, batch) -> torch.Tensor:
        logits = model(batch["decoder_input_ids"], src=batch["input_ids"], src_mask=batch["attention_mask"])
        return F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=IGNORE,
                               reduction="sum", label_smoothing=self.label_smoothing)


# ----------------------------------------------------------------------------------------------- decoding


@dataclass
class DecodeOptions:
    num_beams: int = 4
    length_penalty: float = 1.0
    early_stopping: bool | str = True
    max_new_tokens: int = 128
    max_length_ratio: float = 0.0  # per batch: at most ratio * longest source + 10 new tokens; 0 = off
    batch_size: int = 32


def _early(value: str) -> bool | str:
    return {"true": True, "false": False, "never": "never"}[str(value).lower()]


def decode_options(cfg: Seq2SeqConfig, training: bool = False) -> DecodeOptions:
    s = cfg.seq2seq
    beams = (s.eval_num_beams or s.num_beams) if training else s.num_beams
    return DecodeOptions(num_beams=max(1, beams), length_penalty=s.length_penalty,
                         early_stopping=_early(s.early_stopping),
                         max_new_tokens=s.max_new_tokens or cfg.data.max_target_length,
                         max_length_ratio=2.0 if s.task == "translate" else 0.0)


@torch.no_grad()
def decode_ids(model, codec: PairCodec, src: list[list[int]], opt: DecodeOptions, device: str = "cpu") -> list[str]:
    """Decode sources (token ids) to target texts, in the given order."""
    model = unwrap(model)
    out: list[str] = [""] * len(src)
    with torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", enabled=False):
        for idx in sorted_batches(src, opt.batch_size):
            rows = [src[i] for i in idx]
            b = collate(rows, None, codec.pad, codec.bos, codec.eos)
            ids, mask = b["input_ids"].to(device), b["attention_mask"].to(device)
            n = opt.max_new_tokens
            if opt.max_length_ratio:
                n = min(n, int(opt.max_length_ratio * max(len(r) for r in rows)) + 10)
            kw = dict(max_new_tokens=n, bos_id=codec.bos, eos_id=codec.eos, pad_id=codec.pad,
                      logits_processor=codec.suppress_source())
            if opt.num_beams > 1:
                seqs = beam_search(model, ids, mask, num_beams=opt.num_beams, length_penalty=opt.length_penalty,
                                   early_stopping=opt.early_stopping, **kw).sequences
            else:
                seqs = greedy(model, ids, mask, **kw)
            for i, toks in zip(idx, strip(seqs.cpu(), codec.eos)):
                out[i] = codec.decode_target(toks)
    return out


@torch.no_grad()
def mean_loss(model, enc: Encoded, codec: PairCodec, batch_size: int, device: str) -> float:
    objective, total, count = Seq2SeqLM(0.0), 0.0, 0
    for idx in sorted_batches(enc.src, batch_size):
        b = collate([enc.src[i] for i in idx], [enc.tgt[i] for i in idx], codec.pad, codec.bos, codec.eos)
        b = {k: v.to(device) for k, v in b.items()}
        total += float(objective.loss(model, b))
        count += objective.targets(b)
    return total / max(count, 1)


# ----------------------------------------------------------------------------------------------- trainer


class Seq2SeqTrainer(BestByMetric, Trainer):
    """The shared Trainer, with `best` chosen by a validation metric and an optional wall-clock budget that
    stretches the lr schedule to fit."""

    def __init__(self, *a, metric: str = "val_loss", budget_s: float = 0.0, **kw):
        super().__init__(*a, **kw)
        self.metric, self.budget_s = metric, budget_s
        self._t0: float | None = None
        self._s0 = 0
        self.eval_seconds = 0.0

    def train_step(self):
        if self.budget_s:
            now = time.perf_counter()
            if self._t0 is None:
                self._t0, self._s0 = now, self.state.step
            done, spent = self.state.step - self._s0, now - self._t0
            if done >= 5:  # seconds per step so far (evaluations included) -> steps that fit the budget
                left = max(self.budget_s - spent, 0.0)
                self.cfg.max_steps = self.state.step + max(1, int(left / (spent / done)))
        out = super().train_step()
        if self.budget_s and time.perf_counter() - self._t0 >= self.budget_s:
            self.cfg.max_steps = self.state.step  # this step is the last: final eval + checkpoint
        return out

    def run_eval(self) -> dict:
        t0 = time.perf_counter()
        m = super().run_eval()
        self.eval_seconds += time.perf_counter() - t0
        self.update_best(m)
        return m


def metric_curve(history: list[tuple[int, dict]], keys: tuple[str, ...], path: Path, title: str = "") -> Path:
    """Validation text metrics (BLEU/chrF or ROUGE) against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for k in keys:
        xs = [s for s, m in history if f"val_{k}" in m]
        ys = [m[f"val_{k}"] for s, m in history if f"val_{k}" in m]
        if xs:
            ax.plot(xs, ys, marker="o", lw=1.6, label=k)
    ax.set_xlabel("step")
    ax.set_ylabel("score (0-100)")
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    from kiln.report.plots import save_figure

    return save_figure(fig, path)


# ----------------------------------------------------------------------------------------------- pipeline


def _new_run_dir(cfg: Seq2SeqConfig) -> Path:
    return Path(cfg.out) if cfg.out else Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _held_out(n_sources: int, size: int, fraction: float, name: str) -> int:
    if size < 0:
        raise KilnError(f"data.{name}_size must be >= 0, got {size}")
    if not 0.0 <= fraction < 1.0:
        raise KilnError(f"data.{name}_fraction must be in [0, 1), got {fraction}")
    return size if size else round(n_sources * fraction)


def load_splits(cfg: Seq2SeqConfig, log) -> tuple[dict[str, list[Pair]], dict]:
    d, s = cfg.data, cfg.seq2seq
    if not d.train:
        raise KilnError("data.train is empty: name the pair file (--data.train FILE)")
    report: dict = {"files": {}, "skipped": {}}

    def read(path: str, name: str) -> list[Pair]:
        pairs, r = read_pairs(path, s.source_field, s.target_field)
        for line in r.lines():
            log(line)
        report["files"][name] = path
        report["skipped"][path] = {"rows": r.rows, "empty_source": r.empty_source, "empty_target": r.empty_target}
        return pairs

    train = read(d.train, "train")
    if d.limit:
        train = train[:d.limit]
    given = {name: read(getattr(d, name), name) for name in ("val", "test") if getattr(d, name)}
    if d.dedup:
        train, dropped = dedup(train)
        report["duplicates_dropped"] = dropped
        if dropped:
            log(f"{d.train}: dropped {dropped} exact duplicate pair(s)")
    n_sources = len({p.source for p in train})
    n_val = 0 if "val" in given else _held_out(n_sources, d.val_size, d.val_fraction, "val")
    n_test = 0 if "test" in given else _held_out(n_sources, d.test_size, d.test_fraction, "test")
    tr, va, te, info = split_pairs(train, n_val, n_test, cfg.seed)
    report.update(info)
    splits = {"train": tr, "val": given.get("val", va), "test": given.get("test", te)}
    held = {p.source for name in ("val", "test") if name in given for p in given[name]}
    if held:  # given val/test files: keep their sources out of train
        before = len(splits["train"])
        splits["train"] = [p for p in splits["train"] if p.source not in held]
        report["train_pairs_dropped_for_leakage"] = before - len(splits["train"])
        if before - len(splits["train"]):
            log(f"dropped {before - len(splits['train'])} train pair(s) whose source is in the val/test file")
    if not splits["train"]:
        raise KilnError(f"{d.train}: no training pairs left after the split")
    report["splits"] = {n: {"pairs": len(p), "unique_sources": len({x.source for x in p}),
                            "fingerprint": fingerprint(p)} for n, p in splits.items()}
    return splits, report


def _check_config(cfg: Seq2SeqConfig) -> None:
    m, d, tc = cfg.model, cfg.data, cfg.train
    if m.arch != "encoder-decoder":
        raise KilnError(f"model.arch must be encoder-decoder for seq2seq, got {m.arch!r}")
    if d.max_source_length < 1 or d.max_target_length < 2:
        raise KilnError("data.max_source_length must be >= 1 and data.max_target_length >= 2")
    need = max(d.max_source_length, d.max_target_length)
    if m.context_length < need:
        raise KilnError(f"model.context_length {m.context_length} is shorter than data.max_source_length / "
                        f"max_target_length ({need}); raise it or lower those")
    if tc.batch_size < 1 or tc.grad_accum < 1:
        raise KilnError("train.batch_size and train.grad_accum must be >= 1")
    if not 0.0 <= cfg.seq2seq.label_smoothing < 1.0:
        raise KilnError(f"seq2seq.label_smoothing must be in [0, 1), got {cfg.seq2seq.label_smoothing}")
    if cfg.seq2seq.num_beams < 1:
        raise KilnError(f"seq2seq.num_beams must be >= 1, got {cfg.seq2seq.num_beams}")
    if cfg.seq2seq.time_budget < 0:
        raise KilnError("seq2seq.time_budget must be >= 0 (minutes)")


def _metric_name(cfg: Seq2SeqConfig) -> str:
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


def run_finetune_seq2seq(cfg: Seq2SeqConfig, quiet: bool = False) -> Path:
    cfg.model.resolve()
    _check_config(cfg)
    metric = _metric_name(cfg)
    run_dir = _new_run_dir(cfg)
    if (run_dir / "checkpoints").exists():
        raise KilnError(f"run folder {run_dir} already holds checkpoints; pick another --out")
    log0: list[str] = []
    splits, report = load_splits(cfg, log0.append)  # every input error before anything is created

    run_dir.mkdir(parents=True, exist_ok=True)
    log = RunLog(run_dir, quiet)
    log(f"kiln finetune seq2seq ({cfg.seq2seq.task}) -> {run_dir}")
    for line in log0:
        log(line)
    torch.manual_seed(cfg.seed)
    tc = cfg.train
    if tc.threads:
        torch.set_num_threads(tc.threads)
    device = resolve_device(tc.device)
    codec = build_codec(cfg, splits["train"], log)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = codec.vocab_size
    elif cfg.model.vocab_size < codec.vocab_size:
        raise KilnError(f"model.vocab_size {cfg.model.vocab_size} is smaller than the tokenizer's {codec.vocab_size}")
    d = cfg.data
    enc = {n: encode_pairs(codec, p, d.max_source_length, d.max_target_length, n) for n, p in splits.items()}
    report["truncated"] = {n: e.truncated for n, e in enc.items()}
    for n, e in enc.items():
        if e.truncated:
            log(f"truncation: {e.truncated} of {len(e)} {n} pair(s) exceed data.max_source_length "
                f"{d.max_source_length} / max_target_length {d.max_target_length} tokens and were cut")
    log("splits: " + ", ".join(f"{n} {len(p)} pairs ({report['splits'][n]['unique_sources']} unique sources)"
                               for n, p in splits.items()) + f"; seed {cfg.seed}")

    tcfg = dataclasses.replace(tc)
    if tcfg.save_every <= 0:
        tcfg.save_every = tcfg.max_steps
    precision, reason = choose_precision(tc.precision, device)
    log(reason)
    model = Transformer(cfg.model).to(device)
    log(f"model: encoder-decoder {cfg.model.n_layer}+{cfg.model.n_decoder_layer} layers, d_model "
        f"{cfg.model.d_model}, {model.num_parameters() / 1e6:.2f}M parameters, vocab {cfg.model.vocab_size}; "
        f"batch {tc.batch_size} x {tc.grad_accum}, lr {tc.lr:g}, label smoothing {cfg.seq2seq.label_smoothing}"
        + (f"; time budget {cfg.seq2seq.time_budget:g} min" if cfg.seq2seq.time_budget else f"; {tcfg.max_steps} steps"))

    meta = codec.save(run_dir)
    meta.update(task=cfg.seq2seq.task, source_field=cfg.seq2seq.source_field, target_field=cfg.seq2seq.target_field,
                max_source_length=d.max_source_length, max_target_length=d.max_target_length)
    (run_dir / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    (run_dir / CONFIG_FILE).write_text(dump_yaml(cfg))
    (run_dir / "data.json").write_text(json.dumps(report, indent=2) + "\n")

    # the fixed validation subset decoded at every evaluation, and the val-loss subset
    s = cfg.seq2seq
    val_pairs, val_enc = splits["val"], enc["val"]
    n_dec = min(s.eval_examples, len(val_pairs))
    dec_src, dec_refs = val_enc.src[:n_dec], [p.target for p in val_pairs[:n_dec]]
    n_loss = min(len(val_enc), max(tc.eval_batches * tc.batch_size, n_dec))
    loss_enc = Encoded(val_enc.src[:n_loss], val_enc.tgt[:n_loss])
    train_opt = decode_options(cfg, training=True)
    keys = TASK_METRICS[s.task]
    history: list[tuple[int, dict]] = []
    samples_file = run_dir / "samples.txt"

    def evaluate(m) -> dict:
        out = {"val_loss": mean_loss(m, loss_enc, codec, max(tc.batch_size, 16), device)}
        out["val_ppl"] = math.exp(min(out["val_loss"], 50.0))
        if n_dec:
            hyps = decode_ids(m, codec, dec_src, train_opt, device)
            out.update({f"val_{k}": v for k, v in text_metrics(s.task, hyps, dec_refs).items()})
            lines = [f"step {trainer.state.step} samples ({'greedy' if train_opt.num_beams == 1 else f'beam {train_opt.num_beams}'}):"]
            for i in range(min(s.samples, n_dec)):
                lines += [f"  src: {val_pairs[i].source}", f"  ref: {dec_refs[i]}", f"  out: {hyps[i]}"]
            for line in lines:
                log(line)
            with open(samples_file, "a", encoding="utf-8") as f:
                f.write("\n".join(lines) + "\n")
        return out

    def on_eval(step: int, m: dict) -> None:
        history.append((step, dict(m)))
        if n_dec:
            metric_curve(history, keys, run_dir / "plots" / ("bleu.png" if s.task == "translate" else "rouge.png"),
                         title=f"{run_dir.name}: validation {'/'.join(keys)} ({n_dec} examples)")

    batches = PairBatches(enc["train"], tc.batch_size, cfg.seed, codec.pad, codec.bos, codec.eos)
    if not len(val_enc):
        log("warning: the validation split is empty: no evaluation during training; the last checkpoint is used")
    trainer = Seq2SeqTrainer(model, Seq2SeqLM(s.label_smoothing), tcfg, run_dir, batches.batch,
                             evaluate=evaluate if len(val_enc) else None, device=device, precision=precision,
                             log=log, on_eval=on_eval, metric=metric, budget_s=60.0 * s.time_budget)
    result = trainer.fit()
    summary = {"steps": result["step"], "target_tokens": result["tokens"], "seconds": result["elapsed"],
               "eval_seconds": trainer.eval_seconds, "best_step": trainer.best_step,
               f"best_{metric}": trainer.best_metric, "precision": precision,
               "history": [{"step": st, **m} for st, m in history]}
    log(f"trained {result['step']} steps, {result['tokens']:,} target tokens in {result['elapsed']:.1f}s "
        f"({trainer.eval_seconds:.1f}s of it evaluating); best {metric} "
        f"{trainer.best_metric if trainer.best_metric is not None else float('nan'):.4f} at step {trainer.best_step}")

    # the test split, decoded by the best checkpoint
    from kiln.train.checkpoint import find_checkpoint, load_weights

    which = "best" if (run_dir / "checkpoints" / "best").is_file() else "latest"
    ckpt = find_checkpoint(run_dir, which)
    plain = unwrap(model)
    load_weights(plain, ckpt / "model.safetensors")
    results = {"train": summary, "checkpoint": str(ckpt)}
    test_pairs = splits["test"][:s.test_examples] if s.test_examples else splits["test"]
    out_dir = run_dir / "eval"
    out_dir.mkdir(exist_ok=True)
    if test_pairs:
        opt = decode_options(cfg)
        t0 = time.perf_counter()
        hyps = decode_ids(plain, codec, enc["test"].src[:len(test_pairs)], opt, device)
        scores = text_metrics(s.task, hyps, [p.target for p in test_pairs])
        results["test"] = {"examples": len(test_pairs), "num_beams": opt.num_beams, **scores,
                           "decode_seconds": time.perf_counter() - t0}
        write_outputs(out_dir / "test_outputs.tsv", test_pairs, hyps)
        log(f"test ({len(test_pairs)} pairs, {ckpt.name}, {'greedy' if opt.num_beams == 1 else f'beam {opt.num_beams}'}): "
            + ", ".join(f"{k} {v:.2f}" for k, v in scores.items()))
    (out_dir / "test.json").write_text(json.dumps(results, indent=2) + "\n")
    log(f"done: run folder {run_dir}")
    return run_dir


def write_outputs(path: Path, pairs: list[Pair], hyps: list[str]) -> None:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["line", "source", "reference", "output"])
        for p, h in zip(pairs, hyps):
            w.writerow([p.line, p.source, p.target, h])


# ----------------------------------------------------------------------------------------------- using a run


def load_seq2seq(run_dir: str | Path, which: str = "best", device: str = "cpu"):
    """(model, codec, Seq2SeqConfig, meta) of a `kiln finetune seq2seq` run folder."""
    from kiln.api import _rebuild_buffers
    from kiln.train.checkpoint import find_checkpoint, load_weights

    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise KilnError(f"{run_dir} is not a seq2seq run folder (no {CONFIG_FILE}); train one with "
                        "`kiln finetune seq2seq`")
    cfg = load_config(run_dir / CONFIG_FILE, cls=Seq2SeqConfig)
    try:
        meta = json.loads((run_dir / META_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise KilnError(f"{run_dir / META_FILE}: cannot read ({type(e).__name__})") from None
    root = run_dir / "checkpoints"
    if which == "best" and not (root / "best").is_file():
        which = "latest"
    ckpt = find_checkpoint(run_dir, which)
    with torch.device("meta"):
        model = Transformer(cfg.model)
    model = model.to_empty(device=device)
    _rebuild_buffers(model, cfg)
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
        got, report = read_pairs(file, model_meta["source_field"], model_meta["target_field"], require_target=False)
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
    pairs, report = read_pairs(file, meta["source_field"], meta["target_field"], require_target=True)
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


def seq2seq_from_cli(config: str | None, overrides: list[str]) -> Path:
    cfg = load_config(config, overrides, cls=Seq2SeqConfig)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return run_finetune_seq2seq(cfg)

