"""What the agent adds to one inference, measured so that the tools do not hide it.

In one run, on the digits int8 model (TFLite, the raspberry-pi-4 bundle), with the lean
keep-alive client of `bench/lean.py`:

- bare LiteRT `model.run` on one sample (in this process);
- the null HTTP server (asyncio, a fixed 200), on a Unix socket and on TCP (127.0.0.1):
  the floor of a Python HTTP round trip on each;
- the agent: GET /v2/health/live, then POST infer with a JSON body and with the binary
  tensor extension, on one connection and with two more keep-alive connections open and
  idle (as a client's connection pool or a load balancer holds them), on its Unix socket
  and on TCP with the bearer token.

added = agent - null (same transport) - bare runtime: the agent's own work per request
(parsing, the token, validation, admission, scheduling, serialisation). Also the daemon's
RSS serving the model.
The paced rows (null server and agent alike) have the client busy for 200 µs before each
request, as a client that uses an answer before it asks again: back to back, a server
that is still busy after its answer finds the next request waiting and skips the
wake-up, which flatters a server that does more work after each answer.
`--pin` puts the servers (the null server and every thread of each agent) on the last CPU
and this client with the bare runtime on CPU 0, as a device that gives the agent a core of
its own (systemd's `CPUAffinity=`): unpinned, the kernel wakes a server on the core its
client just left, and each finds its caches holding the other's work.
`--before REV` runs a second agent from the agent package as it was at git revision REV,
in the same rounds: the table before and after a change, side by side.

    .venv/bin/python bench/bench_overhead.py [--requests 5000] [--rounds 3] [--pin]
                                             [--before REV]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_agent import ROOT, converted
from fixture_agent import AgentProcess, make_keys, release, write_config
from fixture_mqtt import free_port
from lean import (
    Address,
    LeanClient,
    bare_times,
    infer_binary,
    infer_json,
    null_server,
    p50_us,
    p99_us,
    request_bytes,
    timed,
)

TOKEN = "bench-overhead-token-0123456789abcdef"
#: The paced rows: the client works this long before each request (`lean.timed`).
GAP_S = 200e-6
PACED = ", paced 200 µs"
BEARER = {"Authorization": f"Bearer {TOKEN}"}


def infer_requests(name: str, input_name: str, x: np.ndarray) -> dict[str, bytes]:
    """Prebuilt JSON and binary-extension infer requests for one sample, without and with
    the bearer token (TCP)."""
    return {"json": infer_json(name, input_name, x),
            "binary": infer_binary(name, input_name, x),
            "json+token": infer_json(name, input_name, x, BEARER),
            "binary+token": infer_binary(name, input_name, x, BEARER)}


def overhead_rows(agents: dict[str, AgentProcess], null: tuple[Path, int], model_path: Path,
                  runtime: str, name: str, input_name: str, x: np.ndarray, n: int,
                  rounds: int) -> list[tuple[str, float, float]]:
    """(label, p50 µs, p99 µs) per path and agent, the median of `rounds` interleaved
    rounds."""
    reqs = infer_requests(name, input_name, x)
    live = request_bytes("GET", "/v2/health/live")
    null_sock, null_port = null
    cases: dict[str, tuple[Address, bytes | None, int]] = {
        f"bare {runtime}": (model_path, None, 0),
        "null HTTP server": (null_sock, reqs["binary"], 0),
        "null HTTP server, TCP": (("127.0.0.1", null_port), reqs["binary+token"], 0),
        f"null HTTP server{PACED}": (null_sock, reqs["binary"], 0),
    }
    for tag, agent in agents.items():
        tcp = ("127.0.0.1", agent.tcp_port)  # type: ignore[attr-defined]
        cases |= {f"{tag}agent GET /v2/health/live": (agent.socket, live, 0),
                  f"{tag}agent infer, JSON": (agent.socket, reqs["json"], 0),
                  f"{tag}agent infer, binary tensors": (agent.socket, reqs["binary"], 0),
                  # as a client's pool holds them: two more keep-alive connections, idle
                  f"{tag}agent infer, JSON, 3 connections open": (agent.socket,
                                                                  reqs["json"], 2),
                  f"{tag}agent infer, binary, 3 connections open": (agent.socket,
                                                                    reqs["binary"], 2),
                  f"{tag}agent infer, JSON, TCP + token": (tcp, reqs["json+token"], 0),
                  f"{tag}agent infer, binary, TCP + token": (tcp, reqs["binary+token"], 0),
                  f"{tag}agent infer, binary, TCP + token, 3 open": (
                      tcp, reqs["binary+token"], 2),
                  f"{tag}agent GET /v2/health/live{PACED}": (agent.socket, live, 0),
                  f"{tag}agent infer, JSON{PACED}": (agent.socket, reqs["json"], 0),
                  f"{tag}agent infer, binary{PACED}": (agent.socket, reqs["binary"], 0),
                  f"{tag}agent infer, binary, 3 open{PACED}": (agent.socket,
                                                               reqs["binary"], 2)}
    got: dict[str, list[tuple[float, float]]] = {k: [] for k in cases}
    for _ in range(rounds):
        for label, (where, raw, idle) in cases.items():
            if raw is None:
                samples = bare_times(Path(str(where)), runtime, x, n)
            else:
                held = [LeanClient(where) for _ in range(idle)]
                probe = live if not isinstance(where, tuple) else request_bytes(
                    "GET", "/v2/health/live", headers=BEARER)
                for h in held:  # established keep-alive connections, then idle
                    assert h.request(probe)[0] == 200
                client = LeanClient(where)
                samples = timed(client, raw, n, gap_s=GAP_S if label.endswith(PACED) else 0)
                client.close()
                for h in held:
                    h.close()
            got[label].append((p50_us(samples), p99_us(samples)))
    return [(label, float(np.median([p for p, _ in v])), float(np.median([q for _, q in v])))
            for label, v in got.items()]


def print_rows(rows: list[tuple[str, float, float]]) -> dict[str, float]:
    """Print the table with added = agent - null (same transport) - bare; returns label ->
    added p50."""
    p50 = {label: p for label, p, _ in rows}
    runtime = next(v for k, v in p50.items() if k.startswith("bare"))
    added: dict[str, float] = {}
    print(f"   {'path':52} {'p50':>8} {'p99':>8} {'added p50':>10}")
    for label, p, q in rows:
        extra = ""
        if "agent infer" in label:
            floor = p50["null HTTP server, TCP" if "TCP" in label else
                        f"null HTTP server{PACED}" if label.endswith(PACED) else
                        "null HTTP server"]
            added[label] = p - floor - runtime
            extra = f"{added[label]:10.0f}"
        print(f"   {label:52} {p:8.0f} {q:8.0f} {extra}")
    return added


def pin_process(pid: int, cpu: int) -> None:
    """Every thread of process `pid` on CPU `cpu` (threads it makes later inherit it)."""
    for thread in psutil.Process(pid).threads():
        os.sched_setaffinity(thread.id, {cpu})


def pin_client() -> tuple[int, int]:
    """This process (the client and the bare runtime) on its first CPU: (the CPU for the
    servers, the client's)."""
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})
    return max(cpus), min(cpus)


