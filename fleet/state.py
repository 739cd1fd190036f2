"""Fleet state in SQLite (one file): the registered device keys, and devices as their
retained `state`, latest telemetry and events say, fed by `FleetWatcher` from the broker.

Only a device's own reports are stored: `fleet.ingest.ReportGate` checks each message's
topic, signature (the device's registered key) and payload (the agent's own wire models,
`agent.link.wire`); anything else is counted under its reason and skipped. A device that
publishes without a registered key is listed as unknown, never stored as a device. An
exception while storing one message is caught, counted and logged: the watcher lives on.

`retained state` is subscribed normally (the broker does not deliver retained messages to
shared subscriptions); telemetry and events use a shared subscription (`$share/{group}/...`)
so several controllers can split the load.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.link.wire import PREFIX, Event, StatePayload, Telemetry
from agent.trust.signatures import PublicKey
from fleet._mqtt import BrokerAuth, connect
from fleet.ingest import ReportGate

log = logging.getLogger("edge_fleet.state")

SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
  device TEXT PRIMARY KEY, fleet TEXT NOT NULL, online INTEGER NOT NULL, profile TEXT,
  agent_version TEXT, groups_json TEXT NOT NULL, models_json TEXT NOT NULL,
  state_at TEXT, telemetry_at REAL, telemetry_json TEXT,
  last_anomaly TEXT, last_anomaly_at TEXT, events INTEGER NOT NULL DEFAULT 0,
  trust_json TEXT);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS anomalies (
  device TEXT NOT NULL, received REAL NOT NULL, model TEXT, detector TEXT, message TEXT);
CREATE INDEX IF NOT EXISTS anomalies_received ON anomalies (received);
CREATE TABLE IF NOT EXISTS device_keys (
  device TEXT PRIMARY KEY, public TEXT NOT NULL, added REAL NOT NULL);
CREATE TABLE IF NOT EXISTS unknown_devices (
  device TEXT PRIMARY KEY, first_seen REAL NOT NULL, last_seen REAL NOT NULL,
  messages INTEGER NOT NULL);
"""
#: Unknown devices listed at most (their ids come from whoever publishes).
MAX_UNKNOWN = 1000


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

    @property
    def health(self) -> str:
        if not self.online:
            return "offline"
        if self.telemetry_age_s is None:
            return "no telemetry"
        if self.trust and self.trust.get("stale"):
            return "frozen"  # its fleet heartbeat expired: messages are withheld
        return "stale" if self.telemetry_age_s > 60 else "ok"

    @property
    def root(self) -> str:
        """The root it trusts: "v2 to 2027-11-30"."""
        if not self.trust:
            return "-"
        return f"v{self.trust['root_version']} to {self.trust['root_expires'][:10]}"


