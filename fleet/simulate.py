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
import heapq
import logging
import multiprocessing
import os
import random
import resource
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from agent import __version__
from agent.config import AgentConfig, DeviceSection, MqttSection, PathsSection
from agent.errors import BundleError
from agent.link.detectors import reference_confidence
from agent.link.fleetlink import FleetLink
from agent.link.hub import LinkHub
from agent.link.telemetry import LATENCY
from agent.serving.admission import Reading, Thermal, ThermalLimits
from agent.serving.metrics import Metrics
from agent.serving.scheduler import DriftSample
from agent.trust.identity import generate_device_key, load_report_signer, read_device_public
from agent.trust.manifest import Manifest
from agent.trust.root import Root, load_pinned_root
from agent.trust.signatures import PublicKey
from agent.trust.verify import Device
from agent.updates.install import Installer, InstallResult, OnStep
from agent.updates.store import ModelStore
from fleet._proc import pid_alive
from fleet.errors import FleetError

log = logging.getLogger("edge_fleet.simulate")
DEFAULT_FAULTS = ("selftest", "latency", "drift")
_SHM = Path("/dev/shm")
#: Devices a worker process gets at least before another process (up to one per core) is
#: worth its own interpreter.
MIN_PER_PROCESS = 250
FAULTS = (*DEFAULT_FAULTS, "errors")


def fault_plan(names: list[str], percent: float, kinds: tuple[str, ...] = DEFAULT_FAULTS
               ) -> dict[str, str]:
    """Which devices are faulty and how: `percent` of them, spread evenly over the sorted
    names (the first is always faulty when percent > 0), `kinds` taken in turn."""
    if unknown := set(kinds) - set(FAULTS):
        raise FleetError(f"unknown fault kinds {sorted(unknown)}; known: {', '.join(FAULTS)}")
    if percent <= 0 or not kinds:
        return {}
    order = sorted(names)
    count = max(1, round(len(order) * percent / 100))
    step = len(order) / count
    return {order[int(i * step)]: kinds[i % len(kinds)] for i in range(count)}


def device_names(count: int, prefix: str = "sim") -> list[str]:
    """`sim-0000`, `sim-0001`, …: as many digits as the largest needs, at least four."""
    width = max(4, len(str(count - 1)))
    return [f"{prefix}-{i:0{width}d}" for i in range(count)]


