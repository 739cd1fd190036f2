"""Tar header bombs are refused before any signature check, in bounded memory, by the
reader the daemon and every `edge-fleet` command share (`agent.trust.tar`)."""

from __future__ import annotations

import gzip
import io
import subprocess
import sys
from pathlib import Path

import pytest

from agent.errors import BundleError
from agent.trust.archive import read_archive_head
from agent.trust.tar import MAX_HEADERS, TarReader


def header(name: bytes, size: int, kind: bytes = b"0") -> bytes:
    h = bytearray(512)
    h[0:len(name)] = name[:100]
    h[100:108] = b"0000644\x00"
    h[108:116] = h[116:124] = b"0000000\x00"
    h[124:136] = f"{size:011o}\x00".encode()
    h[136:148] = b"00000000000\x00"
    h[156:157] = kind
    h[257:263] = b"ustar\x00"
    h[263:265] = b"00"
    h[148:156] = b" " * 8
    h[148:156] = f"{sum(h):06o}\x00 ".encode()
    return bytes(h)


def member(name: bytes, data: bytes, kind: bytes = b"0") -> bytes:
    return header(name, len(data), kind) + data + bytes(-len(data) % 512)


def archive(tmp: Path, body: bytes, name: str = "a.tar.gz") -> Path:
    path = tmp / name
    path.write_bytes(gzip.compress(body + bytes(1024), compresslevel=9))
    return path


BOMBS = {
    # GNU long name: 64 MiB of name before the member it names
    "gnu_long_name": lambda: member(b"././@LongLink", b"a" * (64 << 20), b"L"),
    # a pax header of 16 MiB of records
    "pax_huge": lambda: member(b"pax", b"".join(
        f"{len(r) + 8} path={r}\n".encode() for r in ["x" * 100] * 150_000), b"x"),
    # one pax record whose length is 120,000 digits (quadratic in tarfile)
    "pax_digits": lambda: member(b"pax", b"9" * 120_000 + b" path=x\n", b"x"),
    # many empty global headers
    "header_count": lambda: b"".join(member(b"g", b"", b"g")
                                     for _ in range(MAX_HEADERS + 10)),
    # a link, a directory
    "symlink": lambda: header(b"manifest.json", 0, b"2"),
    "directory": lambda: header(b"manifest.json", 0, b"5"),
    # a manifest bigger than any manifest may be
    "big_manifest": lambda: member(b"manifest.json", b" " * (5 << 20)),
    # a header whose checksum is wrong
    "checksum": lambda: header(b"manifest.json", 10)[:148] + b"0000000\x00"
    + header(b"manifest.json", 10)[156:],
}


@pytest.mark.parametrize("bomb", sorted(BOMBS))
def test_a_tar_header_bomb_is_refused_before_anything_is_verified(
        bomb: str, tmp_path: Path) -> None:
    path = archive(tmp_path, BOMBS[bomb]())
    assert path.stat().st_size < 400_000  # small on the wire, whatever it expands to
    with pytest.raises(BundleError) as exc:
        read_archive_head(path)
    assert exc.value.check == "archive", exc.value


def test_the_reader_never_reads_past_its_cap() -> None:
    body = member(b"manifest.json", b"{}") + member(b"model.onnx", b"x" * 100_000)
    reader = TarReader(io.BytesIO(body + bytes(1024)), max_total_bytes=10_000)
    first = next(reader)
    assert (first.name, first.read()) == ("manifest.json", b"{}")
    with pytest.raises(BundleError, match="more than 10000 bytes"):
        next(reader).read()
    assert reader.total <= 10_000


def test_edge_fleet_verify_of_a_bomb_is_a_rejection_in_bounded_memory(
        tmp_path: Path, releases: dict[str, Path]) -> None:
    path = archive(tmp_path, BOMBS["gnu_long_name"]())
    # `edge-fleet verify` in a process of its own, which reports its own peak RSS (VmHWM:
    # ru_maxrss would count the forking pytest process, over 1 GiB with torch loaded).
    script = ("import re, sys\nfrom fleet.cli import main\nrc = main(sys.argv[1:])\n"
              "print(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1])\n"
              "sys.exit(rc)")
    p = subprocess.run([sys.executable, "-c", script, "verify", str(path), "--root",
                        str(releases["keys"] / "root.json")], capture_output=True, text=True,
                       timeout=120, check=False)
    assert p.returncode == 3 and "rejected (archive)" in p.stderr, p.stderr
    peak_mib = int(p.stdout.split()[-1]) / 1024
    # The 64 MiB name is never held (tarfile took 2 GiB on a 33 KB archive).
    assert peak_mib < 150, peak_mib


def test_the_daemon_refuses_a_pax_bomb_and_keeps_serving(
        tmp_path: Path, releases: dict[str, Path]) -> None:
    from fixture_agent import AgentProcess, write_config

    agent = AgentProcess(write_config(tmp_path, releases["keys"],
                                      profile="x86_64-generic")).start()
    try:
        assert agent.install(releases["onnx1"])[0] == 200
        status, body = agent.install(archive(tmp_path, BOMBS["pax_digits"]()))
        assert status == 422 and body["check"] == "archive", (status, body)
        assert agent.call("GET", "/v2/health/live")[0] == 200
        assert agent.call("GET", "/v1/admin/status")[1]["models"]["digits"]["version"] == 1
    finally:
        agent.stop()
