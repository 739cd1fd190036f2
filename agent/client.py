"""A small HTTP client for the agent's Unix socket (stdlib only), used by `edge-agent
install/status` and by tests and benches that talk to a running agent."""

from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path
from typing import Any


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path | str, timeout: float = 60.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = str(path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.socket_path)
        self.sock = sock


def call(conn: http.client.HTTPConnection, method: str, url: str, body: Any = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request on a kept-alive connection; JSON-encodes non-bytes bodies."""
    hdrs = dict(headers or {})
    if body is not None and not isinstance(body, bytes):
        body = json.dumps(body).encode()
        hdrs.setdefault("Content-Type", "application/json")
    conn.request(method, url, body=body, headers=hdrs)
    resp = conn.getresponse()
    return resp.status, dict(resp.getheaders()), resp.read()


def unix_call(path: Path | str, method: str, url: str, body: Any = None,
              timeout: float = 300.0) -> tuple[int, Any]:
    """One request on a fresh connection; returns (status, decoded JSON or text)."""
    conn = UnixHTTPConnection(path, timeout=timeout)
    try:
        status, _, raw = call(conn, method, url, body)
    finally:
        conn.close()
    return status, _decoded(raw)


def _decoded(raw: bytes) -> Any:
    """A response body: decoded JSON, or text."""
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")


def upload(path: Path | str, archive: Path, timeout: float = 600.0) -> tuple[int, Any]:
    """`POST /v1/admin/install` with the archive's bytes as the body, streamed from the file
    (http.client sends a file object in blocks) with its sha256 for the daemon to check."""
    from agent.trust.bundle import file_entry  # noqa: PLC0415  # install only

    entry = file_entry(archive)
    conn = UnixHTTPConnection(path, timeout=timeout)
    try:
        with archive.open("rb") as fh:
            conn.request("POST", "/v1/admin/install", body=fh, headers={
                "Content-Type": "application/octet-stream",
                "Content-Length": str(entry.size_bytes), "X-Bundle-Sha256": entry.sha256})
        resp = conn.getresponse()
        return resp.status, _decoded(resp.read())
    finally:
        conn.close()
