"""The local API's limits against a live daemon: a connection cap, head and body deadlines
(slowloris), the head size, the token before the body on TCP, no request smuggling, and
an answer for every malformed request. Raw sockets, as an attacker would use them."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fixture_agent import AgentProcess, infer_body, write_config
from fixture_mqtt import free_port
from polling import wait_until

from agent.client import call

X86 = "x86_64-generic"


@pytest.fixture(params=["auto", "h11"])
def agent(request: pytest.FixtureRequest, tmp_path: Path, releases: dict[str, Path]
          ) -> Iterator[Any]:
    """The agent with each request parser: httptools (auto, here) and h11 (armv7l's)."""
    token = tmp_path / "api.token"
    token.write_text("s3cret-s3cret-s3cret\n")
    token.chmod(0o600)
    port = free_port()
    # A test that holds heads open while it looks around gets them for longer.
    head_s = 30.0 if request.node.name.startswith("test_a_full_listener") else 1.0
    a = AgentProcess(write_config(tmp_path, releases["keys"], profile=X86, api={
        "max_connections": 6, "head_timeout_s": head_s, "body_timeout_s": 1.0,
        "tcp_port": port, "token_file": str(token), "http_parser": request.param},
        scheduler={"memory_budget_bytes": 48 << 20})).start()
    a.port = port  # type: ignore[attr-defined]
    assert a.install(releases["onnx1"])[0] == 200
    yield a
    a.stop()


def unix(a: AgentProcess, *, admin: bool = False) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(str(a.admin_socket if admin else a.socket))
    return s


def answer(s: socket.socket) -> tuple[int, bytes]:
    """The status and body of the response on `s` (read to the connection's close)."""
    data = b""
    while chunk := s.recv(65536):
        data += chunk
        if b"\r\n\r\n" in data:
            head, _, body = data.partition(b"\r\n\r\n")
            length = int(next((ln.split(b":")[1] for ln in head.split(b"\r\n")
                               if ln.lower().startswith(b"content-length:")), b"0"))
            if len(body) >= length:
                return int(head.split()[1]), body[:length]
    raise AssertionError(f"connection closed without a response: {data[:200]!r}")


def test_slowloris_connections_are_cut_off_and_others_are_served(agent: Any) -> None:
    slow = []
    for _ in range(4):  # a header line now and then, never the end of the head
        s = unix(agent)
        s.sendall(b"GET /v2/health/live HTTP/1.1\r\nhost: x\r\n")
        slow.append(s)
    t0 = time.monotonic()
    for s in slow:
        s.sendall(b"x-slow: 1\r\n")
    assert agent.call("GET", "/v2/health/live")[0] == 200  # served meanwhile
    for s in slow:
        status, body = answer(s)
        assert status == 408 and b"head" in body
    assert time.monotonic() - t0 < 5  # cut at head_timeout_s (1 s), not kept for ever


def tcp_live(a: Any) -> int:
    """GET /v2/health/live over TCP with the token: its status."""
    s = socket.create_connection(("127.0.0.1", a.port), timeout=10)
    s.sendall(b"GET /v2/health/live HTTP/1.1\r\nhost: x\r\nauthorization: Bearer "
              b"s3cret-s3cret-s3cret\r\nconnection: close\r\n\r\n")
    status = answer(s)[0]
    s.close()
    return status


def closed_by_peer(s: socket.socket) -> bool:
    s.setblocking(False)
    try:
        return s.recv(1) == b""
    except BlockingIOError:
        return False
    finally:
        s.setblocking(True)


def connections(agent: Any, listener: str) -> dict[str, int]:
    """The agent's open connections of `listener` by state, from /metrics (asked on the
    admin socket, which has room of its own)."""
    from agent.client import unix_call

    text = unix_call(agent.admin_socket, "GET", "/metrics")[1]
    return {state: int(n) for state, n in re.findall(
        rf'^edge_agent_http_connections\{{listener="{listener}",state="(\w+)"\}} (\d+)$',
        text, re.M)}


def test_a_full_listener_refuses_with_503_and_starves_no_other(agent: Any) -> None:
    """Six connections busy sending a head fill the inference socket (its cap): one more
    there gets 503, while the admin socket and TCP (their own caps) answer at once. Before,
    one cap for all: 70 idle connections on the inference socket made all three 503."""
    busy = []
    for _ in range(6):
        s = unix(agent)
        s.sendall(b"GET /v2/health/live HTTP/1.1\r\nhost: x\r\n")  # never ends its head
        busy.append(s)
    wait_until(lambda: connections(agent, "unix") == {"busy": 6, "idle": 0},
               what="six heads begun on the inference socket")
    extra = unix(agent)
    status, body = answer(extra)
    assert status == 503 and b"too many connections on this listener" in body
    assert agent.call("GET", "/v1/admin/status")[0] == 200  # the admin socket
    assert tcp_live(agent) == 200
    for s in busy:
        s.close()
    wait_until(lambda: agent.call("GET", "/v2/health/live")[0] == 200,
               what="the cap freed again")


def test_idle_connections_make_room_and_wait_less_the_fuller_the_listener(agent: Any) -> None:
    """Six idle connections (connected, nothing sent) fill the inference socket: a new
    client is served, in the place of the longest-idle one (closed by the daemon); and
    the one that went idle when the listener was full waits `MIN_IDLE_S`, not the 60-s
    idle timeout, while the first, idle since the listener was nearly empty, stays."""
    idle = []
    for _ in range(6):
        idle.append(unix(agent))
        time.sleep(0.05)  # an order of arrival (the daemon evicts the longest idle)
    wait_until(lambda: closed_by_peer(idle[-1]), timeout_s=10,
               what="the last idle connection closed at the short idle timeout")
    assert not closed_by_peer(idle[1])
    newcomer = unix(agent)  # five of six in use: room; then one more past the cap
    newcomer.sendall(b"GET /v2/health/live HTTP/1.1\r\nhost: x\r\n\r\n")
    assert answer(newcomer)[0] == 200
    late = unix(agent)
    late.sendall(b"GET /v2/health/live HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    assert answer(late)[0] == 200  # at the cap: served, an idle one made room
    wait_until(lambda: closed_by_peer(idle[0]), timeout_s=5,
               what="the longest-idle connection closed for the newcomer")
    for s in (*idle, newcomer, late):
        s.close()


def test_content_length_with_transfer_encoding_is_refused(agent: Any) -> None:
    s = unix(agent)
    s.sendall(b"POST /v2/models/digits/infer HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\n"
              b"transfer-encoding: chunked\r\n\r\n0\r\n\r\nGET /v1/admin/status HTTP/1.1\r\n"
              b"host: x\r\n\r\n")
    status, body = answer(s)
    assert status == 400 and b"Transfer-Encoding" in body


def test_a_head_over_the_limit_is_431(agent: Any) -> None:
    s = unix(agent)
    s.sendall(b"GET /v2/health/live HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 20_000
              + b"\r\n\r\n")
    assert answer(s)[0] == 431


def test_on_tcp_the_token_is_checked_before_the_body_and_the_route(agent: Any) -> None:
    for request in (
            # a 10 MB body announced and never sent: refused from the head alone
            b"POST /v2/models/digits/infer HTTP/1.1\r\nhost: x\r\ncontent-length: "
            b"10000000\r\n\r\n",
            b"GET /no/such/route HTTP/1.1\r\nhost: x\r\n\r\n",  # 401, not 404
            b"DELETE /v2/health/live HTTP/1.1\r\nhost: x\r\n\r\n"):  # 401, not 405
        s = socket.create_connection(("127.0.0.1", agent.port), timeout=10)
        s.sendall(request)
        assert answer(s)[0] == 401, request
    s = socket.create_connection(("127.0.0.1", agent.port), timeout=10)
    s.sendall(b"GET /v2/health/live HTTP/1.1\r\nhost: x\r\n"
              b"authorization: Bearer s3cret-s3cret-s3cret\r\n\r\n")
    assert answer(s)[0] == 200


def test_a_body_that_never_arrives_is_408(agent: Any) -> None:
    s = unix(agent)
    s.sendall(b"POST /v2/models/digits/infer HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n"
              b"\r\n{")
    assert answer(s)[0] == 408


def test_long_names_and_deep_bodies_get_an_answer(agent: Any) -> None:
    status, _ = agent.call("POST", f"/v2/models/{'m' * 3000}/infer", infer_body("input"))
    assert status == 404
    deep = "[" * 100_000 + "]" * 100_000
    for path in ("/v2/models/digits/infer", "/v1/admin/rollback", "/v1/admin/install"):
        s = unix(agent, admin=path.startswith("/v1/admin/"))
        body = deep.encode()
        s.sendall(f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                  f"content-length: {len(body)}\r\n\r\n".encode() + body)
        status, reply = answer(s)
        assert 400 <= status < 500, (path, status, reply)
        assert json.loads(reply)["error"]
    assert agent.call("GET", "/v2/health/live")[0] == 200


def test_a_declared_shape_past_the_budget_is_refused_before_its_data_is_decoded(
        agent: Any) -> None:
    """250,000 samples would decode to 64 MB of float32 against a 48 MiB budget: 413 from
    the declared shape alone. The data is junk, so a decoder that ran first would say 400."""
    body = {"inputs": [{"name": "input", "shape": [250_000, 1, 8, 8], "datatype": "UINT8",
                        "data": "junk"}]}
    status, reply = agent.call("POST", "/v2/models/digits/infer", body)
    assert (status, reply["reason"]) == (413, "too_large"), reply
    ok = {"inputs": [{"name": "input", "shape": [2, 1, 8, 8], "datatype": "UINT8",
                      "data": "junk"}]}
    assert agent.call("POST", "/v2/models/digits/infer", ok)[0] == 400  # then decoded
    assert agent.call("POST", "/v2/models/digits/infer", infer_body("input"))[0] == 200


def test_json_past_max_json_bytes_is_413_and_the_binary_extension_carries_it(
        agent: Any) -> None:
    """One json.loads holds the GIL (77 ms for 6 MB): JSON is capped at api.max_json_bytes
    (4 MiB), checked before anything is parsed; the binary tensor extension's JSON head is
    small whatever the batch (2,000 rows here, to stay within this agent's 48 MiB budget
    whatever arena the converted model declares)."""
    rows = 10_000
    body = {"inputs": [{"name": "input", "shape": [rows, 1, 8, 8], "datatype": "FP32",
                        "data": [0.123456789] * (rows * 64)}]}
    status, reply = agent.call("POST", "/v2/models/digits/infer", body)
    assert status == 413 and "binary tensor extension" in reply["error"], reply
    rows = 2_000
    raw = bytes(rows * 64 * 4)
    head = json.dumps({"inputs": [{"name": "input", "shape": [rows, 1, 8, 8],
                                   "datatype": "FP32",
                                   "parameters": {"binary_data_size": len(raw)}}]}).encode()
    conn = agent.connection()
    status, _, out = call(conn, "POST", "/v2/models/digits/infer", head + raw, {
        "Inference-Header-Content-Length": str(len(head))})
    conn.close()
    assert status == 200 and json.loads(out)["outputs"][0]["shape"] == [rows, 10], out[:300]


def heavy_wait_s(agent: Any) -> float:
    from agent.client import unix_call

    text = unix_call(agent.admin_socket, "GET", "/metrics")[1]
    found = re.search(r"^edge_agent_http_heavy_wait_seconds_total (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def test_large_json_takes_turns_at_the_heavy_gate_and_binary_tensors_do_not(
        agent: Any) -> None:
    """Three requests of ~330 KB of JSON at once go through the heavy gate one at a time,
    each waiting out its share (so the gate reports waiting), and all are answered; a
    binary-extension request of the same batch never waits there."""
    rows = 400
    body = {"inputs": [{"name": "input", "shape": [rows, 1, 8, 8], "datatype": "FP32",
                        "data": [0.123456789] * (rows * 64)}]}
    results: list[int] = []

    def one() -> None:
        results.append(agent.call("POST", "/v2/models/digits/infer", body)[0])

    threads = [threading.Thread(target=one) for _ in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert results == [200, 200, 200]
    waited = heavy_wait_s(agent)
    assert waited > 0
    raw = bytes(rows * 64 * 4)
    head = json.dumps({"inputs": [{"name": "input", "shape": [rows, 1, 8, 8],
                                   "datatype": "FP32",
                                   "parameters": {"binary_data_size": len(raw)}}]}).encode()
    for _ in range(3):
        conn = agent.connection()
        status, _, _ = call(conn, "POST", "/v2/models/digits/infer", head + raw, {
            "Inference-Header-Content-Length": str(len(head))})
        conn.close()
        assert status == 200
    assert heavy_wait_s(agent) == waited


def _upload_head(size: int, **headers: str) -> bytes:
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return (f"POST /v1/admin/install HTTP/1.1\r\nhost: x\r\ncontent-type: "
            f"application/octet-stream\r\ncontent-length: {size}\r\n{extra}\r\n").encode()


def test_install_takes_the_archive_bytes_and_checks_them_as_they_arrive(
        agent: Any, releases: dict[str, Path]) -> None:
    """The CLI's upload installs (the daemon opens no client path); a body that is not an
    archive is refused on its first bytes, a wrong sha256 after the last, an upload cut
    short or stalled leaves nothing in staging, and what is served does not change."""
    staging = agent.dir / "state" / "store" / "staging"
    s = unix(agent, admin=True)  # not an archive: refused at the magic, before the rest
    s.sendall(_upload_head(10_000_000) + b"<html>" + b"x" * 65536)
    status, reply = answer(s)
    assert status == 415 and "neither a gzip nor a zstd" in json.loads(reply)["error"]
    data = releases["onnx2"].read_bytes()
    s = unix(agent, admin=True)
    s.sendall(_upload_head(len(data), **{"x-bundle-sha256": "0" * 64}) + data)
    status, reply = answer(s)
    assert (status, json.loads(reply)["check"]) == (422, "sha256")
    s = unix(agent, admin=True)  # half the archive, then the client goes away
    s.sendall(_upload_head(len(data)) + data[: len(data) // 2])
    s.shutdown(socket.SHUT_WR)
    assert answer(s)[0] == 400
    s = unix(agent, admin=True)  # half the archive, then nothing: the body deadline
    s.sendall(_upload_head(len(data)) + data[: len(data) // 2])
    assert answer(s)[0] == 408
    wait_until(lambda: not any(staging.iterdir()), what="staging emptied")
    assert agent.call("GET", "/v1/admin/status")[1]["models"]["digits"]["version"] == 1
    status, reply = agent.install(releases["onnx2"])  # the CLI's streamed upload
    assert (status, reply["version"]) == (200, 2), reply
    assert not any(staging.iterdir())


def test_admin_routes_answer_on_the_admin_socket_only(agent: Any) -> None:
    """Two roles: inference clients (the socket's group) cannot install or roll back."""
    import stat

    for method, path in (("GET", "/v1/admin/status"), ("POST", "/v1/admin/rollback")):
        s = unix(agent)
        s.sendall(f"{method} {path} HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{{}}"
                  .encode())
        status, body = answer(s)
        assert status == 403 and b"admin socket" in body, (path, status)
    assert agent.call("GET", "/v1/admin/status")[0] == 200  # the fixture uses the admin one
    assert stat.S_IMODE(agent.admin_socket.stat().st_mode) == 0o600


def test_an_early_refusal_reaches_a_client_still_sending_its_body(agent: Any) -> None:
    """An install answered 415 before its body is read (a JSON path is not an archive):
    the client sent all 512 KiB before reading, and still gets the 415, every time. The
    daemon reads and drops the rest before it closes (a lingering close); closing on
    unread bytes reset the connection and destroyed the answer (1 run in 6 of
    test_admin_install_of_what_is_not_a_bundle…)."""
    body = b'{"path": "/tmp/x.tar"' + b" " * (512 * 1024) + b"}"
    for _ in range(5):
        s = unix(agent, admin=True)
        s.sendall(b"POST /v1/admin/install HTTP/1.1\r\nHost: x\r\nContent-Type: "
                  b"application/json\r\nContent-Length: " + str(len(body)).encode()
                  + b"\r\n\r\n" + body)
        status, out = answer(s)
        s.close()
        assert status == 415 and b"paths" in out


def test_a_method_not_allowed_names_the_allowed_ones(agent: Any) -> None:
    """405 carries `Allow` (RFC 9110 §15.5.6), so a client learns what the path takes."""
    for request, allow in ((b"POST /v2/health/live", b"GET"),
                           (b"GET /v2/models/digits/infer", b"POST"),
                           (b"PUT /v2/systemsharedmemory/region/r/register", b"POST")):
        s = unix(agent)
        s.sendall(request + b" HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n"
                  b"connection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        s.close()
        head = data.partition(b"\r\n\r\n")[0].lower().split(b"\r\n")
        assert head[0].split()[1] == b"405", data
        assert b"allow: " + allow.lower() in head, (request, head)


def read_responses(s: socket.socket, n: int) -> list[tuple[int, bytes]]:
    """The next `n` responses on `s` (status and body each), in the order they came."""
    data, out = b"", []
    while len(out) < n:
        while (end := data.find(b"\r\n\r\n")) >= 0:
            head = data[:end].lower().split(b"\r\n")
            length = int(next((ln.split(b":")[1] for ln in head
                               if ln.startswith(b"content-length:")), b"0"))
            if len(data) < end + 4 + length:
                break
            out.append((int(head[0].split()[1]), data[end + 4:end + 4 + length]))
            data = data[end + 4 + length:]
        if len(out) < n:
            chunk = s.recv(1 << 16)
            assert chunk, f"closed after {len(out)} of {n} responses"
            data += chunk
    return out


def test_pipelined_requests_are_answered_in_order_on_one_connection(agent: Any) -> None:
    """HTTP/1.1 lets a client send requests without waiting for answers: 600 health checks
    in one write with two infers and a repository index (a handler that waits for a
    thread) among them are answered in the order sent, on the one connection. Requests
    answered at once are taken in a loop, not by recursion (nested, 600 of them passed
    Python's recursion limit). A client that closes its side after sending still gets
    every answer (the 50 sent after a waiting handler were dropped)."""
    health = b"GET /v2/health/live HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n"
    body = json.dumps(infer_body("input")).encode()
    infer = (b"POST /v2/models/digits/infer HTTP/1.1\r\nhost: x\r\ncontent-type: "
             b"application/json\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
    index = b"POST /v2/repository/index HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n"
    sent = [health] * 300 + [infer, index] + [health] * 300 + [infer]
    s = unix(agent)
    s.sendall(b"".join(sent))
    got = read_responses(s, len(sent))
    assert [status for status, _ in got] == [200] * len(sent)
    for i, request in enumerate(sent):
        kind = {health: b'"live"', infer: b'"outputs"', index: b'"digits"'}[request]
        assert kind in got[i][1], (i, got[i][1][:120])
    s.sendall(health)  # and the connection still serves
    assert read_responses(s, 1)[0][0] == 200
    s.close()
    # A client that closes its side after sending gets every answer, then the close.
    sent = [health] * 5 + [index] + [health] * 50
    s = unix(agent)
    s.sendall(b"".join(sent))
    s.shutdown(socket.SHUT_WR)
    assert [status for status, _ in read_responses(s, len(sent))] == [200] * len(sent)
    assert s.recv(1) == b""
    s.close()
