"""A bounded reader of the tar streams bundles travel in, used instead of `tarfile`.

Python's `tarfile` parses pax and GNU extension headers before its caller sees a member,
with no size limit and in time quadratic in a pax record's length: a 33 KB archive took a
process to 2 GiB and a 127-byte one stalled the daemon for 14 s. This reader is what a
bundle archive needs and nothing more, under hard limits, in one pass, in time and memory
linear in the input:

* 512-byte ustar headers with their checksum verified; sizes in octal or base-256;
* regular files only (type `0` or NUL); a pax extended header (`x`) for the next member
  (keys `path` and `size` are used, the others ignored) or a global one (`g`, ignored),
  each at most `MAX_EXTENSION_BYTES`; GNU long names (`L`) at most `MAX_NAME_BYTES`;
  anything else (links, directories, devices, GNU sparse files...) is refused;
* at most `MAX_HEADERS` headers of any kind, and at most `max_total_bytes` read from the
  decompressed stream in all;
* member data is read through `Member.read`, which never returns more than the member's
  size; what the caller does not read is skipped when the next member is asked for.

Every refusal is a `BundleError` with check "archive".
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from agent.errors import BundleError

BLOCK = 512
MAX_EXTENSION_BYTES = 8 * 1024
MAX_NAME_BYTES = 1024
MAX_HEADERS = 4096
MAX_NUMBER_DIGITS = 20
REGULAR = (b"0", b"\x00")


def _refuse(message: str, **details: Any) -> BundleError:
    return BundleError(f"archive refused: {message}", check="archive", **details)


def _octal(field: bytes, what: str) -> int:
    """A tar number: NUL/space-terminated octal, or base-256 (high bit set)."""
    if field and field[0] & 0x80:
        if field[0] != 0x80:  # negative, or more than fits
            raise _refuse(f"{what} is out of range")
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\x00", 1)[0].strip(b" ")
    if not text:
        return 0
    if len(text) > MAX_NUMBER_DIGITS or not all(48 <= c <= 55 for c in text):
        raise _refuse(f"{what} is not an octal number")
    return int(text, 8)


def _checksum_ok(header: bytes) -> bool:
    stored = _octal(header[148:156], "checksum")
    unsigned = sum(header[:148]) + 8 * 32 + sum(header[156:])
    return stored == unsigned


def _pax(data: bytes) -> dict[str, str]:
    """Records `LEN KEY=VALUE\\n`; linear: each record is sliced by its length."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos, pos + MAX_NUMBER_DIGITS + 1)
        if space < 0 or not data[pos:space].isdigit():
            raise _refuse("malformed pax record")
        length = int(data[pos:space])
        end = pos + length
        if length <= space - pos + 2 or end > len(data) or data[end - 1:end] != b"\n":
            raise _refuse("malformed pax record length")
        key, eq, value = data[space + 1:end - 1].partition(b"=")
        if not eq:
            raise _refuse("pax record without '='")
        try:
            out[key.decode("utf-8")] = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _refuse("pax record is not UTF-8") from exc
        pos = end
    return out


@dataclass
class Member:
    """A regular file in the stream; `read` returns at most `size` bytes in all."""

    name: str
    size: int
    _reader: TarReader = field(repr=False)
    _left: int = field(init=False)

    def __post_init__(self) -> None:
        self._left = self.size

    def read(self, n: int = -1) -> bytes:
        if n < 0 or n > self._left:
            n = self._left
        data = self._reader._take(n) if n else b""
        self._left -= len(data)
        return data


class TarReader:
    def __init__(self, stream: IO[bytes], *, max_total_bytes: int) -> None:
        self._stream, self.max_total = stream, max_total_bytes
        self.total = 0
        self.headers = 0
        self._current: Member | None = None

    def _take(self, n: int) -> bytes:
        """Exactly `n` bytes of the stream (fewer only at its end)."""
        if self.total + n > self.max_total:
            raise _refuse(f"more than {self.max_total} bytes once decompressed",
                          max_bytes=self.max_total)
        parts, want = [], n
        while want:
            chunk = self._stream.read(want)
            if not chunk:
                break
            parts.append(chunk)
            want -= len(chunk)
        data = b"".join(parts)
        self.total += len(data)
        return data

    def _block(self) -> bytes:
        block = self._take(BLOCK)
        if len(block) != BLOCK:
            raise _refuse("truncated (a header block is cut short)")
        return block

    def _skip(self, n: int) -> None:
        while n:
            step = min(n, 1 << 20)
            if len(self._take(step)) != step:
                raise _refuse("truncated (member data is cut short)")
            n -= step

    def _finish_current(self) -> None:
        m = self._current
        if m is not None:
            self._skip(m._left + (-m.size % BLOCK))
            self._current = None

    def _extension(self, size: int, cap: int, what: str) -> bytes:
        if size > cap:
            raise _refuse(f"{what} of {size} bytes (at most {cap})", size_bytes=size)
        data = self._take(size)
        if len(data) != size:
            raise _refuse("truncated (an extension header is cut short)")
        self._skip(-size % BLOCK)
        return data

    def __iter__(self) -> Iterator[Member]:
        return self

    def __next__(self) -> Member:
        self._finish_current()
        pax: dict[str, str] = {}
        long_name: str | None = None
        while True:
            self.headers += 1
            if self.headers > MAX_HEADERS:
                raise _refuse(f"more than {MAX_HEADERS} headers")
            header = self._block()
            if header == bytes(BLOCK):
                raise StopIteration  # end of archive (the second zero block is not needed)
            if not _checksum_ok(header):
                raise _refuse("header checksum mismatch")
            kind = header[156:157]
            size = _octal(header[124:136], "size")
            if kind == b"x":
                pax = _pax(self._extension(size, MAX_EXTENSION_BYTES, "pax header"))
                continue
            if kind == b"g":
                self._extension(size, MAX_EXTENSION_BYTES, "global pax header")
                continue
            if kind == b"L":
                raw = self._extension(size, MAX_NAME_BYTES, "GNU long name")
                long_name = raw.split(b"\x00", 1)[0].decode("utf-8", "replace")
                continue
            break
        name = self._name(header, pax, long_name)
        if kind not in REGULAR:
            raise _refuse(f"member {name[:200]} is not a regular file", path=name[:200])
        if "size" in pax:
            text = pax["size"]
            if not text.isdigit() or len(text) > MAX_NUMBER_DIGITS:
                raise _refuse("pax size is not a number")
            size = int(text)
        self._current = Member(name, size, self)
        return self._current

    @staticmethod
    def _name(header: bytes, pax: dict[str, str], long_name: str | None) -> str:
        if "path" in pax:
            name = pax["path"]
        elif long_name is not None:
            name = long_name
        else:
            base = header[0:100].split(b"\x00", 1)[0]
            prefix = header[345:500].split(b"\x00", 1)[0] if header[257:262] == b"ustar" else b""
            raw = prefix + b"/" + base if prefix else base
            try:
                name = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _refuse("a member name is not UTF-8") from exc
        if len(name.encode()) > MAX_NAME_BYTES:
            raise _refuse("a member name is too long")
        return name
