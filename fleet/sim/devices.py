"""The simulated devices of one worker process: the agent's own fleet link over a
stand-in runtime, every MQTT connection on one `LinkHub`, telemetry and load on one
ticker thread (see `fleet.sim.processes`)."""

from __future__ import annotations

import heapq
import logging
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from agent.config import AgentConfig, DeviceSection, MqttSection, PathsSection
from agent.link.fleetlink import FleetLink
from agent.link.hub import LinkHub
from agent.trust.root import load_pinned_root
from fleet.sim.settings import SimSettings, scratch_dir
from fleet.sim.standin import StandInAgent

log = logging.getLogger("edge_fleet.simulate")
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
                          if settings.state_root is not None else scratch_dir(""))
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
