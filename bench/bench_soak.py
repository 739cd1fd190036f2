"""A soak: the agent under a steady mixed load for a long time, sampled every minute.

One agent (x86_64-generic profile, ONNX) serves two models, the converted digits model and
a second one, with telemetry on (a local mosquitto as the project ships it: mutual TLS and
the per-device ACL), while this process sends a steady
rate of requests: JSON and binary-tensor infers to both models and TF Serving predicts,
over keep-alive connections. Every `--swap-every` seconds the next version of digits is
installed while the load runs (a hot swap). Every `--sample-every`
seconds it records the agent's RSS, open descriptors, threads, and the p50/p99 latency of
the requests of that interval. Printed as a table with the load average beside each row,
with the trend (least-squares slope per hour, and RSS's range after warm-up), and drawn
to a PNG.

Target (issue 29): no upward trend: RSS within 2 MiB of its level after warm-up,
descriptors and threads flat, p99 flat.

    .venv/bin/python bench/bench_soak.py --minutes 60 [--rate 200] [--png soak.png]

The suite runs it for 5 minutes (tests/test_soak.py) and holds it to those targets.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_agent import converted
from fixture_agent import AgentProcess, make_keys, other_model, release, write_config
from fixture_mqtt import SecureBroker
from lean import LeanClient, infer_binary, infer_json, request_bytes

#: One digits input (1x1x8x8, float32).
SAMPLE = np.random.default_rng(0).uniform(0, 1, (1, 1, 8, 8)).astype(np.float32)


def requests_mix(x: np.ndarray) -> list[tuple[str, bytes]]:
    """The request mix, cycled: JSON and binary infers to both models, a TF Serving
    predict, a metadata read."""
    body = b'{"instances": ' + str(x.tolist()).encode() + b"}"
    return [("infer json digits", infer_json("digits", "input", x)),
            ("infer binary digits", infer_binary("digits", "input", x)),
            ("infer binary digits-b", infer_binary("digits-b", "input", x)),
            ("predict digits", request_bytes("POST", "/v1/models/digits:predict", body)),
            ("infer json digits-b", infer_json("digits-b", "input", x)),
            ("metadata digits", request_bytes("GET", "/v2/models/digits"))]


class Load:
    """Requests at a steady rate over `clients` keep-alive connections, each thread paced
    to its share; latencies and failures collected per sampling interval."""

    def __init__(self, sock: Path, mix: list[tuple[str, bytes]], rate: float,
                 clients: int) -> None:
        self.sock, self.mix, self.rate, self.clients = sock, mix, rate, clients
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.failures = 0
        self.sent = 0
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                        for i in range(clients)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def take(self) -> tuple[list[float], int, int]:
        with self.lock:
            out = (self.latencies, self.failures, self.sent)
            self.latencies, self.failures, self.sent = [], 0, 0
        return out

    def _run(self, i: int) -> None:
        client = LeanClient(self.sock)
        period = self.clients / self.rate
        nxt = time.perf_counter() + period * i / self.clients
        k = i
        while not self.stop.is_set():
            delay = nxt - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            nxt += period
            _, raw = self.mix[k % len(self.mix)]
            k += 1
            t0 = time.perf_counter()
            try:
                status, _ = client.request(raw)
            except OSError:
                status = 0
                client.close()
                client = LeanClient(self.sock)
            took = time.perf_counter() - t0
            with self.lock:
                self.sent += 1
                if status == 200:
                    self.latencies.append(took)
                else:
                    self.failures += 1
        client.close()


def _slope_per_hour(t: list[float], v: list[float]) -> float:
    if len(t) < 2:
        return 0.0
    return float(np.polyfit(np.asarray(t) / 3600, np.asarray(v), 1)[0])


def draw(rows: list[dict[str, float]], png: Path) -> None:
    import matplotlib  # noqa: PLC0415  # only for the picture

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    t = [r["t"] / 60 for r in rows]
    fig, ax = plt.subplots(4, 1, figsize=(8, 9), sharex=True)
    ax[0].plot(t, [r["rss"] for r in rows])
    ax[0].set_ylabel("RSS MiB")
    ax[1].plot(t, [r["fds"] for r in rows], label="descriptors")
    ax[1].plot(t, [r["threads"] for r in rows], label="threads")
    ax[1].legend()
    ax[2].plot(t, [r["p50"] for r in rows], label="p50")
    ax[2].plot(t, [r["p99"] for r in rows], label="p99")
    ax[2].set_ylabel("µs")
    ax[2].legend()
    ax[3].plot(t, [r["rate"] for r in rows])
    ax[3].set_ylabel("answers/s")
    ax[3].set_xlabel("minutes")
    fig.suptitle("edge-agent soak")
    fig.tight_layout()
    fig.savefig(png, dpi=80)


def soak(agent: AgentProcess, load: Load, proc: psutil.Process, versions: list[Path], *,
         minutes: float, sample_every: float, swap_every: float
         ) -> tuple[list[dict[str, float]], int]:
    """Run the load, swap and sample until the time is up: (rows, swaps)."""
    print(f"{'min':>5} {'RSS MiB':>8} {'fds':>5} {'thr':>4} {'p50 µs':>8} "
          f"{'p99 µs':>8} {'ans/s':>7} {'fail':>5} {'swaps':>5}  load", flush=True)
    rows: list[dict[str, float]] = []
    swaps = 0
    t0 = time.monotonic()
    load.start()
    next_sample, next_swap = t0 + sample_every, t0 + swap_every
    end = t0 + minutes * 60
    while (now := time.monotonic()) < end:
        time.sleep(max(0.0, min(next_sample, next_swap, end) - now))
        now = time.monotonic()
        if now >= next_sample:
            lat, fail, sent = load.take()
            us = np.asarray(lat) * 1e6 if lat else np.asarray([0.0])
            row = {"t": now - t0, "rss": proc.memory_info().rss / 2**20,
                   "fds": proc.num_fds(), "threads": proc.num_threads(),
                   "p50": float(np.percentile(us, 50)),
                   "p99": float(np.percentile(us, 99)),
                   "rate": sent / sample_every, "fail": fail}
            rows.append(row)
            print(f"{row['t'] / 60:5.1f} {row['rss']:8.1f} {row['fds']:5.0f} "
                  f"{row['threads']:4.0f} {row['p50']:8.0f} {row['p99']:8.0f} "
                  f"{row['rate']:7.1f} {fail:5d} {swaps:5d}  "
                  f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
            next_sample += sample_every
        # after the sample: a sample taken as a swap's admin connection closes would count
        # its descriptor
        if now >= next_swap:
            swaps += 1
            status, body = agent.install(versions[swaps])
            assert status == 200, body
            next_swap += swap_every
    load.stop.set()
    return rows, swaps


def settled(rows: list[dict[str, float]], warmup_min: float) -> dict[str, float]:
    """The figures of the samples after `warmup_min` minutes: RSS's range and slope,
    descriptors' and threads' ranges, p99's slope (per hour) and its median over the first
    and the last four samples, failures over all rows."""
    after = [r for r in rows if r["t"] >= warmup_min * 60] or rows
    t = [r["t"] for r in after]
    rss = [r["rss"] for r in after]
    fds = [r["fds"] for r in after]
    threads = [r["threads"] for r in after]
    p99 = [r["p99"] for r in after]
    return {"samples": len(after), "rss_min": min(rss), "rss_max": max(rss),
            "rss_range": max(rss) - min(rss), "rss_slope": _slope_per_hour(t, rss),
            "fds_min": min(fds), "fds_max": max(fds),
            "threads_min": min(threads), "threads_max": max(threads),
            "p99_slope": _slope_per_hour(t, p99),
            "p99_first": float(np.median(p99[:4])), "p99_last": float(np.median(p99[-4:])),
            "failures": sum(r["fail"] for r in rows)}


def summary(rows: list[dict[str, float]], swaps: int, warmup_min: float) -> None:
    f = settled(rows, warmup_min)
    print(f"\nafter {warmup_min:g} min of warm-up ({f['samples']:.0f} samples): RSS "
          f"{f['rss_min']:.1f}-{f['rss_max']:.1f} MiB (range {f['rss_range']:.1f} MiB, "
          f"slope {f['rss_slope']:+.2f} MiB/h); descriptors {f['fds_min']:.0f}-"
          f"{f['fds_max']:.0f}; threads {f['threads_min']:.0f}-{f['threads_max']:.0f}; "
          f"p99 slope {f['p99_slope']:+.0f} µs/h; failures {f['failures']:.0f}; "
          f"swaps {swaps}")


def releases_needed(minutes: float, swap_every: float) -> int:
    """Versions of digits a soak of `minutes` installs: v1, and one per swap (`soak` swaps
    every `swap_every` seconds up to and including the end; one spare for the clock's
    rounding)."""
    return int(minutes * 60 // swap_every) + 2


@contextmanager
def soaking_agent(where: Path, run: Path, versions: int
                  ) -> Iterator[tuple[AgentProcess, list[Path]]]:
    """An agent (x86_64-generic) serving digits v1 and digits-b, its telemetry going to a
    mosquitto configured as the project ships it (mutual TLS, the per-device ACL); and
    `versions` signed releases of digits (v1, v2, ...: the agent refuses a downgrade, so
    one per swap)."""
    keys = make_keys(where / "keys")
    archives = [release(run, where, keys, version=v, profile="x86_64-generic")
                for v in range(1, versions + 1)]
    other = other_model(run, where, keys, "digits-b")
    broker = SecureBroker(where / "broker").start()
    try:
        cfg = write_config(where / "agent", keys, profile="x86_64-generic",
                           mqtt={**broker.agent_mqtt("dev-1"), "telemetry_interval_s": 5.0},
                           scheduler={"memory_budget_bytes": 256 << 20})
        agent = AgentProcess(cfg).start()
        try:
            for archive in (archives[0], other):
                status, body = agent.install(archive)
                assert status == 200, body
            yield agent, archives
        finally:
            agent.stop()
    finally:
        broker.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=60.0)
    ap.add_argument("--rate", type=float, default=200.0, help="requests per second")
    ap.add_argument("--clients", type=int, default=3, help="keep-alive connections")
    ap.add_argument("--sample-every", type=float, default=60.0, help="seconds")
    ap.add_argument("--swap-every", type=float, default=180.0,
                    help="seconds between hot swaps of digits")
    ap.add_argument("--warmup", type=float, default=5.0, help="minutes before RSS's level")
    ap.add_argument("--png", type=Path, default=Path("bench/soak.png"))
    ns = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp:
        where = Path(tmp)
        with soaking_agent(where, converted(where),
                           releases_needed(ns.minutes, ns.swap_every)) as (agent, versions):
            assert agent.proc is not None
            proc = psutil.Process(agent.proc.pid)
            load = Load(agent.socket, requests_mix(SAMPLE), ns.rate, ns.clients)
            print(f"bench_soak: {ns.minutes:g} min at {ns.rate:g} requests/s over "
                  f"{ns.clients} connections, a hot swap every {ns.swap_every:g} s, "
                  f"telemetry every 5 s to a TLS broker; {psutil.cpu_count()} CPUs",
                  flush=True)
            rows, swaps = soak(agent, load, proc, versions, minutes=ns.minutes,
                               sample_every=ns.sample_every, swap_every=ns.swap_every)
            summary(rows, swaps, ns.warmup)
            draw(rows, ns.png)
            print(f"curves: {ns.png}")


if __name__ == "__main__":
    main()
