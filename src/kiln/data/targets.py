"""The label cells of `kiln finetune classify`'s variants (`problem`): a label set (multi_label) or a number
(regression), each with its one-line error, and the summary of numeric targets that data.json records.

    label_set("tags.csv:7", "drama| comedy", "labels", "|")  -> ("comedy|drama", ("comedy", "drama"))
    number("scores.csv:3", "4.5", "score")                    -> 4.5
"""

from __future__ import annotations

import math
import statistics

from kiln.errors import KilnError


def label_set(where: str, value, name: str, sep: str, required: bool = True):
    """(the labels sorted and joined by `sep`, their tuple) of a multi_label cell: text joined by `sep`, or a
    JSONL list of strings; (None, None) for an empty cell where no label is required (prediction)."""
    if isinstance(value, list):
        if any(isinstance(x, bool) or not isinstance(x, (str, int, float)) for x in value):
            raise KilnError(f"{where}: field {name!r} must be a list of label strings, got {value!r}"[:300])
        items = [str(x) for x in value]
    else:
        items = str(value or "").split(sep)
    labels = sorted(dict.fromkeys(x.strip() for x in items if x.strip()))
    if not labels and required:
        raise KilnError(f"{where}: empty label set in column {name!r} (problem multi_label: every row needs at "
                        f"least one label, joined by data.label_sep {sep!r}; a label such as 'none' can mark a text "
                        "with none of the others)")
    return (sep.join(labels) or None), (tuple(labels) or None)


def number(where: str, value: str, name: str) -> float:
    """The finite number in a regression target cell."""
    try:
        x = float(value)
    except ValueError:
        x = math.nan
    if not math.isfinite(x):
        raise KilnError(f"{where}: target {value[:40]!r} in column {name!r} is not a finite number (problem "
                        "regression)")
    return x


def target_summary(examples) -> dict[str, float]:
    """Mean, standard deviation, minimum and maximum of the examples' numeric targets (problem regression)."""
    y = [float(e.target) for e in examples if e.target is not None]
    if not y:
        return {}
    return {"mean": round(statistics.fmean(y), 4), "std": round(statistics.pstdev(y), 4), "min": min(y), "max": max(y)}
