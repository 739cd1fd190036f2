"""The agent's side of the fleet: commands in, state, telemetry, events and results out.

Threads (all daemon threads, started by `start`):

* `mqtt`: the connection (`agent.link.mqtt`); incoming commands go into a bounded queue (a
  full queue refuses with an event, never grows);
* `commands`: verifies each command (`agent.trust.nonces.accept_command`: signature threshold,
  addressee, expiry, replay) and carries it out; forged, expired, replayed or misaddressed
  commands produce a `command.rejected` event and a result, and nothing else happens;
* `telemetry`: every interval, a `Telemetry` message into the outbox, and the detectors
  (`agent.link.detectors`) run on the interval's window; anomalies become events.

A deploy: download (resume, cap, minimum rate; `agent.updates.fetch`) -> check the manifest pin ->
install without committing (verify, stage, load, self-test, activate) -> health window:
anomalies of the new model (latency against the previous version's baseline, error
rate) roll it back at once, otherwise it is committed. Every step is an event; the
command gets one result. A deploy while another is running is refused ("busy"). A crash
during the window leaves the update uncommitted, and the store rolls it back at start.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
import time
from dataclasses import fields, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import psutil

from agent import __version__
from agent.config import MqttSection, load_config
from agent.daemon import Agent
from agent.errors import (
    AgentError,
    ApiError,
    BundleError,
    Busy,
    ConfigError,
    DownloadError,
    Refused,
    RejectedError,
)
from agent.link.detectors import (
    Anomaly,
    LatencyDetector,
    MemoryTrend,
    Thresholds,
    Window,
    drift_anomalies,
    rate_anomalies,
    temperature_anomaly,
)
from agent.link.mqtt import MqttLink, TlsFiles
from agent.link.outbox import Outbox
from agent.link.reporting import Reporter, jsonable
from agent.link.wire import (
    Memory,
    ModelState,
    ModelTelemetry,
    StatePayload,
    Telemetry,
    dump,
    group_cmd_topic,
)
from agent.serving.admission import PRIORITY
from agent.serving.metrics import Snapshot, window_counter, window_quantile
from agent.serving.oip import infer_response, parse_infer
from agent.trust.archive import read_archive_head
from agent.trust.command import (
    Addressee,
    ConfigCommand,
    DeployCommand,
    ReplayPolicy,
    RollbackCommand,
)
from agent.trust.nonces import NonceStore, accept_command
from agent.updates.fetch import FetchLimits, fetch

log = logging.getLogger("edge_agent.fleet")
LATENCY = "edge_agent_request_duration_seconds"


class FleetLink(Reporter):
    def __init__(self, agent: Agent, cfg: MqttSection, *, in_memory: bool = False,
                 poll_s: float = 0.05) -> None:
        """`in_memory` keeps the outbox and the seen nonces in memory instead of the state
        directory (the simulator: hundreds of devices in one process must not hold six
        files each, and nothing of theirs has to survive a restart). `poll_s`: see
        `MqttLink`."""
        self.agent, self.cfg = agent, cfg
        d = agent.config.device
        state = agent.config.paths.state_dir
        super().__init__(Addressee(fleet=d.fleet, device=d.id, groups=frozenset(d.groups)),
                         Outbox(":memory:" if in_memory else state / "outbox.sqlite",
                                cap=cfg.outbox_cap))
        self.nonces = NonceStore(":memory:" if in_memory else state / "nonces.sqlite")
        self.downloads = state / "downloads"
        self.downloads.mkdir(exist_ok=True)
        self.thresholds = Thresholds()
        self.interval_s = cfg.telemetry_interval_s
        self.health_window_s = cfg.health_window_s
        self._inbox: queue.Queue[bytes] = queue.Queue(maxsize=64)
        self._requests: queue.Queue[tuple[bytes, Any]] = queue.Queue(maxsize=256)
        self._stop = threading.Event()
        self._deploying = threading.Lock()
        # A rollback command for the model being deployed cancels that deploy: the deploy
        # thread undoes its own work (nothing installed yet, or back to the previous slot).
        self._cancel = threading.Event()
        self._deploy_committed = False  # the last deploy committed (a rollback must undo it)
        self._deploy_model: str | None = None
        self._latency: dict[str, LatencyDetector] = {}
        self._memory = MemoryTrend(self.thresholds)
        self._loaded: frozenset[tuple[str, int]] = frozenset()
        self._started = time.monotonic()
        self._snap = Snapshot(agent.metrics)
        password = cfg.password_file.read_text().strip() if cfg.password_file else None
        self.link = MqttLink(
            brokers=cfg.brokers, client_id=f"{d.fleet}-{d.id}",
            state_topic=self.topic("state"), birth=lambda: dump(self.state(online=True)),
            will=dump(self.state(online=False)),
            subscriptions=[self.topic("cmd"), self.topic("infer"),
                           *(group_cmd_topic(d.fleet, g) for g in d.groups)],
            on_message=self._received, outbox=self.outbox,
            tls=TlsFiles(ca_file=cfg.ca_file, cert_file=cfg.cert_file, key_file=cfg.key_file),
            username=cfg.username, password=password, keepalive_s=cfg.keepalive_s,
            poll_s=poll_s)

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        for note in self.agent.notes:
            self.event("agent.start", "warning" if "fall" in note or "interrupted" in note
                       else "info", note)
        self.agent.listeners.append(self.publish_state)
        self.link.start()
        for target, name in ((self._commands, "commands"), (self._telemetry, "telemetry"),
                             (self._inference, "infer")):
            threading.Thread(target=target, name=name, daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        self.link.stop()

    # -- outgoing -------------------------------------------------------------------------
    def state(self, *, online: bool) -> StatePayload:
        d = self.agent.config.device
        models = {n: ModelState(version=r.manifest.version, runtime=r.manifest.runtime,
                                committed=self.agent.store.slots(n).committed)
                  for n, r in self.agent.scheduler.models().items()} if online else {}
        return StatePayload(device=d.id, fleet=d.fleet, online=online,
                            agent_version=__version__, profile=d.profile, groups=d.groups,
                            models=models, at=datetime.now(UTC))

    def publish_state(self) -> None:
        self.outbox.enqueue("state", self.topic("state"),
                            lambda _s: dump(self.state(online=True)), retain=True)

    # -- incoming -------------------------------------------------------------------------
    def _received(self, topic: str, payload: bytes, properties: Any) -> None:
        if topic == self.topic("infer"):
            try:
                self._requests.put_nowait((payload, properties))
            except queue.Full:
                self._answer(properties, 429, {"error": "inference queue full",
                                                "reason": "queue_full"})
            return
        try:
            self._inbox.put_nowait(payload)
        except queue.Full:
            self.event("command.dropped", "warning", "command queue full; command dropped",
                       evidence={"topic": topic, "bytes": len(payload)})

    def _commands(self) -> None:
        while not self._stop.is_set():
            try:
                raw = self._inbox.get(timeout=0.2)
            except queue.Empty:
                continue
            self.handle_safely(raw)

    def handle_safely(self, raw: bytes) -> None:
        """`handle`, where an unexpected error becomes a `command.failed` event: the
        command path must never die."""
        try:
            self.handle(raw)
        except Exception as exc:  # say what happened
            log.exception("command.crashed")
            self.event("command.failed", "error", f"unexpected error: {exc!r}")

    def handle(self, raw: bytes) -> None:
        """Verify one command and carry it out."""
        policy = ReplayPolicy(window=timedelta(seconds=self.cfg.replay_window_s))
        try:
            cmd = accept_command(self.agent.root, raw, me=self.me, now=datetime.now(UTC),
                                 store=self.nonces, policy=policy)
        except RejectedError as exc:
            self.rejected(exc)
            return
        if isinstance(cmd, DeployCommand):
            threading.Thread(target=self._deploy_guarded, args=(cmd,), name="deploy",
                             daemon=True).start()
        elif isinstance(cmd, RollbackCommand):
            self._rollback(cmd)
        elif isinstance(cmd, ConfigCommand):
            self._config(cmd)
        elif cmd.kind == "restart":
            self.result(cmd, True, self.agent.restart_runtime())
        else:  # reload
            self.result(cmd, *self._reload())

    # -- remote inference (MQTT 5 request/response) ---------------------------------------
    def _inference(self) -> None:
        while not self._stop.is_set():
            try:
                payload, props = self._requests.get(timeout=0.2)
            except queue.Empty:
                continue
            status, body = self.infer(payload)
            self._answer(props, status, body)

    def infer(self, payload: bytes) -> tuple[int, dict[str, Any]]:
        """An infer request on `.../infer`: a KServe v2 body plus "model"; the same
        scheduler and refusals as the local API. Returns (status, response body)."""
        try:
            head = json.loads(payload)
            name = head.pop("model") if isinstance(head, dict) else None
            resident = self.agent.scheduler.models().get(name) if isinstance(name, str) \
                else None
            if resident is None:
                return 404, {"error": f"no model {name!r} here"}
            req = parse_infer(json.dumps(head).encode(), resident.manifest, None)
            fut = self.agent.scheduler.submit(resident.name, req.x,
                                              priority=PRIORITY[req.priority],
                                              timeout_s=(req.timeout_ms or 1000) / 1000)
            y = fut.result(timeout=(req.timeout_ms or 1000) / 1000 + 5)
        except (ValueError, RecursionError):
            return 400, {"error": "payload is not a JSON infer request"}
        except ApiError as exc:
            return exc.status, {"error": str(exc)}
        except Refused as exc:
            return exc.status, {"error": str(exc), "reason": exc.reason}
        body, _ = infer_response(resident.manifest, y, request_id=req.id, binary=False)
        return 200, json.loads(body)

    def _answer(self, props: Any, status: int, body: dict[str, Any]) -> None:
        topic = getattr(props, "ResponseTopic", None)
        if not topic:
            return  # nobody asked for an answer
        body = {"status": status, **body}
        self.link.reply(topic, json.dumps(body).encode(),
                        getattr(props, "CorrelationData", None))

    # -- commands -------------------------------------------------------------------------
    def _rollback(self, cmd: RollbackCommand) -> None:
        if self._deploying.locked() and self._deploy_model == cmd.model:
            self._cancel.set()
            if not self._deploying.acquire(timeout=self.cfg.download_timeout_s + 60):
                self.result(cmd, False, "the deploy in progress did not stop", "busy")
                return
            self._deploying.release()
            if not self._deploy_committed:  # cancelled, failed or rolled back: undone
                self.result(cmd, True, f"{cmd.model}: the deploy in progress was stopped; "
                            "the previous version serves")
                return
            # It committed before it saw the cancel: a plain rollback of what now serves.
        try:
            note = self.agent.roll_back(cmd.model, cmd.reason or f"command {cmd.id}")
        except AgentError as exc:
            self.result(cmd, False, str(exc), getattr(exc, "check", None))
            return
        self.event("deploy.rolled_back", "warning", f"{cmd.model}: rolled back on command "
                   f"({cmd.reason or 'no reason given'})", command_id=cmd.id)
        self.result(cmd, True, note)

    def _config(self, cmd: ConfigCommand) -> None:
        known = {f.name for f in fields(Thresholds)}
        unknown = [k for k in cmd.settings if k not in known
                   and k not in ("telemetry_interval_s", "health_window_s")]
        if unknown:
            self.result(cmd, False, f"unknown settings: {', '.join(sorted(unknown))}",
                        "settings")
            return
        try:
            kinds = {f.name: type(getattr(self.thresholds, f.name)) for f in fields(Thresholds)}
            updates = {k: kinds[k](v) for k, v in cmd.settings.items() if k in known}
            self.thresholds = replace(self.thresholds, **updates)
            for detector in self._latency.values():  # keep their baselines, new limits
                detector.t = self.thresholds
            self._memory.t = self.thresholds
            if "telemetry_interval_s" in cmd.settings:
                self.interval_s = max(0.1, float(cmd.settings["telemetry_interval_s"]))
            if "health_window_s" in cmd.settings:
                self.health_window_s = max(0.0, float(cmd.settings["health_window_s"]))
        except (TypeError, ValueError) as exc:
            self.result(cmd, False, f"bad value: {exc}", "settings")
            return
        self.result(cmd, True, f"applied {', '.join(sorted(cmd.settings))}")

    def _reload(self) -> tuple[bool, str]:
        """Re-read the configuration file: what can change while running does; the rest is
        reported as needing a restart. An invalid file changes nothing."""
        path = self.agent.config_path
        if path is None:
            return False, "the agent was not started from a configuration file"
        try:
            new = load_config(path)
        except ConfigError as exc:
            return False, f"configuration not reloaded: {exc}"
        if new.mqtt is not None:
            self.interval_s = new.mqtt.telemetry_interval_s
            self.health_window_s = new.mqtt.health_window_s
        changed = [name for name in type(new).model_fields
                   if name != "mqtt" and getattr(new, name) != getattr(self.agent.config, name)]
        return True, ("telemetry interval and health window applied"
                      + (f"; {', '.join(changed)} changed and apply after a restart"
                         if changed else ""))

    def _deploy_guarded(self, cmd: DeployCommand) -> None:
        if not self._deploying.acquire(blocking=False):
            self.event("deploy.refused", "warning", "a deploy is already in progress",
                       command_id=cmd.id)
            self.result(cmd, False, "another deploy is in progress; send it again later",
                        "busy")
            return
        try:
            self._deploy_model = cmd.model
            self._cancel.clear()
            self._deploy_committed = False
            self._deploy(cmd)
        finally:
            self._deploy_model = None
            self._deploying.release()

    def _deploy(self, cmd: DeployCommand) -> None:
        ev = {"model": cmd.model, "version": cmd.version}
        self.event("deploy.downloading", "info", f"{cmd.model} v{cmd.version} from "
                   f"{cmd.archive.urls[0]}", command_id=cmd.id, evidence=ev)
        dest = self.downloads / f"{cmd.model}-v{cmd.version}-{cmd.archive.sha256[:8]}.tar"
        try:
            fetch(cmd.archive, dest, FetchLimits(
                timeout_s=self.cfg.download_timeout_s,
                min_rate_bytes_per_s=self.cfg.download_min_rate_bytes_per_s))
            manifest_raw, _ = read_archive_head(dest)
            if hashlib.sha256(manifest_raw).hexdigest() != cmd.manifest_sha256:
                raise BundleError("the archive's manifest is not the one the command pins",
                                  check="manifest_pin")
            if self._cancel.is_set():
                self.event("deploy.cancelled", "warning", f"{cmd.model} v{cmd.version}: "
                           "cancelled by a rollback command before installing",
                           command_id=cmd.id, evidence=ev)
                self.result(cmd, False, "cancelled by a rollback command", "cancelled")
                return
            result = self.agent.install(dest, commit=False, on_step=lambda s, m: self.event(
                f"deploy.{s}", "info", f"{m.name} v{m.version} {s.replace('_', '-')}",
                manifest=m, command_id=cmd.id))
        except DownloadError as exc:
            self.event("deploy.failed", "error", f"download failed: {exc}", command_id=cmd.id,
                       evidence=ev)
            self.result(cmd, False, f"download failed: {exc}", "download")
            return
        except Busy as exc:
            self.result(cmd, False, str(exc), "busy")
            return
        except RejectedError as exc:
            self.event("deploy.rejected", "error", str(exc), command_id=cmd.id,
                       evidence={"check": exc.check, **jsonable(exc.details), **ev})
            self.result(cmd, False, str(exc), exc.check)
            return
        except AgentError as exc:
            self.event("deploy.failed", "error", str(exc), command_id=cmd.id, evidence=ev)
            self.result(cmd, False, str(exc), "install")
            return
        finally:
            dest.unlink(missing_ok=True)
        self._watch(cmd, result.previous)

    def _watch(self, cmd: DeployCommand, previous: str | None) -> None:
        """The health window: roll back on the first anomaly of the new model."""
        end = time.monotonic() + self.health_window_s
        detector = self._latency.setdefault(cmd.model, LatencyDetector(self.thresholds))
        before = Snapshot(self.agent.metrics)
        while time.monotonic() < end and not self._stop.is_set():
            if self._cancel.wait(min(self.interval_s, max(0.0, end - time.monotonic()))):
                break
            after = Snapshot(self.agent.metrics)
            window = self._window(cmd.model, before, after, self.interval_s)
            before = after
            found = rate_anomalies(window, self.thresholds)
            if (a := detector.observe(window)) is not None:
                found.append(a)
            if found and previous is not None:
                self._roll_back_deploy(cmd, found)
                return
        if self._cancel.is_set():
            self.agent.roll_back(cmd.model, "cancelled by a rollback command")
            self.event("deploy.rolled_back", "warning", f"{cmd.model} v{cmd.version} rolled "
                       "back in its health window: a rollback command cancelled it",
                       command_id=cmd.id, evidence={"model": cmd.model, "version": cmd.version})
            self.result(cmd, False, "cancelled by a rollback command", "cancelled")
            return
        version = self.agent.commit_pending(cmd.model)
        self._deploy_committed = True
        self.event("deploy.committed", "info", f"{cmd.model} v{version} committed after a "
                   f"{self.health_window_s:g} s health window", command_id=cmd.id,
                   evidence={"model": cmd.model, "version": version})
        self.result(cmd, True, f"{cmd.model} v{version} committed")

    def _roll_back_deploy(self, cmd: DeployCommand, found: list[Anomaly]) -> None:
        why = "; ".join(f"{a.detector} {a.statistic} {a.value:.3g} > {a.threshold:g}"
                        for a in found)
        self.agent.roll_back(cmd.model, f"health window: {why}")
        for a in found:
            self.anomaly(a, command_id=cmd.id)
        self.event("deploy.rolled_back", "error", f"{cmd.model} v{cmd.version} rolled back "
                   f"in its health window: {why}", command_id=cmd.id,
                   evidence={"model": cmd.model, "version": cmd.version})
        self.result(cmd, False, f"rolled back: {why}", "health")

    # -- telemetry ------------------------------------------------------------------------
    def _window(self, model: str, before: Snapshot, after: Snapshot, seconds: float) -> Window:
        p50 = window_quantile(before, after, LATENCY, 0.5, model=model)
        return Window(model=model, seconds=seconds,
                      requests=int(window_counter(before, after, "edge_agent_inferences_total",
                                                  model=model)),
                      errors=int(window_counter(before, after, "edge_agent_errors_total",
                                                model=model)),
                      latency_p50_s=p50)

    def _drift(self, name: str) -> None:
        """Input and output drift of the sampled batches against the manifest's reference."""
        resident = self.agent.scheduler.models().get(name)
        sample = resident.take_drift() if resident is not None else None
        if resident is None or sample is None or sample.samples == 0:
            return
        w = Window(model=name, seconds=self.interval_s, requests=sample.samples,
                   input_counts=sample.input_counts.tolist(),
                   class_counts=sample.class_counts.tolist(),
                   mean_confidence=sample.confidence_sum / sample.samples)
        for a in drift_anomalies(w, resident.manifest.reference, self.thresholds):
            self.anomaly(a)

    def _telemetry(self) -> None:
        proc = psutil.Process()
        proc.cpu_percent(None)
        while not self._stop.wait(self.interval_s):
            try:
                self._tick(proc)
            except Exception:  # telemetry must keep going; the log says what broke
                log.exception("telemetry.failed")

    def _tick(self, proc: psutil.Process) -> None:
        before, after = self._snap, Snapshot(self.agent.metrics)
        self._snap = after
        models: dict[str, ModelTelemetry] = {}
        for name in self.agent.scheduler.models():
            w = self._window(name, before, after, self.interval_s)
            q = {p: window_quantile(before, after, LATENCY, p, model=name)
                 for p in (0.5, 0.95, 0.99)}
            models[name] = ModelTelemetry(
                requests=w.requests, errors=w.errors,
                latency_p50_ms=_ms(q[0.5]), latency_p95_ms=_ms(q[0.95]),
                latency_p99_ms=_ms(q[0.99]), throughput_per_s=w.requests / self.interval_s)
            if not self._deploying.locked():
                detector = self._latency.setdefault(name, LatencyDetector(self.thresholds))
                for a in [*rate_anomalies(w, self.thresholds),
                          *filter(None, [detector.observe(w)])]:
                    self.anomaly(a)
            self._drift(name)
        was = before.counters_by("edge_agent_refusals_total", "reason")
        refusals = {k: int(v - was.get(k, 0)) for k, v in
                    after.counters_by("edge_agent_refusals_total", "reason").items()
                    if v - was.get(k, 0) > 0}
        s = self.agent.scheduler
        loaded = frozenset((n, r.manifest.version) for n, r in s.models().items())
        if loaded != self._loaded:  # a load or unload moves memory by design: new trend
            self._loaded, self._memory = loaded, MemoryTrend(self.thresholds)
        rss = proc.memory_info().rss
        vm = psutil.virtual_memory()
        for a in filter(None, [self._memory.observe(time.monotonic(), rss),
                               temperature_anomaly(s.reading.temperature_c,
                                                   s.thermal_limits.throttle_c,
                                                   self.interval_s)]):
            self.anomaly(a)
        dropped = self.outbox.take_dropped()
        if dropped:
            self.event("outbox.dropped", "warning", f"the outbox cap dropped {dropped}",
                       evidence=dropped)

        def build(seq: int) -> bytes:
            return dump(Telemetry(
                seq=seq, device=self.me.device, at=datetime.now(UTC),
                interval_s=self.interval_s, uptime_s=time.monotonic() - self._started,
                cpu_percent=proc.cpu_percent(None),
                memory=Memory(process_rss_bytes=rss, system_available_bytes=vm.available,
                              system_total_bytes=vm.total),
                temperature_c=s.reading.temperature_c, throttle=s.thermal.name.lower(),
                queue_depth=int(self.agent.metrics.gauge("edge_agent_queue_depth")),
                refusals=refusals, models=models, dropped=dropped))
        self.outbox.enqueue("telemetry", self.topic("telemetry"), build)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None or seconds == float("inf") else seconds * 1000

