"""Reading raw text as a stream of cleaned documents.

Inputs: a plain text file (one document, read ~1 MB of lines at a time), a folder of .txt files
(one document per file), .jsonl (one document per row) or .csv/.tsv (one document per row).
"kiln:tinyshakespeare" is the embedded corpus. Anything wrong with the input is a KilnError of one
line that names the file and the problem.
"""

from __future__ import annotations

import codecs
import csv
import json
import re
import unicodedata
from pathlib import Path
from typing import Iterator

from kiln.errors import KilnError, did_you_mean

EMBEDDED = {"kiln:tinyshakespeare": Path(__file__).resolve().parent.parent / "assets" / "tinyshakespeare.txt"}
CHUNK_BYTES = 1 << 20          # plain text files are read ~1 MB of whole lines at a time
SNIFF_BYTES = 8192             # a NUL byte in the first 8 KB means "binary file"
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # Unicode Cc minus \t and \n


def clean_text(s: str) -> str:
    """NFC, \\r\\n -> \\n, control characters removed (except \\n and \\t), leading BOM dropped."""
    if "\r" in s:
        s = s.replace("\r\n", "\n")
    s = _CONTROL.sub("", s)
    if not unicodedata.is_normalized("NFC", s):
        s = unicodedata.normalize("NFC", s)
    return s.lstrip("\ufeff") if s.startswith("\ufeff") else s


def _decode(data: bytes, path: Path, offset: int = 0) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _not_utf8(path, offset + e.start) from None


def _not_utf8(path: Path, offset: int) -> KilnError:
    return KilnError(f"{path}: not UTF-8 text (invalid byte at offset {offset}); "
                     f"convert it to UTF-8, e.g. `iconv -f latin1 -t utf-8`")


def _check_head(path: Path, head: bytes) -> None:
    if not head:
        raise KilnError(f"{path}: file is empty")
    if b"\x00" in head[:SNIFF_BYTES]:
        raise KilnError(f"{path}: looks like a binary file (NUL bytes in the first 8 KB), expected UTF-8 text")


