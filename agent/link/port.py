"""`AgentPort`: what the fleet link needs of an agent, and nothing more.

Two classes implement it: the daemon (`agent.daemon.Agent`) and the fleet simulator's
stand-in (`fleet.sim.standin.StandInAgent`). Both install through the same sequence
(`agent.updates.install.Installer`), so a simulated device stages, journals, switches slots
and commits exactly as a real one; only the runtime differs. mypy checks both against this
Protocol where they are handed to `FleetLink`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

from agent.config import AgentConfig
from agent.serving.admission import Reading, Thermal, ThermalLimits
from agent.serving.metrics import Metrics
from agent.serving.scheduler import DriftSample
from agent.trust.identity import ReportSigner
from agent.trust.manifest import Manifest
from agent.trust.root import Root
from agent.updates.install import InstallResult, OnStep
from agent.updates.store import ModelStore


class ServedModel(Protocol):
    """A model in front of requests, as telemetry and the detectors see it."""

    @property
    def name(self) -> str: ...

    @property
    def manifest(self) -> Manifest: ...

    def take_drift(self) -> DriftSample | None:
        """The sampled batches since the last call (then reset); None when none."""
        ...


class ServingPort(Protocol):
    """What the link reads of the scheduler."""

    @property
    def reading(self) -> Reading: ...

    @property
    def thermal(self) -> Thermal: ...

    @property
    def thermal_limits(self) -> ThermalLimits: ...

    def models(self) -> Mapping[str, ServedModel]: ...


class AgentPort(Protocol):
    """The agent as the fleet link drives it."""

    @property
    def config(self) -> AgentConfig: ...

    @property
    def config_path(self) -> Path | None: ...

    @property
    def root(self) -> Root: ...

    @property
    def report_signer(self) -> ReportSigner:
        """Signs everything the device reports (`agent.trust.identity`)."""
        ...

    @property
    def store(self) -> ModelStore: ...

    @property
    def metrics(self) -> Metrics: ...

    @property
    def serving(self) -> ServingPort: ...

    @property
    def notes(self) -> list[str]: ...

    @property
    def listeners(self) -> list[Callable[[], None]]: ...

    def adopt_root(self, raw: bytes, root: Root) -> list[str]:
        """Trust `root` (already verified to chain from the current one) from now on:
        persisted where it survives a restart, and every installed bundle checked again
        under it; returns what fell back (bundles signed only by revoked keys)."""
        ...

    def install(self, source: Path, *, commit: bool = True,
                on_step: OnStep | None = None) -> InstallResult: ...

    def commit_pending(self, name: str) -> int: ...

    def roll_back(self, name: str, reason: str) -> str: ...

    def restart_runtime(self) -> str: ...
