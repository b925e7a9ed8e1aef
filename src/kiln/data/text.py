"""Reading raw text as a stream of cleaned documents.

Inputs: a plain text file (one document, read ~1 MB of lines at a time), a folder of .txt files
(one document per file), .jsonl (one document per row), .csv/.tsv (one document per row) or .parquet (a file,
or a folder of them: one document per row of the text column, streamed in record batches with pyarrow).
"kiln:tinyshakespeare" is the embedded corpus. Anything wrong with the input is a KilnError of one
line that names the file and the problem.
"""

from __future__ import annotations

import codecs
import csv
import itertools
import json
import re
import unicodedata
from pathlib import Path
from typing import Iterator

from kiln.errors import KilnError, did_you_mean, require

EMBEDDED = {"kiln:tinyshakespeare": Path(__file__).resolve().parent.parent / "assets" / "tinyshakespeare.txt"}
CHUNK_BYTES = 1 << 20          # plain text files are read ~1 MB of whole lines at a time
SNIFF_BYTES = 8192             # a NUL byte in the first 8 KB means "binary file"
PARQUET_BATCH_ROWS = 1024      # rows per record batch read from a .parquet file
PARQUET_BUFFER = 1 << 20       # column chunks are read through a buffer of this size (not whole)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # Unicode Cc minus \t and \n


def clean_text(s: str) -> str:
    """NFC, \\r\\n -> \\n, control characters removed (except \\n and \\t), leading BOM dropped."""
    if "\r" in s:
        s = s.replace("\r\n", "\n")
    s = _CONTROL.sub("", s)
    if not unicodedata.is_normalized("NFC", s):
        s = unicodedata.normalize("NFC", s)
    return s.lstrip("\ufeff") if s.startswith("\ufeff") else s


def _decode(data: bytes, path: Path, offset: int = 0, line: int | None = None) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        at = None if line is None else line + data[:e.start].count(b"\n")
        raise _not_utf8(path, offset + e.start, data[e.start], at) from None


def _not_utf8(path: Path, offset: int, byte: int | None = None, line: int | None = None) -> KilnError:
    what = f"invalid byte 0x{byte:02x}" if byte is not None else "invalid byte"
    where = f"at offset {offset}" + (f", line {line}" if line is not None else "")
    return KilnError(f"{path}: not UTF-8 text ({what} {where}); if it is in another encoding set data.encoding "
                     f"(e.g. latin-1, cp1252, utf-16), or convert it: `iconv -f latin1 -t utf-8 {path.name} > "
                     f"{path.stem}.utf8{path.suffix}`")


# ----------------------------------------------------------------------------------------------- encodings

_BOMS = ((codecs.BOM_UTF32_LE, "utf-32-le", "UTF-32"), (codecs.BOM_UTF32_BE, "utf-32-be", "UTF-32"),
         (codecs.BOM_UTF8, "utf-8", "UTF-8"), (codecs.BOM_UTF16_LE, "utf-16-le", "UTF-16"),
         (codecs.BOM_UTF16_BE, "utf-16-be", "UTF-16"))
ENCODINGS = ("utf-8", "latin-1", "cp1252", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "ascii", "iso-8859-15",
             "cp1251", "shift_jis", "gb18030", "big5", "euc-kr")


def codec_of(encoding: str) -> str:
    """Python's name for data.encoding ('latin-1' -> 'iso8859-1'), or a one-line KilnError."""
    try:
        return codecs.lookup(encoding.strip() or "utf-8").name
    except LookupError:
        raise KilnError(f"data.encoding: unknown encoding {encoding!r}{did_you_mean(encoding, ENCODINGS)}; "
                        f"use a Python codec name such as utf-8, latin-1, cp1252 or utf-16") from None


def _wide(codec: str) -> bool:
    return codec.startswith(("utf-16", "utf-32"))


def resolve_encoding(path: Path, head: bytes, encoding: str = "utf-8") -> tuple[str, int]:
    """(codec, length of the byte-order mark) for a file starting with `head`. A BOM is read: under the default
    utf-8 a UTF-16/32 BOM says the encoding; under an encoding it contradicts it is an error (not mojibake)."""
    codec = codec_of(encoding)
    for bom, bom_codec, family in _BOMS:
        if head.startswith(bom):
            if codec in ("utf-8", "utf-8-sig") or codec.startswith(family.lower()):
                return bom_codec, len(bom)
            raise KilnError(f"{path}: starts with a {family} byte-order mark, but data.encoding is {encoding!r}; "
                            f"leave data.encoding at utf-8 (the mark is read)"
                            + ("" if family == "UTF-8" else f" or set it to {family.lower()}"))
    return ("utf-8" if codec == "utf-8-sig" else codec), 0


def _line_at(data: bytes, start: int, codec: str) -> int:
    return data[:start].decode(codec, errors="replace").count("\n") + 1