def old_agent_tree(rev: str, where: Path) -> Path:
    """The agent package (and the profiles it reads) as it was at `rev`, extracted from
    git into `where`."""
    where.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "agent",
                              "firmware_profiles"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(where)], input=archive, check=True)
    return where


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--before", metavar="REV",
                    help="also run the agent as it was at this git revision, side by side")
    ap.add_argument("--pin", action="store_true",
                    help="servers on the last CPU, this client on CPU 0")
    ns = ap.parse_args()
    server_cpu, client_cpu = pin_client() if ns.pin else (None, None)
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
        where = Path(tmp)
        run = converted(where)
        keys = make_keys(where / "keys")
        archive = release(run, where, keys, version=1, profile="raspberry-pi-4")
        agents: dict[str, AgentProcess] = {}
        trees = {"": None}
        if ns.before:
            trees[f"before ({ns.before[:7]}): "] = old_agent_tree(ns.before, where / "old")
        try:
            for tag, tree in trees.items():
                d = where / f"agent{len(agents)}"
                d.mkdir()
                # -P: the working directory (this tree) must not shadow PYTHONPATH's
                env = dict(os.environ, PYTHONPATH=str(tree)) if tree else None
                command = [sys.executable, "-P", "-m", "agent.cli"] if tree else None
                token = d / "api.token"
                token.write_text(TOKEN + "\n")
                token.chmod(0o600)
                port = free_port()
                agent = AgentProcess(write_config(d, keys, profile="raspberry-pi-4",
                                                  api={"tcp_port": port,
                                                       "token_file": str(token)}),
                                     env=env, command=command).start()
                agent.tcp_port = port  # type: ignore[attr-defined]
                agents[tag] = agent
                if server_cpu is not None:
                    assert agent.proc is not None
                    pin_process(agent.proc.pid, server_cpu)
                assert agent.install(archive)[0] == 200
            x = np.random.default_rng(0).uniform(0, 1, (1, 1, 8, 8)).astype(np.float32)
            placed = ("" if server_cpu is None else
                      f", servers on CPU {server_cpu}, client on CPU {client_cpu}")
            print(f"bench_overhead on {psutil.cpu_count()} CPU(s){placed}: digits int8 "
                  f"TFLite, {ns.requests} requests x {ns.rounds} rounds per row (µs; median "
                  f"of rounds); load average {os.getloadavg()[0]:.2f}")
            null_port = free_port()
            with null_server(where / "null.sock", null_port, server_cpu) as null_sock:
                rows = overhead_rows(agents, (null_sock, null_port), run / "model_int8.tflite",
                                     "tflite",
                                     "digits", "serving_default_args_0", x, ns.requests,
                                     ns.rounds)
            print_rows(rows)
            for tag, agent in agents.items():
                assert agent.proc is not None
                where_from = subprocess.run(
                    [sys.executable, "-P", "-c", "import agent; print(agent.__file__)"],
                    env=agent.env, capture_output=True, text=True, check=True).stdout.strip()
                print(f"\n   {tag or 'this tree: '}agent package {where_from}", end="")
                rss = psutil.Process(agent.proc.pid).memory_info().rss / 2**20
                print(f"\n   {tag}agent RSS serving the TFLite model: {rss:.1f} MiB")
        finally:
            for agent in agents.values():
                agent.stop()


if __name__ == "__main__":
    main()
