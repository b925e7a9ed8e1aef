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
import re
import unicodedata
from pathlib import Path
from typing import Iterator

from kiln.errors import KilnError, did_you_mean
from kiln.data.encodings import SNIFF_BYTES, decode_utf8, not_utf8, codec_of, is_wide, resolve_encoding, check_choice, garbled, decode_bytes
from kiln.data.columns import delimiter_for, column_names, column_hint, check_head, parquet_file, parquet_text_column, json_object

EMBEDDED = {"kiln:tinyshakespeare": Path(__file__).resolve().parent.parent / "assets" / "tinyshakespeare.txt"}
CHUNK_BYTES = 1 << 20          # plain text files are read ~1 MB of whole lines at a time
PARQUET_BATCH_ROWS = 1024      # rows per record batch read from a .parquet file
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # Unicode Cc minus \t and \n


def clean_text(s: str) -> str:
    """NFC, \\r\\n -> \\n, control characters removed (except \\n and \\t), leading BOM dropped."""
    if "\r" in s:
        s = s.replace("\r\n", "\n")
    s = _CONTROL.sub("", s)
    if not unicodedata.is_normalized("NFC", s):
        s = unicodedata.normalize("NFC", s)
    return s.lstrip("\ufeff") if s.startswith("\ufeff") else s


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
        if is_wide(codec):
            check_choice(path, head, codec, encoding, bom)
        else:
            check_head(path, head)
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
        if valid_utf8 and not ascii_only and not bom and not is_wide(codec):
            raise garbled(path, encoding)
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
            check_head(path, f.read(SNIFF_BYTES))
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
                        raise not_utf8(path, offset - len(decoder.getstate()[0]) + e.start) from None
                    offset += len(piece)
                    self.bytes_read += len(piece)
                    text = clean_text(text)
                    if text:
                        yield part, text
            try:
                decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                raise not_utf8(path, offset - len(decoder.getstate()[0])) from None

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
            check_head(path, f.read(SNIFF_BYTES))
            f.seek(0)
            offset = 0
            for lineno, raw in enumerate(f, 1):
                line = decode_utf8(raw, path, offset, lineno)
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
