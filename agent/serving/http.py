"""A small HTTP/1.1 server: one `asyncio.Protocol` per connection, a real parser for the
protocol.

Why not a framework: on the device every MiB counts and armv7 wheels are not a given.
aiohttp alone added 20 MiB of RSS at import. Parsing is the careful part and is left to a
parser (`agent.serving.h1`): httptools (llhttp, in C) where its wheel exists, h11 (pure
Python) elsewhere; this module keeps routing and limits, and writes responses itself.
Untrusted bytes meet the parser, whose one error (`ApiError`) becomes its status
(400, 431) and a closed connection.

Bytes are parsed as they arrive (`data_received`), and a complete request's handler starts
at once, in that same callback: a handler that finishes without waiting (the inline fast
path of a small model) is answered in the loop turn that read its request, with no stream
objects, no task and no second turn. A handler that waits (a batch in the scheduler's
workers, a thread, an upload) goes on in a task of its own. Timeouts are deadlines on the
connection, checked by one timer per server (`_sweep`), not a timer per read.

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
* nothing is read from a connection while its request is being handled or its answer
  waits for the client to read (pipelined requests wait in the socket, bounded by it);
* an idle keep-alive connection is closed after `idle_timeout_s`;
* a handler that raises gets 500 (400 for input nested too deep), and the connection lives.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import select
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from agent.errors import ApiError
from agent.serving import h1
from agent.serving.memo import remember

MAX_HEADER_BYTES = 16 * 1024
#: After answering a request whose body was left unread, the connection is closed only
#: after the client's remaining bytes were read and dropped, up to this many and this
#: long (a lingering close, as nginx's `lingering_close`; RFC 9112 §9.6): closing with
#: unread data resets the connection, and the reset can destroy the answer before the
#: client reads it.
LINGER_BYTES = 1 << 20
LINGER_S = 2.0
#: `others_active` looks for unread requests only on idle connections that answered
#: within this long: a client sending concurrently is back within milliseconds, and one
#: quiet for longer sends too rarely to batch with. A request on a quieter connection that
#: arrives during an inline run waits for that run (at most the scheduler's
#: `inline_max_s`, 1 ms), then is read and served as any other.
RECENT_IDLE_S = 0.1
log = logging.getLogger("edge_agent.http")
#: Authorize a request from its head: None to go on, else the 401 message.
Authorize = Callable[[dict[str, str], bool], str | None]


@dataclass(slots=True)
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

    def __init__(self, conn: _Connection, cap: int) -> None:
        self._conn, self.cap = conn, cap
        self.size, self.done = 0, False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        while not self.done:
            part = await self._conn.body_part()
            if isinstance(part, h1.Body):
                self.size += len(part.data)
                if self.size > self.cap:
                    raise _too_large(self.cap)
                yield part.data
            elif part is h1.END:
                self.done = True
            else:
                raise _HttpError(400, f"connection closed after {self.size} body bytes")


@dataclass(slots=True)
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
        # matches found, by (method, path): a client asks the same few paths again and
        # again. Bounded: emptied when full (random paths only miss).
        self._found: dict[tuple[str, str], tuple[Handler, dict[str, str]] | int] = {}

    def add(self, method: str, pattern: str, handler: Handler, *,
            stream_max_bytes: int | None = None) -> None:
        """`stream_max_bytes`: the handler reads the body itself from `Request.stream`,
        up to that many bytes (a literal path only), instead of receiving it whole."""
        regex = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", pattern)
        self._routes.append((method, re.compile(f"^{regex}$"), handler))
        self._found.clear()
        if stream_max_bytes is not None:
            self._streamed[(method, pattern)] = stream_max_bytes

    def streamed(self, method: str, path: str) -> int | None:
        return self._streamed.get((method, path))

    def match(self, method: str, path: str) -> tuple[Handler, dict[str, str]] | int:
        """The handler and path parameters (the caller's own copy), or 404 / 405."""
        key = (method, path)
        found = self._found.get(key)
        if found is None:
            found = self._match(method, path)
            if len(path) <= MEMO_PATH_MAX:  # at most ROUTES_SEEN_MAX short paths kept
                remember(self._found, key, found, ROUTES_SEEN_MAX)
        return found if isinstance(found, int) else (found[0], dict(found[1]))

    def _match(self, method: str, path: str) -> tuple[Handler, dict[str, str]] | int:
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


#: Matches the router keeps (`Router.match`), of paths up to MEMO_PATH_MAX characters.
ROUTES_SEEN_MAX = 256
MEMO_PATH_MAX = 256


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

# What a connection is doing (`_Connection.state`); each state has its deadline.
IDLE = 0  # waiting for the first byte of a request (keep-alive): the idle limit
HEAD = 1  # a request head has begun: head_timeout_s from its first byte
BODY = 2  # reading a request's body: body_timeout_s
BUSY = 3  # a handler runs (a streamed body: body_timeout_s per chunk), or its answer waits
LINGER = 4  # answered with an error; dropping what the client still sends: LINGER_S
CLOSED = 5


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
        # Deadlines are checked this often: a fraction of the shortest limit.
        self.tick_s = max(0.01, min(0.25, head_timeout_s / 4, body_timeout_s / 4,
                                    idle_timeout_s / 4, MIN_IDLE_S / 4))
        # by listener: refused with 503; idle ones closed to admit a newcomer
        self.refused: dict[str, int] = dict.fromkeys(LISTENERS, 0)
        self.evicted_idle: dict[str, int] = dict.fromkeys(LISTENERS, 0)
        self.server_header = server_name.encode()
        self._connections: dict[str, set[_Connection]] = {n: set() for n in LISTENERS}
        # Connections waiting for the first byte of their next request (keep-alive, idle),
        # per listener, longest idle first: a drain closes them at once instead of waiting
        # out their idle timeout, and a listener at its cap closes the oldest for a newcomer.
        self._idle: dict[str, dict[_Connection, float]] = {n: {} for n in LISTENERS}
        self._draining = False
        self._sweeper: asyncio.TimerHandle | None = None

    @property
    def open_connections(self) -> int:
        """Connections being served now (every listener of this server)."""
        return sum(map(len, self._connections.values()))

    def others_active(self) -> bool:
        """Whether a request besides the caller's is in progress or waiting: a connection
        reading or answering one, or an idle keep-alive connection that answered within
        `RECENT_IDLE_S` with bytes in its socket (one `poll` with no wait: bytes the loop
        has seen ready but not read yet). Idle connections with nothing pending (a
        client's pool, a load balancer's) do not count, and those quiet for longer are not
        polled (the syscall was half of what two idle connections cost a request)."""
        open_n = self.open_connections
        if open_n == 1:  # the caller's alone
            return False
        idle_n = sum(map(len, self._idle.values()))
        if open_n - idle_n > 1:
            return True
        if not idle_n:
            return False
        since = time.monotonic() - RECENT_IDLE_S
        fds = []
        for pool in self._idle.values():
            for c in reversed(pool):  # the most recently idle first
                if pool[c] < since:
                    break
                if c.fd >= 0:
                    fds.append(c.fd)
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
        listener = "admin" if admin else "unix"
        return await asyncio.get_running_loop().create_unix_server(
            lambda: _Connection(self, listener, unix=True, admin=admin), path=path)

    async def start_tcp(self, host: str, port: int) -> asyncio.AbstractServer:
        return await asyncio.get_running_loop().create_server(
            lambda: _Connection(self, "tcp", unix=False, admin=False), host=host, port=port)

    def _admit(self, conn: _Connection) -> bool:
        """Take a new connection into its listener's pool, closing the longest-idle one at
        the cap; False (503 sent) when there is none to close."""
        listener = conn.listener
        pool, cap = self._connections[listener], self.caps[listener]
        if len(pool) >= cap:
            idle = self._idle[listener]
            oldest = next(iter(idle), None)  # longest idle first (insertion order)
            if oldest is None or time.monotonic() - idle[oldest] < IDLE_GRACE_S:
                self.refused[listener] += 1  # counted here, not as an answer
                conn.send_error(503, f"too many connections on this listener ({cap})",
                                count=False)
                conn.close()
                return False
            self._forget(oldest)
            oldest.close()
            self.evicted_idle[listener] += 1
        pool.add(conn)
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(self.tick_s, self._sweep)
        return True

    def _forget(self, conn: _Connection) -> None:
        self._connections[conn.listener].discard(conn)
        self._idle[conn.listener].pop(conn, None)

    def _sweep(self) -> None:
        """Act on the deadlines that passed; again in `tick_s` while connections are open."""
        self._sweeper = None
        now = time.monotonic()
        for pool in self._connections.values():
            for conn in [c for c in pool if c.deadline <= now]:
                conn.expire()
        if self.open_connections:
            self._sweeper = asyncio.get_running_loop().call_later(self.tick_s, self._sweep)

    def _idle_limit(self, listener: str) -> float:
        """How long a connection of this listener may wait idle now: the full idle timeout
        under half the cap, shrinking to `MIN_IDLE_S` at the cap."""
        used = len(self._connections[listener]) / self.caps[listener]
        if used <= 0.5:
            return self.idle_timeout_s
        return max(MIN_IDLE_S, min(self.idle_timeout_s, self.idle_timeout_s * 2 * (1 - used)))

    async def drain(self, timeout_s: float) -> None:
        """Close idle keep-alive connections now; let the others finish their current
        request (answered with `Connection: close`), up to `timeout_s`; then close them."""
        self._draining = True
        for idle in self._idle.values():
            for conn in list(idle):
                conn.close()
        waits = [c.closed for pool in self._connections.values() for c in pool]
        if waits:
            await asyncio.wait(waits, timeout=timeout_s)
        for pool in self._connections.values():  # still busy after timeout_s: the last resort
            for conn in list(pool):
                conn.abort()

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


class _Connection(asyncio.Protocol):
    """One client connection: bytes parsed as they arrive, requests answered in order."""

    def __init__(self, server: HttpServer, listener: str, *, unix: bool, admin: bool) -> None:
        self.server, self.listener, self.unix, self.admin = server, listener, unix, admin
        self.parser = h1.parser(MAX_HEADER_BYTES, prefer_c=server.prefer_c)
        self.transport: Any = None  # an asyncio.Transport once made
        self.state, self.deadline = IDLE, math.inf
        self.peer, self.fd = "token", -1
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.eof = False  # the client closed its side
        # the request being read: its head's parts, the body so far, its cap
        self.head: h1.Head | None = None
        self.path = ""  # its path, without the query
        self.chunks: list[bytes] = []
        self.size = self.limit = 0
        self.backlog: list[bytes] = []  # what arrived while a request was handled
        self.reading = True
        self.streaming = False  # a streamed route's handler is reading the body
        self.waiter: asyncio.Future[None] | None = None  # `body_part` waiting for bytes
        self.task: asyncio.Task[Response] | None = None  # a handler that had to wait
        self.write_paused = False  # the client is not reading its answers fast enough
        self.pumping = False  # `_pump` is taking the parser's events
        self.lingered = 0

    # -- asyncio.Protocol ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        if not self.server._admit(self):
            return
        sock = transport.get_extra_info("socket")
        self.fd = sock.fileno() if sock is not None else -1
        if self.unix:
            self.peer = _peer(sock)
        self._to_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = CLOSED
        self.server._forget(self)
        self._wake()
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state == IDLE:
            self.server._idle[self.listener].pop(self, None)
            self.state, self.deadline = HEAD, time.monotonic() + self.server.head_timeout_s
        elif state == BUSY:
            if self.streaming:
                self._stream_bytes(data)
            else:  # the next request (pipelined): read once this one is answered
                self.backlog.append(data)
                self._pause()
            return
        elif state not in (HEAD, BODY):  # LINGER, CLOSED: dropped
            self.lingered += len(data)
            if self.lingered >= LINGER_BYTES:
                self.close()
            return
        try:
            self.parser.feed(data)
        except ApiError as exc:
            self._refuse(exc.status, str(exc))
            return
        self._pump()

    def eof_received(self) -> bool:
        """The client closed its side: the requests it sent before are still answered (the
        transport stays open to write), then the connection closes."""
        self.eof = True
        if self.state == BUSY:
            self._wake()
            return True
        if self.state in (HEAD, BODY):
            with contextlib.suppress(ApiError):
                self.parser.eof()
        self.close()
        return True

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.state == BUSY and self.task is None and not self.streaming:
            self._next_request()  # the answer is out: the next request may be read

    # -- reading requests -----------------------------------------------------------------
    def _pump(self) -> None:
        """Take the parser's events until it needs bytes or a request is being handled."""
        self.pumping = True
        try:
            self._take_events()
        finally:
            self.pumping = False

    def _take_events(self) -> None:
        while self.state <= BODY:
            try:
                event = self.parser.next_event()
            except ApiError as exc:
                self._refuse(exc.status, str(exc))
                return
            if event is h1.NEED_DATA:
                if self.eof:
                    self.close()
                return
            if isinstance(event, h1.Head):
                self._on_head(event)
            elif self.state != BODY:
                if event is h1.CLOSED:
                    self.close()
                else:
                    self._refuse(400, "a request must start with its head")
                return
            elif isinstance(event, h1.Body):
                self.size += len(event.data)
                if self.size > self.limit:
                    self._refuse(413, str(_too_large(self.limit)))
                    return
                self.chunks.append(event.data)
            elif event is h1.END:
                head, chunks = self.head, self.chunks
                assert head is not None
                body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                self.head, self.chunks = None, []
                self._handle(Request(head.method, self.path, head.headers, body, self.unix,
                                     keep_alive=head.keep_alive))
            else:
                self.close()
                return

    def _on_head(self, head: h1.Head) -> None:
        server = self.server
        if self.state == IDLE:  # pipelined: it was waiting in the parser
            server._idle[self.listener].pop(self, None)
        if head.head_bytes > MAX_HEADER_BYTES:
            self._refuse(431, f"request head of {head.head_bytes} bytes (at most "
                         f"{MAX_HEADER_BYTES})")
            return
        headers = head.headers
        if "content-length" in headers and "transfer-encoding" in headers:
            self._refuse(400, "Content-Length and Transfer-Encoding together")
            return
        refusal = server.authorize(headers, self.unix)  # before routing and before the body
        if refusal is not None:
            self._refuse(401, refusal)
            return
        path = head.target.split("?", 1)[0]
        cap = server.router.streamed(head.method, path)
        limit = cap if cap is not None else server.max_body_bytes
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            self._refuse(413, str(_too_large(limit)))
            return
        if headers.get("expect", "").lower() == "100-continue":
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # curl waits for it
        if cap is not None:
            request = Request(head.method, path, headers, b"", self.unix,
                              keep_alive=head.keep_alive)
            request.stream = BodyStream(self, cap)
            self.streaming = True
            self._handle(request)
            return
        self.head, self.path, self.chunks, self.size, self.limit = head, path, [], 0, limit
        self.state, self.deadline = BODY, time.monotonic() + server.body_timeout_s

    async def body_part(self) -> h1.Event:
        """A streamed body's next event, waiting for its bytes up to `body_timeout_s`."""
        while True:
            try:
                event = self.parser.next_event()
            except ApiError as exc:
                raise _HttpError(400, f"malformed body: {exc}") from exc
            if event is not h1.NEED_DATA:
                if not isinstance(event, h1.Body):
                    self.streaming = False
                return event
            if self.state == CLOSED or self.eof:
                self.streaming = False
                return h1.CLOSED
            self.waiter = asyncio.get_running_loop().create_future()
            self.deadline = time.monotonic() + self.server.body_timeout_s
            self._resume()
            try:
                await self.waiter
            finally:
                self.waiter, self.deadline = None, math.inf

    def _stream_bytes(self, data: bytes) -> None:
        try:
            self.parser.feed(data)
        except ApiError as exc:
            self._wake(_HttpError(400, f"malformed body: {exc}"))
            return
        if self.waiter is None:  # the handler is busy with a chunk: no more until it asks
            self._pause()
        self._wake()

    def _wake(self, exc: BaseException | None = None) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            if exc is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(exc)

    # -- handling and answering -----------------------------------------------------------
    def _handle(self, request: Request) -> None:
        """Run the handler at once; one that has to wait goes on in a task of its own."""
        self.state, self.deadline = BUSY, math.inf
        request.admin, request.peer = self.admin, self.peer
        coro = self.server._dispatch(request)
        try:
            waiting = coro.send(None)
        except StopIteration as done:
            self._answer(request, done.value)
            return
        except BaseException:  # _dispatch answers errors: this is a bug
            log.exception("http.dispatch_failed %s %.200s", request.method, request.path)
            self._answer(request, json_response({"error": "internal error"}, 500))
            return
        self.task = asyncio.get_running_loop().create_task(_resume(coro, waiting))
        self.task.add_done_callback(lambda task: self._answer_from(request, task))

    def _answer_from(self, request: Request, task: asyncio.Task[Response]) -> None:
        self.task = None
        if task.cancelled():  # a drain's last resort
            self.abort()
            return
        exc = task.exception()
        if exc is not None:
            log.error("http.dispatch_failed %s %.200s", request.method, request.path,
                      exc_info=exc)
            self._answer(request, json_response({"error": "internal error"}, 500))
            return
        self._answer(request, task.result())

    def _answer(self, request: Request, response: Response) -> None:
        server = self.server
        if self.state == CLOSED:
            self._answered(request, response)
            return
        unread = request.stream is not None and not request.stream.done
        self.streaming = False
        # a client that closed its side still gets the answers to what it sent before
        # (pipelined requests waiting here); `_take_events` closes once they are done
        close = unread or server._draining or not request.keep_alive
        self._write(response, close=close, head_only=request.method == "HEAD")
        # counted once the answer is out, off the client's wait; no other request is read
        # before this callback returns, so a scrape still finds it counted
        self._answered(request, response)
        if close:
            if unread:
                self._linger()
            else:
                self.close()
        elif self.write_paused:  # the next request once the client has read this answer
            self._pause()
            self.deadline = time.monotonic() + server.idle_timeout_s
        else:
            self._next_request()

    def _answered(self, request: Request, response: Response) -> None:
        if self.server.on_response is not None:
            self.server.on_response(request.method, request.path, response.status,
                                    response.body)

    def _next_request(self) -> None:
        try:
            self.parser.next_cycle()
        except ApiError:
            self.close()
            return
        self._to_idle()
        if self.backlog:
            data = self.backlog[0] if len(self.backlog) == 1 else b"".join(self.backlog)
            self.backlog.clear()
            self._resume()
            self.data_received(data)
        else:
            self._resume()
            if not self.pumping:  # else the loop taking events goes on: no recursion
                self._pump()  # a pipelined request the parser holds already

    def _to_idle(self) -> None:
        now = time.monotonic()
        self.state, self.deadline = IDLE, now + self.server._idle_limit(self.listener)
        self.server._idle[self.listener][self] = now

    def _write(self, response: Response, *, close: bool, head_only: bool = False) -> None:
        if self.transport.is_closing():
            return
        head = h1.response_head(response.status, response.content_type, len(response.body),
                                self.server.server_header, response.headers, close=close)
        if head_only or not response.body:
            self.transport.write(head)
        elif len(response.body) < 16 * 1024:  # one write, one syscall
            self.transport.write(head + response.body)
        else:  # no copy of a large body
            self.transport.writelines((head, response.body))

    def send_error(self, status: int, message: str, *, count: bool = True) -> None:
        """Answer a request that could not be read (or its head refused)."""
        body = json.dumps({"error": message}).encode()
        if count and self.server.on_response is not None:
            self.server.on_response("-", "-", status, body)
        self._write(Response(status, body), close=True)

    def _refuse(self, status: int, message: str) -> None:
        """Answer with an error before the request was read whole, and close lingering."""
        self.send_error(status, message)
        self._linger()

    def _linger(self) -> None:
        """Stop writing, then drop what the client still sends (at most `LINGER_BYTES`
        within `LINGER_S`), so the close that follows finds nothing unread."""
        self.server._idle[self.listener].pop(self, None)
        self.state, self.deadline, self.lingered = LINGER, time.monotonic() + LINGER_S, 0
        if self.eof:
            self.close()
            return
        with contextlib.suppress(Exception):  # the peer may be gone already
            if self.transport.can_write_eof():
                self.transport.write_eof()
        self._resume()

    def expire(self) -> None:
        """Its deadline passed: what that means depends on what it was doing."""
        state = self.state
        if state == HEAD:
            self._refuse(408, "request head not received in time")
        elif state == BODY:
            self._refuse(408, "request body not received in time")
        elif state == BUSY and self.waiter is not None:
            self.deadline = math.inf
            self._wake(_HttpError(408, "request body not received in time"))
        elif state == BUSY and self.task is None and not self.streaming:
            self.abort()  # an answer the client has not read within the idle timeout
        elif state != BUSY:  # idle, lingering: a quiet close
            self.close()

    def _pause(self) -> None:
        if self.reading and not self.transport.is_closing():
            self.reading = False
            self.transport.pause_reading()

    def _resume(self) -> None:
        if not self.reading and not self.transport.is_closing():
            self.reading = True
            self.transport.resume_reading()

    def close(self) -> None:
        self.state, self.deadline = CLOSED, math.inf
        self.server._forget(self)
        self.transport.close()  # what is written goes out first

    def abort(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.state, self.deadline = CLOSED, math.inf
        self.server._forget(self)
        self.transport.abort()


async def _resume(coro: Coroutine[Any, Any, Response], waiting: Any) -> Response:
    """Go on with a coroutine that was started outside a task: `waiting` is what its first
    `send` gave (the future it waits for, or None for a bare yield), as a task would have
    seen it. A cancel of this task reaches the coroutine where it waits."""
    while True:
        signal: BaseException | None = None
        try:
            if waiting is None:
                await asyncio.sleep(0)
            else:  # as a task takes it: the flag says a coroutine yielded it, and a
                waiting._asyncio_future_blocking = False  # second await refuses it when set
                await waiting
        except asyncio.CancelledError as exc:  # this task's, unless the future's own
            if waiting is None or not waiting.cancelled():
                signal = exc
        except BaseException:  # the coroutine reads it from its future
            pass
        try:
            waiting = coro.send(None) if signal is None else coro.throw(signal)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]


def _peer(sock: socket.socket | None) -> str:
    """The user on the other end of a Unix socket ("uid N"), from the kernel."""
    try:
        assert sock is not None
        _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    except (OSError, AttributeError, AssertionError):
        return "uid ?"  # no credential to be had: its own owner, apart from all others
    return f"uid {uid}"
