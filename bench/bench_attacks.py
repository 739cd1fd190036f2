"""The daemon under the attack suite of issue 13, in one run, with two observers running the
whole time: a liveness probe (`GET /v2/health/live` every 10 ms on a kept-alive
connection; its slowest answer bounds the longest event-loop stall a client can see) and
an RSS sampler (every 20 ms; the peak against the unit's MemoryMax for this config).

1. a well-behaved client alone: JSON inference on a kept-alive connection, p50/p99;
2. the same client while 50 slowloris connections trickle a header line every second
   (each is cut at `head_timeout_s` and comes back);
2b. the same client under the mix of issue 26 at once: 40 slowloris connections, two
   loops posting ~4 MiB JSON, two loops pipelining 32 requests per write, and 70 idle
   connections on the inference socket, while an admin probe asks for the status every
   50 ms (how many answers were not 200) and TCP with the token is tried once a second;
3. the attacks, one after the other: tar header bombs uploaded to the admin socket, four
   250k-sample UINT8 requests at once, two 10,000-sample JSON requests (3 MB, within
   max_json_bytes and the budget: decoded and answered), 1,100 idle connections, 8
   unauthenticated TCP clients with 16 MB bodies, a 64 KiB head, Content-Length with
   Transfer-Encoding, a body nested 100,000 deep, a 3,000-character model name; each
   with the answers it got.

    .venv/bin/python bench/bench_attacks.py
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_agent import digits_releases
from fixture_agent import AgentProcess, write_config
from fixture_mqtt import free_port
from test_archive_limits import BOMBS

from agent.client import UnixHTTPConnection, call, upload
from agent.config import load_config
from agent.unit import memory_max_bytes

TOKEN = "bench-token-0123456789abcdef"
BODY = {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                    "data": np.random.default_rng(0).uniform(0, 1, 64).tolist()}]}


class Observers:
    """The probe and the RSS sampler, until `stop`."""

    def __init__(self, agent: AgentProcess) -> None:
        self.agent, self.done = agent, threading.Event()
        self.stall_s, self.peak_rss, self.probe_errors = 0.0, 0, 0
        assert agent.proc is not None
        self.proc = psutil.Process(agent.proc.pid)
        self.threads = [threading.Thread(target=self._probe, daemon=True),
                        threading.Thread(target=self._rss, daemon=True)]
        for t in self.threads:
            t.start()

    def _probe(self) -> None:
        conn = UnixHTTPConnection(self.agent.socket, timeout=60)
        while not self.done.wait(0.01):
            t = time.perf_counter()
            try:
                call(conn, "GET", "/v2/health/live")
            except OSError:
                self.probe_errors += 1
                conn = UnixHTTPConnection(self.agent.socket, timeout=60)
                continue
            self.stall_s = max(self.stall_s, time.perf_counter() - t)
        conn.close()

    def _rss(self) -> None:
        while not self.done.wait(0.02):
            self.peak_rss = max(self.peak_rss, self.proc.memory_info().rss)

    def stop(self) -> None:
        self.done.set()
        for t in self.threads:
            t.join()


def client_p50(agent: AgentProcess, n: int, conn: Any = None) -> tuple[float, float]:
    """p50 and p99 (µs) of `n` answered JSON inferences on one kept-alive connection; a
    connection the daemon closes is opened again and counted (`client_p50.reconnects`), and
    a refusal (a status other than 200, with its reason) is counted, not timed
    (`client_p50.refused`)."""
    conn = conn or agent.connection()
    body = json.dumps(BODY).encode()
    samples = []
    client_p50.reconnects = 0  # type: ignore[attr-defined]
    client_p50.refused = Counter()  # type: ignore[attr-defined]
    while len(samples) < n:
        t = time.perf_counter()
        try:
            status, _, out = call(conn, "POST", "/v2/models/digits/infer", body,
                                  {"Content-Type": "application/json"})
        except OSError:
            client_p50.reconnects += 1  # type: ignore[attr-defined]
            conn.close()
            conn = agent.connection()
            continue
        if status != 200:
            try:
                reason = json.loads(out).get("reason") or json.loads(out).get("error", "")
            except ValueError:
                reason = out[:60].decode(errors="replace")
            client_p50.refused[f"{status} {str(reason)[:60]}"] += 1  # type: ignore[attr-defined]
            continue
        samples.append(time.perf_counter() - t)
    conn.close()
    samples.sort()
    return 1e6 * statistics.median(samples), 1e6 * samples[int(0.99 * len(samples))]


def slowloris(agent: AgentProcess, n: int, stop: threading.Event) -> list[threading.Thread]:
    def one() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
                s.connect(str(agent.socket))
                s.sendall(b"POST /v2/models/digits/infer HTTP/1.1\r\nhost: x\r\n")
                i = 0
                while not stop.wait(1.0):
                    s.sendall(f"x-slow-{i}: 1\r\n".encode())  # cut off at head_timeout_s
                    i += 1
    threads = [threading.Thread(target=one, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    return threads


class AttackMix:
    """The mix (see the module docstring, 2b), running on threads until `stop`; `seen`
    fills with what each part got."""

    def __init__(self, agent: AgentProcess, port: int, stop: threading.Event) -> None:
        self.agent, self.port, self.stop = agent, port, stop
        self.seen: dict[str, Any] = {"admin": Counter(), "tcp": Counter(),
                                     "json": Counter(), "pipelined": 0, "idle_held": 0}
        rows = 6500  # ~4 MiB of JSON, under max_json_bytes
        self.big = json.dumps({"inputs": [{"name": "input", "shape": [rows, 1, 8, 8],
                                           "datatype": "FP32",
                                           "data": [0.5] * (rows * 64)}]}).encode()
        small = json.dumps(BODY).encode()
        self.one = (b"POST /v2/models/digits/infer HTTP/1.1\r\nhost: x\r\ncontent-type: "
                    b"application/json\r\ncontent-length: " + str(len(small)).encode()
                    + b"\r\n\r\n" + small)
        slowloris(agent, 40, stop)
        for fn in (self.json_loop, self.json_loop, self.pipelined, self.pipelined,
                   self.admin, self.tcp, self.idle):
            threading.Thread(target=fn, daemon=True).start()

    def json_loop(self) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(OSError):
                conn = self.agent.connection()
                self.seen["json"][call(conn, "POST", "/v2/models/digits/infer", self.big,
                                       {"Content-Type": "application/json"})[0]] += 1
                conn.close()

    def pipelined(self) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
                s.settimeout(10)
                s.connect(str(self.agent.socket))
                while not self.stop.is_set():
                    s.sendall(self.one * 32)
                    got = b""
                    while got.count(b"HTTP/1.1 ") < 32:
                        chunk = s.recv(1 << 16)
                        if not chunk:
                            raise OSError("closed")
                        got += chunk
                    self.seen["pipelined"] += 32

    def admin(self) -> None:
        while not self.stop.wait(0.05):
            try:
                self.seen["admin"][self.agent.call("GET", "/v1/admin/status")[0]] += 1
            except OSError as exc:
                self.seen["admin"][type(exc).__name__] += 1

    def tcp(self) -> None:
        while not self.stop.wait(1.0):
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
                    s.sendall(b"GET /v2/health/live HTTP/1.1\r\nhost: x\r\nauthorization: "
                              b"Bearer " + TOKEN.encode() + b"\r\nconnection: close\r\n\r\n")
                    head = s.recv(64)
                    self.seen["tcp"][head.split(b" ")[1].decode() if head else "closed"] += 1
            except OSError as exc:
                self.seen["tcp"][type(exc).__name__] += 1

    def idle(self) -> None:
        held: list[socket.socket] = []
        while not self.stop.is_set():
            while len(held) < 70 and not self.stop.is_set():
                with contextlib.suppress(OSError):
                    s = socket.socket(socket.AF_UNIX)
                    s.connect(str(self.agent.socket))
                    held.append(s)
            self.seen["idle_held"] = len(held)
            self.stop.wait(0.5)
            held = [s for s in held if not _closed(s)]  # the daemon closes idle ones
        for s in held:
            s.close()


def _closed(s: socket.socket) -> bool:
    s.setblocking(False)
    try:
        closed = s.recv(1 << 16) == b""
    except BlockingIOError:
        closed = False
    except OSError:
        closed = True
    if closed:
        s.close()
    else:
        s.setblocking(True)
    return closed


def raw(path: Path, data: bytes, timeout: float = 30.0) -> str:
    """Send `data` on a fresh Unix connection; the status line's code, or what happened."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        try:
            s.sendall(data)
        except OSError as exc:
            return type(exc).__name__
        head = s.recv(4096)
    return head.split(b" ", 2)[1].decode() if head else "closed without an answer"


