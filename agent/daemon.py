"""The daemon: configuration in, a serving agent out.

`Agent` ties the parts together and carries out what the pure cores decide:

* start: load the profile and the trusted root, let the store finish any interrupted update
  (`ModelStore.recover`), then for each model re-verify the active bundle (signatures and
  every hash), load it and run its self-test; a damaged bundle or failed self-test falls
  back to the previous slot, and the journal says why;
* install (local file or directory, one at a time): the sequence of
  `agent.updates.install.Installer` (verify into the store -> load in a second session ->
  self-test -> switch slots -> hot swap in the scheduler -> commit), with this class as its
  `ModelHost`; every step journaled, any failure leaves the old model serving;
* serve: the scheduler and the local API (`agent.api`); systemd notifications.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from agent import __version__, memory
from agent.config import AgentConfig
from agent.durable import check_private, write_atomic
from agent.errors import AgentError, BundleError, ConfigError
from agent.profiles import FirmwareProfile, load_profile
from agent.serving.admission import Budget, Thermal, ThermalLimits
from agent.serving.metrics import Metrics, build_info, process_samples
from agent.serving.runtime import (
    LoadedModel,
    import_runtime,
    load_tflite_delegates,
    open_model,
    with_preprocessing,
)
from agent.serving.scheduler import Resident, Scheduler
from agent.serving.selftest import selftest_loaded
from agent.serving.sensors import Sensors, SystemSensors
from agent.trust.identity import ReportSigner, load_device_key, load_report_signer
from agent.trust.manifest import Manifest
from agent.trust.root import Root, load_pinned_root
from agent.trust.sealing import model_source
from agent.trust.verify import Device
from agent.updates.install import Installer, InstallResult, OnStep
from agent.updates.store import ModelStore

log = logging.getLogger("edge_agent")
# Below this model size a run takes microseconds; a multi-threaded runtime only adds the
# cost of waking its pool (measured in bench/bench_agent.py).
SMALL_MODEL_BYTES = 1 << 20


class Agent:
    def __init__(self, config: AgentConfig, *, sensors: Sensors | None = None,
                 metrics: Metrics | None = None) -> None:
        self.config = config
        self.profile: FirmwareProfile = load_profile(config.device.profile)
        self.metrics = metrics or Metrics()
        self.metrics.add_collector(process_samples)
        self.metrics.add_collector(build_info(__version__))
        state = config.paths.state_dir
        state.mkdir(parents=True, exist_ok=True)
        self.root_path = state / "root.json"
        self.root: Root = self._load_root()
        self.store = ModelStore(state)
        if config.paths.device_key is not None:
            try:
                check_private(config.paths.device_key, "the device key")
            except OSError as exc:
                raise ConfigError(f"cannot read the device key {config.paths.device_key}: "
                                  f"{exc.strerror}") from exc
        self.device_key = (load_device_key(config.paths.device_key)
                           if config.paths.device_key else None)
        self._signer = (load_report_signer(config.paths.device_key)
                        if config.paths.device_key and config.mqtt else None)
        if self._signer is not None and self._signer.device != config.device.id:
            raise ConfigError(f"device key {config.paths.device_key} is device "
                              f"{self._signer.device}'s, not {config.device.id}'s")
        sched, thermal = config.scheduler, config.thermal
        prof_thermal = self.profile.thermal
        self._sensor_path = thermal.sensor or (Path(prof_thermal.sensor)
                                               if prof_thermal.sensor else None)
        self.scheduler = Scheduler(
            budget=Budget(
                memory_budget_bytes=sched.memory_budget_bytes
                or self.profile.memory.model_budget_bytes + self.profile.memory.arena_budget_bytes,
                min_available_bytes=sched.min_available_bytes, queue_max=sched.queue_max,
                max_batch=sched.max_batch),
            thermal_limits=ThermalLimits(
                throttle_c=thermal.throttle_c or prof_thermal.throttle_c,
                critical_c=thermal.critical_c or prof_thermal.critical_c,
                hysteresis_c=thermal.hysteresis_c if thermal.hysteresis_c is not None
                else prof_thermal.hysteresis_c),
            sensors=sensors or SystemSensors(self._sensor_path),
            metrics=self.metrics, max_wait_s=sched.max_wait_ms / 1000,
            sensor_interval_s=thermal.poll_s,
            on_unknown=Thermal[thermal.on_unknown.upper()])
        self._load_lock = threading.Lock()
        # The largest RSS growth each model (name, version) has shown at a load. A reload
        # reuses memory the process freed at the unload and grows less: the first load
        # is the honest figure (LiteRT's XNNPACK, for one, keeps its own packed copy of
        # the weights), so later loads are charged at least that.
        self._measured: dict[tuple[str, int], int] = {}
        self._loaded_delegates: list[Any] | None = None
        self.installer: Installer[tuple[LoadedModel, int]] = Installer(
            self.store, self, root=lambda: self.root, device=lambda: self.device,
            metrics=self.metrics, changed=self._changed)
        # Called after every change of what is served (the fleet link republishes state).
        self.listeners: list[Callable[[], None]] = []
        # Set by `edge-agent run`, so a reload command can re-read it.
        self.config_path: Path | None = None
        self.notes: list[str] = []

    # -- trust ---------------------------------------------------------------------------
    def _load_root(self) -> Root:
        """The newest of the provisioned root and the one accepted since (state dir)."""
        roots = []
        for path in (self.config.paths.root_file, self.root_path):
            if path == self.root_path and not path.exists():
                continue
            try:
                roots.append(load_pinned_root(path.read_bytes()))
            except OSError as exc:
                raise AgentError(f"cannot read the trusted root {path}: {exc.strerror}"
                                 ) from exc
        return max(roots, key=lambda r: r.version)

    def adopt_root(self, raw: bytes, root: Root) -> list[str]:
        """Persist and use a root that chains from the trusted one (`AgentPort`)."""
        write_atomic(self.root_path, raw)
        self.root = root
        log.info("trust.root_adopted version=%d expires=%s", root.version,
                 root.expires.isoformat())
        return self.installer.recheck(root)

    @property
    def report_signer(self) -> ReportSigner:
        if self._signer is None:
            raise ConfigError("no device key configured (paths.device_key)")
        return self._signer

    @property
    def serving(self) -> Scheduler:
        """What serves requests (the fleet link's `ServingPort`)."""
        return self.scheduler

    @property
    def device(self) -> Device:
        return Device(profile=self.config.device.profile, agent_version=__version__,
                      committed=self.store.committed())

    # -- loading -------------------------------------------------------------------------
    def load(self, bundle_dir: Path, manifest: Manifest) -> tuple[LoadedModel, int]:
        """Load a model in a new session (`ModelHost`), behind the manifest's preprocessing;
        returns it and the resident bytes it added (the process's RSS growth, the runtime's
        library imported before it is measured; at least the model file's size and the
        largest growth this model showed before)."""
        import_runtime(manifest.runtime)
        rss = psutil.Process().memory_info().rss
        source = model_source(bundle_dir, manifest, device_key=self.device_key)
        model = open_model(source, manifest.runtime, threads=self.threads_for(manifest),
                           providers=self.profile.runtime.onnx_providers,
                           delegates=self._delegates(manifest))
        model = with_preprocessing(model, manifest)
        grown = psutil.Process().memory_info().rss - rss
        key = (manifest.name, manifest.version)
        self._measured[key] = max(grown, manifest.resources.model_bytes,
                                  self._measured.get(key, 0))
        return model, self._measured[key]

    def _delegates(self, manifest: Manifest) -> list[Any] | None:
        """The profile's TFLite delegates, loaded once; a missing one is a start note, or an
        error when the accelerator has no CPU fallback."""
        if manifest.runtime != "tflite" or not self.profile.runtime.tflite_delegates:
            return None
        if self._loaded_delegates is None:
            acc = self.profile.accelerator
            self._loaded_delegates, problems = load_tflite_delegates(
                self.profile.runtime.tflite_delegates,
                required=acc is not None and not acc.cpu_fallback)
            self.notes += problems
            for p in problems:
                log.warning("runtime.delegate_missing %s", p)
        return self._loaded_delegates

    def threads_for(self, manifest: Manifest) -> int:
        """The profile's threads, capped at the CPUs this process may use; one thread for
        small models, whose runs are shorter than waking a thread pool (tens of µs)."""
        if manifest.resources.model_bytes < SMALL_MODEL_BYTES:
            return 1
        return max(1, min(self.profile.runtime.threads, len(os.sched_getaffinity(0))))

    def _resident(self, manifest: Manifest, model: LoadedModel, size: int) -> Resident:
        batchable = manifest.inputs[0].shape[0] is None
        return Resident(manifest.name, manifest, model, size, batchable)

    def start(self) -> list[str]:
        """Recover the store and load every active model; returns what happened."""
        notes = self.store.recover()
        if self.scheduler.reading.temperature_c is None:
            notes.append(f"no thermal sensor reading ({self._sensor_path or 'psutil'}): "
                         f"thermal state unknown, served as {self.config.thermal.on_unknown} "
                         "(thermal.on_unknown)")
        for name in self.store.models():
            notes += self._start_model(name)
        self.notes = notes + self.notes
        for line in notes:
            log.info("start: %s", line)
        return notes

    def _start_model(self, name: str) -> list[str]:
        notes = []
        while (slot := self.store.slots(name).active) is not None:
            try:
                m = self.store.check_installed(name, slot, self.root)
                d = self.store.bundle_dir(name, slot)
                assert d is not None
                loaded = self.load(d, m)
                self.self_test(d, m, loaded)
            except AgentError as exc:
                why = f"{name} {slot}: not loaded at start ({exc}); falling back"
                self.store.fall_back(name, why)
                notes.append(why)
                continue
            self.serve(m, loaded)
            notes.append(f"{name} v{m.version} verified, self-tested and serving")
            break
        return notes

    def ensure_loaded(self, name: str) -> bool:
        """Load an installed model the scheduler unloaded (LRU) to make room; False when
        `name` is not installed at all."""
        with self._load_lock:
            if name in self.scheduler.models():
                return True
            slot = self.store.slots(name).active
            if slot is None:
                return False
            m = self.store.check_installed(name, slot, self.root)
            d = self.store.bundle_dir(name, slot)
            assert d is not None
            self.serve(m, self.load(d, m))
            self.metrics.inc("edge_agent_model_reloads_total", model=name)
            return True

    # -- install (agent.updates.install: the sequence; this class is its ModelHost) -----
    def install(self, source: Path, *, now: datetime | None = None, commit: bool = True,
                on_step: OnStep | None = None) -> InstallResult:
        """Install a bundle archive or directory while serving (`Installer.install`)."""
        try:
            return self.installer.install(source, now=now or datetime.now(UTC), commit=commit,
                                          on_step=on_step)
        finally:
            memory.release()  # the archive's buffers and the self-test's second session

    def commit_pending(self, name: str) -> int:
        """Commit the update of `name` that a health window was watching; its version."""
        return self.installer.commit_pending(name)

    def roll_back(self, name: str, reason: str) -> str:
        """Serve the previous slot of `name` again (hot swap)."""
        return self.installer.roll_back(name, reason)

    def self_test(self, path: Path, manifest: Manifest,
                  loaded: tuple[LoadedModel, int]) -> str:
        result = selftest_loaded(path, manifest, loaded[0])
        if not result.passed:
            raise BundleError(f"{manifest.name} v{manifest.version} failed its self-test: "
                              f"max |diff| {result.max_abs_diff:.4g} (atol "
                              f"{manifest.selftest.atol}), top-1 agreement "
                              f"{result.top1_agreement:.0%}", check="selftest")
        return f"passed, top-1 agreement {result.top1_agreement:.0%}"

    def serve(self, manifest: Manifest, loaded: tuple[LoadedModel, int]) -> None:
        self.scheduler.load(self._resident(manifest, *loaded))

    def serve_active(self, name: str) -> str:
        if self.store.slots(name).active is None:
            self.scheduler.unload(name)
            return f"{name}: nothing left to serve"
        return "; ".join(self._start_model(name))

    def _changed(self) -> None:
        for listener in self.listeners:
            listener()

    def restart_runtime(self) -> str:
        """Reload every active model in new runtime sessions (re-verified, self-tested)."""
        with self.installer.serving_lock():
            notes = []
            for name in self.store.models():
                self.scheduler.unload(name)
                notes += self._start_model(name)
            return "; ".join(notes) or "no model installed"

    def status(self) -> dict[str, object]:
        models = {}
        for name, r in self.scheduler.models().items():
            s = self.store.slots(name)
            models[name] = {"version": r.manifest.version, "runtime": r.manifest.runtime,
                            "resident_bytes": r.resident_bytes, "slot": s.active,
                            "previous": s.previous, "committed": s.committed}
        return {"device": self.config.device.id, "profile": self.profile.name,
                "agent_version": __version__, "root_version": self.root.version,
                "root_expires": self.root.expires.isoformat(),
                "thermal": self.scheduler.thermal_name,
                "temperature_c": self.scheduler.reading.temperature_c, "models": models,
                "start_notes": self.notes}
