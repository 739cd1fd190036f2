"""HTTP/1.1 request parsing for `agent.serving.http`, behind one small interface.

Two parsers, the same events:

- httptools (llhttp, Node.js's C parser) where its wheel exists (x86_64, aarch64): the
  request head and body are parsed in C, about ten times faster than pure Python;
- h11 (pure Python, the careful reference) everywhere else, e.g. armv7l, which httptools
  publishes no wheel for.

A connection's parser takes bytes (`feed`) and gives events (`next_event`): `Head` (method,
target, lower-cased headers, whether the connection stays open after this request),
`Body` chunks, `END` for a complete request, `NEED_DATA`. Malformed input raises
`agent.errors.ApiError` with the status to answer. A request head is bounded while it arrives: past
`max_head_bytes` (plus one read) it is refused with 431 before it is complete, so a header
that never ends cannot grow without bound in either parser.

Responses are written by `response_head`, by hand: a status line and a few headers need no
state machine, and the server decides keep-alive from the request's `Head.keep_alive`.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Final, NamedTuple

from agent.errors import ApiError

try:  # the C parser where a wheel exists
    import httptools
except ImportError:  # pragma: no cover - exercised where httptools is not installed
    httptools = None  # type: ignore[assignment]


# Head and Body are made for every request: named tuples, immutable and cheaper to make
# than frozen dataclasses (whose __init__ sets each field through object.__setattr__).
class Head(NamedTuple):
    method: str
    target: str
    headers: dict[str, str]  # names lower-cased; a repeated header's values joined by ", "
    keep_alive: bool  # HTTP/1.1 without `Connection: close` (or 1.0 with keep-alive)
    head_bytes: int  # target and header lines, as MAX_HEADER_BYTES counts them


class Body(NamedTuple):
    data: bytes


class _Marker:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


END: Final = _Marker("END")  # the request is complete
NEED_DATA: Final = _Marker("NEED_DATA")
CLOSED: Final = _Marker("CLOSED")  # the peer closed, or the server stops waiting
Event = Head | Body | _Marker


def _join(headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in headers:
        name, value = k.decode("latin-1").lower(), v.decode("latin-1")
        out[name] = f"{out[name]}, {value}" if name in out else value
    return out


class _Httptools:
    """llhttp through httptools' callbacks; events queue in order, pipelined requests
    included."""

    def __init__(self, max_head_bytes: int) -> None:
        assert httptools is not None
        self.max_head_bytes = max_head_bytes
        self._events: deque[Event] = deque()
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._size = 0  # of the header lines so far
        self._in_head = True  # between requests or inside a head: bytes count toward it
        self._head_raw = 0

    # httptools' callbacks (a request's state is reset when the one before completes:
    # no on_message_begin, one Python call less per request)
    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        self._size += len(name) + len(value) + 4

    def on_headers_complete(self) -> None:
        p = self._parser
        self._events.append(Head(p.get_method().decode("ascii"), self._url.decode("latin-1"),
                                 _join(self._headers), p.should_keep_alive(),
                                 len(self._url) + self._size))
        self._in_head, self._head_raw = False, 0

    def on_body(self, body: bytes) -> None:
        self._events.append(Body(bytes(body)))

    def on_message_complete(self) -> None:
        self._events.append(END)
        self._in_head, self._head_raw = True, 0
        self._url, self._headers, self._size = b"", [], 0

    def feed(self, data: bytes) -> None:
        if self._in_head:
            self._head_raw += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            raise ApiError(400, "protocol upgrades are not supported") from exc
        except httptools.HttpParserError as exc:
            raise ApiError(400, f"malformed request: {exc}") from exc
        if self._in_head and not self._events and self._head_raw > self.max_head_bytes:
            raise ApiError(431, f"request head over {self.max_head_bytes} bytes")

    def eof(self) -> None:
        """The peer closed its side; nothing more will come."""

    def next_event(self) -> Event:
        return self._events.popleft() if self._events else NEED_DATA

    def next_cycle(self) -> None:
        """The response is sent; the next request may be parsed (llhttp goes on by
        itself)."""


class _H11:
    """h11's state machine, its events turned into ours."""

    def __init__(self, max_head_bytes: int) -> None:
        import h11  # noqa: PLC0415  # not even imported where httptools serves

        self._h11 = h11
        self._conn = h11.Connection(h11.SERVER, max_incomplete_event_size=max_head_bytes)
        self.max_head_bytes = max_head_bytes

    def feed(self, data: bytes) -> None:
        h11 = self._h11
        try:
            self._conn.receive_data(data)
        except h11.RemoteProtocolError as exc:
            raise ApiError(exc.error_status_hint, str(exc)) from exc

    def eof(self) -> None:
        self.feed(b"")

    def next_event(self) -> Event:
        h11 = self._h11
        try:
            event: Any = self._conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise ApiError(exc.error_status_hint, str(exc)) from exc
        if event is h11.NEED_DATA or event is h11.PAUSED:
            return NEED_DATA
        if isinstance(event, h11.Request):
            headers = _join(list(event.headers))
            keep = (event.http_version == b"1.1"
                    and "close" not in headers.get("connection", "").lower())
            size = len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers)
            return Head(event.method.decode("ascii"), event.target.decode("latin-1"),
                        headers, keep, size)
        if isinstance(event, h11.Data):
            return Body(bytes(event.data))
        if isinstance(event, h11.EndOfMessage):
            # h11 wants its own response sent before the next cycle: it is not, so play
            # one to it (the bytes go nowhere; the server writes its own).
            return END
        raise ApiError(400, "connection closed mid-request")

    def next_cycle(self) -> None:
        h11, conn = self._h11, self._conn
        if conn.our_state is h11.SEND_RESPONSE:
            conn.send(h11.Response(status_code=204, headers=[]))
        if conn.our_state is h11.SEND_BODY:
            conn.send(h11.EndOfMessage())
        try:
            conn.start_next_cycle()
        except h11.LocalProtocolError as exc:  # the request said close: none follows
            raise ApiError(400, "no further request on this connection") from exc


