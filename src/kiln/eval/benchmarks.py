"""Benchmarks for a decoder: multiple choice by the log-likelihood of each choice, and generative exact match.

Multiple choice is scored as lm-evaluation-harness scores `output_type: multiple_choice` with its `hf` model
(lm_eval/api/task.py process_results, lm_eval/api/model.py _encode_pair, lm_eval/models/huggingface.py
_loglikelihood_tokens), so `acc` and `acc_norm` here are the numbers it reports:
- each choice is the continuation " " + choice of the item's prompt (no space in chat mode, as lm_eval with
  apply_chat_template); whitespace ending the prompt moves to the continuation;
- the continuation's tokens are those of tokenize(prompt + continuation) after the first len(tokenize(prompt))
  (the tokenizer's own special tokens added, as `tokenizer.encode` adds them; none when the text already starts
  with the prefix token); an empty prompt is the prefix token (bos, else eos);
- prompt + continuation is cut from the left to context + 1 tokens, the last dropped, and the continuation's
  log-probabilities (log-softmax over the whole vocabulary) summed;
- acc: the argmax of the sums is the gold index; acc_norm: the argmax of sum / len(choice in characters).
Ties go to the first choice (numpy's argmax).

Generative items: greedy decoding of the prompt until a newline (chat mode: the template's end of turn) or
max_new_tokens; exact match of the stripped reply against any accepted answer.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from kiln.errors import KilnError

TARGET_DELIMITER = " "


class Encoder:
    """tok_encode as lm_eval's hf model calls it, over a `tokenizers.Tokenizer`."""

    def __init__(self, tokenizer, specials: dict | None = None):
        from kiln.data.tokenizer import eot_id, tokenizer_kind

        self.tok = tokenizer
        self.char = tokenizer_kind(tokenizer) == "char"
        specials = specials or {}
        ids = {k: tokenizer.token_to_id(specials[k]) for k in ("bos_token", "eos_token") if specials.get(k)}
        self.eos_id = ids.get("eos_token") if ids.get("eos_token") is not None else eot_id(tokenizer)
        self.prefix_id = ids.get("bos_token") if ids.get("bos_token") is not None else self.eos_id
        self.prefix_text = tokenizer.id_to_token(self.prefix_id) if self.prefix_id is not None else None

    def __call__(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        from kiln.data.tokenizer import encode_text

        if self.char:
            return encode_text(self.tok, text, "benchmark")
        if add_special_tokens is None:
            add_special_tokens = not (self.prefix_text and text.startswith(self.prefix_text))
        try:
            return self.tok.encode(text, add_special_tokens=add_special_tokens).ids
        except Exception as e:  # e.g. a WordLevel vocabulary without an unknown token
            raise KilnError(f"benchmark: the tokenizer cannot encode {text[:40]!r} ({str(e).splitlines()[0]})") from None

    def pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) as lm_eval's _encode_pair splits them."""
        if context == "":
            if self.prefix_id is None:
                raise KilnError("benchmark: an empty prompt needs a bos or eos token, and the tokenizer has none")
            return [self.prefix_id], self(continuation, add_special_tokens=False)
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole, ctx = self(context + continuation), self(context)
        return ctx, whole[len(ctx):]


def contexts(items, template=None) -> list[str]:
    """Each item's prompt: lm_eval's text, or the bare question as the user turn of `template` (a ChatTemplate)."""
    if template is None:
        return [it.prompt for it in items]
    return [template.render([{"role": "user", "content": it.text}], add_generation_prompt=True) for it in items]


@torch.no_grad()
def loglikelihoods(model, requests: list[tuple[list[int], list[int]]], context_length: int, batch_size: int = 8,
                   device: str = "cpu") -> list[tuple[float, bool]]:
    """(summed log-probability of the continuation, whether greedy decoding gives it) per (context, continuation)
    pair of token ids: the input is (context + continuation)[-(context_length + 1):][:-1], right-padded."""
    order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][0]) + len(requests[i][1])))
    out: list[tuple[float, bool]] = [(0.0, True)] * len(requests)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        inputs = [(requests[i][0] + requests[i][1])[-(context_length + 1):][:-1] for i in chunk]
        width = max(len(x) for x in inputs)
        x = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, ids in enumerate(inputs):
            x[row, :len(ids)] = torch.tensor(ids)
        spans = [(len(ids) - len(requests[i][1]), len(ids)) for i, ids in zip(chunk, inputs)]
        rows = torch.tensor([r for r, (a, b) in enumerate(spans) for _ in range(a, b)], dtype=torch.long)
        cols = torch.tensor([c for a, b in spans for c in range(a, b)], dtype=torch.long)
        logp = torch.log_softmax(_logits_at(model, x.to(device), rows.to(device), cols.to(device)).float(), dim=-1)
        at = 0
        for i, (a, b) in zip(chunk, spans):
            lp, at = logp[at:at + b - a], at + b - a
            target = torch.tensor(requests[i][1], device=lp.device, dtype=torch.long)
            out[i] = (float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all()))
    return out


