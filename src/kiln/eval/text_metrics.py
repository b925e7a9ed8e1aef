"""Metrics of generated text against references, on detokenized strings.

translate: BLEU and chrF (sacrebleu, its default 13a tokenization; corpus level, 0-100)
summarize: ROUGE-1/2/L F-measure (rouge-score; mean over examples, 0-100; its default tokenizer keeps only
           [a-z0-9] after lowercasing, so it suits English summaries)
"""

from __future__ import annotations

from kiln.errors import KilnError

TASK_METRICS = {"translate": ("bleu", "chrf"), "summarize": ("rouge1", "rouge2", "rougeL")}
HEADLINE = {"translate": "bleu", "summarize": "rougeL"}


def _need(module: str, package: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise KilnError(f"this metric needs the {package!r} package: pip install {package}") from None


def _check(hyps: list[str], refs: list[str]) -> None:
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references")


def bleu(hyps: list[str], refs: list[str]) -> float:
    _check(hyps, refs)
    sacrebleu = _need("sacrebleu", "sacrebleu")
    return float(sacrebleu.corpus_bleu(hyps, [refs]).score) if hyps else 0.0


def chrf(hyps: list[str], refs: list[str]) -> float:
    _check(hyps, refs)
    sacrebleu = _need("sacrebleu", "sacrebleu")
    return float(sacrebleu.corpus_chrf(hyps, [refs]).score) if hyps else 0.0


def rouge(hyps: list[str], refs: list[str]) -> dict[str, float]:
    _check(hyps, refs)
    rouge_scorer = _need("rouge_score.rouge_scorer", "rouge-score")
    keys = TASK_METRICS["summarize"]
    scorer = rouge_scorer.RougeScorer(list(keys), use_stemmer=False)
    totals = dict.fromkeys(keys, 0.0)
    for h, r in zip(hyps, refs):
        s = scorer.score(r, h)  # (target, prediction)
        for k in keys:
            totals[k] += s[k].fmeasure
    n = max(len(hyps), 1)
    return {k: 100.0 * v / n for k, v in totals.items()}


def text_metrics(task: str, hyps: list[str], refs: list[str]) -> dict[str, float]:
    """{bleu, chrf} for translate, {rouge1, rouge2, rougeL} for summarize."""
    if task == "translate":
        return {"bleu": bleu(hyps, refs), "chrf": chrf(hyps, refs)}
    if task == "summarize":
        return rouge(hyps, refs)
    raise KilnError(f"unknown task {task!r}: translate or summarize")
