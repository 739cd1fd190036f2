"""`edge-fleet serve-artifacts DIR`: an HTTP server for bundle archives, for small fleets
and tests. It answers GET and HEAD with single byte ranges (`Range: bytes=N-` and
`bytes=N-M`), so devices resume interrupted downloads, and it serves only regular files
directly inside DIR, and the root chain `roots/N.root.json` (`edge-fleet root publish
--artifacts DIR`); no directory listing, no path outside it, no symlink. A connection
that sends or reads nothing for `timeout_s` is closed, and at most `max_connections` are
served at once (one more gets 503), so slow clients cannot hold every thread.

Large fleets put the archives on any static host or object store instead (nginx, S3,
GCS...): the agent needs nothing but HTTP(S) GET with Range, and every byte is verified
on the device, so the host needs no trust.
"""

from __future__ import annotations

import contextlib
import http.server
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")
CHUNK = 256 * 1024
ROOT_FILE = re.compile(r"^roots/[0-9]{1,9}\.root\.json$")


class ArtifactHandler(http.server.BaseHTTPRequestHandler):
    root: Path
    server_version = "edge-fleet-artifacts"

    def log_message(self, fmt: str, *args: Any) -> None:
        pass  # quiet by default: devices poll and resume

    def _file(self) -> Path | None:
        name = self.path.split("?", 1)[0].lstrip("/")
        if len(name) > 255 or not (ROOT_FILE.match(name) or (
                name and "/" not in name and not name.startswith("."))):
            return None
        path = self.root / name
        if not path.is_file() or path.is_symlink():
            return None
        real = path.resolve()  # roots/ itself may be a link out of the directory
        return path if real.parent in (self.root, self.root / "roots") else None

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, *, body: bool) -> None:
        path = self._file()
        if path is None:
            self.send_error(404, "no such archive")
            return
        size = path.stat().st_size
        start, end = 0, size - 1
        rng = self.headers.get("Range")
        if rng is not None:
            m = RANGE.match(rng.strip())
            if (not m or int(m.group(1)) >= size
                    or (m.group(2) and int(m.group(2)) < int(m.group(1)))):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.end_headers()
                return
            start = int(m.group(1))
            end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
        self.send_response(206 if rng else 200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start + 1))
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if body:
            self._copy(path, start, end - start + 1)

    def _copy(self, path: Path, start: int, length: int) -> None:
        with path.open("rb") as fh:
            fh.seek(start)
            while length > 0 and (chunk := fh.read(min(CHUNK, length))):
                try:
                    self.wfile.write(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    return  # the device will resume
                length -= len(chunk)


class _BoundedServer(http.server.ThreadingHTTPServer):
    """A thread per connection, at most `limit` of them; one more gets 503 and is closed."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: Any, limit: int) -> None:
        super().__init__(address, handler)
        self._slots = threading.BoundedSemaphore(limit)
        self._lock = threading.Lock()
        self.connections = 0  # being served now

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            with contextlib.suppress(OSError):
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                                b"Connection: close\r\n\r\n")
            self.shutdown_request(request)
            return
        self._count(+1)
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._done()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._done()

    def _count(self, n: int) -> None:
        with self._lock:
            self.connections += n

    def _done(self) -> None:
        self._count(-1)
        self._slots.release()


def make_server(root: Path, host: str = "127.0.0.1", port: int = 0, *,
                timeout_s: float = 30.0, max_connections: int = 256
                ) -> http.server.ThreadingHTTPServer:
    handler = type("Handler", (ArtifactHandler,), {"root": root.resolve(),
                                                  "timeout": timeout_s})
    return _BoundedServer((host, port), handler, max_connections)


def serve_in_thread(root: Path, host: str = "127.0.0.1", port: int = 0
                    ) -> tuple[http.server.ThreadingHTTPServer, str]:
    """Start serving in a background thread; returns the server and its base URL."""
    server = make_server(root, host, port)
    threading.Thread(target=server.serve_forever, name="artifacts", daemon=True).start()
    return server, f"http://{host}:{server.server_address[1]}"


def serve_in_process(root: Path) -> tuple[subprocess.Popen[str], str]:
    """`edge-fleet serve-artifacts ROOT --port 0` as its own process (as an operator runs
    it, and off the caller's GIL); returns the process and its base URL, read from the
    line the command prints first (`cmd_serve_artifacts`)."""
    p = subprocess.Popen([sys.executable, "-m", "fleet.cli", "serve-artifacts", str(root),
                          "--port", "0"], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    return p, p.stdout.readline().split(" on ")[1].split("/ ")[0]
