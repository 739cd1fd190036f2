"""The HTTP/1.1 request parsers behind the agent's server (`agent.serving.h1`): httptools
(llhttp, C) and h11 (pure Python, armv7l's) give the same events for the same bytes, bound
a request head while it arrives, and refuse malformed input with the status to answer."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import ApiError
from agent.serving import h1

BACKENDS = ["httptools", "h11"]


def _parser(backend: str) -> h1.Parser:
    return h1.parser(16 * 1024, prefer_c=backend == "httptools")


def _events(p: h1.Parser, *chunks: bytes) -> list[object]:
    """Every event the chunks give, fed one by one; ends at NEED_DATA. After END of a
    keep-alive request the parser is told the response went out (next_cycle), as the
    server does; after one that closes, the server reads no more."""
    out: list[object] = []
    keep = True
    for chunk in chunks:
        p.feed(chunk)
        while (ev := p.next_event()) is not h1.NEED_DATA:
            out.append(ev)
            if isinstance(ev, h1.Head):
                keep = ev.keep_alive
            if ev is h1.END:
                if not keep:
                    return out
                p.next_cycle()
    return out


def _flat(events: list[object]) -> list[object]:
    """Body chunks joined per request (parsers may split them differently)."""
    out: list[object] = []
    for ev in events:
        if isinstance(ev, h1.Body) and out and isinstance(out[-1], h1.Body):
            out[-1] = h1.Body(out[-1].data + ev.data)
        else:
            out.append(ev)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_pipelined_requests_with_length_and_chunked_bodies(backend: str) -> None:
    raw = (b"POST /v2/models/m/infer?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
           b"X-A: 1\r\nx-a: 2\r\n\r\nhello"
           b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
           b"GET /v2/health/live HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    # byte by byte: a parser must not depend on where reads split
    evs = _flat(_events(_parser(backend), *[raw[i:i + 1] for i in range(len(raw))]))
    heads = [e for e in evs if isinstance(e, h1.Head)]
    assert [(h.method, h.target) for h in heads] == [
        ("POST", "/v2/models/m/infer?x=1"), ("POST", "/up"), ("GET", "/v2/health/live")]
    assert heads[0].headers["x-a"] == "1, 2" and heads[0].headers["content-length"] == "5"
    assert [h.keep_alive for h in heads] == [True, True, False]
    assert [e.data for e in evs if isinstance(e, h1.Body)] == [b"hello", b"abcde"]
    assert sum(e is h1.END for e in evs) == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_http_1_0_does_not_keep_the_connection(backend: str) -> None:
    [head, end] = _events(_parser(backend), b"GET / HTTP/1.0\r\n\r\n")
    assert isinstance(head, h1.Head) and not head.keep_alive and end is h1.END


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_head_that_never_ends_is_refused_while_it_arrives(backend: str) -> None:
    """No CRLF CRLF ever comes: 431 once the head passes the limit (plus one read), not a
    buffer that grows for as long as the client sends."""
    p = _parser(backend)
    p.feed(b"GET / HTTP/1.1\r\nx-big: ")
    with pytest.raises(ApiError) as err:
        for _ in range(64):  # 64 x 4 KiB = 256 KiB, far past 16 KiB
            p.feed(b"a" * 4096)
            assert p.next_event() is h1.NEED_DATA
    assert err.value.status == 431


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("raw", [
    b"GET / HTTP/1.1\r\nbad header\r\n\r\n",
    b"\x00\x01\x02 garbage\r\n\r\n",
    b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"GET / HTTP/1.1\r\nContent-Length: -3\r\n\r\n",
])
def test_malformed_input_is_a_400(backend: str, raw: bytes) -> None:
    with pytest.raises(ApiError) as err:
        _events(_parser(backend), raw)
    assert err.value.status == 400


def test_response_heads_carry_no_injected_lines() -> None:
    head = h1.response_head(200, "application/json", 2, b"edge-agent", {"x-a": "1"},
                            close=True)
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and head.endswith(b"\r\n\r\n")
    assert b"content-length: 2\r\n" in head and b"connection: close\r\n" in head
    with pytest.raises(ValueError, match="invalid response header"):
        h1.response_head(200, "text/plain", 0, b"s", {"x-a": "1\r\nset-cookie: a"},
                         close=False)


TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(requests=st.lists(st.tuples(
    st.sampled_from(["GET", "POST", "PUT", "DELETE"]),
    st.lists(TOKEN, min_size=1, max_size=4),
    st.dictionaries(TOKEN.map(lambda t: "x-" + t), TOKEN, max_size=4),
    st.binary(max_size=300), st.booleans()), min_size=1, max_size=4),
    split=st.integers(1, 97))
def test_both_parsers_agree_on_valid_requests(requests: list[tuple[str, list[str], dict[str,
                                              str], bytes, bool]], split: int) -> None:
    raw = b""
    for method, path, headers, body, chunked in requests:
        lines = [f"{method} /{'/'.join(path)} HTTP/1.1", "host: a"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        if chunked:
            lines.append("transfer-encoding: chunked")
            payload = (f"{len(body):x}\r\n".encode() + body + b"\r\n" if body else b"") + \
                b"0\r\n\r\n"
        else:
            lines.append(f"content-length: {len(body)}")
            payload = body
        raw += ("\r\n".join(lines) + "\r\n\r\n").encode() + payload
    chunks = [raw[i:i + split] for i in range(0, len(raw), split)]
    c_events = _flat(_events(_parser("httptools"), *chunks))
    py_events = _flat(_events(_parser("h11"), *chunks))
    assert c_events == py_events
    assert sum(e is h1.END for e in c_events) == len(requests)