class Ticker:
    """One thread running callbacks at their times (a heap), for all simulated devices."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._cv = threading.Condition()
        self._n = 0
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="sim-ticker", daemon=True)
        self._thread.start()

    def call_at(self, when: float, fn: Callable[[], None]) -> None:
        with self._cv:
            self._n += 1
            heapq.heappush(self._heap, (when, self._n, fn))
            self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stop and (not self._heap
                                          or self._heap[0][0] > time.monotonic()):
                    self._cv.wait(None if not self._heap
                                  else self._heap[0][0] - time.monotonic())
                if self._stop:
                    return
                _, _, fn = heapq.heappop(self._heap)
            try:
                fn()
            except Exception:  # one device's bad tick must not stop the others
                log.exception("sim.tick_failed")

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(5)


@dataclass
class StandInResident:
    """A "loaded" model: its manifest and how the stand-in serves it."""

    name: str
    manifest: Manifest
    slow: float = 1.0  # latency factor (the latency fault)
    drifting: bool = False  # the drift fault
    failing: float = 0.0  # share of requests that fail (the errors fault)
    samples: int = 0

    def take_drift(self) -> DriftSample | None:
        ref = self.manifest.reference
        n, self.samples = self.samples, 0
        if n == 0:
            return None
        inputs = np.asarray(ref.input.histogram.fractions, dtype=np.float64)
        classes = np.asarray(ref.output.class_fractions, dtype=np.float64)
        score = ref.output.score
        scores = np.asarray(score.histogram.fractions if score else [], dtype=np.float64)
        confidence = reference_confidence(ref) if ref.output.confidence else 0.0
        over = (1 - score.quantile) if score else 0.0
        if self.drifting:  # mass moves to the other end; one class; less confident
            inputs, scores = inputs[::-1], scores[::-1]
            classes = np.eye(len(classes))[0] if len(classes) else classes
            confidence, over = confidence - 0.3, 0.5
        return DriftSample(input_counts=inputs * n, class_counts=classes * n,
                           score_counts=scores * n, confidence_sum=max(confidence, 0.0) * n,
                           over_threshold=int(over * n), samples=n)


@dataclass
class StandInScheduler:
    residents: dict[str, StandInResident] = field(default_factory=dict)
    reading: Reading = field(default_factory=lambda: Reading(temperature_c=48.0,
                                                            available_bytes=2 << 30))
    thermal: Thermal = Thermal.NORMAL
    thermal_limits: ThermalLimits = field(
        default_factory=lambda: ThermalLimits(throttle_c=80.0, critical_c=90.0,
                                              hysteresis_c=5.0))

    def models(self) -> dict[str, StandInResident]:
        return dict(self.residents)


_MANIFESTS: dict[str, Manifest] = {}


def _shared(m: Manifest) -> Manifest:
    """One object for equal manifests in this process: each device verified and parsed
    its own (the real store's checks), and keeps the first equal one (~10 KiB each)."""
    return _MANIFESTS.setdefault(m.model_dump_json(), m)


class StandInAgent:
    """An `AgentPort` with the real model store, trust checks and install sequence
    (`agent.updates.install.Installer`), and a stand-in runtime: it is its own
    `ModelHost`, where loading is free and the self-test fails only under the
    `selftest` fault."""

    def __init__(self, config: AgentConfig, root: Root, fault: str | None,
                 rng: random.Random) -> None:
        self.config, self.root, self.fault = config, root, fault
        assert config.paths.device_key is not None  # the simulator makes one per device
        self.report_signer = load_report_signer(config.paths.device_key)
        self.store = ModelStore(config.paths.state_dir)
        self.metrics = Metrics()
        self.scheduler = StandInScheduler()
        self.listeners: list[Callable[[], None]] = []
        self.notes: list[str] = []
        self.config_path: Path | None = None
        self.base_latency_s = 0.004 * rng.uniform(0.8, 1.25)
        self.faults = True  # off while the initial release is installed
        self._rng = rng
        self.installer: Installer[Manifest] = Installer(
            self.store, self, root=lambda: self.root, device=lambda: self.device,
            metrics=self.metrics, changed=self._changed)
        for name in self.store.models():
            self.serve_active(name)

    @property
    def serving(self) -> StandInScheduler:
        return self.scheduler

    @property
    def device(self) -> Device:
        return Device(profile=self.config.device.profile, agent_version=__version__,
                      committed=self.store.committed())

    # -- ModelHost ------------------------------------------------------------------------
    def load(self, path: Path, manifest: Manifest) -> Manifest:
        return manifest

    def self_test(self, path: Path, manifest: Manifest, loaded: Manifest) -> str:
        if self.faults and self.fault == "selftest":
            raise BundleError(f"{manifest.name} v{manifest.version} failed its self-test: "
                              "top-1 agreement 12% (simulated fault)", check="selftest")
        return "passed (stand-in)"

    def serve(self, manifest: Manifest, loaded: Manifest) -> None:
        faulty = self.faults
        manifest = _shared(manifest)
        self.scheduler.residents[manifest.name] = StandInResident(
            manifest.name, manifest, slow=4.0 if faulty and self.fault == "latency" else 1.0,
            drifting=faulty and self.fault == "drift",
            failing=0.3 if faulty and self.fault == "errors" else 0.0)

    def serve_active(self, name: str) -> str:
        """Serve the active slot of `name`, re-verified from the store (a start or a
        rollback), as the daemon does; a fault shows only in releases deployed since."""
        d = self.store.active_dir(name)
        if d is None:
            self.scheduler.residents.pop(name, None)
            return f"{name}: nothing left"
        m = _shared(self.store.check_installed(name, d.name, self.root))
        self.scheduler.residents[name] = StandInResident(name, m)
        return f"{name} v{m.version} serving"

    # -- AgentPort ------------------------------------------------------------------------
    def adopt_root(self, raw: bytes, root: Root) -> list[str]:
        self.root = root  # in memory: a simulated device keeps nothing across runs
        return self.installer.recheck(root)

    def install(self, source: Path, *, commit: bool = True,
                on_step: OnStep | None = None) -> InstallResult:
        return self.installer.install(source, now=datetime.now(UTC), commit=commit,
                                      on_step=on_step)

    def commit_pending(self, name: str) -> int:
        return self.installer.commit_pending(name)

    def roll_back(self, name: str, reason: str) -> str:
        return self.installer.roll_back(name, reason)

    def restart_runtime(self) -> str:
        return "stand-in runtime restarted"

    def _changed(self) -> None:
        for listener in self.listeners:
            listener()

    def run_load(self, seconds: float, requests_per_s: float, rng: np.random.Generator
                 ) -> None:
        """The synthetic load of one interval, recorded as the scheduler records it
        (latencies lognormal around the device's base, drawn in one numpy call)."""
        n = max(1, round(seconds * requests_per_s))
        for name, r in self.scheduler.residents.items():
            latencies = self.base_latency_s * r.slow * np.exp(rng.normal(0.0, 0.1, n))
            self.metrics.observe_many(LATENCY, latencies, model=name)
            self.metrics.inc("edge_agent_inferences_total", n, model=name)
            if r.failing:
                self.metrics.inc("edge_agent_errors_total", round(n * r.failing), model=name)
            r.samples += n


class SimDevice(FleetLink):
    """A simulated device: the agent's fleet link over a `StandInAgent`."""

    def __init__(self, sim: Simulator, name: str, fault: str | None) -> None:
        state = sim.state_dir / name
        state.mkdir(parents=True, exist_ok=True)
        config = AgentConfig(
            device=DeviceSection(id=name, fleet=sim.fleet, groups=sim.groups,
                                 profile=sim.profile),
            paths=PathsSection(state_dir=state, root_file=sim.root_file,
                               device_key=sim.keys_dir / f"{name}.key"),
            mqtt=sim.mqtt)
        self.standin = StandInAgent(config, sim.root, fault, random.Random(name))
        mqtt = sim.mqtt
        if sim.certs_dir is not None:
            mqtt = mqtt.model_copy(update={"cert_file": sim.certs_dir / f"{name}.crt",
                                           "key_file": sim.certs_dir / f"{name}.key"})
        super().__init__(self.standin, mqtt, in_memory=True, hub=sim.hub)
        self.sim = sim
        self.stalled_until = 0.0  # monotonic: a stalled device does nothing until then

    def start(self) -> None:
        """The link without its own threads: commands on the simulator's pool, telemetry
        and load on its ticker."""
        self.announce()
        self.link.start()
        self.sim.ticker.call_at(
            time.monotonic() + self.sim.rng.uniform(0, self.settings.interval_s),
            self._sim_tick)

    def enqueue(self, raw: bytes) -> None:
        if (until := self.stalled_until) > time.monotonic():  # held, as by a stopped process
            self.sim.ticker.call_at(until, lambda: self.enqueue(raw))
            return
        self.sim.pool.submit(self.handle_safely, raw)

    # -- faults the chaos runs inject (`SimulatedFleet.inject`) ---------------------------
    def go_offline(self) -> None:
        """Leave the broker (its session stays: commands wait there)."""
        self.link.stop()

    def come_back(self) -> None:
        self.link.start()

    def stall(self, seconds: float) -> None:
        """Stop working for `seconds`: commands and telemetry wait (the connection stays
        up, as for a process stopped with SIGSTOP)."""
        self.stalled_until = time.monotonic() + seconds

    def trust_message(self, kind: str, payload: bytes) -> None:
        self.sim.pool.submit(self.trust.handle, kind, payload)

    def _sim_tick(self) -> None:
        if self.stopping:
            return
        if self.stalled_until > time.monotonic():
            self.sim.ticker.call_at(self.stalled_until, self._sim_tick)
            return
        self.standin.run_load(self.settings.interval_s, self.sim.requests_per_s,
                              self.sim.np_rng)
        self.telemetry.tick(self.sim.process, self.sim.process.system_memory)
        self.sim.ticker.call_at(time.monotonic() + self.settings.interval_s, self._sim_tick)

    @property
    def versions(self) -> dict[str, int]:
        return {n: r.manifest.version for n, r in self.standin.scheduler.residents.items()}


class _Process:
    """What telemetry reads of the process: plausible device figures, not the simulator's."""

    def cpu_percent(self, _interval: Any = None) -> float:
        return 12.0

    def memory_info(self) -> Any:
        return _Figures(rss=96 << 20)

    def system_memory(self) -> Any:
        """A 4 GiB device's memory (psutil.virtual_memory() costs ~150 µs a call: 8 % of
        the simulator's CPU when every device asked it)."""
        return _Figures(available=3 << 30, total=4 << 30)


class _Figures:
    def __init__(self, **figures: int) -> None:
        self.__dict__.update(figures)


@dataclass(frozen=True, kw_only=True)
class SimSettings:
    """What every simulated device shares (picklable: it goes to worker processes)."""

    broker: str
    root_file: Path
    fleet: str | None = None  # default: the root's fleet
    groups: tuple[str, ...] = ("sim",)
    profile: str = "raspberry-pi-4"
    initial: Path | None = None  # a release every device has installed and committed
    telemetry_interval_s: float = 2.0
    health_window_s: float = 2.0
    requests_per_s: float = 40.0
    # Each device's key file (`edge-agent device-key`): DEVICE.key and DEVICE.pub. Made
    # when missing; register the .pub files with `edge-fleet devices import DIR`.
    keys_dir: Path | None = None
    # A broker with mutual TLS: its CA, and each device's certificate `{certs_dir}/{name}.crt`
    # and key `.key` (CN = the device id, `edge-fleet pki issue`).
    ca_file: Path | None = None
    certs_dir: Path | None = None
    # Where the workers keep their devices' state; `SimulatedFleet` makes it and removes
    # it however its workers end.
    state_root: Path | None = None


def _scratch(kind: str) -> Path:
    """A new directory on tmpfs (where a thousand devices' fsyncs cost nothing) named for
    this process, so a later run can remove what a killed one left."""
    return Path(tempfile.mkdtemp(prefix=f"edge-sim-{kind}{os.getpid()}-",
                                 dir=_SHM if _SHM.is_dir() else None))


def remove_orphans() -> list[Path]:
    """Remove the simulator's directories on tmpfs whose process is gone (a run killed
    before it could clean up); returns them."""
    gone = []
    for d in (_SHM.glob("edge-sim-*") if _SHM.is_dir() else []):
        pid = d.name.removeprefix("edge-sim-").removeprefix("keys").partition("-")[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)
            gone.append(d)
    return gone


class Simulator:
    """The simulated devices of one process."""

    def __init__(self, settings: SimSettings, names: list[str], faults: dict[str, str], *,
                 workers: int = 8) -> None:
        self.root_file = settings.root_file
        assert settings.keys_dir is not None  # SimulatedFleet makes the keys first
        self.keys_dir = settings.keys_dir
        self.root = load_pinned_root(settings.root_file.read_bytes())
        self.fleet = settings.fleet or self.root.fleet
        self.groups, self.profile = list(settings.groups), settings.profile
        self.requests_per_s = settings.requests_per_s
        self.certs_dir = settings.certs_dir
        self.mqtt = MqttSection(brokers=[settings.broker], ca_file=settings.ca_file,
                                telemetry_interval_s=settings.telemetry_interval_s,
                                health_window_s=settings.health_window_s, keepalive_s=60)
        self.state_dir = (Path(tempfile.mkdtemp(dir=settings.state_root))
                          if settings.state_root is not None else _scratch(""))
        self.rng = random.Random(0)
        self.np_rng = np.random.default_rng(0)  # the ticker's thread alone draws from it
        self.ticker = Ticker()
        self.hub = LinkHub(name="sim-hub")
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="sim-cmd")
        self.process = _Process()
        self.devices = {n: SimDevice(self, n, faults.get(n)) for n in names}

    def install_initial(self, archive: Path) -> None:
        """Install a first release on every device (verified and committed, offline)."""
        for d in self.devices.values():
            if not d.standin.store.models():
                d.standin.faults = False
                try:
                    d.standin.install(archive, commit=True)
                finally:
                    d.standin.faults = True

    def start(self, *, connect_timeout_s: float = 300) -> int:
        """Connect every device; returns how many are connected."""
        for d in self.devices.values():
            d.start()
        end = time.monotonic() + connect_timeout_s
        for d in self.devices.values():
            d.link.connected.wait(max(0.0, end - time.monotonic()))
        return sum(d.link.connected.is_set() for d in self.devices.values())

    def stop(self, timeout_s: float = 15) -> None:
        self.ticker.stop()  # no more ticks, then each device's link (FleetLink.stop)
        for d in self.devices.values():  # every link told first (the hub says goodbye
            d.stop(wait=False)  # for each in turn), then waited for, up to timeout_s
        end = time.monotonic() + timeout_s
        for d in self.devices.values():
            d.link.stop(timeout_s=max(0.001, end - time.monotonic()))
        self.hub.close()
        self.pool.shutdown(wait=False, cancel_futures=True)
        for d in self.devices.values():
            d.outbox.close()
            d.nonces.close()
        shutil.rmtree(self.state_dir, ignore_errors=True)

    def versions(self) -> dict[str, dict[str, int]]:
        return {n: d.versions for n, d in self.devices.items()}

    def inject(self, fault: str, names: list[str], seconds: float = 0.0) -> None:
        """`offline`, `online` or `stall` (for `seconds`) the named devices of this process."""
        for n in names:
            d = self.devices.get(n)
            if d is None:
                continue
            if fault == "offline":
                d.go_offline()
            elif fault == "online":
                d.come_back()
            elif fault == "stall":
                d.stall(seconds)


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
            settings = replace(settings, keys_dir=_scratch("keys"))
        self.state_root = _scratch("")
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
