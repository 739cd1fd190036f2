"""A lean HTTP/1.1 client and a null HTTP server, on Unix sockets or TCP, for measuring what
the agent adds to a request without the measuring tools' own cost hiding it.

- `LeanClient`: one raw socket with keep-alive; requests are prebuilt bytes; a response is
  read by its Content-Length. No http.client (whose header parsing and object churn cost
  about as much as the server under test).
- `load`: N keep-alive connections driven from one thread with `selectors` (a request
  out on each, the next as soon as its answer is in): concurrency N for the server under
  test at a fraction of a core, where N client threads would fight it for the CPU;
- the null server (`python bench/lean.py null-server PATH`): asyncio, one Protocol, answers
  every request with a fixed 200 once its head and Content-Length body are in: the floor of
  an HTTP round trip through a Python asyncio server on this machine. The agent minus it,
  minus the bare runtime, is what the agent's own work costs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RECV = 1 << 20


def request_bytes(method: str, path: str, body: bytes = b"",
                  headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: agent"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


#: Where a server listens: a Unix socket's path, or (host, port) for TCP.
Address = str | Path | tuple[str, int]


class LeanClient:
    def __init__(self, where: Address) -> None:
        if isinstance(where, tuple):  # TCP, Nagle off as any HTTP client sets it
            self.sock = socket.create_connection(where)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        else:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(str(where))
        self.buf = bytearray()

    def close(self) -> None:
        self.sock.close()

    def request(self, raw: bytes) -> tuple[int, bytes]:
        """Send one prebuilt request, read its whole response: (status, body)."""
        self.sock.sendall(raw)
        buf = self.buf
        while (end := buf.find(b"\r\n\r\n")) < 0:
            self._recv()
        head = bytes(buf[:end]).lower()
        status = int(head[9:12])
        at = head.find(b"content-length:")
        length = int(head[at + 15:head.find(b"\r\n", at) if head.find(b"\r\n", at) > 0
                          else len(head)]) if at >= 0 else 0
        need = end + 4 + length
        while len(buf) < need:
            self._recv()
        body = bytes(buf[end + 4:need])
        del buf[:need]
        return status, body

    def _recv(self) -> None:
        chunk = self.sock.recv(RECV)
        if not chunk:
            raise ConnectionError("server closed the connection")
        self.buf += chunk


def infer_binary(name: str, input_name: str, x: np.ndarray,
                 headers: dict[str, str] | None = None) -> bytes:
    """A v2 infer request carrying `x` in the binary tensor extension, output binary too."""
    head = json.dumps({"inputs": [{"name": input_name, "shape": list(x.shape),
                                   "datatype": "FP32",
                                   "parameters": {"binary_data_size": x.nbytes}}],
                       "outputs": [{"name": "y", "parameters": {"binary_data": True}}]}
                      ).encode()
    return request_bytes("POST", f"/v2/models/{name}/infer", head + x.tobytes(),
                         {"Inference-Header-Content-Length": str(len(head)),
                          **(headers or {})})


def infer_json(name: str, input_name: str, x: np.ndarray,
               headers: dict[str, str] | None = None) -> bytes:
    """A v2 infer request carrying `x` as JSON numbers."""
    body = json.dumps({"inputs": [{"name": input_name, "shape": list(x.shape),
                                   "datatype": "FP32", "data": x.ravel().tolist()}]}).encode()
    return request_bytes("POST", f"/v2/models/{name}/infer", body,
                         {"Content-Type": "application/json", **(headers or {})})


def bare_times(path: Path, runtime: str, x: np.ndarray, n: int, warmup: int = 200
               ) -> list[float]:
    """Seconds per `model.run(x)` of the bare runtime in this process, after a warm-up."""
    from agent.serving.runtime import open_model  # noqa: PLC0415  # the bench's runtime

    model = open_model(path, runtime)  # type: ignore[arg-type]
    for _ in range(warmup):
        model.run(x)
    out = []
    for _ in range(n):
        t = time.perf_counter()
        model.run(x)
        out.append(time.perf_counter() - t)
    return out


def load(path: str | Path, raw: bytes, *, clients: int, seconds: float) -> tuple[float, int]:
    """Closed-loop load at concurrency `clients` for `seconds`: (answers per second,
    answers that were not 200)."""
    import selectors  # noqa: PLC0415  # only the load generator needs it

    sel = selectors.DefaultSelector()
    conns = [LeanClient(path) for _ in range(clients)]
    for c in conns:
        c.sock.setblocking(False)
        c.sock.sendall(raw)
        sel.register(c.sock, selectors.EVENT_READ, c)
    done = bad = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while time.perf_counter() < deadline:
        for key, _ in sel.select(timeout=0.5):
            c = key.data
            chunk = c.sock.recv(RECV)
            if not chunk:
                raise ConnectionError("server closed a connection under load")
            c.buf += chunk
            while (status := _complete(c.buf)) is not None:
                done += 1
                bad += status != 200
                c.sock.setblocking(True)  # a request is small: send it whole
                c.sock.sendall(raw)
                c.sock.setblocking(False)
    took = time.perf_counter() - t0
    for c in conns:
        sel.unregister(c.sock)
        c.close()
    return done / took, bad


def _complete(buf: bytearray) -> int | None:
    """The status of the first whole response in `buf` (removed from it), or None."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = bytes(buf[:end]).lower()
    at = head.find(b"content-length:")
    length = 0
    if at >= 0:
        stop = head.find(b"\r\n", at)
        length = int(head[at + 15:stop if stop > 0 else len(head)])
    if len(buf) < end + 4 + length:
        return None
    del buf[:end + 4 + length]
    return int(head[9:12])


