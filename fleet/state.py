"""Fleet state in SQLite (one file): the registered device keys, and devices as their
retained `state`, latest telemetry and events say, fed by `FleetWatcher` from the broker.

Only a device's own reports are stored: `fleet.ingest.ReportGate` checks each message's
topic, signature (the device's registered key) and payload (the agent's own wire models,
`agent.link.wire`); anything else is counted under its reason and skipped. A device that
publishes without a registered key is listed as unknown, never stored as a device. An
exception while storing one message is caught, counted and logged: the watcher lives on.

`retained state` is subscribed normally (the broker does not deliver retained messages to
shared subscriptions); the rollout controllers take telemetry and events on a shared
subscription of their own (`CONTROLLER_GROUP`) so several can split the load, and every
monitoring tool subscribes without one (it sees every message and takes none from them).
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import re
import sqlite3
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from agent.link.wire import PREFIX, Event, StatePayload, Telemetry
from agent.trust.signatures import NAME_PATTERN, PublicKey
from fleet._mqtt import BrokerAuth, close, connect_patiently
from fleet.ingest import Report, ReportGate
from fleet.ordering import Mark, admit

log = logging.getLogger("edge_fleet.state")
#: The shared-subscription group of the rollout controllers (and only theirs).
CONTROLLER_GROUP = "edge-fleet-controllers"
#: Telemetry reaches the fleet's consumers at QoS 0: the broker forwards each message once
#: and no acknowledgement goes back (devices still publish it at QoS 1 from their outbox).
#: A message lost between broker and controller is replaced by the next within an
#: interval, and the broker keeps none for a controller that is away; states, events and
#: results stay at QoS 1.
TELEMETRY_QOS = 0

SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
  device TEXT PRIMARY KEY, fleet TEXT NOT NULL, online INTEGER NOT NULL, profile TEXT,
  agent_version TEXT, groups_json TEXT NOT NULL, models_json TEXT NOT NULL,
  state_at TEXT, telemetry_at REAL, telemetry_json TEXT,
  last_anomaly TEXT, last_anomaly_at TEXT, events INTEGER NOT NULL DEFAULT 0,
  trust_json TEXT, state_received REAL, last_seen REAL, offline_at REAL, started_at TEXT,
  anomaly_received REAL);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS anomalies (
  device TEXT NOT NULL, received REAL NOT NULL, model TEXT, detector TEXT, message TEXT);
CREATE INDEX IF NOT EXISTS anomalies_received ON anomalies (received);
CREATE TABLE IF NOT EXISTS device_keys (
  device TEXT PRIMARY KEY, public TEXT NOT NULL, added REAL NOT NULL);
CREATE TABLE IF NOT EXISTS unknown_devices (
  device TEXT PRIMARY KEY, first_seen REAL NOT NULL, last_seen REAL NOT NULL,
  messages INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS report_marks (
  device TEXT NOT NULL, kind TEXT NOT NULL, epoch INTEGER NOT NULL, seq INTEGER NOT NULL,
  connection INTEGER NOT NULL, will INTEGER NOT NULL, window INTEGER NOT NULL,
  PRIMARY KEY (device, kind));
"""
#: A device that reported an anomaly this recently is "anomalous", not "ok".
ANOMALY_RECENT_S = 600.0
#: Unknown devices listed at most (their ids come from whoever publishes).
MAX_UNKNOWN = 1000
MODEL_NAME = re.compile(NAME_PATTERN)


class StateOfModel(NamedTuple):
    """What a device's retained state says of one model, and the state's device order."""

    version: int | None  # None: it does not serve the model
    committed: int | None
    order: tuple[int, int]


