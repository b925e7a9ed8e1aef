"""Tables as text: delimiters, column names and the hints an error gives, Parquet files, JSON lines."""

from __future__ import annotations

import json
from pathlib import Path

from kiln.errors import KilnError, did_you_mean, require
from kiln.data.encodings import SNIFF_BYTES

PARQUET_BUFFER = 1 << 20  # column chunks are read through a buffer of this size (not whole)


_DELIMITERS = {"tab": "\t", "\\t": "\t", "comma": ",", "semicolon": ";", "pipe": "|", "space": " "}


def delimiter_for(path: Path, delimiter: str = "") -> str:
    """data.delimiter (one character; tab, \\t, comma, semicolon, pipe, space by name), or the extension's:
    a tab for .tsv/.txt, else a comma."""
    if not delimiter:
        return "\t" if path.suffix.lower() in (".tsv", ".txt") else ","
    d = _DELIMITERS.get(delimiter.lower(), delimiter)
    if len(d) != 1 or d in '"\r\n':
        raise KilnError(f"data.delimiter must be one character (or tab, \\t, comma, semicolon, pipe, space), "
                        f"got {delimiter!r}")
    return d


def column_names(path: Path, first: list[str], header: bool = True, columns: list[str] | None = None,
                 ) -> tuple[list[str], bool]:
    """(column names, whether the first row is data): the header row's names; with data.header false the
    positions 0, 1, ...; data.columns names the columns in order (replacing a header row's names)."""
    if columns:
        if len(columns) != len(first):
            raise KilnError(f"{path}:1: data.columns names {len(columns)} column(s) ({', '.join(columns)}), the "
                            f"first row has {len(first)} field(s)")
        if not header and [c.strip() for c in first] == list(columns):
            raise KilnError(f"{path}:1: the first row is data.columns itself, so the file has a header row; "
                            f"remove data.header false")
        return list(columns), not header
    if header:
        return [h.strip() for h in first], False
    return [str(i) for i in range(len(first))], True


def column_hint(names: list[str], header: bool = True, columns: list[str] | None = None) -> str:
    """What to set when a named column is missing: the delimiter (every row one column), or data.header."""
    if len(names) == 1 and any(c in names[0] for c in "\t,;|"):
        return "; every row is a single column: check data.delimiter"
    if header and not columns:
        return "; if the file has no header row, set data.header false (columns 0, 1, ...) or data.columns"
    return ""


def check_head(path: Path, head: bytes) -> None:
    if not head:
        raise KilnError(f"{path}: file is empty")
    if b"\x00" in head[:SNIFF_BYTES]:
        raise KilnError(f"{path}: looks like a binary file (NUL bytes in the first 8 KB), expected UTF-8 text")


def parquet_file(path: Path):
    """pyarrow's ParquetFile for `path` (only its footer is read), or a one-line KilnError: pyarrow missing, not
    a Parquet file."""
    pq = require("pyarrow.parquet", "parquet", "reading .parquet files")
    try:
        # pre_buffer off: pyarrow's read-ahead cache would keep every column chunk read so far (peak RSS grew
        # with the file: 1.19 GB on a 1 GB file); with it off and a buffer, memory is one batch (bench/parquet_memory.py)
        return pq.ParquetFile(str(path), buffer_size=PARQUET_BUFFER, pre_buffer=False)
    except Exception as e:  # pyarrow.ArrowInvalid (no magic bytes, a bad footer), OSError
        raise KilnError(f"{path}: not a Parquet file ({str(e).splitlines()[0][:160]})") from None


def parquet_text_column(path: Path, pf, name: str) -> None:
    """A corpus's text column must exist (did-you-mean + the columns present) and hold strings."""
    import pyarrow as pa

    names = pf.schema_arrow.names
    if name not in names:
        raise KilnError(f"{path}: no column {name!r}{did_you_mean(name, names)}; columns present: "
                        f"{', '.join(repr(n) for n in names) or '(none)'} (set data.text_field)")
    t = pf.schema_arrow.field(name).type
    if pa.types.is_dictionary(t):
        t = t.value_type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t) or str(t) == "string_view"):
        raise KilnError(f"{path}: column {name!r} holds {t}, expected strings (set data.text_field)")


def json_object(path: Path, lineno: int, line: str, expected: str = "a JSON object") -> dict:
    """One JSONL row as a dict, or a one-line KilnError naming the file and line."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise KilnError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict):
        raise KilnError(f"{path}:{lineno}: expected {expected}, got {type(row).__name__}")
    return row
