"""Open dataset text files (json, jsonl, csv, txt) in the encoding they are written in, or say how to convert them.

UTF-8 (with or without a byte-order mark), UTF-16 and UTF-32 with a byte-order mark are read as they are. Any
other file that is not valid UTF-8 (GBK/GB18030 from Chinese Windows tools, Big5, Shift_JIS, Windows-1252...)
stops with one :class:`DataError` naming the file, the line and byte where decoding failed, the encoding the
bytes look like, and the `iconv` command that converts the file.
"""

from __future__ import annotations

import codecs
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, TextIO

from ..errors import DataError

# Longest BOMs first: the UTF-32-LE BOM starts with the UTF-16-LE one.
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"),
)

# (Python codec, name shown to the user, iconv name, Unicode ranges of its script, characters frequent in any text
# of that language). Tried in this order; the first that decodes the sample strictly into its own script, with
# some of the frequent characters, wins: GBK bytes also decode as EUC-KR or Big5, but into rare characters. This
# is only a guess for the error message (a file is never read in a guessed encoding), so a short list of the
# encodings our users meet is enough and needs no detector library.
_CJK = ((0x4E00, 0x9FFF), (0x3000, 0x303F), (0xFF00, 0xFFEF))
_CANDIDATES = (
    ("gb18030", "GBK/GB18030 (Simplified Chinese)", "GB18030", _CJK, "的一是不了人我在有这中大来上个们到说为和你地出"),
    ("big5", "Big5 (Traditional Chinese)", "BIG5", _CJK, "的一是不了人我在有這中大來上個們到說為和你地出"),
    ("shift_jis", "Shift_JIS (Japanese)", "SHIFT_JIS", ((0x3040, 0x30FF),) + _CJK, "のにはをたがでてしとなす"),
    ("euc_kr", "EUC-KR (Korean)", "EUC-KR", ((0xAC00, 0xD7AF), (0x3130, 0x318F)), "이다는의에가을를하고"),
)
_SAMPLE_BYTES = 1 << 16


def file_encoding(path: str | Path) -> str:
    """The codec to read ``path`` with: from its byte-order mark, else ``utf-8-sig`` (plain UTF-8 also reads)."""
    with open(path, "rb") as fh:
        head = fh.read(4)
    for bom, codec in _BOMS:
        if head.startswith(bom):
            return codec
    return "utf-8-sig"


@contextmanager
def open_text(path: str | Path, *, dataset: str | None = None, newline: str | None = None) -> Iterator[TextIO]:
    """``open(path)`` for reading in the file's own encoding; a decoding error becomes a :class:`DataError`."""
    encoding = file_encoding(path)
    try:
        with open(path, encoding=encoding, newline=newline) as fh:
            yield fh
    except UnicodeDecodeError as err:
        raise decode_error(path, err, encoding, dataset=dataset) from None


def read_text(path: str | Path, *, dataset: str | None = None) -> str:
    """The whole text of ``path`` (see :func:`open_text`)."""
    with open_text(path, dataset=dataset) as fh:
        return fh.read()


def decode_error(path: str | Path, err: UnicodeDecodeError, encoding: str, *, dataset: str | None = None) -> DataError:
    """The error for a file that does not decode: where, what it looks like, and the iconv fix."""
    path = Path(path)
    who = f"dataset {dataset!r}: " if dataset else ""
    if encoding in ("utf-16", "utf-32"):  # a BOM said UTF-16/32, yet the bytes break it: no guess to make
        return DataError(f"{who}{path} starts with a {encoding.upper()} byte-order mark but is not valid "
                         f"{encoding.upper()} ({err.reason})",
                         hint=f"re-save it as UTF-8, e.g. `iconv -f {encoding.upper()} -t UTF-8 {path} > "
                              f"{_utf8_name(path)}`")
    line, column, offset, byte = first_bad_byte(path)
    guess = guess_encoding(path)
    looks = f"it looks like {guess[1]}" if guess else "its encoding is not one loraforge recognises"
    source = guess[2] if guess else "YOUR_ENCODING"
    return DataError(
        f"{who}{path} is not UTF-8: line {line}, byte {column} (offset {offset}, 0x{byte:02x}) does not decode; "
        f"{looks}",
        hint=f"convert it to UTF-8, e.g. `iconv -f {source} -t UTF-8 {path} > {_utf8_name(path)}`, and "
             + ("point `file_name` in dataset_info.json at the new file" if dataset else "use the new file")
             + " (UTF-8 with a BOM and UTF-16 with a BOM are read as they are)")


def first_bad_byte(path: str | Path) -> tuple[int, int, int, int]:
    """(line, byte within the line, both 1-based; offset in the file, 0-based; the byte) of the first byte that is
    not UTF-8. Decoded line by line: a newline byte never occurs inside a UTF-8 multi-byte sequence."""
    offset = 0
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, 1):
            chunk = raw[3:] if number == 1 and raw.startswith(codecs.BOM_UTF8) else raw
            skipped = len(raw) - len(chunk)
            try:
                chunk.decode("utf-8")
            except UnicodeDecodeError as err:
                column = skipped + err.start
                return number, column + 1, offset + column, raw[column]
            offset += len(raw)
    return 1, 1, 0, 0  # not reached for a file that failed to decode


def guess_encoding(path: str | Path) -> tuple[str, str, str] | None:
    """(codec, name for people, iconv name) of the encoding the file's first bytes look like, or None."""
    with open(path, "rb") as fh:
        sample = fh.read(_SAMPLE_BYTES)
    if len(sample) == _SAMPLE_BYTES and b"\n" in sample:
        sample = sample[: sample.rindex(b"\n") + 1]  # do not cut a multi-byte character in two
    utf16 = _utf16_without_bom(sample)
    if utf16:
        return utf16
    non_ascii = [b for b in sample if b >= 0x80]
    if not non_ascii:
        return None
    in_script = []
    for codec, label, iconv, ranges, frequent in _CANDIDATES:
        try:
            text = sample.decode(codec)
        except UnicodeDecodeError:
            continue
        wide = [c for c in text if ord(c) >= 0x80]
        native = sum(1 for c in wide if any(lo <= ord(c) <= hi for lo, hi in ranges))
        if wide and native >= 0.8 * len(wide):
            if sum(1 for c in wide if c in frequent) >= max(1, len(wide) // 50):
                return codec, label, iconv
            in_script.append((codec, label, iconv))
    if in_script:  # a short text without any frequent character: the first in the list's order
        return in_script[0]
    try:
        sample.decode("cp1252")
    except UnicodeDecodeError:
        return "latin-1", "Latin-1 (ISO-8859-1)", "LATIN1"
    return "cp1252", "Windows-1252 (Western European)", "WINDOWS-1252"


def _utf16_without_bom(sample: bytes) -> tuple[str, str, str] | None:
    """Mostly-ASCII text in UTF-16 has a zero in every other byte; which half says the byte order."""
    pairs = len(sample) // 2
    if pairs < 2:
        return None
    even = sum(1 for i in range(0, 2 * pairs, 2) if sample[i] == 0)
    odd = sum(1 for i in range(1, 2 * pairs, 2) if sample[i] == 0)
    if odd > 0.3 * pairs and even < 0.05 * pairs:
        return "utf-16-le", "UTF-16 little-endian without a byte-order mark", "UTF-16LE"
    if even > 0.3 * pairs and odd < 0.05 * pairs:
        return "utf-16-be", "UTF-16 big-endian without a byte-order mark", "UTF-16BE"
    return None


def _utf8_name(path: Path) -> str:
    return str(path.with_name(f"{path.stem}.utf8{path.suffix}"))

