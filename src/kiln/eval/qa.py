"""Extractive QA: answers from start/end logits over all windows of a question, and SQuAD's exact match / F1.

    answers = best_answers(examples, windows, start_logits, end_logits, n_best=20, max_answer_length=30)
    scores = squad_scores({a["id"]: a["answer"] for a in answers}, examples)   # exact_match, f1 (0-100)

Post-processing (the behaviour of Hugging Face's run_qa.py): in each window the `n_best` highest start and
end logits over context tokens are paired (end >= start, at most `max_answer_length` tokens); a span scores
start + end logit and maps back to characters of the context through the tokenizer's offsets; the best span
over all windows is the answer. With null answers (SQuAD v2.0) the null score is the lowest [CLS] score
(start[0] + end[0]) over the windows, and the answer is empty when null - best span > `null_threshold`.

Scores follow the official SQuAD v2.0 script: answers are normalized (lowercase, punctuation and the articles
a/an/the removed, whitespace collapsed); exact match and token F1 take the maximum over the gold answers; a
question without gold answers has the gold answer "" (only the empty prediction scores 1).
"""

from __future__ import annotations

import re
import string
from collections import Counter

import numpy as np

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def exact_match(prediction: str, gold: str) -> int:
    return int(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    p, r = same / len(pred), same / len(ref)
    return 2 * p * r / (p + r)


def gold_answers(example) -> list[str]:
    golds = [t for t, _ in example.answers if normalize_answer(t)]
    return golds or [""]


def squad_scores(predictions: dict[str, str], examples) -> dict:
    """exact_match and f1 in percent over `examples` (a missing prediction counts as ""), with the HasAns /
    NoAns breakdowns when some questions are unanswerable."""
    em, f = [], []
    for e in examples:
        pred = predictions.get(e.id, "")
        golds = gold_answers(e)
        em.append(max(exact_match(pred, g) for g in golds))
        f.append(max(f1(pred, g) for g in golds))
    em, f = np.array(em, dtype=np.float64), np.array(f, dtype=np.float64)
    out = {"exact_match": 100.0 * em.mean() if len(em) else 0.0, "f1": 100.0 * f.mean() if len(f) else 0.0,
           "n": len(examples)}
    has = np.array([not e.impossible for e in examples], dtype=bool)
    if len(has) and not has.all():
        for name, m in (("has_answer", has), ("no_answer", ~has)):
            out[f"{name}_n"] = int(m.sum())
            if m.any():
                out[f"{name}_exact_match"] = 100.0 * em[m].mean()
                out[f"{name}_f1"] = 100.0 * f[m].mean()
    return out


def best_answers(examples, windows, start_logits: list[np.ndarray], end_logits: list[np.ndarray],
                 n_best: int = 20, max_answer_length: int = 30, null_answers: bool = False,
                 null_threshold: float = 0.0) -> list[dict]:
    """One dict per example: id, answer (text), start/end (character span in the context, end exclusive; -1
    for the null answer), score (start + end logit of the span), null_score, probability (softmax over the
    n-best spans and the null answer)."""
    by_example: dict[int, list[int]] = {}
    for w, i in enumerate(windows.example):
        by_example.setdefault(int(i), []).append(w)
    out = []
    for i, e in enumerate(examples):
        spans, null = [], None
        for w in by_example.get(i, []):
            s, t, off = start_logits[w], end_logits[w], windows.offsets[w]
            null = min(null, float(s[0] + t[0])) if null is not None else float(s[0] + t[0])
            ctx = np.flatnonzero(off[:, 0] >= 0)
            if not len(ctx):
                continue
            top_s = ctx[np.argsort(-s[ctx], kind="stable")[:n_best]]
            top_e = ctx[np.argsort(-t[ctx], kind="stable")[:n_best]]
            for a in top_s:
                for b in top_e:
                    if b < a or b - a + 1 > max_answer_length:
                        continue
                    spans.append((float(s[a] + t[b]), int(off[a, 0]), int(off[b, 1])))
        spans.sort(key=lambda x: -x[0])
        spans = spans[:n_best]
        null = 0.0 if null is None else null
        scores = np.array([x[0] for x in spans] + ([null] if null_answers else []), dtype=np.float64)
        probs = np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum() if len(scores) else scores
        row = {"id": e.id, "answer": "", "start": -1, "end": -1, "score": null, "null_score": null,
               "probability": float(probs[-1]) if null_answers and len(probs) else 0.0}
        if spans and not (null_answers and null - spans[0][0] > null_threshold):
            score, a, b = spans[0]
            row.update(answer=e.context[a:b], start=a, end=b, score=score, probability=float(probs[0]))
        out.append(row)
    return out
