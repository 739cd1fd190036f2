"""The stand-in runtime of a simulated device: loading is free, the self-test passes
unless the device carries the `selftest` fault, and serving is a synthetic load recorded
into the device's `Metrics` as the scheduler would (see `fleet.sim.processes`)."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from agent import __version__
from agent.config import AgentConfig
from agent.errors import BundleError
from agent.link.detectors import reference_confidence
from agent.link.telemetry import LATENCY
from agent.serving.admission import Reading, Thermal, ThermalLimits
from agent.serving.metrics import Metrics
from agent.serving.scheduler import DriftSample
from agent.trust.identity import load_report_signer
from agent.trust.manifest import Manifest
from agent.trust.root import Root
from agent.trust.verify import Device
from agent.updates.install import Installer, InstallResult, OnStep
from agent.updates.store import ModelStore

log = logging.getLogger("edge_fleet.simulate")
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