def payload_attacks(agent: AgentProcess, where: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    bombs: Counter[str] = Counter()
    for name, build in BOMBS.items():
        path = where / f"{name}.tar.gz"
        path.write_bytes(gzip.compress(build() + bytes(1024), compresslevel=9))
        status, body = upload(agent.admin_socket, path)
        bombs[f"{status} {body.get('check') if isinstance(body, dict) else ''}"] += 1
    out["tar header bombs (admin upload)"] = dict(bombs)

    big = np.zeros((250_000, 1, 8, 8), np.uint8).tobytes()
    head = json.dumps({"inputs": [{"name": "input", "shape": [250_000, 1, 8, 8],
                                   "datatype": "UINT8",
                                   "parameters": {"binary_data_size": len(big)}}]}).encode()
    answers: list[int] = []

    def huge() -> None:
        conn = agent.connection()
        answers.append(call(conn, "POST", "/v2/models/digits/infer", head + big, {
            "Inference-Header-Content-Length": str(len(head)),
            "Content-Type": "application/octet-stream"})[0])
        conn.close()
    _together(huge, 4)
    out["4 x 250k-sample UINT8 requests"] = dict(Counter(answers))

    rows = 10_000  # under max_json_bytes and the budget: decoded and answered off the loop
    body = json.dumps({"inputs": [{"name": "input", "shape": [rows, 1, 8, 8],
                                   "datatype": "FP32", "data": [0.5] * (rows * 64)}]})
    answers = []

    def large_json() -> None:
        conn = agent.connection()
        answers.append(call(conn, "POST", "/v2/models/digits/infer", body.encode(),
                            {"Content-Type": "application/json"})[0])
        conn.close()
    _together(large_json, 2)
    out[f"2 x {rows:,}-sample JSON requests ({len(body) / 1e6:.0f} MB)"] = dict(
        Counter(answers))

    return out


def connection_attacks(agent: AgentProcess, port: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    held: list[socket.socket] = []
    seen: Counter[str] = Counter()
    for _ in range(1100):
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(5)
        try:
            s.connect(str(agent.socket))
        except OSError as exc:  # the listen backlog, not the daemon, said no
            seen[type(exc).__name__] += 1
            s.close()
            continue
        held.append(s)
    for s in held[-100:]:  # past the cap: a 503 at once, then closed
        s.settimeout(2)
        try:
            first = s.recv(64)
            seen[first.split(b" ")[1].decode() if first else "closed"] += 1
        except TimeoutError:
            seen["held (under the cap)"] += 1
    for s in held:
        s.close()
    out["1,100 idle connections (last 100 read)"] = {"connected": len(held), **seen}
    out["then a new request"] = agent.call("GET", "/v2/health/live")[0]

    answers: list[int] = []

    def unauthenticated() -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(b"POST /v2/models/digits/infer HTTP/1.1\r\nhost: x\r\n"
                      b"content-length: 16000000\r\n\r\n")
            answers.append(int(s.recv(4096).split(b" ")[1]))
    _together(unauthenticated, 8)
    out["8 unauthenticated TCP clients, 16 MB bodies"] = dict(Counter(answers))

    out["64 KiB head"] = raw(agent.socket, b"GET /v2/health/live HTTP/1.1\r\nhost: x\r\n"
                             + b"x-pad: " + b"a" * 65536 + b"\r\n\r\n")
    out["Content-Length with Transfer-Encoding"] = raw(
        agent.socket, b"POST /v2/models/digits/infer HTTP/1.1\r\nhost: x\r\ncontent-length: 5"
        b"\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n")
    deep = b"[" * 100_000 + b"]" * 100_000
    out["body nested 100,000 deep"] = raw(
        agent.socket, b"POST /v2/models/digits/infer HTTP/1.1\r\nhost: x\r\ncontent-length: "
        + str(len(deep)).encode() + b"\r\n\r\n" + deep)
    out["3,000-character model name"] = raw(
        agent.socket, f"GET /v2/models/{'m' * 3000} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
    return out


def _together(fn: Callable[[], None], n: int) -> None:
    threads = [threading.Thread(target=fn) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000)
    ns = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-attacks-") as tmp:
        where = Path(tmp)
        keys, (v1,) = digits_releases(where, 1)
        token = where / "api.token"
        token.write_text(TOKEN)
        token.chmod(0o600)
        port = free_port()
        config = write_config(where, keys, profile="x86_64-generic",  # a Pi 4's budget
                              api={"tcp_port": port, "token_file": str(token)},
                              scheduler={"memory_budget_bytes": 256 << 20})
        agent = AgentProcess(config).start()
        assert agent.install(v1)[0] == 200
        limit = memory_max_bytes(load_config(config))
        watch = Observers(agent)
        alone = client_p50(agent, ns.requests)
        stop = threading.Event()
        slow = slowloris(agent, 50, stop)
        time.sleep(2)  # let the 50 connections open and start trickling
        during = client_p50(agent, ns.requests)
        stop.set()
        for t in slow:
            t.join(15)
        stop_mix = threading.Event()
        client = agent.connection()  # the well-behaved client's kept-alive connection
        call(client, "GET", "/v2/health/live")
        mix_rss0 = watch.peak_rss
        mix = AttackMix(agent, port, stop_mix).seen
        time.sleep(3)  # the mix under way
        under_mix = client_p50(agent, ns.requests, conn=client)
        reconnects = client_p50.reconnects  # type: ignore[attr-defined]
        refused = dict(client_p50.refused)  # type: ignore[attr-defined]
        stop_mix.set()
        time.sleep(1)
        found = payload_attacks(agent, where) | connection_attacks(agent, port)
        live = agent.call("GET", "/v2/health/live")[0]
        watch.stop()
        print(f"bench_attacks on {psutil.cpu_count()} CPU(s); digits ONNX, memory budget "
              "256 MiB")
        print(f"well-behaved client, {ns.requests} JSON requests (µs): alone p50 {alone[0]:.0f} "
              f"p99 {alone[1]:.0f}; during 50 slowloris p50 {during[0]:.0f} p99 "
              f"{during[1]:.0f} ({during[0] / alone[0]:.2f}x)")
        print(f"  under the mix (40 slowloris, 2 loops of 4 MiB JSON, 2 pipelined loops, 70 "
              f"idle): p50 {under_mix[0]:.0f} p99 {under_mix[1]:.0f}, its connection closed "
              f"{reconnects} time(s), refused {refused or 'never'} "
              f"({under_mix[0] / alone[0]:.2f}x; target <= 3x); admin status answers "
              f"{dict(mix['admin'])}; TCP with the token {dict(mix['tcp'])}; 4 MiB JSON "
              f"answers {dict(mix['json'])}; pipelined answers {mix['pipelined']}; idle "
              f"connections held {mix['idle_held']}; peak RSS before the mix "
              f"{mix_rss0 / 2**20:.1f} MiB")
        for name, result in found.items():
            print(f"  {name:46} {result}")
        print(f"peak RSS {watch.peak_rss / 2**20:.1f} MiB (MemoryMax {limit / 2**20:.0f} MiB); "
              f"longest liveness-probe answer {1000 * watch.stall_s:.1f} ms "
              f"({watch.probe_errors} probe errors); live after: {live}")
        agent.stop()


if __name__ == "__main__":
    main()
