"""Downloading a bundle archive: HTTP(S) with resume, a hard byte cap, a timeout and a
minimum rate, or `file://`; the sha256 and size the signed deploy command pins are checked
as bytes arrive (stdlib only: urllib).

Errors split by what the caller does next (python-tuf's split): `DownloadError` (transport:
retry later, resuming from the partial file) and `BundleError` (the bytes are wrong: never
retry them; the partial file is deleted).
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from agent.errors import BundleError, DownloadError
from agent.trust.bundle import file_entry
from agent.trust.command import ArchiveRef

CHUNK_BYTES = 256 * 1024


@dataclass(frozen=True, kw_only=True)
class FetchLimits:
    timeout_s: float = 30.0
    min_rate_bytes_per_s: float = 16 * 1024  # slow retrieval attack: give up below this
    grace_s: float = 5.0  # the rate is judged only after this long


def fetch(ref: ArchiveRef, dest: Path, limits: FetchLimits = FetchLimits()) -> Path:
    """Download `ref` into `dest`, resuming a partial `dest.part` from an earlier attempt.

    Raises:
        DownloadError: every URL failed in transport; the partial file is kept.
        BundleError: longer than `size_bytes`, or a Content-Length other than it (check
            "size"), or wrong sha256 (check "sha256"); the partial file is removed.
    """
    part = dest.with_name(dest.name + ".part")
    problems = []
    for url in ref.urls:
        try:
            _fetch_one(url, part, ref.size_bytes, limits)
            break
        except DownloadError as exc:
            problems.append(f"{url}: {exc}")
        except BundleError:
            part.unlink(missing_ok=True)
            raise
    else:
        raise DownloadError("; ".join(problems))
    digest = file_entry(part).sha256
    if digest != ref.sha256:
        part.unlink()
        raise BundleError("downloaded archive does not match the sha256 the command pins",
                          check="sha256", declared=ref.sha256, got=digest)
    part.replace(dest)
    return dest


def _fetch_one(url: str, part: Path, size: int, limits: FetchLimits) -> None:
    have = part.stat().st_size if part.exists() else 0
    if have > size:
        part.unlink()
        have = 0
    if have == size:
        return
    if url.startswith("file://"):
        _copy_capped(Path(url[len("file://"):]), part, size)
        return
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        resp = urllib.request.urlopen(req, timeout=limits.timeout_s)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # nothing left to send: the caller checks the hash
            return
        raise DownloadError(f"HTTP {exc.code}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise DownloadError(str(getattr(exc, "reason", exc))) from exc
    with resp:
        resumed = resp.status == 206
        offered = resp.headers.get("Content-Length")
        expected = size - have if resumed else size
        if offered is not None and offered.isdigit() and int(offered) != expected:
            # Not the pinned archive (shorter would otherwise look like a dropped
            # connection, resumed forever): refuse now.
            raise BundleError(f"the server offers {int(offered)} bytes where the command pins "
                              f"{expected}", check="size", declared=size,
                              offered=int(offered) + (have if resumed else 0))
        with part.open("ab" if resumed else "wb") as out:
            _stream(resp, out, (have if resumed else 0), size, limits)
    got = part.stat().st_size
    if got < size:  # the server closed early: a transport problem, resume next time
        raise DownloadError(f"connection closed after {got} of {size} bytes")


def _stream(src: Any, out: IO[bytes], have: int, size: int, limits: FetchLimits) -> None:
    start, got = time.monotonic(), 0
    try:
        # read1: whatever has arrived (up to the chunk), so the rate is judged as bytes
        # trickle in rather than after a whole chunk was awaited.
        while chunk := src.read1(min(CHUNK_BYTES, size - have - got + 1)):
            got += len(chunk)
            if have + got > size:
                raise BundleError(f"download passed the declared {size} bytes", check="size",
                                  declared=size)
            out.write(chunk)
            elapsed = time.monotonic() - start
            if elapsed > limits.grace_s and got / elapsed < limits.min_rate_bytes_per_s:
                raise DownloadError(f"{got / elapsed:.0f} B/s is below the minimum rate "
                                    f"{limits.min_rate_bytes_per_s:.0f} B/s")
    except TimeoutError as exc:
        raise DownloadError("timed out") from exc
    except OSError as exc:
        raise DownloadError(f"connection lost: {exc}") from exc


def _copy_capped(src: Path, part: Path, size: int) -> None:
    try:
        with src.open("rb") as fh, part.open("wb") as out:
            copied = 0
            while chunk := fh.read(min(CHUNK_BYTES, size - copied + 1)):
                copied += len(chunk)
                if copied > size:
                    raise BundleError(f"file passed the declared {size} bytes", check="size",
                                      declared=size)
                out.write(chunk)
    except FileNotFoundError as exc:
        raise DownloadError(f"{src} does not exist") from exc

