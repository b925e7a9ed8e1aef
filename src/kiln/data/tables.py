"""Task datasets: labelled examples read from CSV/TSV/JSONL/Parquet, label vocabularies and leak-free splits.

    rows, report = read_examples("reviews.csv", text_field="text", label_field="label")
    labels = label_names(rows)
    train, val, test, info = split_examples(rows, 0.1, 0.1, seed=0)

Rules (each a one-line KilnError or a counted, reported skip):
- the file is read in data.encoding (UTF-8 by default; a UTF-8/UTF-16 byte-order mark is read); a byte that is
  not valid there is an error naming the file, the offset and the line, and UTF-8 read as latin-1 is an error
  too (never mojibake);
- CSV/TSV: the first row names the columns unless data.header is false (then they are 0, 1, ... or
  data.columns); data.delimiter overrides the extension's (.tsv/.txt tab, else comma);
- Parquet (pyarrow): only the named columns are read; a row's "line" is its row number (1 = the first row);
- the named columns must exist (the error lists the columns present);
- a CSV/TSV row with the wrong number of fields is an error naming the file and the line;
- a row whose text is empty (after stripping) is skipped and counted in the report;
- a row with an empty label is an error (the label column is required for training and evaluation);
- problem multi_label: a label cell holds labels joined by `label_sep` (or is a JSONL list); an empty set is an
  error; problem regression: a label cell holds a finite number, anything else is an error.
Splitting deduplicates exact (text, pair, label) rows and keeps every identical text inside one split, so
no text is ever both trained on and evaluated; it is stratified by label and seeded. A label with a single
example cannot be split: it stays in train (with a warning), and val/test have no example of it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import random
from dataclasses import dataclass, field
from pathlib import Path

from kiln.data.columns import column_hint, column_names, delimiter_for, json_object, parquet_file
from kiln.data.encodings import decode_bytes
from kiln.data.text import clean_text
from kiln.data.targets import label_set, number
from kiln.errors import KilnError, did_you_mean

FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".txt": "tsv"}


@dataclass
class Example:
    text: str
    label: str | None
    pair: str | None = None
    line: int = 0            # line of the source file the row starts on
    row: dict = field(default_factory=dict, repr=False)  # the raw row (predict writes selected columns back)
    target: object = None    # multi_label: the tuple of labels (label: them joined); regression: the number

    @property
    def key(self) -> tuple[str, str]:
        return self.text, self.pair or ""


@dataclass
class ReadReport:
    path: str
    rows: int = 0
    empty_text: int = 0
    empty_text_lines: list[int] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = []
        if self.empty_text:
            shown = ", ".join(map(str, self.empty_text_lines[:5])) + (" ..." if self.empty_text > 5 else "")
            out.append(f"{self.path}: skipped {self.empty_text} row(s) with an empty text (line {shown})")
        return out


def _read_text(path: Path, fmt=None) -> str:
    """The text of a data file in `fmt.encoding` (a data config section; None = UTF-8)."""
    if not path.is_file():
        raise KilnError(f"data file not found: {path}")
    data = path.read_bytes()
    if not data.strip():
        raise KilnError(f"{path}: file is empty")
    return decode_bytes(data, path, getattr(fmt, "encoding", "utf-8") or "utf-8").lstrip("\ufeff")


def _missing_column(path: Path, what: str, name: str, columns: list[str], key: str, fmt=None) -> KilnError:
    cols = ", ".join(repr(c) for c in columns) or "(none)"
    hint = "" if path.suffix.lower() in (".jsonl", ".parquet") else column_hint(columns, getattr(fmt, "header", True),
                                                                 getattr(fmt, "columns", None))
    return KilnError(f"{path}: no {what} column {name!r}{did_you_mean(name, columns)}; columns present: {cols} "
                     f"(set data.{key}){hint}")


def _table_rows(path: Path, text: str, fmt=None):
    """(line, dict row, header) for CSV/TSV; checks the field count of every row. `fmt` (a data config
    section, None = the defaults) gives data.header, data.columns and data.delimiter."""
    kind = FORMATS.get(path.suffix.lower(), "csv")
    delimiter = delimiter_for(path, getattr(fmt, "delimiter", "") or "")
    has_header = getattr(fmt, "header", True)
    columns = [str(c) for c in getattr(fmt, "columns", None) or []]
    csv.field_size_limit(2**31 - 1)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        first = next(reader, None)
        if not first:
            raise KilnError(f"{path}: no header row (expected column names on line 1, or set data.header false)"
                            if has_header else f"{path}: line 1 is empty (expected the first row)")
        header, first_is_data = column_names(path, first, has_header, columns)
        rows = [(1, dict(zip(header, first)))] if first_is_data else []
        last = reader.line_num
        for values in reader:
            start, last = last + 1, reader.line_num
            if not values:  # blank line
                continue
            if len(values) != len(header):
                sep = {"\t": "tabs", ",": "commas"}.get(delimiter, repr(delimiter))
                raise KilnError(f"{path}:{start}: expected {len(header)} fields ({', '.join(header)}), got "
                                f"{len(values)}; quote fields that contain {sep} (or check data.delimiter)")
            rows.append((start, dict(zip(header, values))))
    except csv.Error as e:
        raise KilnError(f"{path}:{reader.line_num}: bad {kind.upper()} ({e})") from None
    return rows, header


def _jsonl_rows(path: Path, text: str):
    rows, header = [], []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        row = json_object(path, lineno, line)
        header += [k for k in row if k not in header]
        rows.append((lineno, row))
    return rows, header


def _parquet_rows(path: Path, fields=None):
    """(row number, dict row) of the named columns the file has (None: all of them), and all its column names."""
    import pyarrow as pa

    if not path.is_file():
        raise KilnError(f"data file not found: {path}")
    pf = parquet_file(path)
    header = pf.schema_arrow.names
    wanted = header if fields is None else [f for f in dict.fromkeys(fields) if f and f in header]
    try:
        table = pf.read(columns=wanted)
    except (pa.ArrowException, OSError) as e:
        raise KilnError(f"{path}: cannot read Parquet data ({str(e).splitlines()[0][:160]})") from None
    cols = {name: table.column(name).to_pylist() for name in wanted}
    return [(i + 1, {k: v[i] for k, v in cols.items()}) for i in range(table.num_rows)], header


def read_rows(path: Path, fmt=None, fields=None, text: str | None = None):
    """(line, dict row) and the column names of a CSV/TSV, JSONL or Parquet file (`fields`: the columns to
    read from a Parquet file; `text`: a CSV/JSONL file's text when already read)."""
    path = Path(path)
    if path.suffix.lower() == ".parquet":
        return _parquet_rows(path, fields)
    text = _read_text(path, fmt) if text is None else text
    return _jsonl_rows(path, text) if path.suffix.lower() == ".jsonl" else _table_rows(path, text, fmt)


def _field(path: Path, lineno: int, row: dict, name: str) -> str:
    v = row.get(name)
    if v is None:
        return ""
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        raise KilnError(f"{path}:{lineno}: field {name!r} is {type(v).__name__}, expected a string or a number")
    return str(v)


def read_examples(path: str | Path, text_field: str = "text", label_field: str | None = "label",
                  text_pair_field: str = "", require_label: bool = True, fmt=None,
                  problem: str = "single_label") -> tuple[list[Example], ReadReport]:
    """Examples of a CSV/TSV/JSONL/Parquet file. `label_field` None (or a missing column with require_label
    False) reads texts only (prediction). `fmt`: the data config section (data.encoding, header, columns,
    delimiter, label_sep). `problem` multi_label / regression: Example.target holds the label set / number."""
    path = Path(path)
    rows, header = read_rows(path, fmt, [text_field, text_pair_field, label_field])
    if not rows:
        raise KilnError(f"{path}: no data rows")
    if text_field not in header:
        raise _missing_column(path, "text", text_field, header, "text_field", fmt)
    if text_pair_field and text_pair_field not in header:
        raise _missing_column(path, "text pair", text_pair_field, header, "text_pair_field", fmt)
    has_label = bool(label_field) and label_field in header
    if label_field and require_label and not has_label:
        raise _missing_column(path, "label", label_field, header, "label_field", fmt)
    report = ReadReport(str(path))
    out = []
    for lineno, row in rows:
        report.rows += 1
        t = clean_text(_field(path, lineno, row, text_field)).strip()
        pair = clean_text(_field(path, lineno, row, text_pair_field)).strip() if text_pair_field else None
        if not t:
            report.empty_text += 1
            report.empty_text_lines.append(lineno)
            continue
        label = target = None
        if has_label and problem == "multi_label":
            v = row.get(label_field)
            label, target = label_set(f"{path}:{lineno}", v if isinstance(v, list) else _field(
                path, lineno, row, label_field), label_field, getattr(fmt, "label_sep", "|") or "|", require_label)
        elif has_label:
            label = _field(path, lineno, row, label_field).strip()
            if not label and require_label:
                raise KilnError(f"{path}:{lineno}: empty label in column {label_field!r}")
            if label and problem == "regression":
                target = number(f"{path}:{lineno}", label, label_field)
        out.append(Example(t, label or None, pair, lineno, row, target))
    if not out:
        raise KilnError(f"{path}: every row has an empty text (column {text_field!r})")
    return out, report


# ----------------------------------------------------------------------------------------------- labels


def names_of(e: Example) -> tuple:
    """The labels of an example: its label set (multi_label) or its one label."""
    return e.target if isinstance(e.target, tuple) else (e.label,) if e.label is not None else ()


def label_names(examples: list[Example]) -> list[str]:
    """Sorted label names (numerically when every label is an integer)."""
    names = {n for e in examples for n in names_of(e)}
    if all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


def check_labels(examples: list[Example], labels: list[str], path: str, train_path: str = "train") -> None:
    """A label the model was not trained on (e.g. one only in the test file) is an error naming it."""
    known = set(labels)
    for e in examples:
        for n in names_of(e):
            if n not in known:
                raise KilnError(f"{path}:{e.line}: label {n!r} does not occur in {train_path} "
                                f"(known labels: {', '.join(labels)}){did_you_mean(n, labels)}")


def class_weights(spec: str, labels: list[str], train: list[Example]) -> list[float] | None:
    """none -> None; balanced -> n / (k * count_c) (scikit-learn's 'balanced'); 'a=1,b=2.5' -> explicit."""
    spec = spec.strip()
    if spec in ("", "none"):
        return None
    if spec == "balanced":
        counts = {name: 0 for name in labels}
        for e in train:
            counts[e.label] += 1
        n, k = len(train), len(labels)
        return [n / (k * max(counts[name], 1)) for name in labels]
    weights = {}
    for part in spec.split(","):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep:
            raise KilnError(f"class_weights: expected none, balanced or label=weight,...; got {spec!r}")
        if name not in labels:
            raise KilnError(f"class_weights: unknown label {name!r}{did_you_mean(name, labels)}; labels: "
                            f"{', '.join(labels)}")
        try:
            weights[name] = float(value)
        except ValueError:
            raise KilnError(f"class_weights: weight of {name!r} must be a number, got {value.strip()!r}") from None
        if weights[name] < 0:
            raise KilnError(f"class_weights: weight of {name!r} must be >= 0, got {weights[name]}")
    return [weights.get(name, 1.0) for name in labels]


# ----------------------------------------------------------------------------------------------- splits


def dedup(examples: list[Example]) -> tuple[list[Example], int]:
    """Drop exact duplicate (text, pair, label) rows, keeping the first. Returns (kept, number dropped)."""
    seen, out = set(), []
    for e in examples:
        k = (e.text, e.pair or "", e.label)
        if k not in seen:
            seen.add(k)
            out.append(e)
    return out, len(examples) - len(out)


def split_examples(examples: list[Example], val_fraction: float, test_fraction: float, seed: int,
                   log=print, method: str = "stratified") -> tuple[list[Example], list[Example], list[Example], dict]:
    """Seeded, leak-free split: identical texts (text + pair) form one group, so a text is never in two splits.

    method "stratified": groups are shuffled within their label (the label of the group's first row) and cut
    val/test/train per label; labels with one group stay in train (warned).
    method "shuffle": the groups, in order of first appearance, get one `random.Random(seed).shuffle` and are
    cut in that order into train | val | test at int(n * (1 - val - test)) and int(n * (1 - test)): the common
    "dedup, shuffle with seed S, 80/10/10" split (the one ../shared/data/README.md's reference scores use)."""
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= f < 1.0:
            raise KilnError(f"data.{name} must be in [0, 1), got {f}")
    if val_fraction + test_fraction >= 1.0:
        raise KilnError(f"data.val_fraction + data.test_fraction must be < 1, got {val_fraction + test_fraction}")
    groups: dict[tuple, list[Example]] = {}
    for e in examples:
        groups.setdefault(e.key, []).append(e)
    if method not in ("stratified", "shuffle"):
        raise KilnError(f"data.split must be stratified or shuffle, got {method!r}")
    rng = random.Random(seed)
    if method == "shuffle":
        parts, singles = _cut_shuffled(list(groups), rng, val_fraction, test_fraction), []
    else:
        parts, singles = _cut_stratified(groups, rng, val_fraction, test_fraction)
    for label in singles:
        log(f"warning: label {label!r} has a single example: kept in train only (val/test have none of it)")
    conflicting = sum(1 for members in groups.values() if len({m.label for m in members}) > 1)
    out = {name: [e for k in keys for e in groups[k]] for name, keys in parts.items()}
    info = {"groups": len(groups), "conflicting_texts": conflicting, "single_example_labels": singles}
    return out["train"], out["val"], out["test"], info


def _cut_shuffled(keys: list[tuple], rng: random.Random, val_fraction: float, test_fraction: float) -> dict:
    """One shuffle of the groups (in order of first appearance), cut in order into train | val | test."""
    rng.shuffle(keys)
    n = len(keys)
    a = max(int(n * (1.0 - val_fraction - test_fraction)), 1)
    b = max(int(n * (1.0 - test_fraction)), a)
    return {"train": keys[:a], "val": keys[a:b], "test": keys[b:]}


def _cut_stratified(groups: dict, rng: random.Random, val_fraction: float,
                    test_fraction: float) -> tuple[dict, list[str]]:
    """Groups shuffled within their label (the label of the group's first row) and cut per label, then each
    split's groups mixed; also the labels with a single group (kept in train)."""
    by_label: dict[str, list[tuple]] = {}
    for key, members in groups.items():
        by_label.setdefault(members[0].label, []).append(key)
    parts: dict[str, list[tuple]] = {"train": [], "val": [], "test": []}
    singles = []
    for label in sorted(by_label, key=str):
        keys = by_label[label]
        rng.shuffle(keys)
        n = len(keys)
        if n == 1:
            singles.append(label)
            parts["train"] += keys
            continue
        n_val = round(n * val_fraction) if val_fraction else 0
        n_test = round(n * test_fraction) if test_fraction else 0
        while n_val + n_test >= n:  # keep at least one group in train
            if n_test >= n_val and n_test:
                n_test -= 1
            else:
                n_val -= 1
        parts["val"] += keys[:n_val]
        parts["test"] += keys[n_val:n_val + n_test]
        parts["train"] += keys[n_val + n_test:]
    for keys in parts.values():  # mix the labels
        rng.shuffle(keys)
    return parts, singles


def overlap(a: list[Example], b: list[Example]) -> int:
    """How many examples of b have a text (text + pair) that also occurs in a."""
    keys = {e.key for e in a}
    return sum(1 for e in b if e.key in keys)


def fingerprint(examples: list[Example]) -> str:
    """A short hash of a split's (text, pair, label) rows in order: equal splits have equal fingerprints."""
    h = hashlib.sha256()
    for e in examples:
        h.update(f"{e.text}\x1f{e.pair or ''}\x1f{e.label}\x1e".encode())
    return h.hexdigest()[:16]


def label_counts(examples: list[Example], labels: list[str]) -> dict[str, int]:
    counts = {name: 0 for name in labels}
    for e in examples:
        for n in names_of(e):
            if n in counts:
                counts[n] += 1
    return counts
