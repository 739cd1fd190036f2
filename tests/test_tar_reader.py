"""The bounded tar reader (`agent.trust.tar`) at each of its edges, with archives made by
hand byte by byte: numbers in every spelling the format allows, the ustar prefix, names and
extension headers at their caps and one byte past, every kind of truncation, the header
count and the total at their limits, and `Member.read` at zero, part and all. The mutation
run (`bench/mutation.py`) found each of these unguarded."""

from __future__ import annotations

import io
import tarfile

import pytest

from agent.errors import BundleError
from agent.trust.tar import (
    MAX_HEADERS,
    MAX_NAME_BYTES,
    MAX_NUMBER_DIGITS,
    TarReader,
    _octal,
    _pax,
)

END = bytes(1024)


def header(name: bytes = b"m.bin", size: int | bytes = 0, kind: bytes = b"0", *,
           prefix: bytes = b"", checksum: str = "padded") -> bytes:
    """One ustar header; `size` an int (written as 11 octal digits) or the raw field;
    `checksum` "padded" (`%06o\\0 `, as tarfile writes it), "bare" (no leading zeros,
    NUL-terminated) or "spaces" (no leading zeros, space-filled, no NUL)."""
    h = bytearray(512)
    h[0:len(name)] = name
    h[100:108] = b"0000644\x00"
    h[124:136] = b"%011o\x00" % size if isinstance(size, int) else size.ljust(12, b"\x00")
    h[156:157] = kind
    h[257:263] = b"ustar\x00"
    h[263:265] = b"00"
    h[345:345 + len(prefix)] = prefix
    h[148:156] = b" " * 8
    total = sum(h)
    h[148:156] = {"padded": b"%06o\x00 " % total, "bare": (b"%o\x00" % total).ljust(8, b" "),
                  "spaces": (b"%o" % total).ljust(8, b" ")}[checksum]
    return bytes(h)


def data(payload: bytes) -> bytes:
    return payload + bytes(-len(payload) % 512)


def member(name: bytes, payload: bytes, **kw: object) -> bytes:
    return header(name, len(payload), **kw) + data(payload)  # type: ignore[arg-type]


def read(raw: bytes, max_total: int = 1 << 24) -> dict[str, bytes]:
    return {m.name: m.read() for m in TarReader(io.BytesIO(raw), max_total_bytes=max_total)}


def refused(raw: bytes, message: str, max_total: int = 1 << 24) -> BundleError:
    with pytest.raises(BundleError, match=message) as exc:
        read(raw, max_total)
    assert exc.value.check == "archive"
    return exc.value


# -- numbers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "value"), [
    (b"00000000012\x00", 10), (b"12\x00", 10), (b"  12 \x00", 10), (b"7", 7), (b"0", 0),
    (b"", 0), (b"\x00" * 12, 0), (b"   \x00", 0), (b"1" * MAX_NUMBER_DIGITS, int("1" * 20, 8)),
    (b"\x80" + (300).to_bytes(11, "big"), 300),
])
def test_numbers_in_every_spelling_the_format_allows(field: bytes, value: int) -> None:
    assert _octal(field, "size") == value


@pytest.mark.parametrize("field", [b"8", b"19", b"0x10", b"1 2", b"-1",
                                   b"1" * (MAX_NUMBER_DIGITS + 1), b"\x81\x00", b"\xff\x00"])
def test_what_is_not_an_octal_number_is_refused(field: bytes) -> None:
    with pytest.raises(BundleError, match=r"size is (not an octal number|out of range)"):
        _octal(field, "size")


def test_a_size_field_without_leading_zeros_or_empty_is_read() -> None:
    """'1750' (1000) starts with a digit whose low bit is set: not base-256; an empty size
    is a member of no bytes."""
    payload = b"x" * 1000
    raw = header(b"a.bin", b"1750\x00") + data(payload) + header(b"e.bin", b"") + END
    assert read(raw) == {"a.bin": payload, "e.bin": b""}


@pytest.mark.parametrize("checksum", ["padded", "bare", "spaces"])
def test_the_checksum_in_each_spelling_is_verified(checksum: str) -> None:
    raw = member(b"c.bin", b"abc", checksum=checksum) + END
    assert read(raw) == {"c.bin": b"abc"}
    broken = bytearray(raw)
    broken[0] ^= 1  # the name changes, the stored checksum does not
    refused(bytes(broken), "header checksum mismatch")


# -- names -----------------------------------------------------------------------------------


def test_a_ustar_prefix_joins_the_name_and_a_hundred_byte_name_needs_no_nul() -> None:
    hundred = b"n" * 100
    raw = (member(b"base.bin", b"P", prefix=b"some/dir") + member(hundred, b"H") + END)
    assert read(raw) == {"some/dir/base.bin": b"P", hundred.decode(): b"H"}
    # as tarfile writes a 150-character path in the ustar format
    path = "d" * 80 + "/" + "f" * 69
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as t:
        info = tarfile.TarInfo(path)
        info.size = 2
        t.addfile(info, io.BytesIO(b"ok"))
    assert out.getvalue()[345:425] == b"d" * 80  # it did use the prefix
    assert read(out.getvalue()) == {path: b"ok"}


