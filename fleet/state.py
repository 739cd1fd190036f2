"""Fleet state in SQLite (one file): devices as their retained `state`, latest telemetry
and events say, fed by `FleetWatcher` from the broker.

Payloads are validated with the agent's own wire models (`agent.link.wire`); a payload that
does not validate is counted and skipped, never stored. `retained state` is subscribed
normally (the broker does not deliver retained messages to shared subscriptions);
telemetry and events use a shared subscription (`$share/{group}/...`) so several
controllers can split the load.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from agent.link.wire import PREFIX, Event, StatePayload, Telemetry
from fleet._mqtt import connect

SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
  device TEXT PRIMARY KEY, fleet TEXT NOT NULL, online INTEGER NOT NULL, profile TEXT,
  agent_version TEXT, groups_json TEXT NOT NULL, models_json TEXT NOT NULL,
  state_at TEXT, telemetry_at REAL, telemetry_json TEXT,
  last_anomaly TEXT, last_anomaly_at TEXT, events INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS anomalies (
  device TEXT NOT NULL, received REAL NOT NULL, model TEXT, detector TEXT, message TEXT);
CREATE INDEX IF NOT EXISTS anomalies_received ON anomalies (received);
"""


@dataclass(frozen=True)
class DeviceRow:
    device: str
    online: bool
    profile: str | None
    groups: list[str]
    models: dict[str, Any]
    telemetry_age_s: float | None
    last_anomaly: str | None

    @property
    def health(self) -> str:
        if not self.online:
            return "offline"
        if self.telemetry_age_s is None:
            return "no telemetry"
        return "stale" if self.telemetry_age_s > 60 else "ok"


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

    def put_state(self, s: StatePayload) -> None:
        models = {n: m.model_dump() for n, m in s.models.items()}
        with self._lock:
            self._db.execute(
                "INSERT INTO devices (device, fleet, online, profile, agent_version, "
                "groups_json, models_json, state_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(device) DO UPDATE SET online = excluded.online, "
                "profile = excluded.profile, agent_version = excluded.agent_version, "
                "groups_json = excluded.groups_json, state_at = excluded.state_at, "
                "models_json = CASE WHEN excluded.online THEN excluded.models_json "
                "ELSE devices.models_json END",
                (s.device, s.fleet, int(s.online), s.profile, s.agent_version,
                 json.dumps(s.groups), json.dumps(models), s.at.isoformat()))

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
                                 (e.device, received, e.model or e.evidence.get("model"),
                                  e.evidence.get("detector"), e.message))

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
                                "telemetry_at, last_anomaly FROM devices ORDER BY device")
        out = []
        for dev, online, profile, groups, models, t_at, anomaly in rows.fetchall():
            g = json.loads(groups)
            if group is None or group in g:
                out.append(DeviceRow(dev, bool(online), profile, g, json.loads(models),
                                     None if t_at is None else now - t_at, anomaly))
        return out


class FleetWatcher:
    """Subscribes to a fleet's topics and keeps a `FleetDB` up to date."""

    def __init__(self, db: FleetDB, broker_url: str, fleet: str, *,
                 share_group: str = "edge-fleet", client_id: str | None = None) -> None:
        self.db, self.fleet = db, fleet
        self.ingested: Counter[str] = Counter()  # valid messages stored, per kind
        base = f"{PREFIX}/{fleet}"
        self.client, _ = connect(
            broker_url, client_id or f"edge-fleet-{time.time_ns()}",
            topics=[f"{base}/+/state", f"$share/{share_group}/{base}/+/telemetry",
                    f"$share/{share_group}/{base}/+/event"], on_message=self._message)

    def _message(self, client: Any, userdata: Any, msg: Any) -> None:
        kind = msg.topic.rsplit("/", 1)[-1]
        try:
            if kind == "state":
                self.db.put_state(StatePayload.model_validate_json(msg.payload))
            elif kind == "telemetry":
                self.db.put_telemetry(Telemetry.model_validate_json(msg.payload), time.time())
            elif kind == "event":
                self.db.put_event(Event.model_validate_json(msg.payload), time.time())
            self.ingested[kind] += 1
        except ValidationError:
            self.db.bump(f"invalid_{kind}")

    def start(self) -> FleetWatcher:
        self.client.loop_start()
        return self

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def status_lines(rows: list[DeviceRow]) -> list[str]:
    """The `edge-fleet status` table."""
    head = f"{'device':16} {'online':7} {'profile':18} {'models':22} {'health':12} last anomaly"
    out = [head, "-" * len(head)]
    for r in rows:
        models = ", ".join(f"{n} v{m['version']}" + ("*" if m.get("committed") != m["version"]
                                                      else "")
                           for n, m in r.models.items()) or "-"
        out.append(f"{r.device:16} {'yes' if r.online else 'no':7} {r.profile or '-':18} "
                   f"{models:22} {r.health:12} {r.last_anomaly or '-'}")
    out.append(f"{len(rows)} device(s), {sum(r.online for r in rows)} online; "
               "* = not committed yet (health window)")
    return out

