"""Decoding a text file's bytes: UTF-8 by default, a declared or byte-order-marked encoding otherwise, with one-line
errors that name the file, the offset and the line."""

from __future__ import annotations

import codecs
from pathlib import Path

from kiln.errors import KilnError, did_you_mean

SNIFF_BYTES = 8192  # a NUL byte in the first 8 KB means "binary file"


def decode_utf8(data: bytes, path: Path, offset: int = 0, line: int | None = None) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        at = None if line is None else line + data[:e.start].count(b"\n")
        raise not_utf8(path, offset + e.start, data[e.start], at) from None


def not_utf8(path: Path, offset: int, byte: int | None = None, line: int | None = None) -> KilnError:
    what = f"invalid byte 0x{byte:02x}" if byte is not None else "invalid byte"
    where = f"at offset {offset}" + (f", line {line}" if line is not None else "")
    return KilnError(f"{path}: not UTF-8 text ({what} {where}); if it is in another encoding set data.encoding "
                     f"(e.g. latin-1, cp1252, utf-16), or convert it: `iconv -f latin1 -t utf-8 {path.name} > "
                     f"{path.stem}.utf8{path.suffix}`")



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


def is_wide(codec: str) -> bool:
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
    if not data.isascii() and not is_wide(codec):
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            return
        raise garbled(path, encoding)
    if is_wide(codec) and b"\x00" not in data[:SNIFF_BYTES]:
        todo = "leave data.encoding at utf-8" if _valid_utf8(data) else "check data.encoding"
        raise KilnError(f"{path}: data.encoding is {encoding!r}, but the file has no byte-order mark and no NUL "
                        f"bytes, so it is not {encoding}; {todo}")


def garbled(path: Path, encoding: str) -> KilnError:
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
        return decode_utf8(data[bom:], path, bom, line=1)
    check_choice(path, data, codec, encoding, bom)
    if not is_wide(codec) and b"\x00" in data[:SNIFF_BYTES]:
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
