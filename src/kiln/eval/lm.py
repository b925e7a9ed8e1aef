"""`kiln eval RUN FILE` for a pretraining run: how well a language model predicts a text it did not train on.

Causal LM: every token after the first is scored exactly once, left to right, in windows of the model's context
length that advance by `stride` tokens (the sliding-window recipe of Hugging Face's perplexity guide): with
stride = context the windows do not overlap and the first tokens of each window see little context; a smaller
stride gives every scored token at least context - stride tokens of history, at context / stride times the
compute; it also reports bits per byte (the summed loss over the text's UTF-8 bytes: a number that compares
models with different tokenizers). Masked LM: the run's masking rate on fixed masks, seeded per window, over
windows of the context length; masked-token loss, perplexity and accuracy.

The text goes through the run's tokenizer the way `kiln data prepare` sends it: the same cleaning, the same
pieces, an end-of-text token after each document of a folder / .jsonl / .csv (a plain text file is one document).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from kiln.errors import KilnError

from kiln.constants import IGNORE_INDEX as IGNORE  # noqa: E402


def read_tokens(file: str | Path, tokenizer, text_field: str = "text") -> tuple[np.ndarray, int, int]:
    """(token ids, documents, UTF-8 bytes of the cleaned text) of a file or folder, tokenized as for training."""
    from kiln.data.prepare import _pieces
    from kiln.data.text import Corpus
    from kiln.data.tokenizer import encoder, eot_id

    corpus = Corpus(str(file), text_field)
    encode = encoder(tokenizer, str(corpus.path))
    eot = eot_id(tokenizer)
    tail = [np.array([eot], dtype=np.int64)] if eot is not None and not corpus.single_file else []
    parts: list[np.ndarray] = []
    docs = nbytes = 0
    for doc in corpus.documents():
        if not doc.strip():
            continue
        docs += 1
        nbytes += len(doc.encode("utf-8"))
        parts.extend(encode(_pieces(doc)) + tail)
    ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    if len(ids) < 2:
        raise KilnError(f"{corpus.path}: {len(ids)} token(s) after cleaning; scoring a text needs at least 2")
    return ids, docs, nbytes


def causal_windows(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first) per window over n tokens: inputs ids[begin:end-1], targets ids[begin+1:end], of which
    the positions >= first are scored. Every position 1..n-1 is scored exactly once."""
    if not 1 <= stride <= context:
        raise KilnError(f"--stride must be between 1 and the context length {context}, got {stride}")
    out, scored = [], 1
    for begin in range(0, n - 1, stride):
        end = min(begin + context + 1, n)
        if end > scored:
            out.append((begin, end, scored))
            scored = end
        if end == n:
            break
    return out


@torch.no_grad()
def causal_nll(model, ids: np.ndarray, context: int, stride: int, batch_size: int = 8,
               device: str = "cpu") -> tuple[float, int]:
    """(summed next-token cross-entropy in nats, tokens scored) of a causal LM over a token sequence."""
    windows = causal_windows(len(ids), context, stride)
    t = torch.from_numpy(ids)
    total, count = 0.0, 0
    by_len: dict[int, list[tuple[int, int, int]]] = {}
    for w in windows:
        by_len.setdefault(w[1] - w[0], []).append(w)
    for length, group in by_len.items():
        for i in range(0, len(group), batch_size):
            chunk = group[i:i + batch_size]
            x = torch.stack([t[b:e - 1] for b, e, _ in chunk]).to(device)
            y = torch.stack([t[b + 1:e] for b, e, _ in chunk])
            for row, (b, _, first) in enumerate(chunk):
                y[row, :first - b - 1] = IGNORE  # target j is token b + 1 + j
            y = y.to(device)
            total += float(model(x, labels=y))
            count += int((y != IGNORE).sum())
    return total, count


