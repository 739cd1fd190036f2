"""A deploy command carried out: the I/O around the pure deploy flow
(`agent.updates.deploy`).

    download (resume, cap, minimum rate; `agent.updates.fetch`) -> check the manifest pin
    -> install without committing (`AgentPort.install`: verify, stage, load, self-test,
    activate) -> health window: anomalies of the new model (latency against its baseline,
    error rate) roll it back at once, otherwise it is committed.

Every step is an event; the command gets one result. One deploy at a time: another is
refused ("busy"). A device that already serves the release, committed, answers ok at once
(check "already"), so a retried deploy never counts as a failure. A rollback command for
the model cancels the deploy in progress (`cancel`); it waits until the deploy thread has
undone its own work and then says what it did. A crash during the window leaves the update
uncommitted, and the store rolls it back at start; so does a daemon stopping in the window.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.durable import write_atomic
from agent.errors import AgentError, BundleError, Busy, DownloadError, RejectedError
from agent.link.detectors import Anomaly, rate_anomalies
from agent.link.port import AgentPort
from agent.link.reporting import Reporter, jsonable
from agent.link.settings import LinkSettings
from agent.link.telemetry import TelemetryLoop, window
from agent.serving.metrics import Snapshot
from agent.trust.archive import read_archive_head
from agent.trust.command import DeployCommand
from agent.updates.deploy import Flow, Phase, Step, advance
from agent.updates.fetch import FetchLimits, fetch
from agent.updates.install import InstallResult

log = logging.getLogger("edge_agent.fleet")


class DeployJournal:
    """What must outlive the process (`deploy.json`, replaced atomically): the deploy
    command in progress, so an agent restarted after a crash or power cut answers it
    ("interrupted", or "committed" when the commit made it to disk), and which command
    installed each model's committed release, so a retry of the same rollout is answered
    with the command that installed it rather than as "already" current. `path` None: in
    memory (the simulator)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._data: dict[str, Any] = {"running": None, "installed_by": {}}
        if path is not None and path.exists():
            try:
                loaded = json.loads(path.read_text())
            except (OSError, ValueError) as exc:  # a torn file loses only this memory
                log.warning("deploy.journal_unreadable %s: %s", path, exc)
                loaded = {}
            if not isinstance(loaded, dict):
                loaded = {}
            running, by = loaded.get("running"), loaded.get("installed_by")
            self._data = {"running": running if isinstance(running, dict) else None,
                          "installed_by": by if isinstance(by, dict) else {}}

    def _save(self) -> None:
        if self.path is not None:
            write_atomic(self.path, json.dumps(self._data).encode())

    def begin(self, cmd: DeployCommand) -> None:
        self._data["running"] = {"command_id": cmd.id, "model": cmd.model,
                                 "version": cmd.version,
                                 "manifest_sha256": cmd.manifest_sha256}
        self._save()

    def committed(self, cmd: DeployCommand) -> None:
        self.committed_id(cmd.model, cmd.version, cmd.manifest_sha256, cmd.id)

    def committed_id(self, model: str, version: Any, manifest_sha256: Any,
                     command_id: str) -> None:
        self._data["installed_by"][model] = {"version": version,
                                             "manifest_sha256": manifest_sha256,
                                             "command_id": command_id}
        self._save()

    def end(self) -> None:
        self._data["running"] = None
        self._save()

    def running(self) -> dict[str, Any] | None:
        got = self._data.get("running")
        return got if isinstance(got, dict) else None

    def installed_by(self, model: str, version: int, manifest_sha256: str | None
                     ) -> str | None:
        """The command that installed `model` v`version` (with this manifest), if known."""
        got = self._data.get("installed_by", {}).get(model)
        if isinstance(got, dict) and got.get("version") == version and (
                manifest_sha256 is None or got.get("manifest_sha256") == manifest_sha256):
            cmd_id = got.get("command_id")
            return cmd_id if isinstance(cmd_id, str) else None
        return None