def json_object(path: Path, lineno: int, line: str, expected: str = "a JSON object") -> dict:
    """One JSONL row as a dict, or a one-line KilnError naming the file and line."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise KilnError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict):
        raise KilnError(f"{path}:{lineno}: expected {expected}, got {type(row).__name__}")
    return row


class Corpus:
    """One input source. `single_file` sources (plain text) stream as chunks with `chunks()`;
    the others stream as documents with `documents()`. `bytes_read` grows as the input is read."""

    def __init__(self, source: str, text_field: str = "text"):
        self.source, self.text_field = str(source), text_field
        self.exact_split = self.source in EMBEDDED  # embedded corpus: nanoGPT's exact character split
        path = EMBEDDED.get(self.source)
        if path is None and self.source.startswith("kiln:"):
            raise KilnError(f"unknown embedded corpus {self.source!r}{did_you_mean(self.source, EMBEDDED)}; "
                            f"available: {', '.join(EMBEDDED)}")
        self.path = path or Path(self.source).expanduser()
        if self.path.is_dir():
            self.kind = "folder"
            self.files = sorted(p for p in self.path.rglob("*.txt") if p.is_file())
            if not self.files:
                raise KilnError(f"{self.path}: folder has no .txt files")
        elif self.path.is_file():
            suffix = self.path.suffix.lower()
            self.kind = {".jsonl": "jsonl", ".csv": "csv", ".tsv": "csv"}.get(suffix, "text")
            self.files = [self.path]
        else:
            raise KilnError(f"data source not found: {self.path}")
        self.nbytes = sum(p.stat().st_size for p in self.files)
        self.bytes_read = 0

    @property
    def single_file(self) -> bool:
        return self.kind == "text"

    def texts(self, limit_bytes: int | None = None) -> Iterator[str]:
        """Cleaned text pieces (chunks or documents), stopping after about `limit_bytes` of input."""
        it = (t for _, t in self.chunks()) if self.single_file else self.documents()
        start = self.bytes_read
        for t in it:
            yield t
            if limit_bytes is not None and self.bytes_read - start >= limit_bytes:
                return

    # ---------------------------------------------------------------------------------- plain text

    def split_offset(self, val_fraction: float) -> int:
        """Byte offset where validation starts (refined to a line boundary by `chunks`)."""
        return int(self.nbytes * (1.0 - val_fraction))

    def chunks(self, cut: int | None = None) -> Iterator[tuple[int, str]]:
        """(part, cleaned text) for a plain text file, in order; part is 0 before byte offset `cut`
        and 1 after. The cut moves forward to the next line boundary unless the source asks for an
        exact split (embedded corpus) or the line is the file's last."""
        path = self.path
        if cut is None:
            cut = self.nbytes + 1
        decoder = codecs.getincrementaldecoder("utf-8")("strict")
        offset, part = 0, 0
        with open(path, "rb") as f:
            _check_head(path, f.read(SNIFF_BYTES))
            f.seek(0)
            while True:
                data = f.read(CHUNK_BYTES)
                if not data:
                    break
                if not data.endswith(b"\n"):
                    data += f.readline(CHUNK_BYTES)
                # keep going while the next line starts with whitespace, so a chunk boundary never
                # falls inside a run of whitespace (byte-level BPE then tokenizes as if unchunked)
                extra = 0
                while data.endswith(b"\n") and f.peek(1)[:1].isspace() and extra < CHUNK_BYTES:
                    line = f.readline(CHUNK_BYTES)
                    data += line
                    extra += len(line)
                pieces = [data]
                if part == 0 and offset + len(data) > cut:
                    at = cut - offset
                    if not self.exact_split:
                        nl = data.find(b"\n", at)
                        if nl != -1 and offset + nl + 1 < self.nbytes:
                            at = nl + 1
                    while at < len(data) and (data[at] & 0xC0) == 0x80:  # not inside a UTF-8 character
                        at += 1
                    pieces = [data[:at], data[at:]]
                for i, piece in enumerate(pieces):
                    if i == 1:
                        part = 1
                    try:
                        text = decoder.decode(piece, final=False)
                    except UnicodeDecodeError as e:
                        raise _not_utf8(path, offset - len(decoder.getstate()[0]) + e.start) from None
                    offset += len(piece)
                    self.bytes_read += len(piece)
                    text = clean_text(text)
                    if text:
                        yield part, text
            try:
                decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                raise _not_utf8(path, offset - len(decoder.getstate()[0])) from None

    # ---------------------------------------------------------------------------------- documents

    def documents(self) -> Iterator[str]:
        """Cleaned documents (a plain text file is a single document)."""
        if self.kind == "text":
            yield "".join(t for _, t in self.chunks())
        elif self.kind == "folder":
            for p in self.files:
                data = p.read_bytes()
                self.bytes_read += len(data)
                if data:
                    _check_head(p, data[:SNIFF_BYTES])
                    yield clean_text(_decode(data, p))
        elif self.kind == "jsonl":
            yield from self._jsonl()
        else:
            yield from self._csv()

    def _lines(self, path: Path) -> Iterator[tuple[int, str]]:
        """(line number, decoded line) of a file, checking for binary data and invalid UTF-8."""
        with open(path, "rb") as f:
            _check_head(path, f.read(SNIFF_BYTES))
            f.seek(0)
            offset = 0
            for lineno, raw in enumerate(f, 1):
                line = _decode(raw, path, offset)
                offset += len(raw)
                self.bytes_read += len(raw)
                yield lineno, line

    def _jsonl(self) -> Iterator[str]:
        path, key = self.path, self.text_field
        for lineno, line in self._lines(path):
            if not line.strip():
                continue
            row = json_object(path, lineno, line, f"a JSON object with a {key!r} field")
            if key not in row:
                raise KilnError(f"{path}:{lineno}: no field {key!r}{did_you_mean(key, row)}; "
                                f"fields: {', '.join(map(str, row)) or '(none)'} (set data.text_field)")
            text = row[key]
            if text is None:
                continue
            if not isinstance(text, str):
                raise KilnError(f"{path}:{lineno}: field {key!r} is {type(text).__name__}, expected a string")
            yield clean_text(text)

    def _csv(self) -> Iterator[str]:
        path, key = self.path, self.text_field
        csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
        reader = csv.reader((line for _, line in self._lines(path)), delimiter=delimiter)
        try:
            header = next(reader, None)
            if header is None:
                raise KilnError(f"{path}: file is empty")
            if key not in header:
                raise KilnError(f"{path}: no column {key!r}{did_you_mean(key, header)}; "
                                f"columns: {', '.join(header)} (set data.text_field)")
            col = header.index(key)
            for row in reader:
                if col < len(row):
                    yield clean_text(row[col])
        except csv.Error as e:
            raise KilnError(f"{path}:{reader.line_num}: bad CSV ({e})") from None