def evaluate_text(run_dir: str | Path, file: str | Path, out: str | Path | None = None, which: str = "best",
                  stride: int = 0, batch_size: int = 8, device: str = "auto", log=print) -> dict:
    """Loss, perplexity and bits per byte of a pretraining run on a text file (or folder, .jsonl, .csv);
    printed and written as JSON (default RUN_DIR/eval/<FILE stem>.json)."""
    from kiln.run.load import load
    from kiln.run.device import resolve_device

    run_dir, file = Path(run_dir), Path(file)
    if which == "best" and not (run_dir / "checkpoints" / "best").is_file():
        which = "latest"  # a run without validation has no best checkpoint
    if batch_size < 1:
        raise KilnError(f"--batch-size must be >= 1, got {batch_size}")
    dev = resolve_device(device, "--device")
    model, tokenizer, cfg = load(run_dir, which, device=dev)
    if cfg.objective == "electra":
        raise KilnError(f"{run_dir} is an ELECTRA run: its discriminator scores no text; fine-tune it "
                        "(kiln finetune classify --init RUN) or evaluate a masked-LM run")
    if cfg.model.arch != ("encoder" if cfg.objective == "mlm" else "decoder"):
        raise KilnError(f"{run_dir}: kiln eval scores a text with a decoder (causal LM) or an encoder (masked LM); "
                        f"this run is an {cfg.model.arch} with objective {cfg.objective} (fine-tune an "
                        "encoder-decoder with `kiln finetune seq2seq`, then `kiln eval` that run on a pair file)")
    if tokenizer is None:
        raise KilnError(f"{run_dir} has no tokenizer.json: kiln eval cannot turn {file} into tokens")
    ids, docs, nbytes = read_tokens(file, tokenizer, cfg.data.text_field)
    if int(ids.max()) >= cfg.model.vocab_size:
        raise KilnError(f"{file}: token id {int(ids.max())} is outside the model's vocabulary "
                        f"({cfg.model.vocab_size}); the run's tokenizer.json does not match its model")
    T = cfg.model.context_length
    result: dict = {"file": str(file), "run": str(run_dir), "objective": cfg.objective, "documents": docs,
                    "bytes": nbytes, "tokens": int(len(ids)), "context": T}
    if cfg.objective == "mlm":
        result.update(_masked(model, cfg, run_dir, tokenizer, ids, T, batch_size, dev))
        what = "masked tokens"
    else:
        stride = stride or T
        nll, n = causal_nll(model, ids, T, stride, batch_size, dev)
        result.update(stride=stride, scored=n, loss=nll / n)
        what = "tokens"
    result["perplexity"] = math.exp(min(result["loss"], 50.0))
    if cfg.objective != "mlm":  # the whole text's cost in bits; masked LM scores ~15% of it
        result["bits_per_byte"] = result["loss"] * result["scored"] / math.log(2) / max(nbytes, 1)
    out = Path(out) if out else run_dir / "eval" / f"{file.stem}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    log(f"{file}: {docs} document(s), {nbytes:,} bytes, {len(ids):,} tokens; {result['scored']:,} {what} scored"
        + (f" (context {T}, stride {result['stride']})" if "stride" in result else ""))
    rows = [("loss (nats/token)", result["loss"]), ("perplexity", result["perplexity"])]
    rows += [("bits per byte", result["bits_per_byte"])] if "bits_per_byte" in result else \
        [("masked-token accuracy", result["accuracy"])]
    log("\n".join(f"  {k:<22} {v:10.4f}" for k, v in rows))
    log(f"wrote {out}")
    return result


def _masked(model, cfg, run_dir: Path, tokenizer, ids: np.ndarray, T: int, batch_size: int, device: str) -> dict:
    from kiln.data.tokenizer import vocab_size
    from kiln.train.mlm import from_tokenizer

    # as in training: the tokenizer's [MASK], or one id appended after its vocabulary
    mlm = from_tokenizer(run_dir / "tokenizer.json", vocab_size(tokenizer), cfg.mlm.mask_prob, cfg.seed)
    t = torch.from_numpy(ids)
    # windows of T inputs (+1: the masker's window shape), then at most one shorter window at the end
    full = list(range(0, len(ids) - T, T))
    last = [len(full) * T] if len(full) * T < len(ids) - 1 else []

    def windows():
        for i in range(0, len(full), batch_size):
            yield torch.stack([t[s:s + T + 1] for s in full[i:i + batch_size]]).to(device)
        for s in last:
            yield t[s:].unsqueeze(0).to(device)

    total, correct, count = mlm.sums(model, windows, cfg.mlm.whole_word, per_row=True)
    if count == 0:
        raise KilnError(f"no token was masked at mlm.mask_prob {cfg.mlm.mask_prob}: the text is too short to score")
    return {"loss": total / count, "accuracy": correct / count, "scored": count, "mask_prob": cfg.mlm.mask_prob}