@dataclass(frozen=True)
class DeviceRow:
    device: str
    online: bool
    profile: str | None
    groups: list[str]
    models: dict[str, Any]
    telemetry_age_s: float | None
    last_anomaly: str | None
    trust: dict[str, Any] | None = None
    last_anomaly_at: str | None = None  # the device's time of its last anomaly
    anomaly_age_s: float | None = None  # since the fleet received it
    last_seen_age_s: float | None = None  # since any report of it arrived

    @property
    def health(self) -> str:
        if not self.online:
            return "offline"
        if self.telemetry_age_s is None:
            return "no telemetry"
        if self.trust and self.trust.get("stale"):
            return "frozen"  # its fleet heartbeat expired: messages are withheld
        if self.telemetry_age_s > 60:
            return "stale"
        if self.anomaly_age_s is not None and self.anomaly_age_s < ANOMALY_RECENT_S:
            return "anomalous"  # an anomaly in the last minutes is not "ok"
        return "ok"

    @property
    def root(self) -> str:
        """The root it trusts: "v2 to 2027-11-30"."""
        if not self.trust:
            return "-"
        return f"v{self.trust['root_version']} to {self.trust['root_expires'][:10]}"


class FleetDB:
    def __init__(self, path: Path | str) -> None:
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        # Durable against a killed process (the controller resumes from here); a power cut
        # may lose the last transactions, which the devices' retained state and results
        # (persistent session) bring back.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        have = {r[1] for r in self._db.execute("PRAGMA table_info(devices)")}
        for column, decl in (("trust_json", "TEXT"), ("state_received", "REAL"),
                             ("last_seen", "REAL"), ("offline_at", "REAL"),
                             ("started_at", "TEXT"), ("anomaly_received", "REAL"),
                             ("state_epoch", "INTEGER"), ("state_seq", "INTEGER")):
            if column not in have:  # files made by an earlier version
                self._db.execute(f"ALTER TABLE devices ADD COLUMN {column} {decl}")

    @contextmanager
    def tx(self) -> Iterator[None]:
        """One write transaction; inside one already open on this thread, part of it (the
        outer one commits or rolls back everything)."""
        with self._lock:
            if self._db.in_transaction:
                yield
                return
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # -- the device's order (`fleet.ordering`) ----------------------------------------------
    def admit(self, report: Report) -> bool:
        """Whether `report` is new in its device's order; if so its mark is stored (call
        inside `tx`, with what applies it). Stale: counted under `ignored_stale`."""
        key = (report.device, report.kind)
        with self.tx():
            new = self._admit_in(report, self._marks({report.device}).get(key))
            if new is None:
                self.bump("ignored_stale")
                return False
            self._save_marks({key: new})
            return True

    def apply(self, batch: list[tuple[Report, float]]) -> list[Report]:
        """Store a batch of verified reports (with when each arrived) in one transaction,
        each put in its device's order first (`admit`): returns those applied, in order.
        Telemetry is folded: the device row takes the newest of the batch, one write per
        device; states and events are written one by one (they are rare)."""
        applied: list[Report] = []
        newest: dict[str, tuple[Telemetry, float]] = {}
        with self.tx():
            marks = self._marks({r.device for r, _ in batch})
            changed: set[tuple[str, str]] = set()
            for report, received in batch:
                key = (report.device, report.kind)
                new = self._admit_in(report, marks.get(key))
                if new is None:
                    self.bump("ignored_stale")
                    continue
                marks[key] = new
                changed.add(key)
                applied.append(report)
                p = report.payload
                if isinstance(p, Telemetry):
                    newest[report.device] = (p, received)
                elif isinstance(p, StatePayload):
                    self.put_state(p, received)
                elif isinstance(p, Event):
                    self.put_event(p, received)
            self._db.executemany(
                "UPDATE devices SET telemetry_at = ?, telemetry_json = ?, last_seen = ? "
                "WHERE device = ?", [(rx, t.model_dump_json(), rx, dev)
                                     for dev, (t, rx) in newest.items()])
            self._save_marks({key: marks[key] for key in changed})
        return applied

    def _save_marks(self, marks: dict[tuple[str, str], Mark]) -> None:
        """Write (device, kind) -> mark (call inside `tx`)."""
        self._db.executemany(
            "INSERT INTO report_marks VALUES (?,?,?,?,?,?,?) ON CONFLICT(device, kind) "
            "DO UPDATE SET epoch = excluded.epoch, seq = excluded.seq, connection = "
            "excluded.connection, will = excluded.will, window = excluded.window",
            [(d, k, m.epoch, m.seq, m.connection, int(m.will), m.window)
             for (d, k), m in marks.items()])

    def _marks(self, devices: set[str]) -> dict[tuple[str, str], Mark]:
        """The marks of these devices (call inside `tx`)."""
        out: dict[tuple[str, str], Mark] = {}
        names = sorted(devices)
        for i in range(0, len(names), 500):  # bounded statement size
            part = names[i:i + 500]
            for d, k, e, q, c, w, win in self._db.execute(
                    "SELECT device, kind, epoch, seq, connection, will, window FROM "
                    f"report_marks WHERE device IN ({','.join('?' * len(part))})", part):
                out[(d, k)] = Mark(e, q, c, bool(w), win)
        return out

    @staticmethod
    def _admit_in(report: Report, mark: Mark | None) -> Mark | None:
        p = report.payload
        order = getattr(p, "order", None)
        assert order is not None  # the gate refuses unordered reports
        state = p if isinstance(p, StatePayload) else None
        return admit(report.kind, mark, order.epoch, order.seq,
                     connection=state.connection if state else None,
                     will=state is not None and not state.online)

    @property
    def lock(self) -> threading.RLock:
        """Held around every write of this connection (the rollout tables take it too)."""
        return self._lock

    @property
    def connection(self) -> sqlite3.Connection:
        """The one SQLite connection (other fleet tables live in the same file)."""
        return self._db

    def bump(self, name: str) -> None:
        with self._lock:
            self._db.execute("INSERT INTO counters VALUES (?, 1) ON CONFLICT(name) DO UPDATE "
                             "SET value = value + 1", (name,))

    def counter(self, name: str) -> int:
        row = self._db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row else 0

    # -- the device registry ------------------------------------------------------------
    def register(self, device: str, key: PublicKey) -> bool:
        """Register (or replace) a device's report key; True when it was new or changed."""
        with self._lock:
            old = self._db.execute("SELECT public FROM device_keys WHERE device = ?",
                                   (device,)).fetchone()
            self._db.execute("INSERT INTO device_keys VALUES (?, ?, ?) ON CONFLICT(device) "
                             "DO UPDATE SET public = excluded.public, added = excluded.added",
                             (device, key.public, time.time()))
            self._db.execute("DELETE FROM unknown_devices WHERE device = ?", (device,))
            # registered again (a new key, or a reset device whose clock went back): its
            # next reports start its order afresh
            self._db.execute("DELETE FROM report_marks WHERE device = ?", (device,))
        return old is None or old[0] != key.public

    def registered_key(self, device: str) -> PublicKey | None:
        row = self._db.execute("SELECT public FROM device_keys WHERE device = ?",
                               (device,)).fetchone()
        return None if row is None else PublicKey(public=row[0])

    def registered(self) -> dict[str, PublicKey]:
        return {d: PublicKey(public=p) for d, p in self._db.execute(
            "SELECT device, public FROM device_keys ORDER BY device")}

    def note_unknown(self, device: str) -> None:
        now = time.time()
        with self._lock:
            cur = self._db.execute("UPDATE unknown_devices SET last_seen = ?, messages = "
                                   "messages + 1 WHERE device = ?", (now, device))
            if cur.rowcount == 0 and self._db.execute(
                    "SELECT COUNT(*) FROM unknown_devices").fetchone()[0] < MAX_UNKNOWN:
                self._db.execute("INSERT INTO unknown_devices VALUES (?, ?, ?, 1)",
                                 (device, now, now))

    def unknown(self) -> list[tuple[str, int]]:
        """Devices that published without a registered key, with their message counts."""
        return [(d, int(n)) for d, n in self._db.execute(
            "SELECT device, messages FROM unknown_devices ORDER BY device")]

    def ignored(self) -> dict[str, int]:
        """Messages the ingest gate ignored, by reason."""
        return {n.removeprefix("ignored_"): int(v) for n, v in self._db.execute(
            "SELECT name, value FROM counters WHERE name LIKE 'ignored\\_%' ESCAPE '\\' "
            "ORDER BY name")}

    # -- what devices report ---------------------------------------------------------------
    def put_state(self, s: StatePayload, received: float | None = None) -> None:
        """A device's retained state, stamped with when it arrived: a birth is a sign of
        life; a Last Will (offline) keeps the models it last reported, and its arrival
        time is when the broker noticed the device gone (at once when its connection
        closed, 1.5 keepalives after it went silent otherwise), which is all a Will can
        tell."""
        received = time.time() if received is None else received
        models = {n: m.model_dump() for n, m in s.models.items()}
        with self._lock:
            self._db.execute(
                "INSERT INTO devices (device, fleet, online, profile, agent_version, "
                "groups_json, models_json, state_at, trust_json, state_received, "
                "last_seen, offline_at, started_at, state_epoch, state_seq) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(device) DO UPDATE SET online = excluded.online, "
                "profile = excluded.profile, agent_version = excluded.agent_version, "
                "groups_json = excluded.groups_json, state_at = excluded.state_at, "
                "models_json = CASE WHEN excluded.online THEN excluded.models_json "
                "ELSE devices.models_json END, trust_json = COALESCE(excluded.trust_json, "
                "devices.trust_json), state_received = excluded.state_received, "
                "last_seen = CASE WHEN excluded.online THEN excluded.last_seen "
                "ELSE MAX(COALESCE(devices.last_seen, 0), COALESCE(excluded.last_seen, 0)) "
                "END, offline_at = excluded.offline_at, "
                "started_at = COALESCE(excluded.started_at, devices.started_at), "
                "state_epoch = CASE WHEN excluded.online THEN excluded.state_epoch "
                "ELSE devices.state_epoch END, state_seq = CASE WHEN excluded.online THEN "
                "excluded.state_seq ELSE devices.state_seq END",
                (s.device, s.fleet, int(s.online), s.profile, s.agent_version,
                 json.dumps(s.groups), json.dumps(models), s.at.isoformat(),
                 s.trust.model_dump_json() if s.trust else None, received,
                 received if s.online else (s.seen_at.timestamp() if s.seen_at else None),
                 None if s.online else received,
                 s.started_at.isoformat() if s.started_at else None,
                 s.order.epoch if s.order else None, s.order.seq if s.order else None))

    def put_telemetry(self, t: Telemetry, received: float) -> None:
        with self._lock:
            self._db.execute("UPDATE devices SET telemetry_at = ?, telemetry_json = ?, "
                             "last_seen = ? WHERE device = ?",
                             (received, t.model_dump_json(), received, t.device))

    def put_event(self, e: Event, received: float) -> None:
        with self._lock:
            self._db.execute("UPDATE devices SET events = events + 1 WHERE device = ?",
                             (e.device,))
            if e.kind == "anomaly":
                self._db.execute("UPDATE devices SET last_anomaly = ?, last_anomaly_at = ?, "
                                 "anomaly_received = ? WHERE device = ?",
                                 (e.message, e.at.isoformat(), received, e.device))
                self._db.execute("INSERT INTO anomalies VALUES (?, ?, ?, ?, ?)",
                                 (e.device, received, e.model or _text(e.evidence, "model"),
                                  _text(e.evidence, "detector"), e.message))

    def anomalies_since(self, since: float) -> dict[str, int]:
        """Anomaly events per device received since `since` (epoch seconds)."""
        rows = self._db.execute("SELECT device, COUNT(*) FROM anomalies WHERE received >= ? "
                                "GROUP BY device", (since,)).fetchall()
        return {d: int(n) for d, n in rows}

    def latency_p95_since(self, model: str, since: float) -> dict[str, float]:
        """Each device's p95 latency of `model` in its last telemetry, if received since
        `since` (read by SQLite's JSON functions: a controller asks every step)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT device, p95 FROM (SELECT device, json_extract(telemetry_json, ?) "
                "AS p95 FROM devices WHERE telemetry_at >= ?) WHERE p95 IS NOT NULL",
                (f"$.models.{_label(model)}.latency_p95_ms", since)).fetchall()
        return {dev: float(p95) for dev, p95 in rows}

    def online(self) -> set[str]:
        """Devices whose retained state says online."""
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT device FROM devices WHERE online")}

    def models_of(self, device: str) -> dict[str, Any]:
        """The models a device last reported serving: name -> {version, committed, ...}."""
        with self._lock:
            row = self._db.execute("SELECT models_json FROM devices WHERE device = ?",
                                   (device,)).fetchone()
        return json.loads(row[0]) if row else {}

    def model_states(self, model: str) -> dict[str, StateOfModel]:
        """device -> what its retained state says of `model`, for each device whose state
        carries a device order (read by SQLite's JSON functions: a controller asks every
        step, and parsing every device's models in Python was most of a step at 1,000
        devices)."""
        label = _label(model)
        with self._lock:
            rows = self._db.execute(
                "SELECT device, json_extract(models_json, ?), json_extract(models_json, ?), "
                "state_epoch, state_seq FROM devices WHERE state_epoch IS NOT NULL",
                (f"$.{label}.version", f"$.{label}.committed")).fetchall()
        return {d: StateOfModel(v, c, (int(e), int(q))) for d, v, c, e, q in rows}

    def devices(self, *, group: str | None = None, now: float | None = None
                ) -> list[DeviceRow]:
        now = time.time() if now is None else now
        with self._lock:
            rows = self._db.execute(
                "SELECT device, online, profile, groups_json, models_json, telemetry_at, "
                "last_anomaly, trust_json, last_anomaly_at, anomaly_received, last_seen "
                "FROM devices ORDER BY device").fetchall()
        out = []
        for (dev, online, profile, groups, models, t_at, anomaly, trust, a_at, a_rx,
             seen) in rows:
            g = json.loads(groups)
            if group is None or group in g:
                out.append(DeviceRow(dev, bool(online), profile, g, json.loads(models),
                                     None if t_at is None else now - t_at, anomaly,
                                     json.loads(trust) if trust else None, a_at,
                                     None if a_rx is None else now - a_rx,
                                     None if seen is None else now - seen))
        return out


def _label(name: str) -> str:
    """A model name as a quoted label of an SQLite JSON path."""
    if not MODEL_NAME.match(name):  # never a quote or a path operator
        raise ValueError(f"not a model name: {name[:80]!r}")
    return f'"{name}"'


def _text(evidence: dict[str, Any], key: str) -> str | None:
    """A short string from free-form evidence, or None (it may hold anything)."""
    value = evidence.get(key)
    return value[:128] if isinstance(value, str) else None


class FleetWatcher:
    """Subscribes to a fleet's topics and keeps a `FleetDB` up to date.

    `share_group`: the rollout controllers share telemetry and events
    (`CONTROLLER_GROUP`); a monitoring tool (status, watch, dashboard) passes None and
    subscribes on its own, so it never takes a message from a controller or another tool.
    The client id is unique per instance; paho reconnects after a broker outage and the
    subscriptions are made again (retained states arrive again with them).

    Ingest is batched: paho's thread only queues what arrives (a bounded queue: when it
    is full paho waits, and the broker holds the QoS 1 messages); an ingest thread takes up
    to `BATCH_MAX` messages or what arrived within `BATCH_DELAY_S` of the first, verifies
    each (`fleet.ingest`), and stores the batch in one transaction (`FleetDB.apply`). The
    CPU seconds of each stage are in `cpu` (verify, parse, write)."""

    #: At most this many messages per transaction, collected for at most this long.
    BATCH_MAX = 1000
    BATCH_DELAY_S = 0.02
    #: Messages received and not yet stored, at most (then paho's thread waits).
    QUEUE_MAX = 20_000

    def __init__(self, db: FleetDB, broker_url: BrokerAuth | str, fleet: str, *,
                 share_group: str | None = None, client_id: str | None = None,
                 on_report: Callable[[Report], None] | None = None,
                 connect_wait_s: float = 0.0) -> None:
        self.db, self.fleet = db, fleet
        self.ingested: Counter[str] = Counter()  # valid messages stored, per kind
        self.errors = 0  # messages whose handling raised (logged, counted, survived)
        self.stale = 0  # verified reports older than what was applied (`fleet.ordering`)
        self.superseded = 0  # telemetry a later one of its device's in the batch replaced
        self.batches = 0
        self.gate = ReportGate(db, fleet)
        self._write_cpu_s = 0.0
        self.on_report = on_report
        self._queue: queue.Queue[tuple[str, bytes, float] | None] = queue.Queue(
            self.QUEUE_MAX)
        self._idle = threading.Condition()
        self._unstored = 0  # queued or in a batch being stored
        self._thread = threading.Thread(target=self._ingest, name="ingest", daemon=True)
        self._thread.start()
        base = f"{PREFIX}/{fleet}"
        share = f"$share/{share_group}/" if share_group else ""
        self._last_message = time.monotonic()
        self.client, self.subscribed = connect_patiently(
            broker_url, client_id or f"edge-fleet-{uuid.uuid4().hex[:12]}",
            topics=[f"{base}/+/state", (f"{share}{base}/+/telemetry", TELEMETRY_QOS),
                    f"{share}{base}/+/event"], on_message=self._message,
            wait_s=connect_wait_s)

    @property
    def cpu(self) -> dict[str, float]:
        """CPU seconds by stage: verify, parse (the gate's), write (the batches)."""
        return {**self.gate.cpu, "write": self._write_cpu_s}

    def synced(self, *, quiet_s: float = 0.3, max_s: float = 5.0) -> bool:
        """Wait until the subscriptions are acknowledged and the retained states they
        bring have stopped arriving (nothing for `quiet_s`) and are stored, at most
        `max_s`."""
        end = time.monotonic() + max_s
        if not self.subscribed.wait(max_s):
            return False
        while time.monotonic() < end:
            if time.monotonic() - self._last_message >= quiet_s:
                return self.drained(end - time.monotonic())
            time.sleep(quiet_s / 3)
        return False

    def drained(self, timeout_s: float = 5.0) -> bool:
        """Wait until everything received so far is stored."""
        with self._idle:
            return self._idle.wait_for(lambda: self._unstored == 0, max(0.0, timeout_s))

    def _message(self, client: Any, userdata: Any, msg: Any) -> None:
        self._last_message = time.monotonic()
        with self._idle:
            self._unstored += 1
        self._queue.put((msg.topic, bytes(msg.payload), time.time()))

    def _ingest(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            end = time.monotonic() + self.BATCH_DELAY_S
            while len(batch) < self.BATCH_MAX:
                try:
                    item = self._queue.get(timeout=max(0.0, end - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)  # stop after this batch
                    break
                batch.append(item)
            try:
                self._store(batch)
            except Exception:  # the ingest thread must outlive any batch
                self._crashed(f"a batch of {len(batch)}")
            finally:
                with self._idle:
                    self._unstored -= len(batch)
                    self._idle.notify_all()

    def _open(self, topic: str, payload: bytes) -> Report | None:
        try:
            return self.gate.open(topic, payload)
        except Exception:  # one bad message must never stop ingest
            self._crashed(topic)
            return None

    def _verified(self, batch: list[tuple[str, bytes, float]]) -> list[tuple[Report, float]]:
        """The batch's reports that pass the gate, with when each arrived.

        Telemetry is folded into one row per device (`FleetDB.apply`), so of a device's
        telemetry in one batch only the last to arrive is verified (the broker keeps one
        publisher's order on a topic); the ones before it are `superseded`, never opened,
        unless it fails its checks (then the one before it is tried, and so on). A backlog
        of N reports per device costs one verification per device and batch, not N."""
        earlier: dict[str, list[int]] = {}  # topic -> its telemetry before the last
        last: dict[str, int] = {}
        for i, (topic, _, _) in enumerate(batch):
            if topic.endswith("/telemetry"):
                if topic in last:
                    earlier.setdefault(topic, []).append(last[topic])
                last[topic] = i
        skip = {i for older in earlier.values() for i in older}
        reports = []
        for i, (topic, payload, received) in enumerate(batch):
            if i in skip:
                continue
            report, at = self._open(topic, payload), received
            older = earlier.get(topic, [])
            while report is None and older:  # it failed its checks: the one before it
                j = older.pop()
                report, at = self._open(topic, batch[j][1]), batch[j][2]
            self.superseded += len(older)
            if report is not None:
                reports.append((report, at))
        return reports

    def _store(self, batch: list[tuple[str, bytes, float]]) -> None:
        """Verify, then store the batch in one transaction; a batch that fails to store
        is stored again message by message, so one bad message costs only itself."""
        reports = self._verified(batch)
        t0 = time.thread_time()
        try:
            applied = self.db.apply(reports)
        except Exception:
            applied = []
            for one in reports:
                try:
                    applied += self.db.apply([one])
                except Exception:
                    self._crashed(f"{PREFIX}/{self.fleet}/{one[0].device}/{one[0].kind}")
        self._write_cpu_s += time.thread_time() - t0
        self.batches += 1
        self.stale += len(reports) - len(applied)
        for report in applied:
            self.ingested[report.kind] += 1
            if self.on_report is not None:
                try:
                    self.on_report(report)
                except Exception:
                    self._crashed(f"{PREFIX}/{self.fleet}/{report.device}/{report.kind}")

    def _crashed(self, topic: str) -> None:
        self.errors += 1
        with contextlib.suppress(Exception):
            self.db.bump("ingest_errors")
        log.exception("ingest.crashed topic=%.200s", topic)

    def start(self) -> FleetWatcher:
        """(The client runs from construction; kept so call sites read as they act.)"""
        return self

    def stop(self) -> None:
        """Disconnect, then store what was received before returning."""
        close(self.client)
        self.drained(10.0)
        self._queue.put(None)
        self._thread.join(10.0)


def shown_models(models: Mapping[str, Any]) -> str:
    """"digits v2" for a committed version, "digits v2*" for one in its health window
    (above the committed floor), "digits v1 (rolled back from v2)" below it."""
    out = []
    for n, m in models.items():
        v, floor = m["version"], m.get("committed")
        mark = ("*" if floor is None or v > floor
                else f" (rolled back from v{floor})" if v < floor else "")
        out.append(f"{n} v{v}{mark}")
    return ", ".join(out) or "-"


def status_lines(rows: list[DeviceRow], *, unknown: Sequence[tuple[str, int]] = (),
                 ignored: Mapping[str, int] | None = None) -> list[str]:
    """The `edge-fleet status` table: devices, then devices that published without a
    registered key (never counted), then what the ingest gate ignored."""
    head = (f"{'device':16} {'online':7} {'profile':18} {'models':22} {'root':17} "
            f"{'health':12} last anomaly")
    out = [head, "-" * len(head)]
    for r in rows:
        out.append(f"{r.device:16} {'yes' if r.online else 'no':7} {r.profile or '-':18} "
                   f"{shown_models(r.models):22} {r.root:17} {r.health:12} "
                   f"{r.last_anomaly or '-'}")
    for dev, n in unknown:
        out.append(f"{dev:16} {'?':7} {'-':18} {'-':22} {'-':17} {'unknown':12} "
                   "no registered key; "
                   f"{n} message(s) ignored")
    out.append(f"{len(rows)} device(s), {sum(r.online for r in rows)} online; "
               "* = in its health window, not committed yet"
               + (f"; {len(unknown)} unknown" if unknown else ""))
    if ignored:
        out.append("ignored messages: " + ", ".join(f"{n} {k}" for k, n in ignored.items()))
    return out