class FleetDB:
    def __init__(self, path: Path | str) -> None:
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        # Durable against a killed process (the controller resumes from here); a power cut
        # may lose the last transactions, which the devices' retained state and results
        # (persistent session) bring back.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        if "trust_json" not in {r[1] for r in self._db.execute("PRAGMA table_info(devices)")}:
            self._db.execute("ALTER TABLE devices ADD COLUMN trust_json TEXT")  # older files

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
    def put_state(self, s: StatePayload) -> None:
        models = {n: m.model_dump() for n, m in s.models.items()}
        with self._lock:
            self._db.execute(
                "INSERT INTO devices (device, fleet, online, profile, agent_version, "
                "groups_json, models_json, state_at, trust_json) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(device) DO UPDATE SET online = excluded.online, "
                "profile = excluded.profile, agent_version = excluded.agent_version, "
                "groups_json = excluded.groups_json, state_at = excluded.state_at, "
                "models_json = CASE WHEN excluded.online THEN excluded.models_json "
                "ELSE devices.models_json END, trust_json = COALESCE(excluded.trust_json, "
                "devices.trust_json)",
                (s.device, s.fleet, int(s.online), s.profile, s.agent_version,
                 json.dumps(s.groups), json.dumps(models), s.at.isoformat(),
                 s.trust.model_dump_json() if s.trust else None))

    def put_telemetry(self, t: Telemetry, received: float) -> None:
        with self._lock:
            self._db.execute("UPDATE devices SET telemetry_at = ?, telemetry_json = ? "
                             "WHERE device = ?", (received, t.model_dump_json(), t.device))

    def put_event(self, e: Event, received: float) -> None:
        with self._lock:
            self._db.execute("UPDATE devices SET events = events + 1 WHERE device = ?",
                             (e.device,))
            if e.kind == "anomaly":
                self._db.execute("UPDATE devices SET last_anomaly = ?, last_anomaly_at = ? "
                                 "WHERE device = ?", (e.message, e.at.isoformat(), e.device))
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
        `since`."""
        out = {}
        for dev, raw in self._db.execute("SELECT device, telemetry_json FROM devices WHERE "
                                         "telemetry_at >= ?", (since,)).fetchall():
            m = json.loads(raw).get("models", {}).get(model) or {}
            if m.get("latency_p95_ms") is not None:
                out[dev] = float(m["latency_p95_ms"])
        return out

    def devices(self, *, group: str | None = None, now: float | None = None
                ) -> list[DeviceRow]:
        now = time.time() if now is None else now
        rows = self._db.execute("SELECT device, online, profile, groups_json, models_json, "
                                "telemetry_at, last_anomaly, trust_json FROM devices "
                                "ORDER BY device")
        out = []
        for dev, online, profile, groups, models, t_at, anomaly, trust in rows.fetchall():
            g = json.loads(groups)
            if group is None or group in g:
                out.append(DeviceRow(dev, bool(online), profile, g, json.loads(models),
                                     None if t_at is None else now - t_at, anomaly,
                                     json.loads(trust) if trust else None))
        return out


def _text(evidence: dict[str, Any], key: str) -> str | None:
    """A short string from free-form evidence, or None (it may hold anything)."""
    value = evidence.get(key)
    return value[:128] if isinstance(value, str) else None


class FleetWatcher:
    """Subscribes to a fleet's topics and keeps a `FleetDB` up to date."""

    def __init__(self, db: FleetDB, broker_url: BrokerAuth | str, fleet: str, *,
                 share_group: str = "edge-fleet", client_id: str | None = None) -> None:
        self.db, self.fleet = db, fleet
        self.ingested: Counter[str] = Counter()  # valid messages stored, per kind
        self.errors = 0  # messages whose handling raised (logged, counted, survived)
        self.gate = ReportGate(db, fleet)
        base = f"{PREFIX}/{fleet}"
        self.client, _ = connect(
            broker_url, client_id or f"edge-fleet-{time.time_ns()}",
            topics=[f"{base}/+/state", f"$share/{share_group}/{base}/+/telemetry",
                    f"$share/{share_group}/{base}/+/event"], on_message=self._message)

    def _message(self, client: Any, userdata: Any, msg: Any) -> None:
        try:
            report = self.gate.open(msg.topic, bytes(msg.payload))
            if report is None:
                return
            p = report.payload
            if isinstance(p, StatePayload):
                self.db.put_state(p)
            elif isinstance(p, Telemetry):
                self.db.put_telemetry(p, time.time())
            elif isinstance(p, Event):
                self.db.put_event(p, time.time())
            self.ingested[report.kind] += 1
        except Exception:  # one bad message must never stop ingest
            self.errors += 1
            self.db.bump("ingest_errors")
            log.exception("ingest.crashed topic=%.200s", msg.topic)

    def start(self) -> FleetWatcher:
        """(The client runs from construction; kept so call sites read as they act.)"""
        return self

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def status_lines(rows: list[DeviceRow], *, unknown: Sequence[tuple[str, int]] = (),
                 ignored: Mapping[str, int] | None = None) -> list[str]:
    """The `edge-fleet status` table: devices, then devices that published without a
    registered key (never counted), then what the ingest gate ignored."""
    head = (f"{'device':16} {'online':7} {'profile':18} {'models':22} {'root':17} "
            f"{'health':12} last anomaly")
    out = [head, "-" * len(head)]
    for r in rows:
        models = ", ".join(f"{n} v{m['version']}" + ("*" if m.get("committed") != m["version"]
                                                      else "")
                           for n, m in r.models.items()) or "-"
        out.append(f"{r.device:16} {'yes' if r.online else 'no':7} {r.profile or '-':18} "
                   f"{models:22} {r.root:17} {r.health:12} {r.last_anomaly or '-'}")
    for dev, n in unknown:
        out.append(f"{dev:16} {'?':7} {'-':18} {'-':22} {'-':17} {'unknown':12} "
                   "no registered key; "
                   f"{n} message(s) ignored")
    out.append(f"{len(rows)} device(s), {sum(r.online for r in rows)} online; "
               "* = not committed yet (health window)"
               + (f"; {len(unknown)} unknown" if unknown else ""))
    if ignored:
        out.append("ignored messages: " + ", ".join(f"{n} {k}" for k, n in ignored.items()))
    return out

