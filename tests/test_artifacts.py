"""`edge-fleet serve-artifacts`: byte ranges for resumed downloads, nothing outside its
directory, and the agent's downloader resuming against it."""

from __future__ import annotations

import hashlib
import http.client
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from polling import wait_until

from agent.trust.command import ArchiveRef
from agent.updates.fetch import fetch
from fleet.trust.artifacts import ArtifactHandler, serve_in_thread

DATA = bytes(range(256)) * 2000


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "artifacts"
    root.mkdir()
    (root / "a.tar.zst").write_bytes(DATA)
    (root / ".hidden").write_text("a dot file: not for devices")
    (root / "sub").mkdir()
    (root / "sub" / "a").write_text("below the directory: not served")
    (tmp_path / "secret").write_text("not for devices")
    (root / "link").symlink_to(tmp_path / "secret")
    (tmp_path / "elsewhere").mkdir()  # roots/ as a link out of the directory
    (tmp_path / "elsewhere" / "1.root.json").write_text("not for devices")
    (root / "roots").symlink_to(tmp_path / "elsewhere")
    server, url = serve_in_thread(root)
    yield url, root
    server.shutdown()


def get(url: str, path: str, headers: dict[str, str] | None = None
        ) -> tuple[int, dict[str, str], bytes]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    conn.request("GET", path, headers=headers or {})
    r = conn.getresponse()
    out = r.status, dict(r.getheaders()), r.read()
    conn.close()
    return out


def test_ranges(served: tuple[str, Path]) -> None:
    url, _ = served
    assert get(url, "/a.tar.zst")[2] == DATA
    status, headers, body = get(url, "/a.tar.zst", {"Range": "bytes=1000-1999"})
    assert (status, body, headers["Content-Range"]) == (206, DATA[1000:2000],
                                                        f"bytes 1000-1999/{len(DATA)}")
    assert get(url, "/a.tar.zst", {"Range": "bytes=500000-"})[2] == DATA[500000:]
    assert get(url, "/a.tar.zst", {"Range": f"bytes={len(DATA)}-"})[0] == 416


@pytest.mark.parametrize("path", ["/../secret", "/link", "/", "/.hidden", "/sub/a", "/sub",
                                  "/%2e%2e/secret", "/%2e%2e%2fsecret", "/roots/../../secret",
                                  "//etc/passwd", "/roots/1.root.json", "/a.tar.zst%00.txt"])
def test_nothing_outside_the_directory(served: tuple[str, Path], path: str) -> None:
    url, root = served
    assert (root / "a.tar.zst").is_file() and get(url, "/a.tar.zst")[0] == 200
    assert get(url, path)[0] == 404


def test_the_agent_resumes_a_partial_download(served: tuple[str, Path],
                                              tmp_path: Path) -> None:
    _, root = served
    asked: list[str | None] = []

    class Recording(ArtifactHandler):  # the real handler; it only notes what was asked
        def do_GET(self) -> None:
            asked.append(self.headers.get("Range"))
            super().do_GET()

    Recording.root = root.resolve()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recording)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    dest = tmp_path / "got.tar.zst"
    (tmp_path / "got.tar.zst.part").write_bytes(DATA[:123_456])
    ref = ArchiveRef(urls=[f"http://127.0.0.1:{server.server_address[1]}/a.tar.zst"],
                     size_bytes=len(DATA), sha256=hashlib.sha256(DATA).hexdigest())
    try:
        assert fetch(ref, dest).read_bytes() == DATA
    finally:
        server.shutdown()
    assert asked == ["bytes=123456-"]  # only the missing bytes: the partial file was kept


def test_slow_clients_are_cut_off_and_bounded(tmp_path: Path) -> None:
    """Connections that send half a request line hold a thread each: they are closed after
    the server's timeout, at most `max_connections` are served at once (one more: 503),
    and a device's download is served once they are gone."""
    import socket
    import threading
    import time

    from fleet.trust.artifacts import make_server

    (tmp_path / "a.tar.zst").write_bytes(DATA)
    server = make_server(tmp_path, timeout_s=1.0, max_connections=4)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        slow = []
        for _ in range(4):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(b"GET /a.tar")  # and nothing more
            slow.append(s)
        wait_until(lambda: server.connections == 4,  # type: ignore[attr-defined]
                   what="four slow connections held")
        extra = socket.create_connection(("127.0.0.1", port), timeout=10)
        assert extra.recv(64).startswith(b"HTTP/1.1 503")
        extra.close()
        t0 = time.monotonic()
        for s in slow:
            assert s.recv(64) == b""  # closed by the server, no answer
            s.close()
        assert time.monotonic() - t0 < 5  # at the 1-s timeout, not held for ever
        assert get(f"http://127.0.0.1:{port}", "/a.tar.zst")[2] == DATA
    finally:
        server.shutdown()
