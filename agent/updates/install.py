"""The one install sequence, shared by the daemon and the fleet simulator's stand-in.

    stage (verify into the store) -> load and self-test (the host) -> activate the slot
    -> serve (the host) -> commit, or wait for a health window (`commit_pending`)

Each step is journaled by the store through the lifecycle table
(`agent.updates.lifecycle`), so a crash at any point is finished by `ModelStore.recover`.
What differs between a device and a simulated one is only the `ModelHost`: how a staged
bundle is loaded and self-tested, and how a model is put in front of requests. One update
at a time: a second one is refused with `Busy`, never queued.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Generic, Protocol, TypeVar

from agent.errors import AgentError, Busy, RejectedError
from agent.serving.metrics import Metrics
from agent.trust.manifest import Manifest
from agent.trust.root import Root
from agent.trust.verify import Device
from agent.updates.store import ModelStore, Staged

log = logging.getLogger("edge_agent")
H = TypeVar("H")

#: Called with each lifecycle step reached ("verified", "self_tested", "activated",
#: "committed") and the manifest, for progress events.
OnStep = Callable[[str, Manifest], None]


@dataclass(frozen=True)
class InstallResult:
    model: str
    version: int
    previous: str | None
    selftest: str


class ModelHost(Protocol[H]):
    """Where installed models run: the daemon's runtimes and scheduler, or a stand-in."""

    def load(self, path: Path, manifest: Manifest) -> H:
        """Load a staged bundle in a new session.

        Raises:
            AgentError: the model does not load.
        """
        ...

    def self_test(self, path: Path, manifest: Manifest, loaded: H) -> str:
        """Run the bundle's self-test on the loaded model; a one-line summary.

        Raises:
            BundleError: check "selftest" when the outputs are not the golden ones.
        """
        ...

    def serve(self, manifest: Manifest, loaded: H) -> None:
        """Put a loaded model in front of requests (a hot swap when one serves)."""
        ...

    def serve_active(self, name: str) -> str:
        """Serve what the store's active slot of `name` now holds (re-verified), or stop
        serving `name` when the slot is empty; returns what happened."""
        ...


class Installer(Generic[H]):
    """Installs, commits and rolls back, one update at a time."""

    def __init__(self, store: ModelStore, host: ModelHost[H], *, root: Callable[[], Root],
                 device: Callable[[], Device], metrics: Metrics,
                 changed: Callable[[], None]) -> None:
        self.store, self.host, self.metrics = store, host, metrics
        self._root, self._device, self._changed = root, device, changed
        self._lock = threading.Lock()
        self._pending: dict[str, Staged] = {}

    def install(self, source: Path, *, now: datetime, commit: bool = True,
                on_step: OnStep | None = None) -> InstallResult:
        """Install a bundle archive or directory while serving.

        Args:
            commit: False leaves the update active but uncommitted (a health window
                follows: `commit_pending` or `roll_back`; a restart rolls it back).
            on_step: progress callback.

        Raises:
            Busy: another install is running.
            RejectedError: verification failed (nothing changed).
            AgentError: load or self-test failed (the old model keeps serving).
        """
        if not self._lock.acquire(blocking=False):
            raise Busy("another update is in progress; try again when it finishes")
        try:
            return self._install(source, now, commit, on_step or (lambda _s, _m: None))
        finally:
            self._lock.release()

    def _install(self, source: Path, now: datetime, commit: bool, step: OnStep
                 ) -> InstallResult:
        try:
            staged = self.store.stage(source, self._root(), device=self._device(), now=now)
        except RejectedError as exc:
            self.metrics.inc("edge_agent_updates_total", result=f"rejected_{exc.check}")
            raise
        m = staged.manifest
        step("verified", m)
        try:
            loaded = self.host.load(staged.path, m)
            self.store.record(staged, "loaded")
            selftest = self.host.self_test(staged.path, m, loaded)
            self.store.record(staged, "self_tested")
        except AgentError as exc:
            self.store.fail(staged, str(exc))
            self.metrics.inc("edge_agent_updates_total", result="failed")
            raise
        step("self_tested", m)
        slots = self.store.activate(staged)
        self.host.serve(m, loaded)
        step("activated", m)
        self._changed()
        if commit:
            self._commit(staged)
            step("committed", m)
        else:
            self._pending[m.name] = staged
        return InstallResult(m.name, m.version, slots.previous, selftest)

    def _commit(self, staged: Staged) -> None:
        self.store.commit(staged)
        self._changed()
        self.metrics.inc("edge_agent_updates_total", result="committed")
        log.info("update.committed model=%s version=%d", staged.manifest.name,
                 staged.manifest.version)

    def commit_pending(self, name: str) -> int:
        """Commit the update of `name` that a health window was watching; its version.

        Raises:
            KeyError: no update of `name` is waiting (programmer misuse).
        """
        with self._lock:
            staged = self._pending.pop(name)
            self._commit(staged)
            return staged.manifest.version

    def roll_back(self, name: str, reason: str) -> str:
        """Serve the previous slot of `name` again (hot swap); what serves now.

        Raises:
            BundleError: check "no_previous" when there is nothing to go back to.
        """
        with self._lock:
            self._pending.pop(name, None)
            self.store.roll_back(name, reason)
            note = self.host.serve_active(name)
        self._changed()
        return note

    def recheck(self, root: Root) -> list[str]:
        """After the trusted root changed: verify every active bundle again under `root`;
        one it no longer accepts (e.g. signed only by keys it revoked) falls back to the
        previous slot, which then serves. Returns what fell back."""
        notes: list[str] = []
        with self._lock:
            for name in self.store.models():
                fell = False
                while (slot := self.store.slots(name).active) is not None:
                    try:
                        self.store.check_installed(name, slot, root)
                        break
                    except RejectedError as exc:
                        why = (f"{name} {slot}: not valid under root v{root.version} "
                               f"({exc.check}: {str(exc)[:200]}); falling back")
                        self.store.fall_back(name, why)
                        notes.append(why)
                        fell = True
                if fell:
                    notes.append(self.host.serve_active(name))
        if notes:
            self._changed()
        return notes

    def serving_lock(self) -> threading.Lock:
        """Held while the served models change (install, rollback); a runtime restart
        takes it too."""
        return self._lock