def test_the_prefix_counts_only_in_a_ustar_header() -> None:
    h = bytearray(member(b"base.bin", b"P", prefix=b"ignored"))
    h[257:263] = b"\x00" * 6  # an old (v7) header: bytes 345.. are not a prefix
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\x00 " % sum(h[:512])
    assert read(bytes(h) + END) == {"base.bin": b"P"}


def test_the_limits_are_these() -> None:
    """The tests below read the limits from the module: pinned here, so a changed limit
    is a failing test and not a test that follows it."""
    assert (MAX_NAME_BYTES, MAX_HEADERS, MAX_NUMBER_DIGITS) == (1024, 4096, 20)


def test_a_name_of_the_cap_is_taken_and_one_byte_more_refused() -> None:
    def pax_named(name: str) -> bytes:
        record = f" path={name}\n".encode()
        n = len(record) + len(str(len(record)))
        n += len(str(n)) - len(str(len(record)))
        record = str(n).encode() + record
        assert len(record) == n
        return header(b"PaxHeader", len(record), b"x") + data(record) + member(b"m", b"M")

    at_cap = "a" * MAX_NAME_BYTES
    assert read(pax_named(at_cap) + END) == {at_cap: b"M"}
    refused(pax_named(at_cap + "b") + END, "a member name is too long")


def test_a_name_that_is_not_utf8_is_refused() -> None:
    refused(member(b"bad\xff\xfe.bin", b"x") + END, "a member name is not UTF-8")


def test_a_link_is_refused_naming_the_first_200_characters_of_its_name() -> None:
    long = "l" * 300
    record = b"%d path=%s\n" % (len(long) + 10, long.encode())
    raw = header(b"PaxHeader", len(record), b"x") + data(record) + header(b"x", 0, b"2") + END
    err = refused(raw, "is not a regular file")
    assert err.path == "l" * 200 and f"member {'l' * 200} is" in str(err)


# -- pax -------------------------------------------------------------------------------------


def test_pax_lengths_of_up_to_20_digits_and_the_shortest_record() -> None:
    body = b" path=p.bin\n"
    n = len(body) + MAX_NUMBER_DIGITS
    assert _pax(b"%020d" % n + body) == {"path": "p.bin"}
    with pytest.raises(BundleError, match="malformed pax record"):
        _pax(b"%021d" % (n + 1) + body)
    assert _pax(b"4 =\n") == {"": ""}  # the shortest record there is: an empty key


def test_a_pax_size_of_up_to_20_digits_is_taken() -> None:
    def pax_sized(digits: int) -> bytes:
        text = b"7".rjust(digits, b"0")
        record = b"%d size=%s\n" % (len(text) + 9, text)
        assert len(record) == len(text) + 9
        return (header(b"PaxHeader", len(record), b"x") + data(record) + header(b"s.bin", 0)
                + data(b"seven!!") + END)

    assert read(pax_sized(MAX_NUMBER_DIGITS)) == {"s.bin": b"seven!!"}
    refused(pax_sized(MAX_NUMBER_DIGITS + 1), "pax size is not a number")


# -- truncation, counts and totals -----------------------------------------------------------


@pytest.mark.parametrize(("raw", "message"), [
    (header()[:300], r"truncated \(a header block is cut short\)"),
    (header(b"d.bin", 1000) + b"x" * 600, r"truncated \(member data is cut short\)"),
    (header(b"PaxHeader", 100, b"x") + b"20 path=abc.bin.xyz\n",
     r"truncated \(an extension header is cut short\)"),
])
def test_every_truncation_is_refused_by_name(raw: bytes, message: str) -> None:
    refused(raw, message)


def test_at_most_max_headers_headers() -> None:
    """Global pax headers of no bytes count as headers, and so does the end-of-archive
    block: 4,094 of them, the member and the end make 4,096, read; one more is refused."""
    at_cap = header(b"g", 0, b"g") * (MAX_HEADERS - 2) + member(b"m.bin", b"M") + END
    assert read(at_cap) == {"m.bin": b"M"}
    over = header(b"g", 0, b"g") * (MAX_HEADERS - 1) + member(b"m.bin", b"M") + END
    refused(over, f"more than {MAX_HEADERS} headers")


def test_the_total_is_counted_from_the_first_byte_to_the_last() -> None:
    raw = member(b"t.bin", b"T" * 100) + bytes(512)  # 1,536 bytes read to the end marker
    assert read(raw, max_total=1536) == {"t.bin": b"T" * 100}
    refused(raw, "more than 1535 bytes once decompressed", max_total=1535)


def test_member_read_at_zero_part_and_all() -> None:
    raw = member(b"r.bin", b"0123456789") + member(b"s.bin", b"rest") + END
    reader = iter(TarReader(io.BytesIO(raw), max_total_bytes=1 << 20))
    m = next(reader)
    assert m.read(0) == b""
    assert m.read(3) == b"012"
    assert m.read() == b"3456789"
    assert m.read() == b"" and m.read(5) == b""
    s = next(reader)
    assert s.read(100) == b"rest"  # never past its size
    with pytest.raises(StopIteration):
        next(reader)