Parser = _Httptools | _H11


def parser(max_head_bytes: int, *, prefer_c: bool = True) -> Parser:
    """A request parser for one connection: httptools when installed (and preferred)."""
    if prefer_c and httptools is not None:
        return _Httptools(max_head_bytes)
    return _H11(max_head_bytes)


def backend(prefer_c: bool = True) -> str:
    return "httptools" if prefer_c and httptools is not None else "h11"


REASONS = {200: "OK", 204: "No Content", 400: "Bad Request", 401: "Unauthorized",
           403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
           408: "Request Timeout", 409: "Conflict", 413: "Content Too Large",
           415: "Unsupported Media Type", 422: "Unprocessable Content",
           429: "Too Many Requests", 431: "Request Header Fields Too Large",
           500: "Internal Server Error", 503: "Service Unavailable",
           507: "Insufficient Storage"}
_STATUS_LINES: dict[int, bytes] = {}


def response_head(status: int, content_type: str, length: int, server: bytes,
                  headers: dict[str, str], *, close: bool) -> bytes:
    """The status line and headers of a response with a `length`-byte body."""
    line = _STATUS_LINES.get(status)
    if line is None:
        line = _STATUS_LINES.setdefault(
            status, f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}\r\n".encode())
    parts = [line, b"content-type: ", content_type.encode("latin-1"),
             b"\r\ncontent-length: ", str(length).encode(), b"\r\nserver: ", server, b"\r\n"]
    for k, v in headers.items():
        if k == "connection":
            continue
        _check_header(k, v)
        parts += [k.encode("latin-1"), b": ", v.encode("latin-1"), b"\r\n"]
    if close:
        parts.append(b"connection: close\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def _check_header(name: str, value: str) -> None:
    """A response header the handlers set: no line breaks (no header injection)."""
    if (not name or "\r" in name or "\n" in name or "\0" in name or "\r" in value
            or "\n" in value or "\0" in value):
        raise ValueError(f"invalid response header {name!r}")
