"""A simulated fleet: N devices that run the agent's own fleet link against a stand-in
runtime, each with its own MQTT connection.

What is real in every simulated device: `agent.link.fleetlink.FleetLink` (command verification
with the fleet's root and nonce store, the deploy flow with download, manifest pin,
health window and commit or rollback, telemetry, drift and latency detectors, events,
results), `agent.link.mqtt.MqttLink` (birth, Last Will, QoS 1, the outbox), `agent.link.outbox`,
and `agent.updates.store.ModelStore` (every deploy is downloaded, verified against the signed
manifest and unpacked, journaled and switched between slots exactly as on a device).

What stands in: the runtime. Loading is free, the self-test passes unless the device
carries the `selftest` fault, and serving is a synthetic load of `requests_per_s` per
device whose latencies and drift statistics are recorded into the device's `Metrics` as
the scheduler would, so the real detectors judge them.

Faults (`--faulty P`): P % of the devices, spread evenly over the sorted names (the first
device is always one of them), each with one kind, taken in turn: `selftest` (every new
release fails its self-test), `latency` (a new release serves 4x slower: the health window
rolls it back) and `drift` (its inputs and outputs drift away from the manifest's
reference: anomaly events from the first telemetry interval on; the device's own window
judges latency and errors, so it commits, and the rollout controller's comparison with
the baseline is what catches it); on request (`--fault-kinds`), also `errors` (a new
release fails 30 % of its requests: the health window's error rate rolls it back). A
fault shows only for releases deployed during the simulation, not for the model the
devices start with.

Processes and threads: `SimulatedFleet` spreads the devices over worker processes (see
there); in each, one `agent.link.hub.LinkHub` thread drives every device's MQTT
connection (epoll, paho's external loop, no polling) with a few connector threads for
the TLS handshakes, commands are verified on a shared pool, telemetry and synthetic load
run on one shared ticker thread, and a thread per deploy in progress (mostly asleep in
its health window). What a simulated device would keep on disk is in memory (its outbox
and seen nonces: `MemoryOutbox`, `MemoryNonces`) or on tmpfs (its model store):
nothing of it survives the run, and a power cut is not something it can simulate.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import resource
import shutil
import time
from dataclasses import replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import psutil

from agent.trust.identity import generate_device_key, read_device_public
from agent.trust.signatures import PublicKey
from fleet.errors import FleetError
from fleet.sim.devices import Simulator
from fleet.sim.settings import (
    DEFAULT_FAULTS,
    MIN_PER_PROCESS,
    SimSettings,
    device_names,
    fault_plan,
    remove_orphans,
    scratch_dir,
)

log = logging.getLogger("edge_fleet.simulate")
def _worker(settings: SimSettings, names: list[str], faults: dict[str, str],
            conn: Connection) -> None:
    logging.basicConfig(level=logging.ERROR, format="%(processName)s %(message)s")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # a socket per device
    if soft != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    base = psutil.Process().memory_info().rss  # the shared base: interpreter and modules
    sim = Simulator(settings, names, faults)
    try:
        if settings.initial is not None:
            sim.install_initial(settings.initial)
        conn.send((sim.start(), base))
        while (msg := conn.recv()) != "stop":
            if msg == "versions":
                conn.send(sim.versions())
            elif isinstance(msg, tuple):  # (fault, names, seconds)
                sim.inject(*msg)
    except (EOFError, KeyboardInterrupt):
        pass
    finally:
        sim.stop()


class SimulatedFleet:
    """`count` simulated devices over worker processes of at most `per_process` devices
    (one process has one GIL: signing, verifying and the hub's turns of 2,500 devices
    keep about one core busy at a 2-s telemetry interval), and one per core at least
    while each gets 250 or more (1,000 devices deploying in one process held its GIL:
    a 1,000-device rollout took 46 s with one process and 35 s with two on 2 cores)."""

    def __init__(self, settings: SimSettings, count: int, *, faulty_percent: float = 0,
                 fault_kinds: tuple[str, ...] = DEFAULT_FAULTS, prefix: str = "sim",
                 per_process: int = 2500) -> None:
        remove_orphans()
        self._own_keys = settings.keys_dir is None
        if settings.keys_dir is None:
            settings = replace(settings, keys_dir=scratch_dir("keys"))
        self.state_root = scratch_dir("")
        settings = replace(settings, state_root=self.state_root)
        self.settings = settings
        self.names = device_names(count, prefix)
        self.keys_dir: Path = settings.keys_dir  # type: ignore[assignment]  # set above
        for name in self.names:
            if not (self.keys_dir / f"{name}.key").exists():
                generate_device_key(name, self.keys_dir)
        self.faults = fault_plan(self.names, faulty_percent, fault_kinds)
        n = max(min(os.cpu_count() or 1, -(-count // MIN_PER_PROCESS)),
                -(-count // per_process))
        self._chunks = [self.names[i::n] for i in range(n)]
        self._workers: list[tuple[Any, Connection]] = []
        self.base_rss = 0  # the workers' resident memory before their devices were made

    def start(self, *, timeout_s: float = 600) -> int:
        """Start the workers; returns how many devices connected (each worker waits up to
        300 s for its devices: 10,000 connect in about two minutes on 2 cores)."""
        ctx = multiprocessing.get_context("spawn")
        for i, names in enumerate(self._chunks):
            mine, theirs = ctx.Pipe()
            p = ctx.Process(target=_worker, name=f"sim-{i}", daemon=True, args=(
                self.settings, names, {n: f for n, f in self.faults.items() if n in names},
                theirs))
            p.start()
            self._workers.append((p, mine))
        connected = 0
        self.base_rss = 0
        end = time.monotonic() + timeout_s
        for p, conn in self._workers:
            while not conn.poll(0.2):  # a worker that died is an error now, not at the end
                if not p.is_alive():
                    raise FleetError(f"simulator worker {p.name} ended with exit code "
                                     f"{p.exitcode} before its devices were up")
                if time.monotonic() > end:
                    raise TimeoutError(f"simulator worker {p.name} did not start")
            up, base = conn.recv()
            connected += up
            self.base_rss += base
        return connected

    def usage(self) -> tuple[int, float]:
        """The workers' resident memory now (bytes) and CPU time so far (s)."""
        rss, cpu = 0, 0.0
        for p, _ in self._workers:
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(p.pid)
                rss += proc.memory_info().rss
                t = proc.cpu_times()
                cpu += t.user + t.system
        return rss, cpu

    def inventory(self) -> dict[str, PublicKey]:
        """Each device's report key, to register in the fleet database."""
        out = {}
        for name in self.names:
            pub = read_device_public((self.keys_dir / f"{name}.pub").read_bytes(),
                                     what=f"{name}.pub")
            assert pub.report_key is not None  # made by generate_device_key
            out[name] = pub.report_key
        return out

    def versions(self) -> dict[str, dict[str, int]]:
        """Each device's serving versions (model -> version)."""
        out: dict[str, dict[str, int]] = {}
        for _, conn in self._workers:
            conn.send("versions")
            out.update(conn.recv())
        return out

    def inject(self, fault: str, names: list[str], seconds: float = 0.0) -> None:
        """Take devices `offline` (they leave the broker; their sessions keep commands),
        bring them back `online`, or `stall` them for `seconds`."""
        for chunk, (_, conn) in zip(self._chunks, self._workers, strict=True):
            mine = [n for n in names if n in chunk]
            if mine:
                conn.send((fault, mine, seconds))

    def stop(self) -> None:
        for _, conn in self._workers:
            with contextlib.suppress(OSError):
                conn.send("stop")
        for p, _ in self._workers:
            p.join(15)
            if p.is_alive():
                p.kill()
        self._workers = []
        shutil.rmtree(self.state_root, ignore_errors=True)  # also what a killed worker left
        if self._own_keys:
            shutil.rmtree(self.keys_dir, ignore_errors=True)

    def __enter__(self) -> SimulatedFleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
