"""Downloads against a real local HTTP server: resume with Range after a cut, the byte cap
(endless data), the minimum rate (slow retrieval), the pinned sha256, failover to the next
URL, and file:// URLs."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from agent.errors import BundleError, DownloadError
from agent.trust.command import ArchiveRef
from agent.updates.fetch import FetchLimits, fetch

DATA = bytes(range(256)) * 4096  # 1 MiB


class Handler(http.server.BaseHTTPRequestHandler):
    mode: ClassVar[dict[str, str]] = {}
    ranges: ClassVar[list[str | None]] = []
    stalled: ClassVar[threading.Event] = threading.Event()

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:  # the stdlib's name
        mode = self.mode.get(self.path, "ok")
        rng = self.headers.get("Range")
        self.ranges.append(rng)
        start = int(rng.split("=")[1].rstrip("-")) if rng else 0
        body = DATA + (b"x" * 500_000 if mode == "endless" else b"")
        body = body[:500_000] if mode == "short" else body
        self.send_response(206 if rng else 200)
        if mode != "endless":  # an endless server announces no length: it just keeps going
            self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if mode == "cut" and not rng:
            self.wfile.write(body[:300_000])
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        if mode == "stall":  # headers, a first part, then silence until the client leaves
            with contextlib.suppress(OSError):
                self.wfile.write(body[start:start + 1000])
                self.wfile.flush()
                self.stalled.wait(10)
            return
        if mode == "slow":
            with contextlib.suppress(OSError):  # the client gives up: that is the point
                for i in range(start, len(body), 1000):
                    self.wfile.write(body[i:i + 1000])
                    time.sleep(0.05)
            return
        self.wfile.write(body[start:])


@pytest.fixture
def server() -> Iterator[str]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    Handler.mode, Handler.ranges, Handler.stalled = {}, [], threading.Event()
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def ref(*urls: str, size: int = len(DATA), sha: str | None = None) -> ArchiveRef:
    return ArchiveRef(urls=list(urls), size_bytes=size,
                      sha256=sha or hashlib.sha256(DATA).hexdigest())


def test_a_cut_download_resumes_with_range(server: str, tmp_path: Path) -> None:
    Handler.mode["/a"] = "cut"
    dest = tmp_path / "a.tar.zst"
    with pytest.raises(DownloadError):
        fetch(ref(f"{server}/a"), dest)
    assert (tmp_path / "a.tar.zst.part").stat().st_size == 300_000
    fetch(ref(f"{server}/a"), dest)
    assert dest.read_bytes() == DATA
    assert Handler.ranges == [None, "bytes=300000-"]


def test_endless_data_stops_at_the_cap_and_is_never_retried(server: str,
                                                            tmp_path: Path) -> None:
    Handler.mode["/e"] = "endless"
    with pytest.raises(BundleError) as err:  # a second URL is there to be (not) tried
        fetch(ref(f"{server}/e", f"{server}/e-mirror"), tmp_path / "e")
    assert err.value.check == "size"
    assert not (tmp_path / "e.part").exists()
    assert Handler.ranges == [None]  # one request: not resumed, not tried elsewhere


def test_another_file_of_another_length_is_refused_at_its_headers(server: str,
                                                                 tmp_path: Path) -> None:
    Handler.mode["/short"] = "short"  # e.g. an older release at the pinned URL
    with pytest.raises(BundleError, match="offers 500000 bytes where the command pins") as err:
        fetch(ref(f"{server}/short"), tmp_path / "s")
    assert err.value.check == "size" and not (tmp_path / "s.part").exists()
    assert Handler.ranges == [None]  # refused, not resumed as if the connection had dropped


def test_slow_retrieval_is_abandoned(server: str, tmp_path: Path) -> None:
    Handler.mode["/s"] = "slow"
    limits = FetchLimits(min_rate_bytes_per_s=100_000, grace_s=0.3)
    with pytest.raises(DownloadError, match="minimum rate"):
        fetch(ref(f"{server}/s"), tmp_path / "s", limits)


def test_a_wrong_hash_is_a_rejection(server: str, tmp_path: Path) -> None:
    with pytest.raises(BundleError) as err:
        fetch(ref(f"{server}/x", sha="0" * 64), tmp_path / "x")
    assert err.value.check == "sha256" and not (tmp_path / "x.part").exists()


def test_failover_to_the_next_url_and_file_urls(server: str, tmp_path: Path) -> None:
    fetch(ref("http://127.0.0.1:9/nothing", f"{server}/ok"), tmp_path / "ok")
    src = tmp_path / "src.bin"
    src.write_bytes(DATA)
    assert fetch(ref(f"file://{src}"), tmp_path / "f").read_bytes() == DATA
    with pytest.raises(DownloadError, match=r"127\.0\.0\.1:9"):
        fetch(ref("http://127.0.0.1:9/nothing"), tmp_path / "n")


def test_a_stalled_download_times_out_and_keeps_what_it_got(server: str,
                                                            tmp_path: Path) -> None:
    Handler.mode["/t"] = "stall"
    limits = FetchLimits(timeout_s=0.5, grace_s=60)  # the rate check is out of the way
    t0 = time.monotonic()
    try:
        with pytest.raises(DownloadError, match="timed out"):
            fetch(ref(f"{server}/t"), tmp_path / "t", limits)
    finally:
        Handler.stalled.set()
    assert time.monotonic() - t0 < 5
    assert (tmp_path / "t.part").stat().st_size == 1000  # kept: the next attempt resumes
