"""The HTTP server's view of its other connections (`HttpServer.others_active`), which
decides whether a request may run inline on the event loop: a real server on a real Unix
socket, driven from its own loop."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

from agent.serving import http
from agent.serving.http import HttpServer, Request, Response, Router

GET = b"GET /ok HTTP/1.1\r\nhost: x\r\n\r\n"


async def _ok(request: Request) -> Response:
    return Response(200, b"{}")


async def _pass(request: Request, handler: http.Handler) -> Response:
    return await handler(request)


async def _answer(sock: socket.socket, loop: asyncio.AbstractEventLoop) -> bytes:
    """Send one request and read its whole (two-byte) answer, the loop serving it."""
    await loop.sock_sendall(sock, GET)
    return await _read(sock, loop)


async def _read(sock: socket.socket, loop: asyncio.AbstractEventLoop) -> bytes:
    data = b""
    while not data.endswith(b"\r\n\r\n{}"):
        chunk = await loop.sock_recv(sock, 4096)
        assert chunk, data
        data += chunk
    return data


def test_an_unread_request_counts_on_a_recent_connection_not_on_a_quiet_one(
        tmp_path: Path) -> None:
    """Three keep-alive connections, each answered once, then idle. Nothing pending: no
    other request is active (a client's idle pool must not cost the fast path). Bytes of a
    request written on one of them and not read yet by the loop: active while that
    connection answered within `RECENT_IDLE_S`; once it has been quiet longer, it is
    no longer polled (the request is read after the inline run)."""

    async def main() -> list[bool]:
        loop = asyncio.get_running_loop()
        router = Router()
        router.add("GET", "/ok", _ok)
        server = HttpServer(router, max_body_bytes=1024, middleware=_pass)
        listening = await server.start_unix(str(tmp_path / "s.sock"))
        socks = []
        try:
            for _ in range(3):
                s = socket.socket(socket.AF_UNIX)
                s.setblocking(False)
                await loop.sock_connect(s, str(tmp_path / "s.sock"))
                socks.append(s)
                assert (await _answer(s, loop)).startswith(b"HTTP/1.1 200")
            idle = server._idle["unix"]
            assert server.open_connections == 3 and len(idle) == 3
            seen = [server.others_active()]  # idle, nothing pending
            socks[2].sendall(GET)  # the loop does not run until this coroutine waits
            seen.append(server.others_active())  # pending, on a connection just answered
            newest = list(idle)[-1]
            idle[newest] = time.monotonic() - 2 * http.RECENT_IDLE_S
            seen.append(server.others_active())  # pending, on a connection quiet since
            assert (await _read(socks[2], loop)).startswith(b"HTTP/1.1 200")
            return seen
        finally:
            for s in socks:
                s.close()
            listening.close()

    assert asyncio.run(main()) == [False, True, False]