def check_choice(path: Path, data: bytes, codec: str, encoding: str, bom: int) -> None:
    """A wrong data.encoding that would decode without an error (latin-1 takes any byte) is still an error:
    UTF-8 text read as latin-1/cp1252, or text without NUL bytes read as UTF-16/32."""
    if codec == "utf-8" or bom:
        return
    if not data.isascii() and not _wide(codec):
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            return
        raise _garbled(path, encoding)
    if _wide(codec) and b"\x00" not in data[:SNIFF_BYTES]:
        todo = "leave data.encoding at utf-8" if _valid_utf8(data) else "check data.encoding"
        raise KilnError(f"{path}: data.encoding is {encoding!r}, but the file has no byte-order mark and no NUL "
                        f"bytes, so it is not {encoding}; {todo}")


def _garbled(path: Path, encoding: str) -> KilnError:
    return KilnError(f"{path}: data.encoding is {encoding!r}, but the file is UTF-8 (its non-ASCII characters "
                     f"would be garbled, e.g. 'Ã©' for 'é'); leave data.encoding at utf-8")


def _valid_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def decode_bytes(data: bytes, path: Path, encoding: str = "utf-8") -> str:
    """A whole file's text in data.encoding (BOM read, a wrong choice an error naming the file, the byte offset
    and the line); a NUL byte in 8-bit text means a binary file."""
    codec, bom = resolve_encoding(path, data[:4], encoding)
    if codec == "utf-8":
        if b"\x00" in data[:SNIFF_BYTES]:
            raise KilnError(f"{path}: looks like a binary file (NUL bytes), expected UTF-8 text")
        return _decode(data[bom:], path, bom, line=1)
    check_choice(path, data, codec, encoding, bom)
    if not _wide(codec) and b"\x00" in data[:SNIFF_BYTES]:
        raise KilnError(f"{path}: looks like a binary file (NUL bytes), expected {encoding} text")
    try:
        text = data[bom:].decode(codec)
    except UnicodeDecodeError as e:
        at = bom + e.start
        raise KilnError(f"{path}: not valid {encoding} text (invalid byte 0x{data[at]:02x} at offset {at}, line "
                        f"{_line_at(data, at, codec)}); check data.encoding") from None
    if "\x00" in text[:SNIFF_BYTES]:
        raise KilnError(f"{path}: looks like a binary file (NUL characters), expected {encoding} text")
    return text


# ----------------------------------------------------------------------------------------------- tables

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


def _check_head(path: Path, head: bytes) -> None:
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


