"""Token classification metrics: entity-level precision / recall / F1 with seqeval (strict mode, the run's tag
scheme: an entity counts only when its type and its exact token span match), per entity type and micro /
macro / weighted averages, and token accuracy. Scheme "none" (plain tags such as POS): per-tag precision /
recall / F1 over tokens (scikit-learn) and their macro average as "f1".

    m = token_metrics(gold_tag_seqs, predicted_tag_seqs, "IOB2")   # {"f1", "precision", "recall", "accuracy", ...}
    spans = entities(tags, "IOB2")                                 # [(type, first token, end token)]
"""

from __future__ import annotations

import numpy as np

_SCHEMES = {"IOB1": "IOB1", "IOB2": "IOB2", "BIOES": "IOBES"}


def _scheme(name: str):
    import seqeval.scheme

    return getattr(seqeval.scheme, _SCHEMES[name])


def entities(tags: list[str], scheme: str) -> list[tuple[str, int, int]]:
    """The entities of one tag sequence as (type, first token, end token exclusive), as seqeval's strict mode
    reads them (a sequence the scheme does not allow yields no entity there)."""
    if scheme == "none":
        return []
    from seqeval.scheme import Entities

    return [(e.tag, e.start, e.end) for e in Entities([list(tags)], _scheme(scheme)).entities[0]]


def token_metrics(gold: list[list[str]], pred: list[list[str]], scheme: str) -> dict:
    flat_g = [t for s in gold for t in s]
    flat_p = [t for s in pred for t in s]
    acc = float(np.mean([a == b for a, b in zip(flat_g, flat_p)])) if flat_g else 0.0
    out = {"accuracy": acc, "sentences": len(gold), "tokens": len(flat_g), "scheme": scheme}
    if scheme == "none":
        from sklearn.metrics import precision_recall_fscore_support

        names = sorted(set(flat_g))
        p, r, f, n = precision_recall_fscore_support(flat_g, flat_p, labels=names, zero_division=0)
        out["per_type"] = {k: {"precision": float(a), "recall": float(b), "f1": float(c), "support": int(d)}
                           for k, a, b, c, d in zip(names, p, r, f, n)}
        out.update(precision=float(np.mean(p)), recall=float(np.mean(r)), f1=float(np.mean(f)))
        return out
    from seqeval.metrics import classification_report

    rep = classification_report(gold, pred, mode="strict", scheme=_scheme(scheme), output_dict=True, zero_division=0)
    row = lambda d: {"precision": float(d["precision"]), "recall": float(d["recall"]),  # noqa: E731
                     "f1": float(d["f1-score"]), "support": int(d["support"])}
    avgs = {k: row(rep.pop(k)) for k in ("micro avg", "macro avg", "weighted avg")}
    out["per_type"] = {k: row(v) for k, v in sorted(rep.items())}
    out.update(precision=avgs["micro avg"]["precision"], recall=avgs["micro avg"]["recall"],
               f1=avgs["micro avg"]["f1"], macro_f1=avgs["macro avg"]["f1"], weighted_f1=avgs["weighted avg"]["f1"],
               entities=avgs["micro avg"]["support"])
    return out


def metrics_table(m: dict) -> str:
    """per type and the averages, like seqeval's classification_report; then token accuracy."""
    lines = [f"{'':>12} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>8}"]
    for k, v in m["per_type"].items():
        lines.append(f"{k:>12} {v['precision']:>9.4f} {v['recall']:>9.4f} {v['f1']:>9.4f} {v['support']:>8}")
    lines.append(f"{'micro avg' if m['scheme'] != 'none' else 'macro avg':>12} {m['precision']:>9.4f} "
                 f"{m['recall']:>9.4f} {m['f1']:>9.4f}")
    if "macro_f1" in m:
        lines.append(f"{'macro f1':>12} {'':>9} {'':>9} {m['macro_f1']:>9.4f}")
    lines.append(f"token accuracy {m['accuracy']:.4f} over {m['tokens']} tokens, {m['sentences']} sentences")
    return "\n".join(lines)
