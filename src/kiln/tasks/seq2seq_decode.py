"""Seq2seq ids and decoding: encoded pairs, padded teacher-forcing batches, greedy/beam decoding of sources
to target texts, the val loss, and the outputs file. Used by the seq2seq task and `kiln translate`/`eval`."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import torch

from kiln.config import Seq2SeqConfig
from kiln.constants import IGNORE_INDEX
from kiln.data.batches import EpochSampler, by_length
from kiln.data.pairs import Pair, PairCodec
from kiln.model.beam import beam_search, greedy, strip
from kiln.run.checkpoint import unwrap
from kiln.train.objectives import Seq2SeqLM


@dataclass
class EncodedPairs:
    src: list[list[int]]
    tgt: list[list[int]]       # without eos
    truncated: int = 0

    def __len__(self) -> int:
        return len(self.src)


def encode_pairs(codec: PairCodec, pairs: list[Pair], max_src: int, max_tgt: int, where: str) -> EncodedPairs:
    src = codec.encode_source([p.source for p in pairs], where)
    tgt = codec.encode_target([p.target for p in pairs], where)
    cut = 0
    for i in range(len(pairs)):
        if len(src[i]) > max_src or len(tgt[i]) > max_tgt - 1:
            cut += 1
            src[i], tgt[i] = src[i][:max_src], tgt[i][:max_tgt - 1]
        if not src[i]:
            src[i] = [codec.eos]  # a source of only unknown bytes cannot happen with byte BPE; be safe anyway
    return EncodedPairs(src, tgt, cut)


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
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        for r, t in enumerate(tgt):
            dec[r, :len(t) + 1] = torch.as_tensor([bos] + t)
            labels[r, :len(t) + 1] = torch.as_tensor(t + [eos])
        batch.update(decoder_input_ids=dec, labels=labels)
    return batch


class PairBatches:
    """Micro-batch `i`: a pure function of i (resume, determinism). Each epoch is a seeded shuffle cut into
    chunks of 50 batches; a chunk is sorted by length (little padding) and its batches are shuffled."""

    def __init__(self, enc: EncodedPairs, batch_size: int, seed: int, pad: int, bos: int, eos: int):
        self.enc, self.ids = enc, (pad, bos, eos)
        self.sampler = EpochSampler([len(s) + len(t) for s, t in zip(enc.src, enc.tgt)], batch_size, seed, bucket=50)

    def batch(self, i: int) -> dict:
        idx = self.sampler.indices(i)
        return collate([self.enc.src[k] for k in idx], [self.enc.tgt[k] for k in idx], *self.ids)


def sorted_batches(src: list[list[int]], batch_size: int):
    """(positions, slice) in source-length order; positions map rows back."""
    return by_length([len(s) for s in src], batch_size)


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
def mean_loss(model, enc: EncodedPairs, codec: PairCodec, batch_size: int, device: str) -> float:
    objective, total, count = Seq2SeqLM(0.0), 0.0, 0
    for idx in sorted_batches(enc.src, batch_size):
        b = collate([enc.src[i] for i in idx], [enc.tgt[i] for i in idx], codec.pad, codec.bos, codec.eos)
        b = {k: v.to(device) for k, v in b.items()}
        total += float(objective.loss(model, b))
        count += objective.targets(b)
    return total / max(count, 1)


def write_outputs(path: Path, pairs: list[Pair], hyps: list[str]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["line", "source", "reference", "output"])
        for p, h in zip(pairs, hyps):
            w.writerow([p.line, p.source, p.target, h])