def timed(client: LeanClient, raw: bytes, n: int, warmup: int = 200,
          gap_s: float = 0.0) -> list[float]:
    """Seconds per request for n requests after a warm-up; every answer must be 200.
    `gap_s`: the client works that long (a busy wait) before each request, as a client
    that does something with an answer before it asks again: the server has gone back
    to waiting for input when the request comes (back to back, a server still busy
    after its answer finds the next request at once, which flatters whatever keeps it
    busy)."""
    for _ in range(warmup):
        status, body = client.request(raw)
        assert status == 200, body[:200]
    out = []
    for _ in range(n):
        if gap_s:
            until = time.perf_counter() + gap_s
            while time.perf_counter() < until:
                pass
        t = time.perf_counter()
        status, _ = client.request(raw)
        out.append(time.perf_counter() - t)
    assert status == 200
    return out


def p50_us(samples: list[float]) -> float:
    return float(np.percentile(np.asarray(samples) * 1e6, 50))


def p99_us(samples: list[float]) -> float:
    return float(np.percentile(np.asarray(samples) * 1e6, 99))


class _Null(asyncio.Protocol):
    ANSWER = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n"
              b"\r\n{}")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.buf = bytearray()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            head = bytes(self.buf[:end]).lower()
            at = head.find(b"content-length:")
            length = 0
            if at >= 0:
                stop = head.find(b"\r\n", at)
                length = int(head[at + 15:stop if stop > 0 else len(head)])
            if len(self.buf) < end + 4 + length:
                return
            del self.buf[:end + 4 + length]
            self.transport.write(self.ANSWER)


async def _serve_null(path: str, port: int | None) -> None:
    loop = asyncio.get_running_loop()
    if port is not None:  # asyncio sets TCP_NODELAY on its TCP transports, as for the agent
        await loop.create_server(_Null, host="127.0.0.1", port=port)
    server = await loop.create_unix_server(_Null, path=path)  # last: the path says "ready"
    async with server:
        await server.serve_forever()


@contextlib.contextmanager
def null_server(path: Path, port: int | None = None,  # type: ignore[no-untyped-def]
                cpu: int | None = None):
    """The null server as a subprocess (like the agent, another process), until exit; on
    TCP port `port` of 127.0.0.1 too when given; on CPU `cpu` alone when given."""
    proc = subprocess.Popen([sys.executable, __file__, "null-server", str(path),
                             *([str(port)] if port is not None else [])])
    if cpu is not None:  # before it starts its loop: one thread, nothing made yet
        os.sched_setaffinity(proc.pid, {cpu})
    try:
        deadline = time.monotonic() + 10
        while not path.exists():
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("the null server did not start")
            time.sleep(0.01)
        yield path
    finally:
        proc.terminate()
        proc.wait(5)
        path.unlink(missing_ok=True)


if __name__ == "__main__" and sys.argv[1:2] == ["null-server"]:
    asyncio.run(_serve_null(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else None))
