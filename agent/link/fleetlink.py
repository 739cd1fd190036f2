"""The agent's side of the fleet: commands in, state, telemetry, events and results out.

Threads (all daemon threads, started by `start`):

* `mqtt`: the connection (`agent.link.mqtt`). Each incoming command is screened here,
  cheapest check first (size, JSON, the fleet's signature threshold, then expiry,
  addressee and replay against the nonces seen and queued): only commands that would be
  carried out enter the bounded queue, so junk can never crowd out a real command. A
  refusal is counted by check (telemetry `commands_dropped`), with a rate-limited
  `command.rejected` event; a signed command refused (expired, replayed, misaddressed)
  also gets a result, junk does not;
* `commands`: verifies each queued command again and records its nonce
  (`agent.trust.nonces.accept_command`), then carries it out;
* `telemetry`: `agent.link.telemetry.TelemetryLoop`, every interval (and the trust
  feed's checks: root expiry, heartbeat freshness);
* `trust`: new roots and heartbeats from the fleet (`agent.link.trustfeed`);
* `deploy`: one per deploy command (`agent.link.deploying.Deployer`);
* `infer`: remote inference (`agent.link.remote`), when a scheduler is given.

The link drives an `AgentPort` (`agent.link.port`): the daemon, or the fleet simulator's
stand-in, which reuses this class whole.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import OrderedDict
from collections.abc import Container
from datetime import UTC, datetime, timedelta
from typing import Any

from agent import __version__
from agent.config import MqttSection, load_config
from agent.errors import AgentError, CommandError, ConfigError, RejectedError
from agent.link.deploying import Deployer, DeployJournal
from agent.link.hub import LinkHub
from agent.link.mqtt import MqttLink, TlsFiles
from agent.link.outbox import MemoryOutbox, Order, Outbox
from agent.link.port import AgentPort
from agent.link.remote import RemoteInference
from agent.link.reporting import Reporter, wire_order
from agent.link.settings import LinkSettings, SettingsStore, initial_settings
from agent.link.telemetry import TelemetryLoop
from agent.link.trustfeed import KINDS, TrustFeed
from agent.link.wire import (
    ModelState,
    StatePayload,
    fleet_topic,
    group_cmd_topic,
    infer_reply_prefix,
)
from agent.serving.metrics import Sample
from agent.serving.scheduler import Scheduler
from agent.trust.command import (
    Addressee,
    ConfigCommand,
    DeployCommand,
    ReplayPolicy,
    RollbackCommand,
    check_signed,
    verify_command,
)
from agent.trust.nonces import MemoryNonces, NonceStore, accept_command

log = logging.getLogger("edge_agent.fleet")
#: Commands waiting for the command thread; past this, dropped with an event.
INBOX_MAX = 64
#: The retained state is published again every this many telemetry intervals.
STATE_REFRESH_TICKS = 10
#: Nonces of queued commands remembered by the screen (besides the nonce store).
RECENT_NONCES = 4096


class _Seen:
    """`nonce in seen`: queued lately, or recorded in the nonce store."""

    def __init__(self, *where: Container[str]) -> None:
        self.where = where

    def __contains__(self, nonce: object) -> bool:
        return any(nonce in w for w in self.where)


class FleetLink:
    def __init__(self, agent: AgentPort, cfg: MqttSection, *,
                 scheduler: Scheduler | None = None, in_memory: bool = False,
                 hub: LinkHub | None = None) -> None:
        """Args:
            scheduler: serve remote inference requests through it (the daemon's); None
                leaves the `infer` topic unsubscribed (the simulator).
            in_memory: keep the outbox, the seen nonces and the settings in memory instead
                of the state directory (the simulator: hundreds of devices in one process
                must not hold six files each, and nothing of theirs has to survive).
            hub: the `LinkHub` that drives the MQTT connection (the simulator's thousands
                of links in one process) instead of a thread of its own.
        """
        self.agent, self.cfg = agent, cfg
        self._started_at = datetime.now(UTC)
        d = agent.config.device
        state = agent.config.paths.state_dir
        self.report = Reporter(Addressee(fleet=d.fleet, device=d.id,
                                         groups=frozenset(d.groups)),
                               MemoryOutbox(cap=cfg.outbox_cap) if in_memory
                               else Outbox(state / "outbox.sqlite", cap=cfg.outbox_cap),
                               agent.report_signer)
        self.outbox = self.report.outbox
        self._connection: int | None = None  # see `_will`
        self.nonces = (MemoryNonces() if in_memory
                       else NonceStore(state / "nonces.sqlite"))
        self._settings_store = SettingsStore(None if in_memory else state / "settings.json")
        self.settings, self._settings_notes = initial_settings(
            cfg, agent.config.detectors, self._settings_store)
        self._inbox: queue.Queue[bytes] = queue.Queue(maxsize=INBOX_MAX)
        # Nonces of commands queued lately: a replay flood stops at the screen.
        self._queued: OrderedDict[str, None] = OrderedDict()
        self._policy = ReplayPolicy(window=timedelta(seconds=cfg.replay_window_s))
        self._stop = threading.Event()
        downloads = state / "downloads"
        downloads.mkdir(exist_ok=True)
        self.telemetry = TelemetryLoop(
            agent, self.report, lambda: self.settings,
            deploying=lambda: self.deployer.busy(),  # noqa: PLW0108  # made below
            online=lambda: self.link.connected.is_set(),  # noqa: PLW0108  # made below
            on_tick=self._tick)
        self.deployer = Deployer(agent, self.report, self.telemetry, lambda: self.settings,
                                 downloads=downloads, stop=self._stop,
                                 journal=DeployJournal(None if in_memory
                                                       else state / "deploy.json"))
        self.trust = TrustFeed(agent, self.report,
                               heartbeat_file=None if in_memory else state / "heartbeat.json",
                               expiry_warning=timedelta(seconds=cfg.root_expiry_warning_s),
                               changed=lambda: self.publish_state(),  # noqa: PLW0108  # later
                               root_urls=cfg.root_urls)
        password = cfg.password_file.read_text().strip() if cfg.password_file else None
        topic = self.report.topic
        self.link = MqttLink(
            brokers=cfg.brokers, client_id=f"{d.fleet}-{d.id}",
            state_topic=topic("state"), birth=self._birth, will=self._will,
            subscriptions=[topic("cmd"), *([topic("infer")] if scheduler else []),
                           fleet_topic(d.fleet, "root"), fleet_topic(d.fleet, "heartbeat"),
                           *(group_cmd_topic(d.fleet, g) for g in d.groups)],
            on_message=self._received, outbox=self.outbox,
            tls=TlsFiles(ca_file=cfg.ca_file, cert_file=cfg.cert_file, key_file=cfg.key_file),
            username=cfg.username, password=password, keepalive_s=cfg.keepalive_s,
            session_expiry_s=cfg.session_expiry_s, hub=hub)
        self.remote = (RemoteInference(scheduler, self.link.reply,
                                       reply_prefix=infer_reply_prefix(d.fleet))
                       if scheduler else None)

    @property
    def me(self) -> Addressee:
        return self.report.me

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        self.announce()
        self.agent.metrics.add_collector(self.samples)
        self.link.start()
        threads = [(self._commands, "commands"), (lambda: self.telemetry.run(self._stop),
                                                  "telemetry"),
                   *((lambda k=k: self.trust.run(self._stop, k), f"trust-{k}")
                     for k in KINDS)]
        if (remote := self.remote) is not None:
            threads.append((lambda: remote.run(self._stop), "infer"))
        for target, name in threads:
            threading.Thread(target=target, name=name, daemon=True).start()

    def samples(self) -> list[Sample]:
        """The link's state for /metrics: connected, connects, outbox depth and drops."""
        return [("edge_agent_mqtt_connected", {}, float(self.link.connected.is_set())),
                ("edge_agent_mqtt_connects_total", {}, float(self.link.connects)),
                ("edge_agent_outbox_messages", {}, float(len(self.outbox))),
                ("edge_agent_outbox_dropped_total", {}, float(self.outbox.dropped_total))]

    def announce(self) -> None:
        """Start notes become events, an interrupted deploy gets its result; state is
        republished after every change."""
        for note in self.agent.notes:
            self.report.event("agent.start", "warning" if "fall" in note
                              or "interrupted" in note else "info", note)
        for note in self._settings_notes:
            self.report.event("agent.settings", "warning", note)
        self.deployer.answer_interrupted()
        self.agent.listeners.append(self.publish_state)

    def stop(self, *, wait: bool = True) -> None:
        """Stop; `wait` False only tells the threads (a simulator stops a thousand links
        at once, then waits for each)."""
        self._stop.set()
        self.link.stop(timeout_s=5.0 if wait else 0.0)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    # -- outgoing -------------------------------------------------------------------------
    def _will(self) -> bytes:
        """The Last Will of a new connection (and a clean stop's goodbye): its order's seq
        names the connection every later state goes out on."""
        order = self.outbox.reserve()
        self._connection = order.seq
        return self.report.seal(self.state(online=False, order=order))

    def _birth(self) -> bytes:
        return self.report.seal(self.state(online=True, order=self.outbox.reserve()))

    def state(self, *, online: bool, order: Order | None = None) -> StatePayload:
        d = self.agent.config.device
        models = {n: ModelState(version=r.manifest.version, runtime=r.manifest.runtime,
                                committed=self.agent.store.slots(n).committed)
                  for n, r in self.agent.serving.models().items()} if online else {}
        now = datetime.now(UTC)
        return StatePayload(device=d.id, fleet=d.fleet, online=online,
                            agent_version=__version__, profile=d.profile, groups=d.groups,
                            models=models, trust=self.trust.state if online else None,
                            at=now, started_at=self._started_at,
                            seen_at=None if online else now,
                            order=None if order is None else wire_order(order),
                            connection=self._connection)

    def _tick(self, ticks: int) -> None:
        """Every telemetry interval: the trust checks; every `STATE_REFRESH_TICKS`, the
        retained state again (one that someone overwrote on a broker without the shipped
        ACL heals within minutes)."""
        self.trust.tick(datetime.now(UTC))
        if ticks % STATE_REFRESH_TICKS == 0:
            self.publish_state()

    def publish_state(self) -> None:
        self.outbox.enqueue("state", self.report.topic("state"),
                            lambda _s, order: self.report.seal(self.state(online=True,
                                                                          order=order)),
                            retain=True)

    # -- incoming -------------------------------------------------------------------------
    def _received(self, topic: str, payload: bytes, properties: Any) -> None:
        if self.remote is not None and topic == self.report.topic("infer"):
            self.remote.received(payload, properties)
            return
        fleet = self.me.fleet
        if topic in (fleet_topic(fleet, "root"), fleet_topic(fleet, "heartbeat")):
            self.trust_message(topic.rsplit("/", 1)[-1], payload)
            return
        if self.screen(payload):
            self.enqueue(payload)

    def screen(self, raw: bytes) -> bool:
        """Whether a command would be carried out; a refusal is reported here (see the
        module docstring). Never raises: this runs on the MQTT thread."""
        root = self.agent.root
        try:
            check_signed(root, raw)
        except RejectedError as exc:
            self.report.rejected(exc, signed=False)
            return False
        try:
            cmd = verify_command(root, raw, me=self.me, now=datetime.now(UTC),
                                 seen=_Seen(self._queued, self.nonces), policy=self._policy)
        except RejectedError as exc:
            self.report.rejected(exc, signed=True)
            return False
        except Exception:  # never let one message kill the connection's thread
            log.exception("command.screen_failed")
            return False
        self._queued[cmd.nonce] = None
        while len(self._queued) > RECENT_NONCES:
            self._queued.popitem(last=False)
        return True

    def trust_message(self, kind: str, payload: bytes) -> None:
        """A root announcement or heartbeat, for the trust thread."""
        self.trust.received(kind, payload)

    def enqueue(self, raw: bytes) -> None:
        """Queue a screened command for the command thread."""
        try:
            self._inbox.put_nowait(raw)
        except queue.Full:  # only commands the fleet signed get here
            self.report.event("command.dropped", "warning",
                              f"command queue full ({INBOX_MAX}); command dropped",
                              evidence={"bytes": len(raw)})

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
            self.report.event("command.failed", "error", f"unexpected error: {exc!r}")

    def handle(self, raw: bytes) -> None:
        """Verify one command and carry it out."""
        try:
            cmd = accept_command(self.agent.root, raw, me=self.me, now=datetime.now(UTC),
                                 store=self.nonces, policy=self._policy)
        except RejectedError as exc:
            self.report.rejected(exc, signed=True)
            return
        if isinstance(cmd, DeployCommand):
            self.deployer.start(cmd)
        elif isinstance(cmd, RollbackCommand):
            self._rollback(cmd)
        elif isinstance(cmd, ConfigCommand):
            self._config(cmd)
        elif cmd.kind == "restart":
            self.report.result(cmd, True, self.agent.restart_runtime())
        else:  # reload
            self.report.result(cmd, *self._reload())

    # -- commands -------------------------------------------------------------------------
    def _rollback(self, cmd: RollbackCommand) -> None:
        """Cancel the deploy of the model in progress, or serve its previous version. A
        rollback that names a version undoes only that one: a device that does not serve
        it (its deploy never arrived, or expired) answers ok, "not_serving"."""
        timeout_s = self.settings.mqtt.download_timeout_s + 60
        if cmd.version is not None and not self.deployer.deploying(cmd.model, cmd.version):
            serving = self.agent.serving.models().get(cmd.model)
            if serving is None or serving.manifest.version != cmd.version:
                now = f"v{serving.manifest.version}" if serving else "nothing"
                self.report.result(cmd, True, f"{cmd.model}: {now} serves, not "
                                   f"v{cmd.version}; nothing to roll back", "not_serving")
                return
        try:
            ended = self.deployer.cancel(cmd.model, timeout_s)
        except TimeoutError as exc:
            self.report.result(cmd, False, str(exc), "busy")
            return
        if ended is not None and ended.value not in ("committed", "already"):
            self.report.result(cmd, True, f"{cmd.model}: the deploy in progress was "
                               f"stopped ({ended.value}); the previous version serves")
            return
        # No deploy ran, or it committed before it saw the cancel: a plain rollback.
        try:
            note = self.agent.roll_back(cmd.model, cmd.reason or f"command {cmd.id}")
        except AgentError as exc:
            self.report.result(cmd, False, str(exc), getattr(exc, "check", None))
            return
        self.report.event("deploy.rolled_back", "warning", f"{cmd.model}: rolled back on "
                          f"command ({cmd.reason or 'no reason given'})", command_id=cmd.id)
        self.report.result(cmd, True, note)

    def _config(self, cmd: ConfigCommand) -> None:
        try:
            new = self.settings.changed(cmd.settings)
        except CommandError as exc:
            self.report.result(cmd, False, str(exc), exc.check)
            return
        self._settings_store.add(cmd.settings)
        self._apply(new)
        self.report.result(cmd, True, f"applied {', '.join(sorted(cmd.settings))}")

    def _apply(self, new: LinkSettings) -> None:
        self.settings = new
        self.telemetry.thresholds_changed()

    def _reload(self) -> tuple[bool, str]:
        """Re-read the configuration file: what can change while running does (with the
        `config` commands' changes on top); the rest is reported as needing a restart. An
        invalid file changes nothing."""
        path = self.agent.config_path
        if path is None:
            return False, "the agent was not started from a configuration file"
        try:
            new = load_config(path)
        except ConfigError as exc:
            return False, f"configuration not reloaded: {exc}"
        settings, notes = initial_settings(new.mqtt or self.cfg, new.detectors,
                                           self._settings_store)
        self._apply(settings)
        changed = [name for name in type(new).model_fields
                   if name not in ("mqtt", "detectors")
                   and getattr(new, name) != getattr(self.agent.config, name)]
        return True, ("telemetry interval, health window and detector thresholds applied"
                      + (f"; {', '.join(changed)} changed and apply after a restart"
                         if changed else "") + "".join(f"; {n}" for n in notes))