class Corpus:
    """One input source. `single_file` sources (plain text) stream as chunks with `chunks()`;
    the others stream as documents with `documents()`. `bytes_read` grows as the input is read."""

    def __init__(self, source: str, text_field: str = "text", fmt=None):
        """`fmt`: the data config section (or anything with `encoding`, `header`, `columns`, `delimiter`)."""
        self.source, self.text_field = str(source), text_field
        self.encoding = getattr(fmt, "encoding", "utf-8") or "utf-8"
        self.header = getattr(fmt, "header", True)
        self.columns = [str(c) for c in getattr(fmt, "columns", None) or []]
        self.delimiter = getattr(fmt, "delimiter", "") or ""
        codec_of(self.encoding)  # an unknown name or delimiter fails before anything is read
        delimiter_for(Path(self.source), self.delimiter)
        self.exact_split = self.source in EMBEDDED  # embedded corpus: nanoGPT's exact character split
        path = EMBEDDED.get(self.source)
        if path is None and self.source.startswith("kiln:"):
            raise KilnError(f"unknown embedded corpus {self.source!r}{did_you_mean(self.source, EMBEDDED)}; "
                            f"available: {', '.join(EMBEDDED)}")
        self.path = path or Path(self.source).expanduser()
        if self.path.is_dir():
            self.files = sorted(p for p in self.path.rglob("*.txt") if p.is_file())
            parquet = sorted(p for p in self.path.rglob("*.parquet") if p.is_file())
            if self.files and parquet:
                raise KilnError(f"{self.path}: folder holds both .txt and .parquet files; point data.source at a "
                                "folder of one kind")
            self.kind, self.files = ("parquet", parquet) if parquet else ("folder", self.files)
            if not self.files:
                raise KilnError(f"{self.path}: folder has no .txt files (nor .parquet files)")
        elif self.path.is_file():
            suffix = self.path.suffix.lower()
            self.kind = {".jsonl": "jsonl", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}.get(suffix, "text")
            self.files = [self.path]
        else:
            raise KilnError(f"data source not found: {self.path}")
        self.read_path = self.path  # a single file in another encoding is read from a UTF-8 copy
        if self.kind == "parquet":  # every file's footer and column checked before anything is read
            for p in self.files:
                parquet_text_column(p, parquet_file(p), self.text_field)
        elif self.kind != "folder":
            with open(self.path, "rb") as f:
                head = f.read(SNIFF_BYTES)
            codec, bom = resolve_encoding(self.path, head, self.encoding)
            if codec != "utf-8":
                self.read_path = self._transcode(codec, bom, head)
        self.nbytes = (sum(p.stat().st_size for p in self.files) if self.kind in ("folder", "parquet")
                       else self.read_path.stat().st_size)
        self.bytes_read = 0

    def _transcode(self, codec: str, bom: int, head: bytes) -> Path:
        """Convert the file from `codec` to a temporary UTF-8 copy, streamed, with the checks of decode_bytes:
        an invalid byte names its offset and line, UTF-8 read as latin-1 is an error (not mojibake)."""
        import os
        import tempfile
        import weakref

        path, encoding = self.path, self.encoding
        if _wide(codec):
            check_choice(path, head, codec, encoding, bom)
        else:
            _check_head(path, head)
        fd, name = tempfile.mkstemp(prefix="kiln-", suffix=f".utf8{path.suffix}")
        weakref.finalize(self, lambda n=name: os.path.exists(n) and os.unlink(n))
        decoder = codecs.getincrementaldecoder(codec)("strict")
        utf8 = codecs.getincrementaldecoder("utf-8")("strict")
        valid_utf8, ascii_only, offset, lines = True, True, bom, 1
        with open(path, "rb") as f, os.fdopen(fd, "wb") as out:
            f.seek(bom)
            while True:
                data = f.read(CHUNK_BYTES)
                ascii_only = ascii_only and data.isascii()
                if valid_utf8:
                    try:
                        utf8.decode(data, final=not data)
                    except UnicodeDecodeError:
                        valid_utf8 = False
                try:
                    text = decoder.decode(data, final=not data)
                except UnicodeDecodeError as e:
                    pending = len(decoder.getstate()[0]) if data else 0
                    at = offset - pending + e.start
                    line = lines + data[:max(e.start - pending, 0)].decode(codec, errors="replace").count("\n")
                    byte = f" 0x{data[e.start - pending]:02x}" if 0 <= e.start - pending < len(data) else ""
                    raise KilnError(f"{path}: not valid {encoding} text (invalid byte{byte} at offset {at}, line "
                                    f"{line}); check data.encoding") from None
                lines += text.count("\n")
                out.write(text.encode("utf-8"))
                offset += len(data)
                if not data:
                    break
        if valid_utf8 and not ascii_only and not bom and not _wide(codec):
            raise _garbled(path, encoding)
        return Path(name)

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
        with open(self.read_path, "rb") as f:
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
                    yield clean_text(decode_bytes(data, p, self.encoding))
        elif self.kind == "jsonl":
            yield from self._jsonl()
        elif self.kind == "parquet":
            yield from self._parquet()
        else:
            yield from self._csv()

    def _lines(self, path: Path) -> Iterator[tuple[int, str]]:
        """(line number, decoded line) of a file, checking for binary data and invalid UTF-8 (a leading
        byte-order mark dropped)."""
        with open(self.read_path if path == self.path else path, "rb") as f:
            _check_head(path, f.read(SNIFF_BYTES))
            f.seek(0)
            offset = 0
            for lineno, raw in enumerate(f, 1):
                line = _decode(raw, path, offset, lineno)
                offset += len(raw)
                self.bytes_read += len(raw)
                yield lineno, (line[1:] if lineno == 1 and line.startswith("\ufeff") else line)

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

    def _parquet(self) -> Iterator[str]:
        """The text column of each file, a record batch at a time (memory: one batch and a read buffer);
        null values are skipped. bytes_read grows with the share of rows read."""
        import pyarrow as pa

        for path in self.files:
            pf = parquet_file(path)
            size, rows, done, counted = path.stat().st_size, max(pf.metadata.num_rows, 1), 0, 0
            batches = pf.iter_batches(columns=[self.text_field], batch_size=PARQUET_BATCH_ROWS)
            while True:
                try:
                    batch = next(batches, None)
                except (pa.ArrowException, OSError) as e:
                    raise KilnError(f"{path}: cannot read Parquet data ({str(e).splitlines()[0][:160]})") from None
                if batch is None:
                    break
                texts = batch.column(0).to_pylist()
                done += len(texts)
                self.bytes_read += size * done // rows - counted
                counted = size * done // rows
                for text in texts:
                    if text is not None:
                        yield clean_text(str(text))

    def _csv(self) -> Iterator[str]:
        path, key = self.path, self.text_field
        csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
        delimiter = delimiter_for(path, self.delimiter)
        reader = csv.reader((line for _, line in self._lines(path)), delimiter=delimiter)
        try:
            first = next(reader, None)
            if first is None:
                raise KilnError(f"{path}: file is empty")
            header, first_is_data = column_names(path, first, self.header, self.columns)
            if key not in header:
                raise KilnError(f"{path}: no column {key!r}{did_you_mean(key, header)}; "
                                f"columns: {', '.join(header)} (set data.text_field)"
                                f"{column_hint(header, self.header, self.columns)}")
            col = header.index(key)
            for row in itertools.chain([first] if first_is_data else [], reader):
                if col < len(row):
                    yield clean_text(row[col])
        except csv.Error as e:
            raise KilnError(f"{path}:{reader.line_num}: bad CSV ({e})") from None
