"""Benchmark files: JSONL rows in the common layouts -> items (a prompt, its choices and the gold index, or the
accepted answers of a generative question).

Layouts, told apart by their fields (the first row decides; every row must then have that layout):

  mc          question, choices [str, ...], answer (the index of the right choice; `label` or `gold` also read)
  hellaswag   ctx_a + ctx_b (or ctx), endings [str, ...], label; activity_label when present
  arc         question, choices {text: [...], label: [...]}, answerKey (one of the labels)
  generative  question, answer (a string, or a list of accepted strings)

The prompts are lm-evaluation-harness's for these datasets, so a score here is a score there: question rows
(mc, arc, generative) read "Question: {question}\\nAnswer:" (its ARC task), HellaSwag rows its preprocessed
"{activity_label}: {ctx_a} {Ctx_b}" with the endings cleaned the same way (its hellaswag task). `text` keeps
the bare question (or context) for a chat model's user turn.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from kiln.errors import KilnError

LAYOUTS = ("mc", "hellaswag", "arc", "generative")


@dataclass
class Item:
    prompt: str  # the context, as lm-evaluation-harness writes it
    text: str  # the bare question or context (a chat model's user turn)
    choices: list[str] = field(default_factory=list)  # multiple choice; empty for a generative item
    gold: int = -1  # the index of the right choice
    answers: list[str] = field(default_factory=list)  # generative: the accepted answers
    kind: str = ""  # the row's `kind` field, when it has one: scores are also given per kind
    where: str = ""  # FILE:LINE, for messages


def layout_of(row) -> str | None:
    """The layout whose fields the row has, or None."""
    if not isinstance(row, dict):
        return None
    if "endings" in row and ("ctx" in row or "ctx_a" in row):
        return "hellaswag"
    if "question" in row and isinstance(row.get("choices"), dict) and "answerKey" in row:
        return "arc"
    if "question" in row and "choices" in row:
        return "mc"
    if "question" in row and "answer" in row:
        return "generative"
    return None


def sniff(path: str | Path) -> str | None:
    """The layout of a .jsonl file's first row: None when it is not a benchmark file (a `text` field makes it a
    text to score by perplexity) or cannot be read."""
    path = Path(path)
    if path.suffix.lower() != ".jsonl" or not path.is_file():
        return None
    try:
        with path.open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    return None if isinstance(row, dict) and "text" in row else layout_of(row)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return None


def _hellaswag_clean(text: str) -> str:
    text = text.strip()
    text = text.replace(" [title]", ". ")  # bracketed artifacts of HellaSwag's WikiHow rows
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _strings(value, where: str, what: str) -> list[str]:
    if not isinstance(value, list) or not value:
        raise KilnError(f"{where}: no choices ({what} must be a non-empty list of strings)")
    if not all(isinstance(v, str) for v in value):
        raise KilnError(f"{where}: {what} must be a list of strings")
    return value


def _index(value, n: int, where: str, what: str) -> int:
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise KilnError(f"{where}: {what} must be the index of the right choice (an integer), got {value!r}")
    if not 0 <= value < n:
        raise KilnError(f"{where}: {what} {value} is out of range for {n} choices (0..{n - 1})")
    return value


def _question(row: dict, where: str) -> str:
    q = row.get("question")
    if not isinstance(q, str) or not q.strip():
        raise KilnError(f"{where}: question must be a non-empty string")
    return q


def parse_row(row: dict, layout: str, where: str) -> Item:
    """One row of `layout` -> an Item; a KilnError naming the line for anything malformed."""
    kind = str(row.get("kind", ""))
    if layout == "hellaswag":
        if "ctx_a" in row:
            ctx = str(row["ctx_a"]) + " " + str(row.get("ctx_b", "")).capitalize()
        else:
            ctx = str(row["ctx"])
        label = row.get("activity_label")
        prompt = _hellaswag_clean(f"{label}: {ctx}" if label is not None else ctx)
        choices = [_hellaswag_clean(e) for e in _strings(row["endings"], where, "endings")]
        return Item(prompt, ctx, choices, _index(row.get("label"), len(choices), where, "label"), kind=kind)
    q = _question(row, where)
    prompt = f"Question: {q}\nAnswer:"
    if layout == "arc":
        ch = row["choices"]
        texts = _strings(ch.get("text"), where, "choices.text")
        labels = ch.get("label")
        if not isinstance(labels, list) or len(labels) != len(texts):
            raise KilnError(f"{where}: choices.label must list one label per choice ({len(texts)})")
        if row["answerKey"] not in labels:
            raise KilnError(f"{where}: answerKey {row['answerKey']!r} is not one of the labels {labels}")
        return Item(prompt, q, texts, labels.index(row["answerKey"]), kind=kind)
    if layout == "mc":
        choices = _strings(row["choices"], where, "choices")
        key = next((k for k in ("answer", "label", "gold") if k in row), None)
        if key is None:
            raise KilnError(f"{where}: no answer (the index of the right choice)")
        return Item(prompt, q, choices, _index(row[key], len(choices), where, key), kind=kind)
    answers = row["answer"] if isinstance(row["answer"], list) else [row["answer"]]
    if not answers or not all(isinstance(a, str) and a.strip() for a in answers):
        raise KilnError(f"{where}: answer must be a non-empty string (or a list of them)")
    return Item(prompt, q, answers=[a.strip() for a in answers], kind=kind)


def read_benchmark(path: str | Path, layout: str = "auto") -> tuple[list[Item], str]:
    """(items, layout) of a benchmark .jsonl; every line is checked before anything is scored."""
    path = Path(path)
    if not path.is_file():
        raise KilnError(f"{path}: no such file")
    if layout != "auto" and layout not in LAYOUTS:
        raise KilnError(f"unknown benchmark layout {layout!r}: one of auto, {', '.join(LAYOUTS)}")
    items: list[Item] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise KilnError(f"{path}: cannot read ({str(e).splitlines()[0]})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise KilnError(f"{where}: not JSON ({e.msg})") from None
        found = layout_of(row)
        if layout == "auto" and found is not None:
            layout = found
        if found is None or (found != layout and not (layout == "mc" and found == "arc")):
            fields = ", ".join(sorted(row)) if isinstance(row, dict) else type(row).__name__
            raise KilnError(f"{where}: not a {layout if layout != 'auto' else 'benchmark'} row (fields: {fields}); "
                            "expected question/choices/answer, ctx/endings/label, question/choices{text,label}/"
                            "answerKey or question/answer")
        items.append(parse_row(row, layout if found != "arc" else "arc", where))
        items[-1].where = where
    if not items:
        raise KilnError(f"{path}: no benchmark rows")
    return items, layout
