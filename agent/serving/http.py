"""A small HTTP/1.1 server: asyncio streams for I/O, a real parser for the protocol.

Why not a framework: on the device every MiB counts and armv7 wheels are not a given.
aiohttp alone added 20 MiB of RSS at import. Parsing is the careful part and is left to a
parser (`agent.serving.h1`): httptools (llhttp, in C) where its wheel exists, h11 (pure
Python) elsewhere; this module keeps routing and limits, and writes responses itself.
Untrusted bytes meet the parser, whose one error (`ApiError`) becomes its status
(400, 431) and a closed connection.

Limits, each answered with a status and a closed connection, never a silent drop:

* connections: each listener (the inference socket, the admin socket, TCP) has its own
  cap (`caps`, else `max_connections`), so no listener can starve another; at its cap a
  new connection takes the place of the listener's longest-idle keep-alive connection
  (idle for at least `IDLE_GRACE_S`: an active client's connection between two requests
  is not taken), and gets 503 when there is none; idle keep-alive connections wait
  `idle_timeout_s` while the listener is under half its cap, less the fuller it is
  (down to `MIN_IDLE_S` at the cap);
* the request head: `MAX_HEADER_BYTES` (target and header lines; 431 past it), complete
  within `head_timeout_s` of its first byte (408: a slowloris trickle is cut off);
* `authorize(headers, unix)` runs on the head alone, before routing and before any body
  byte is read (401);
* Content-Length together with Transfer-Encoding is refused (400: request smuggling);
* the body: `max_body_bytes` (413 from its Content-Length before it is read, or as soon as
  a chunked body passes it), complete within `body_timeout_s` (408); a streamed route
  (an upload) has its own cap and hands its body to the handler chunk by chunk, each
  chunk within `body_timeout_s` of the last;
* an idle keep-alive connection is closed after `idle_timeout_s`;
* a handler that raises gets 500 (400 for input nested too deep), and the connection lives.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import select
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from agent.errors import ApiError
from agent.serving import h1

MAX_HEADER_BYTES = 16 * 1024
READ_BYTES = 64 * 1024
#: After answering a request whose body was left unread, the connection is closed only
#: after the client's remaining bytes were read and dropped, up to this many and this
#: long (a lingering close, as nginx's `lingering_close`; RFC 9112 §9.6): closing with
#: unread data resets the connection, and the reset can destroy the answer before the
#: client reads it.
LINGER_BYTES = 1 << 20
LINGER_S = 2.0
log = logging.getLogger("edge_agent.http")
#: Authorize a request from its head: None to go on, else the 401 message.
Authorize = Callable[[dict[str, str], bool], str | None]


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes
    unix: bool  # arrived on a Unix socket (not TCP)
    params: dict[str, str] = field(default_factory=dict)
    admin: bool = False  # arrived on the admin socket
    # The connection's credential: "uid N" (a Unix socket's peer user, SO_PEERCRED) or
    # "token" (TCP, where the bearer token is the only credential).
    peer: str = "token"
    # A streamed route's body, not read yet (`body` is then empty); None elsewhere.
    stream: BodyStream | None = None
    keep_alive: bool = True  # the client lets the connection serve another request


class BodyStream:
    """The body of a request to a streamed route, read chunk by chunk as the handler
    iterates: at most `cap` bytes, each chunk within the server's `body_timeout_s` of the
    previous one.
    Past the cap: 413; a stall: 408; a connection closed early or a malformed chunk: 400
    (raised from the iteration as `_HttpError`, answered by the server)."""

    def __init__(self, server: HttpServer, conn: h1.Parser,
                 reader: asyncio.StreamReader, cap: int) -> None:
        self._server, self._conn, self._reader, self.cap = server, conn, reader, cap
        self.size, self.done = 0, False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        while not self.done:
            deadline = loop.time() + self._server.body_timeout_s
            try:
                part = await self._server._next(self._conn, self._reader, deadline,
                                                "request body")
            except ApiError as exc:
                raise _HttpError(400, f"malformed body: {exc}") from exc
            if isinstance(part, h1.Body):
                self.size += len(part.data)
                if self.size > self.cap:
                    raise _too_large(self.cap)
                yield part.data
            elif part is h1.END:
                self.done = True
            else:
                raise _HttpError(400, f"connection closed after {self.size} body bytes")


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


def json_response(data: Any, status: int = 200) -> Response:
    return Response(status, json.dumps(data, separators=(",", ":")).encode())


Handler = Callable[[Request], Awaitable[Response]]


class Router:
    """Routes by method and path pattern; `{name}` matches one path segment."""

    def __init__(self) -> None:
        self._routes: list[tuple[str, re.Pattern[str], Handler]] = []
        self._streamed: dict[tuple[str, str], int] = {}

    def add(self, method: str, pattern: str, handler: Handler, *,
            stream_max_bytes: int | None = None) -> None:
        """`stream_max_bytes`: the handler reads the body itself from `Request.stream`,
        up to that many bytes (a literal path only), instead of receiving it whole."""
        regex = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", pattern)
        self._routes.append((method, re.compile(f"^{regex}$"), handler))
        if stream_max_bytes is not None:
            self._streamed[(method, pattern)] = stream_max_bytes

    def streamed(self, method: str, path: str) -> int | None:
        return self._streamed.get((method, path))

    def match(self, method: str, path: str) -> tuple[Handler, dict[str, str]] | int:
        """The handler and path parameters, or 404 / 405."""
        allowed = False
        for m, regex, handler in self._routes:
            found = regex.match(path)
            if found:
                if m == method:
                    return handler, found.groupdict()
                allowed = True
        return 405 if allowed else 404

    def allowed(self, path: str) -> list[str]:
        """The methods `path` answers to (a 405's `Allow`, RFC 9110 §15.5.6)."""
        return sorted({m for m, regex, _ in self._routes if regex.match(path)})


class _HttpError(Exception):
    """A refusal answered with its status (and the connection closed when raised before
    the request was read whole)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _too_large(cap: int) -> _HttpError:
    return _HttpError(413, f"body larger than {cap} bytes")


#: The shortest idle keep-alive wait, at a listener's cap.
MIN_IDLE_S = 1.0
#: A connection idle for less than this is between two requests of an active client: it
#: is never closed to make room (a newcomer then gets 503).
IDLE_GRACE_S = 0.5
LISTENERS = ("unix", "admin", "tcp")


class HttpServer:
    def __init__(self, router: Router, *, max_body_bytes: int,
                 middleware: Callable[[Request, Handler], Awaitable[Response]],
                 authorize: Authorize = lambda headers, unix: None,
                 max_connections: int = 64, caps: dict[str, int] | None = None,
                 head_timeout_s: float = 10.0,
                 body_timeout_s: float = 30.0, idle_timeout_s: float = 60.0,
                 server_name: str = "edge-agent",
                 on_response: Callable[[str, str, int, bytes], None] | None = None,
                 parser: str = "auto") -> None:
        self.router = router
        # "auto": httptools where installed, else h11; "h11": always the pure-Python one.
        self.prefer_c = parser == "auto"
        # Called with (method, path, status, body) for every answer sent, protocol errors
        # too (method and path "-"): the API counts statuses and logs errors there.
        self.on_response = on_response
        self.max_body_bytes = max_body_bytes
        self.middleware = middleware
        self.authorize = authorize
        self.max_connections = max_connections
        self.caps = {name: (caps or {}).get(name, max_connections) for name in LISTENERS}
        self.head_timeout_s, self.body_timeout_s = head_timeout_s, body_timeout_s
        self.idle_timeout_s = idle_timeout_s
        # by listener: refused with 503; idle ones closed to admit a newcomer
        self.refused: dict[str, int] = dict.fromkeys(LISTENERS, 0)
        self.evicted_idle: dict[str, int] = dict.fromkeys(LISTENERS, 0)
        self.server_header = server_name.encode()
        self._connections: dict[str, set[asyncio.Task[None]]] = {n: set() for n in LISTENERS}
        self._listener_of: dict[asyncio.StreamReader, str] = {}
        self._fd_of: dict[asyncio.StreamReader, int] = {}  # for `others_active`
        # Connections waiting for the first byte of their next request (keep-alive, idle),
        # per listener, longest idle first: a drain closes them at once instead of waiting
        # out their idle timeout, and a listener at its cap closes the oldest for a newcomer.
        self._idle: dict[str, dict[asyncio.StreamReader, float]] = {n: {} for n in LISTENERS}
        self._draining = False

    @property
    def open_connections(self) -> int:
        """Connections being served now (every listener of this server)."""
        return sum(len(c) for c in self._connections.values())

    def others_active(self) -> bool:
        """Whether a request besides the caller's is in progress or waiting: a connection
        reading or answering one, or an idle keep-alive connection with bytes already
        received (in its reader, or in its socket: one `poll` with no wait). Idle
        connections with nothing pending (a client's pool, a load balancer's) do not
        count."""
        idle = [r for pool in self._idle.values() for r in pool]
        if self.open_connections - len(idle) > 1:
            return True
        # asyncio's StreamReader keeps what its transport read in `_buffer` (CPython's
        # since 3.4): bytes a read callback took from the socket in this loop iteration,
        # whose task has not run yet.
        if any(getattr(r, "_buffer", None) for r in idle):
            return True
        fds = [fd for r in idle if (fd := self._fd_of.get(r, -1)) >= 0]
        if not fds:
            return False
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        return bool(poller.poll(0))

    def samples(self) -> list[tuple[str, dict[str, str], float]]:
        """Per listener: connections busy and idle, refusals and idle ones closed."""
        out: list[tuple[str, dict[str, str], float]] = []
        for name in LISTENERS:
            idle = len(self._idle[name])
            out += [("edge_agent_http_connections", {"listener": name, "state": "idle"}, idle),
                    ("edge_agent_http_connections", {"listener": name, "state": "busy"},
                     len(self._connections[name]) - idle),
                    ("edge_agent_http_connections_refused_total", {"listener": name},
                     self.refused[name]),
                    ("edge_agent_http_idle_closed_total", {"listener": name},
                     self.evicted_idle[name])]
        return out

    async def start_unix(self, path: str, *, admin: bool = False) -> asyncio.AbstractServer:
        return await asyncio.start_unix_server(
            lambda r, w: self._track(r, w, unix=True, admin=admin), path=path)

    async def start_tcp(self, host: str, port: int) -> asyncio.AbstractServer:
        return await asyncio.start_server(lambda r, w: self._track(r, w, unix=False),
                                          host=host, port=port)

    async def _track(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                     unix: bool, admin: bool = False) -> None:
        task = asyncio.current_task()
        assert task is not None
        listener = "admin" if admin else "unix" if unix else "tcp"
        pool, cap = self._connections[listener], self.caps[listener]
        if len(pool) >= cap:
            idle = self._idle[listener]
            oldest = next(iter(idle), None)  # longest idle first (insertion order)
            if oldest is None or time.monotonic() - idle[oldest] < IDLE_GRACE_S:
                self.refused[listener] += 1
                await self._send_error(writer, 503, f"too many connections on this listener "
                                       f"({cap})", count=False)  # counted in `refused`
                writer.close()
                return
            del idle[oldest]
            oldest.feed_eof()  # its pending read returns b"": a clean close
            self.evicted_idle[listener] += 1
        pool.add(task)
        self._listener_of[reader] = listener
        sock = writer.get_extra_info("socket")
        self._fd_of[reader] = sock.fileno() if sock is not None else -1
        try:
            await self._serve(reader, writer, unix, admin)
        finally:
            pool.discard(task)
            self._listener_of.pop(reader, None)
            self._fd_of.pop(reader, None)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _idle_limit(self, reader: asyncio.StreamReader) -> float:
        """How long a connection of this reader's listener may wait idle now: the full
        idle timeout under half the cap, shrinking to `MIN_IDLE_S` at the cap."""
        listener = self._listener_of.get(reader)
        if listener is None:
            return self.idle_timeout_s
        used = len(self._connections[listener]) / self.caps[listener]
        if used <= 0.5:
            return self.idle_timeout_s
        return max(MIN_IDLE_S, min(self.idle_timeout_s, self.idle_timeout_s * 2 * (1 - used)))

    async def drain(self, timeout_s: float) -> None:
        """Close idle keep-alive connections now; let the others finish their current
        request (answered with `Connection: close`), up to `timeout_s`; then close them."""
        self._draining = True
        for idle in self._idle.values():
            for reader in list(idle):  # the pending read returns b"": a clean close
                reader.feed_eof()
        tasks = [t for pool in self._connections.values() for t in pool]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)
        for task in tasks:  # still busy after timeout_s: the last resort
            if not task.done():
                task.cancel()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     unix: bool, admin: bool = False) -> None:
        conn = h1.parser(MAX_HEADER_BYTES, prefer_c=self.prefer_c)
        peer = _peer(writer) if unix else "token"
        while True:
            try:
                request = await self._read_request(conn, reader, writer, unix)
            except (ApiError, _HttpError) as exc:
                await self._send_error(writer, exc.status, str(exc))
                await _linger(reader, writer)
                return
            if request is None:
                return
            request.admin, request.peer = admin, peer
            response = await self._dispatch(request)
            if self.on_response is not None:
                self.on_response(request.method, request.path, response.status, response.body)
            unread = request.stream is not None and not request.stream.done
            close = unread or self._draining or not request.keep_alive
            await self._send(writer, response, close=close,
                             head_only=request.method == "HEAD")
            if close:
                if unread:
                    await _linger(reader, writer)
                return
            try:
                conn.next_cycle()
            except ApiError:
                return

    async def _next(self, conn: h1.Parser, reader: asyncio.StreamReader,
                    deadline: float | None = None, what: str = "") -> h1.Event:
        """The next parser event. Without a deadline, waiting for the first byte of a
        request is bounded by the idle timeout, and the rest of its head by the head timeout
        from that first byte; with one, everything by it (408 once it passes)."""
        loop = asyncio.get_running_loop()
        while True:
            event = conn.next_event()
            if event is not h1.NEED_DATA:
                return event
            if deadline is None:
                limit = self._idle_limit(reader)
            else:
                limit = deadline - loop.time()
                if limit <= 0:
                    raise _HttpError(408, f"{what} not received in time")
            if deadline is None and self._draining:
                return h1.CLOSED
            try:
                data = await self._read(reader, limit, idle=deadline is None)
            except TimeoutError:
                if deadline is not None:
                    raise _HttpError(408, f"{what} not received in time") from None
                return h1.CLOSED
            except ConnectionError:
                return h1.CLOSED
            if not data:
                conn.eof()
                event = conn.next_event()
                return event if event is not h1.NEED_DATA else h1.CLOSED
            if deadline is None:  # the head has begun: it gets head_timeout_s
                deadline, what = loop.time() + self.head_timeout_s, "request head"
            conn.feed(data)

    async def _read(self, reader: asyncio.StreamReader, limit: float, *, idle: bool) -> bytes:
        """Up to READ_BYTES within `limit` seconds; an idle read (waiting for a request's
        first byte) is one a drain ends (end of stream: the connection closes cleanly; a
        cancelled connection task would make asyncio log a traceback)."""
        pool = self._idle.get(self._listener_of.get(reader, ""), {}) if idle else None
        if pool is not None:
            pool[reader] = time.monotonic()
        try:
            # asyncio.timeout, not wait_for: no extra task per read on the hot path.
            async with asyncio.timeout(limit):
                return await reader.read(READ_BYTES)
        finally:
            if pool is not None:
                pool.pop(reader, None)

    async def _read_request(self, conn: h1.Parser, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter, unix: bool) -> Request | None:
        head = await self._next(conn, reader)
        if not isinstance(head, h1.Head):
            if head is h1.CLOSED:
                return None
            raise _HttpError(400, "a request must start with its head")
        if head.head_bytes > MAX_HEADER_BYTES:
            raise _HttpError(431, f"request head of {head.head_bytes} bytes (at most "
                             f"{MAX_HEADER_BYTES})")
        headers = head.headers
        if "content-length" in headers and "transfer-encoding" in headers:
            raise _HttpError(400, "Content-Length and Transfer-Encoding together")
        refusal = self.authorize(headers, unix)  # before routing and before the body
        if refusal is not None:
            raise _HttpError(401, refusal)
        length = headers.get("content-length")
        method, path = head.method, head.target.split("?", 1)[0]
        cap = self.router.streamed(method, path)
        limit = cap if cap is not None else self.max_body_bytes
        if length is not None and length.isdigit() and int(length) > limit:
            raise _too_large(limit)
        if headers.get("expect", "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # curl waits for it on uploads
        if cap is not None:
            request = Request(method, path, headers, b"", unix, keep_alive=head.keep_alive)
            request.stream = BodyStream(self, conn, reader, cap)
            return request
        body = await self._read_body(conn, reader)
        if body is None:
            return None
        return Request(method, path, headers, body, unix, keep_alive=head.keep_alive)

    async def _read_body(self, conn: h1.Parser, reader: asyncio.StreamReader
                         ) -> bytes | None:
        """The whole body (at most max_body_bytes, within body_timeout_s); None when the
        peer closed first."""
        deadline = asyncio.get_running_loop().time() + self.body_timeout_s
        chunks, size = [], 0
        while True:
            part = await self._next(conn, reader, deadline, "request body")
            if isinstance(part, h1.Body):
                size += len(part.data)
                if size > self.max_body_bytes:
                    raise _too_large(self.max_body_bytes)
                chunks.append(part.data)
            elif part is h1.END:
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)
            else:
                return None

    async def _dispatch(self, request: Request) -> Response:
        found = self.router.match(request.method, request.path)
        if isinstance(found, int):
            what = "no such route" if found == 404 else f"{request.method} not allowed here"
            response = json_response({"error": f"{what}: {request.path}"}, found)
            if found == 405:
                response.headers["Allow"] = ", ".join(self.router.allowed(request.path))
            return response
        handler, request.params = found
        try:
            return await self.middleware(request, handler)
        except _HttpError as exc:  # from a streamed body
            return json_response({"error": str(exc)}, exc.status)
        except RecursionError:
            return json_response({"error": "request nested too deep"}, 400)
        except Exception as exc:  # a bug must cost one request, not the connection
            log.exception("http.handler_failed %s %.200s", request.method, request.path)
            return json_response({"error": f"internal error: {type(exc).__name__}"}, 500)

    async def _send(self, writer: asyncio.StreamWriter, response: Response, *,
                    close: bool, head_only: bool = False) -> None:
        head = h1.response_head(response.status, response.content_type, len(response.body),
                                self.server_header, response.headers, close=close)
        if head_only or not response.body:
            writer.write(head)
        elif len(response.body) < 16 * 1024:  # one write, one syscall
            writer.write(head + response.body)
        else:  # no copy of a large body
            writer.writelines((head, response.body))
        with contextlib.suppress(ConnectionError):
            await writer.drain()

    async def _send_error(self, writer: asyncio.StreamWriter, status: int,
                          message: str, *, count: bool = True) -> None:
        """Answer a request that could not be read (or its head refused), and close."""
        body = json.dumps({"error": message}).encode()
        if count and self.on_response is not None:
            self.on_response("-", "-", status, body)
        with contextlib.suppress(Exception):
            await self._send(writer, Response(status, body), close=True)


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Stop writing, then read and drop what the client still sends (at most
    `LINGER_BYTES` within `LINGER_S`), so the close that follows finds nothing unread."""
    loop = asyncio.get_running_loop()
    deadline, left = loop.time() + LINGER_S, LINGER_BYTES
    with contextlib.suppress(Exception):  # the peer may be gone already: nothing to do
        if writer.can_write_eof():
            writer.write_eof()
        while left > 0 and (timeout := deadline - loop.time()) > 0:
            chunk = await asyncio.wait_for(reader.read(min(READ_BYTES, left)), timeout)
            if not chunk:
                return
            left -= len(chunk)


def _peer(writer: asyncio.StreamWriter) -> str:
    """The user on the other end of a Unix socket ("uid N"), from the kernel."""
    sock = writer.get_extra_info("socket")
    try:
        _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    except (OSError, AttributeError):
        return "uid ?"  # no credential to be had: its own owner, apart from all others
    return f"uid {uid}"
