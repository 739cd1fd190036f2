"""`edge-fleet serve-artifacts`: byte ranges for resumed downloads, nothing outside its
directory, and the agent's downloader resuming against it."""

from __future__ import annotations

import hashlib
import http.client
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.trust.command import ArchiveRef
from agent.updates.fetch import fetch
from fleet.artifacts import serve_in_thread

DATA = bytes(range(256)) * 2000


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "artifacts"
    root.mkdir()
    (root / "a.tar.zst").write_bytes(DATA)
    (tmp_path / "secret").write_text("not for devices")
    (root / "link").symlink_to(tmp_path / "secret")
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


@pytest.mark.parametrize("path", ["/../secret", "/link", "/", "/.hidden", "/sub/a"])
def test_nothing_outside_the_directory(served: tuple[str, Path], path: str) -> None:
    assert get(served[0], path)[0] == 404


def test_the_agent_resumes_a_partial_download(served: tuple[str, Path],
                                              tmp_path: Path) -> None:
    url, _ = served
    dest = tmp_path / "got.tar.zst"
    (tmp_path / "got.tar.zst.part").write_bytes(DATA[:123_456])
    ref = ArchiveRef(urls=[f"{url}/a.tar.zst"], size_bytes=len(DATA),
                     sha256=hashlib.sha256(DATA).hexdigest())
    assert fetch(ref, dest).read_bytes() == DATA