class Deployer:
    def __init__(self, agent: AgentPort, reporter: Reporter, telemetry: TelemetryLoop,
                 settings: Callable[[], LinkSettings], *, downloads: Path,
                 stop: threading.Event, journal: DeployJournal | None = None) -> None:
        self.agent, self.report, self.telemetry = agent, reporter, telemetry
        self._settings, self.downloads, self._stop = settings, downloads, stop
        self.journal = journal or DeployJournal(None)
        self._cv = threading.Condition()
        self._flow = Flow(Phase.ALREADY)  # no deploy yet: as if the last one were done
        self._model: str | None = None
        self._version: int | None = None
        self._done = True  # the deploy thread has finished all its I/O

    # -- from the command thread ----------------------------------------------------------
    def busy(self) -> bool:
        with self._cv:
            return not self._done

    def start(self, cmd: DeployCommand) -> None:
        """Run `cmd` on a thread of its own, or refuse it when a deploy is running."""
        with self._cv:
            if not self._done:
                busy = True
            else:
                busy, self._flow, self._done = False, Flow(), False
                self._model, self._version = cmd.model, cmd.version
        if busy:
            self.report.event("deploy.refused", "warning", "a deploy is already in progress",
                              command_id=cmd.id)
            self.report.result(cmd, False, "another deploy is in progress; send it again "
                               "later", "busy")
            return
        threading.Thread(target=self._run, args=(cmd,), name="deploy", daemon=True).start()

    def deploying(self, model: str, version: int) -> bool:
        """True while a deploy of `model` v`version` runs."""
        with self._cv:
            return not self._done and (self._model, self._version) == (model, version)

    def cancel(self, model: str, timeout_s: float) -> Phase | None:
        """Cancel the deploy of `model` in progress and wait until it has undone its work.

        Returns:
            its final phase, or None when no deploy of `model` was running.

        Raises:
            TimeoutError: the deploy did not finish within `timeout_s`.
        """
        with self._cv:
            if self._done or self._model != model:
                return None
            self._flow = advance(self._flow, Step.CANCEL)
            self._cv.notify_all()
            if not self._cv.wait_for(lambda: self._done, timeout_s):
                raise TimeoutError(f"the deploy of {model} did not stop in {timeout_s:g} s")
            return self._flow.phase

    # -- the deploy thread ----------------------------------------------------------------
    def _to(self, step: Step) -> Flow:
        with self._cv:
            self._flow = advance(self._flow, step)
            self._cv.notify_all()
            return self._flow

    def _unless_cancelled(self, step: Step) -> bool:
        """Take `step` out of the health window; False when a cancel took it out first."""
        with self._cv:
            if self._flow.phase is not Phase.WATCHING:
                return False
            self._flow = advance(self._flow, step)
            self._cv.notify_all()
            return True

    def _run(self, cmd: DeployCommand) -> None:
        try:
            self.journal.begin(cmd)
            self._deploy(cmd)
        except Exception as exc:  # the flow must end and the command get its result
            log.exception("deploy.crashed")
            self.report.event("deploy.failed", "error", f"unexpected error: {exc!r}",
                              command_id=cmd.id)
            self.report.result(cmd, False, f"unexpected error: {exc!r}", "install")
        finally:
            if not self._stop.is_set():  # stopping in the window: answered at the restart
                self.journal.end()
            with self._cv:
                self._done = True
                self._cv.notify_all()

    def answer_interrupted(self) -> None:
        """At start: a deploy the agent was running when it stopped (a crash, a power
        cut, a stop during the health window) gets its result now, and partial downloads
        go. The store has already rolled back what was not committed; a commit that
        reached the disk is answered as committed."""
        for part in self.downloads.glob("*.part"):
            part.unlink(missing_ok=True)
        running = self.journal.running()
        if running is None:
            return
        cmd_id, model = str(running.get("command_id")), str(running.get("model"))
        version = running.get("version")
        serving = self.agent.serving.models().get(model)
        committed = self.agent.store.slots(model).committed if serving else None
        if (serving is not None and serving.manifest.version == version
                and committed == version and self.agent.store.active_manifest_sha256(model)
                == running.get("manifest_sha256")):
            self.journal.committed_id(model, version, running.get("manifest_sha256"), cmd_id)
            self.report.result_for(cmd_id, "deploy", True, f"{model} v{version} committed "
                                   "(answered after the agent restarted)")
        else:
            now = f"v{serving.manifest.version}" if serving else "nothing"
            self.report.event("deploy.interrupted", "warning", f"{model} v{version}: the "
                              f"agent stopped during the deploy; {now} serves",
                              command_id=cmd_id)
            self.report.result_for(cmd_id, "deploy", False, f"interrupted: the agent stopped "
                                   f"during the deploy of {model} v{version}; {now} serves",
                                   "interrupted")
        self.journal.end()

    def _begin(self, step: Step) -> bool:
        """The deploy's first step; False when a cancel came before it (nothing done)."""
        with self._cv:
            if self._flow.phase is Phase.CANCELLED:
                return False
            self._flow = advance(self._flow, step)
            self._cv.notify_all()
            return True

    def _already_serving(self, cmd: DeployCommand) -> str | None:
        """"v2" when the device serves this release committed, or a later version
        committed; else None."""
        store = self.agent.store
        committed = store.slots(cmd.model).committed
        serving = self.agent.serving.models().get(cmd.model)
        if committed is None or serving is None or committed < serving.manifest.version:
            return None
        v = serving.manifest.version
        same = store.active_manifest_sha256(cmd.model) == cmd.manifest_sha256
        return f"v{v}" if v > cmd.version or (v == cmd.version and same) else None

    def _deploy(self, cmd: DeployCommand) -> None:
        ev = {"model": cmd.model, "version": cmd.version}
        current = self._already_serving(cmd)
        if not self._begin(Step.BEGIN if current is None else Step.ALREADY_SERVING):
            self.report.event("deploy.cancelled", "warning", f"{cmd.model} v{cmd.version}: "
                              "cancelled by a rollback command before it started",
                              command_id=cmd.id, evidence=ev)
            self.report.result(cmd, False, "cancelled by a rollback command", "cancelled")
            return
        if current is not None:
            self.report.result(cmd, True, f"{cmd.model} {current} already serves, "
                               f"committed (asked for v{cmd.version})", "already",
                               installed_by=self.journal.installed_by(
                                   cmd.model, cmd.version, cmd.manifest_sha256))
            return
        self.report.event("deploy.downloading", "info", f"{cmd.model} v{cmd.version} from "
                          f"{cmd.archive.urls[0]}", command_id=cmd.id, evidence=ev)
        dest = self.downloads / f"{cmd.model}-v{cmd.version}-{cmd.archive.sha256[:8]}.tar"
        try:
            if not self._download(cmd, dest, ev):
                return
            if self._to(Step.DOWNLOADED).phase is Phase.CANCELLED:
                self.report.event("deploy.cancelled", "warning", f"{cmd.model} v{cmd.version}"
                                  ": cancelled by a rollback command before installing",
                                  command_id=cmd.id, evidence=ev)
                self.report.result(cmd, False, "cancelled by a rollback command", "cancelled")
                return
            result = self._install(cmd, dest, ev)
        finally:
            dest.unlink(missing_ok=True)
        if result is None:
            return
        if self._to(Step.INSTALLED).phase is Phase.ROLLED_BACK:
            self._cancelled_in_window(cmd)
            return
        self._watch(cmd, result.previous)

    def _download(self, cmd: DeployCommand, dest: Path, ev: dict[str, object]) -> bool:
        mqtt = self._settings().mqtt
        try:
            fetch(cmd.archive, dest, FetchLimits(
                timeout_s=mqtt.download_timeout_s,
                min_rate_bytes_per_s=mqtt.download_min_rate_bytes_per_s))
            manifest_raw, _ = read_archive_head(dest)
            if hashlib.sha256(manifest_raw).hexdigest() != cmd.manifest_sha256:
                raise BundleError("the archive's manifest is not the one the command pins",
                                  check="manifest_pin")
        except DownloadError as exc:
            self._failed(cmd, "deploy.failed", f"download failed: {exc}", "download", ev)
            return False
        except RejectedError as exc:
            self._failed(cmd, "deploy.rejected", str(exc), exc.check,
                         {"check": exc.check, **jsonable(exc.details), **ev})
            return False
        return True

    def _install(self, cmd: DeployCommand, dest: Path, ev: dict[str, object]
                 ) -> InstallResult | None:
        """Install uncommitted; None when that failed (reported)."""
        try:
            result = self.agent.install(dest, commit=False, on_step=lambda s, m:
                                        self.report.event(f"deploy.{s}", "info",
                                                          f"{m.name} v{m.version} "
                                                          f"{s.replace('_', '-')}",
                                                          manifest=m, command_id=cmd.id))
        except Busy as exc:
            self._to(Step.FAILED)
            self.report.result(cmd, False, str(exc), "busy")
            return None
        except RejectedError as exc:
            self._failed(cmd, "deploy.rejected", str(exc), exc.check,
                         {"check": exc.check, **jsonable(exc.details), **ev})
            return None
        except AgentError as exc:
            self._failed(cmd, "deploy.failed", str(exc), "install", ev)
            return None
        return result

    def _failed(self, cmd: DeployCommand, kind: str, message: str, check: str,
                evidence: dict[str, object]) -> None:
        self._to(Step.FAILED)
        self.report.event(kind, "error", message, command_id=cmd.id, evidence=evidence)
        self.report.result(cmd, False, message, check)

    def _watch(self, cmd: DeployCommand, previous: str | None) -> None:
        """The health window: roll back on the first anomaly of the new model."""
        settings = self._settings()
        end = time.monotonic() + settings.health_window_s
        detector = self.telemetry.latency_detector(cmd.model)
        before = Snapshot(self.agent.metrics)
        while (remaining := end - time.monotonic()) > 0:
            with self._cv:  # a cancel wakes this at once
                self._cv.wait_for(lambda: self._flow.phase is not Phase.WATCHING
                                  or self._stop.is_set(), min(settings.interval_s, remaining))
                phase = self._flow.phase
            if phase is Phase.ROLLED_BACK:
                self._cancelled_in_window(cmd)
                return
            if self._stop.is_set():  # stopping: uncommitted, the store rolls it back
                return
            after = Snapshot(self.agent.metrics)
            w = window(cmd.model, before, after, settings.interval_s)
            before = after
            found = rate_anomalies(w, settings.thresholds)
            if (a := detector.observe(w)) is not None:
                found.append(a)
            if found and previous is not None:
                if self._unless_cancelled(Step.ANOMALY):
                    self._roll_back_unhealthy(cmd, found)
                else:
                    self._cancelled_in_window(cmd)
                return
        if not self._unless_cancelled(Step.WINDOW_OVER):
            self._cancelled_in_window(cmd)  # the cancel came first
            return
        version = self.agent.commit_pending(cmd.model)
        self.journal.committed(cmd)
        self.report.event("deploy.committed", "info", f"{cmd.model} v{version} committed "
                          f"after a {settings.health_window_s:g} s health window",
                          command_id=cmd.id, evidence={"model": cmd.model, "version": version})
        self.report.result(cmd, True, f"{cmd.model} v{version} committed")

    def _cancelled_in_window(self, cmd: DeployCommand) -> None:
        self.agent.roll_back(cmd.model, "cancelled by a rollback command")
        self.report.event("deploy.rolled_back", "warning", f"{cmd.model} v{cmd.version} "
                          "rolled back in its health window: a rollback command cancelled "
                          "it", command_id=cmd.id,
                          evidence={"model": cmd.model, "version": cmd.version})
        self.report.result(cmd, False, "cancelled by a rollback command", "cancelled")

    def _roll_back_unhealthy(self, cmd: DeployCommand, found: list[Anomaly]) -> None:
        why = "; ".join(f"{a.detector} {a.statistic} {a.value:.3g} > {a.threshold:g}"
                        for a in found)
        self.agent.roll_back(cmd.model, f"health window: {why}")
        for a in found:
            self.report.anomaly(a, command_id=cmd.id)
        self.report.event("deploy.rolled_back", "error", f"{cmd.model} v{cmd.version} rolled "
                          f"back in its health window: {why}", command_id=cmd.id,
                          evidence={"model": cmd.model, "version": cmd.version})
        self.report.result(cmd, False, f"rolled back: {why}", "health")