def _logits_at(model, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Logits [N, vocab] at positions (rows, cols) of the batch x: a kiln Transformer runs its head on those
    positions only (with a large vocabulary the head and its softmax are a large share of a small model's work)."""
    head = getattr(model, "lm_head", None)
    if hasattr(model, "hidden") and isinstance(head, torch.nn.Module):
        h = model.hidden(x)[rows, cols]
        if getattr(model, "head_transform", None) is not None:
            h = model.head_transform(h)
        return head(h)
    return model(x)[rows, cols]


def choice_results(items, lls: list[list[float]]) -> list[dict]:
    """Per item: chosen index by log-likelihood (acc) and by log-likelihood per character (acc_norm)."""
    rows = []
    for it, ll in zip(items, lls):
        ll_arr = np.array(ll)
        pred = int(np.argmax(ll_arr))
        with np.errstate(divide="ignore", invalid="ignore"):  # an empty choice: lm_eval divides by 0 as well
            pred_norm = int(np.argmax(ll_arr / np.array([float(len(c)) for c in it.choices])))
        rows.append({"kind": it.kind, "gold": it.gold, "chosen": pred, "chosen_norm": pred_norm,
                     "acc": float(pred == it.gold), "acc_norm": float(pred_norm == it.gold), "loglikelihoods": ll})
    return rows


def _generate(model, enc: Encoder, context: str, stops: list[str], stop_ids: list[int], max_new_tokens: int,
              context_length: int, device: str) -> str:
    ids = enc(context)[-max(context_length - max_new_tokens, 1):]

    def hit(new_ids: torch.Tensor) -> torch.Tensor:
        text = enc.tok.decode(new_ids[0].tolist())
        return torch.tensor([any(s in text for s in stops) or int(new_ids[0, -1]) in stop_ids], device=new_ids.device)

    out = model.generate(torch.tensor([ids], device=device), max_new_tokens, greedy=True, stop=hit)
    new = [t for t in out[0, len(ids):].tolist() if t not in stop_ids]
    text = enc.tok.decode(new)
    return text[:min((text.index(s) for s in stops if s in text), default=len(text))]


def score_benchmark(model, tokenizer, items, *, context_length: int, template=None, specials: dict | None = None,
                    batch_size: int = 8, device: str = "cpu", max_new_tokens: int = 32) -> dict:
    """Score `items` (kiln.data.benchmarks.Item) with a decoder and its `tokenizers.Tokenizer`. Returns
    {"acc", "acc_norm"} (multiple choice) or {"exact_match"} (generative), "n", "per_kind" (the same per item
    kind) and "items" (per item: gold, chosen, log-likelihoods or the reply). `template`: a ChatTemplate to
    wrap each question as a user turn; `specials`: tokenizer_config.json's special tokens (bos/eos)."""
    if not items:
        raise KilnError("benchmark: no items to score")
    was_training = model.training
    model.eval()
    try:
        enc = Encoder(tokenizer, specials if specials is not None else getattr(template, "specials", None))
        ctxs = contexts(items, template)
        delim = "" if template is not None else TARGET_DELIMITER
        if items[0].choices:
            reqs = [(i, enc.pair(c, delim + ch)) for i, (it, c) in enumerate(zip(items, ctxs)) for ch in it.choices]
            for i, (ctx, cont) in reqs:
                if len(cont) > context_length:
                    raise KilnError(f"{items[i].where or f'benchmark item {i}'}: a choice of {len(cont)} tokens is "
                                    f"longer than the model's context ({context_length})")
            res = loglikelihoods(model, [r for _, r in reqs], context_length, batch_size, device)
            lls: list[list[float]] = [[] for _ in items]
            for (i, _), (ll, _) in zip(reqs, res):
                lls[i].append(ll)
            rows, keys = choice_results(items, lls), ("acc", "acc_norm")
            cut = {i for i, (ctx, cont) in reqs if len(ctx) + len(cont) > context_length + 1}
            for i in cut:  # lm_eval cuts such inputs from the left too; the count says how many items it touched
                rows[i]["truncated"] = True
        else:
            stops = template.end_of_turn() if template is not None else ["\n"]
            stop_ids = [i for i in (tokenizer.token_to_id(s) for s in stops) if i is not None]
            stop_ids += [enc.eos_id] if enc.eos_id is not None and enc.eos_id not in stop_ids else []
            rows = []
            for it, c in zip(items, ctxs):
                reply = _generate(model, enc, c, stops, stop_ids, max_new_tokens, context_length, device).strip()
                rows.append({"kind": it.kind, "answers": it.answers, "reply": reply,
                             "exact_match": float(reply in it.answers)})
            keys = ("exact_match",)
    finally:
        model.train(was_training)
    return {**summarise(rows, keys), "items": rows}


def summarise(rows: list[dict], keys) -> dict:
    """Mean of each key over the items, and per item kind when the items have kinds."""
    out: dict = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    out["n"] = len(rows)
    out["truncated"] = sum(bool(r.get("truncated")) for r in rows)
    kinds = defaultdict(list)
    for r in rows:
        if r["kind"]:
            kinds[r["kind"]].append(r)
    out["per_kind"] = {k: {**{m: float(np.mean([r[m] for r in rs])) for m in keys}, "n": len(rs)}
                       for k, rs in sorted(kinds.items())}
    return out


def evaluate_benchmark(run_dir, file, out=None, which: str = "best", *, chat: bool = False, layout: str = "auto",
                       batch_size: int = 8, device: str = "auto", max_new_tokens: int = 32, loaded=None,
                       log=print) -> dict:
    """`kiln eval RUN FILE.jsonl` on a benchmark file: prints and writes the metrics (default
    RUN_DIR/eval/<FILE stem>.json) and per item results beside them (<FILE stem>.items.jsonl). `loaded`:
    (model, tokenizer, context length) of a decoder the caller loaded (a run of another kind than pretraining);
    by default the pretraining run's `which` checkpoint."""
    import json
    from pathlib import Path

    from kiln.data.benchmarks import read_benchmark
    from kiln.data.chat import TEMPLATE_FILE, ChatTemplate
    from kiln.run.device import resolve_device
    from kiln.run.load import load

    run_dir, file = Path(run_dir), Path(file)
    if batch_size < 1:
        raise KilnError(f"--batch-size must be >= 1, got {batch_size}")
    if max_new_tokens < 1:
        raise KilnError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    items, layout = read_benchmark(file, layout)
    template = ChatTemplate.of_run(run_dir) if chat else None
    if chat and template.is_default:  # as kiln chat: a run without a template is asked in ChatML
        log(f"{run_dir} has no {TEMPLATE_FILE}: each question is a user turn in ChatML")
    specials = template.specials if template else ChatTemplate.of_run(run_dir).specials
    if which == "best" and not (run_dir / "checkpoints" / "best").is_file():
        which = "latest"  # a run without validation has no best checkpoint
    dev = resolve_device(device, "--device")
    if loaded is None:
        model, tokenizer, cfg = load(run_dir, which, device=dev)
        if cfg.model.arch != "decoder" or cfg.objective != "clm":
            raise KilnError(f"{run_dir}: a benchmark is scored by a decoder (causal LM); this run is an "
                            f"{cfg.model.arch} with objective {cfg.objective}")
        context_length = cfg.model.context_length
    else:
        model, tokenizer, context_length = loaded
        dev = str(next(model.parameters()).device)
    if tokenizer is None:
        raise KilnError(f"{run_dir} has no tokenizer.json: kiln eval cannot turn {file} into tokens")
    result = score_benchmark(model, tokenizer, items, context_length=context_length, template=template,
                             specials=specials, batch_size=batch_size, device=dev, max_new_tokens=max_new_tokens)
    rows = result.pop("items")
    result = {"file": str(file), "run": str(run_dir), "layout": layout, "chat": chat, **result}
    out = Path(out) if out else run_dir / "eval" / f"{file.stem}.json"
    per_item = out.with_name(f"{out.stem}.items.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    per_item.write_text("".join(json.dumps({"index": i, **r}) + "\n" for i, r in enumerate(rows)))
    out.write_text(json.dumps(result, indent=2) + "\n")
    keys = [k for k in ("acc", "acc_norm", "exact_match") if k in result]
    log(f"{file}: {result['n']} {layout} item(s){' (chat template)' if chat else ''}"
        + (f"; {result['truncated']} cut from the left to the context" if result["truncated"] else ""))
    log("\n".join(f"  {k:<12} {result[k]:.4f}" for k in keys))
    for kind, m in result["per_kind"].items():
        log(f"  {kind:<24} " + "  ".join(f"{k} {m[k]:.4f}" for k in keys) + f"  (n={m['n']})")
    log(f"wrote {out} and {per_item}")
    return result
