"""The device registry: the registered device keys, and devices as their retained
`state`, latest telemetry and events say, fed by `FleetWatcher` from the broker, in the
fleet's record (`fleet.store`: an SQLite file, or PostgreSQL).

Only a device's own reports are stored: `fleet.devices.gate.ReportGate` checks each message's
topic, signature (the device's registered key) and payload (the agent's own wire models,
`agent.link.wire`); anything else is counted under its reason and skipped. A device that
publishes without a registered key is listed as unknown, never stored as a device. An
exception while storing one message is caught, counted and logged: the watcher lives on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from agent.link.wire import Event, StatePayload, Telemetry
from agent.trust.signatures import NAME_PATTERN
from fleet.devices.gate import Report
from fleet.devices.keyring import Keyring
from fleet.devices.ordering import Mark, admit
from fleet.store.engine import Store, open_store
from fleet.store.schema import migrate

log = logging.getLogger("edge_fleet.state")

#: A device that reported an anomaly this recently is "anomalous", not "ok".
ANOMALY_RECENT_S = 600.0
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


class FleetDB(Keyring):
    def __init__(self, target: Path | str | Store) -> None:
        """`target`: an SQLite file's path, a `postgresql://` URL, or an open store."""
        self.store = target if isinstance(target, Store) else open_store(target)
        migrate(self.store)

    def tx(self) -> contextlib.AbstractContextManager[None]:
        """One write transaction; inside one already open on this thread, part of it (the
        outer one commits or rolls back everything)."""
        return self.store.tx()

    def close(self) -> None:
        self.store.close()

    # -- the device's order (`fleet.devices.ordering`) ------------------------------------
    def admit(self, report: Report) -> bool:
        """Whether `report` is new in its device's order; if so its mark is stored (call
        inside `tx`, with what applies it). Stale: counted under `ignored_stale`."""
        key = (report.device, report.kind)
        with self.tx():
            new = self._admit_in(report, self._marks({key}).get(key))
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
            marks = self._marks({(r.device, r.kind) for r, _ in batch})
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
            self.store.executemany(
                "UPDATE devices SET telemetry_at = ?, telemetry_json = ?, last_seen = ? "
                "WHERE device = ?", [(rx, t.model_dump_json(), rx, dev)
                                     for dev, (t, rx) in newest.items()])
            self._save_marks({key: marks[key] for key in changed})
        return applied

    def _save_marks(self, marks: dict[tuple[str, str], Mark]) -> None:
        """Write (device, kind) -> mark (call inside `tx`)."""
        self.store.executemany(
            "INSERT INTO report_marks VALUES (?,?,?,?,?,?,?) ON CONFLICT(device, kind) "
            "DO UPDATE SET epoch = excluded.epoch, seq = excluded.seq, connection = "
            "excluded.connection, will = excluded.will, \"window\" = excluded.\"window\"",
            [(d, k, m.epoch, m.seq, m.connection, int(m.will), m.window)
             for (d, k), m in marks.items()])

    def _marks(self, keys: set[tuple[str, str]]) -> dict[tuple[str, str], Mark]:
        """The marks of these (device, kind) keys, locked until the transaction ends (call
        inside `tx`). Where writers run concurrently (PostgreSQL: ingest consumers on
        several hosts), a key without a mark gets a placeholder row first (epoch 0, which
        no report carries), so the first reports of a device that reach two consumers at
        once are ordered too: the second waits for the first's commit and reads its mark."""
        st = self.store
        ordered = sorted(keys)
        if st.concurrent_writers:
            st.executemany("INSERT INTO report_marks VALUES (?, ?, 0, 0, 0, 0, 0) "
                           "ON CONFLICT (device, kind) DO NOTHING", ordered)
        out: dict[tuple[str, str], Mark] = {}
        names = sorted({d for d, _ in ordered})
        for i in range(0, len(names), 500):  # bounded statement size
            part = names[i:i + 500]
            for d, k, e, q, c, w, win in st.all(
                    "SELECT device, kind, epoch, seq, connection, will, \"window\" FROM "
                    f"report_marks WHERE device IN ({','.join('?' * len(part))}) ORDER BY "
                    "device, kind" + st.for_update, part):
                if e > 0:  # 0: a placeholder, no mark yet
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

    # -- what devices report ---------------------------------------------------------------
    def put_state(self, s: StatePayload, received: float | None = None) -> None:
        """A device's retained state, stamped with when it arrived: a birth is a sign of
        life; a Last Will (offline) keeps the models it last reported, and its arrival
        time is when the broker noticed the device gone (at once when its connection
        closed, 1.5 keepalives after it went silent otherwise), which is all a Will can
        tell."""
        received = time.time() if received is None else received
        models = {n: m.model_dump() for n, m in s.models.items()}
        with self.store.lock:
            self.store.execute(
                "INSERT INTO devices (device, fleet, online, profile, agent_version, "
                "groups_json, models_json, state_at, trust_json, state_received, "
                "last_seen, offline_at, started_at, state_epoch, state_seq) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(device) DO UPDATE SET online = excluded.online, "
                "profile = excluded.profile, agent_version = excluded.agent_version, "
                "groups_json = excluded.groups_json, state_at = excluded.state_at, "
                "models_json = CASE WHEN excluded.online <> 0 THEN excluded.models_json "
                "ELSE devices.models_json END, trust_json = COALESCE(excluded.trust_json, "
                "devices.trust_json), state_received = excluded.state_received, "
                "last_seen = CASE WHEN excluded.online <> 0 THEN excluded.last_seen "
                f"ELSE {self.store.greatest}(COALESCE(devices.last_seen, 0), "
                "COALESCE(excluded.last_seen, 0)) "
                "END, offline_at = excluded.offline_at, "
                "started_at = COALESCE(excluded.started_at, devices.started_at), "
                "state_epoch = CASE WHEN excluded.online <> 0 THEN excluded.state_epoch "
                "ELSE devices.state_epoch END, state_seq = CASE WHEN excluded.online <> 0 THEN "
                "excluded.state_seq ELSE devices.state_seq END",
                (s.device, s.fleet, int(s.online), s.profile, s.agent_version,
                 json.dumps(s.groups), json.dumps(models), s.at.isoformat(),
                 s.trust.model_dump_json() if s.trust else None, received,
                 received if s.online else (s.seen_at.timestamp() if s.seen_at else None),
                 None if s.online else received,
                 s.started_at.isoformat() if s.started_at else None,
                 s.order.epoch if s.order else None, s.order.seq if s.order else None))

    def put_telemetry(self, t: Telemetry, received: float) -> None:
        with self.store.lock:
            self.store.execute("UPDATE devices SET telemetry_at = ?, telemetry_json = ?, "
                             "last_seen = ? WHERE device = ?",
                             (received, t.model_dump_json(), received, t.device))

    def put_event(self, e: Event, received: float) -> None:
        with self.store.lock:
            self.store.execute("UPDATE devices SET events = events + 1 WHERE device = ?",
                             (e.device,))
            if e.kind == "anomaly":
                self.store.execute("UPDATE devices SET last_anomaly = ?, last_anomaly_at = ?, "
                                 "anomaly_received = ? WHERE device = ?",
                                 (e.message, e.at.isoformat(), received, e.device))
                self.store.execute("INSERT INTO anomalies VALUES (?, ?, ?, ?, ?)",
                                 (e.device, received, e.model or _text(e.evidence, "model"),
                                  _text(e.evidence, "detector"), e.message))

    def anomalies_since(self, since: float) -> dict[str, int]:
        """Anomaly events per device received since `since` (epoch seconds)."""
        rows = self.store.execute("SELECT device, COUNT(*) FROM anomalies WHERE received >= ? "
                                "GROUP BY device", (since,)).fetchall()
        return {d: int(n) for d, n in rows}

    def latency_p95_since(self, model: str, since: float) -> dict[str, float]:
        """Each device's p95 latency of `model` in its last telemetry, if received since
        `since` (read by the database's JSON functions: a controller asks every step)."""
        st = self.store
        rows = st.all(
            f"SELECT device, p95 FROM (SELECT device, {st.json_at('telemetry_json')} "
            "AS p95 FROM devices WHERE telemetry_at >= ?) AS t WHERE p95 IS NOT NULL",
            (st.json_path("models", _checked(model), "latency_p95_ms"), since))
        return {dev: float(p95) for dev, p95 in rows}

    def online(self) -> set[str]:
        """Devices whose retained state says online."""
        return {r[0] for r in self.store.all("SELECT device FROM devices WHERE online <> 0")}

    def models_of(self, device: str) -> dict[str, Any]:
        """The models a device last reported serving: name -> {version, committed, ...}."""
        row = self.store.one("SELECT models_json FROM devices WHERE device = ?", (device,))
        return json.loads(row[0]) if row else {}

    def model_states(self, model: str) -> dict[str, StateOfModel]:
        """device -> what its retained state says of `model`, for each device whose state
        carries a device order (read by the database's JSON functions: a controller asks
        every step, and parsing every device's models in Python was most of a step at
        1,000 devices)."""
        st, name = self.store, _checked(model)
        rows = st.all(
            f"SELECT device, {st.json_at('models_json')}, {st.json_at('models_json')}, "
            "state_epoch, state_seq FROM devices WHERE state_epoch IS NOT NULL",
            (st.json_path(name, "version"), st.json_path(name, "committed")))
        return {d: StateOfModel(_int(v), _int(c), (int(e), int(q)))
                for d, v, c, e, q in rows}

    def devices(self, *, group: str | None = None, now: float | None = None
                ) -> list[DeviceRow]:
        now = time.time() if now is None else now
        with self.store.lock:
            rows = self.store.execute(
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


def _checked(name: str) -> str:
    """A model name, checked before it becomes a step of a JSON path (never a quote or a
    path operator)."""
    if not MODEL_NAME.match(name):
        raise ValueError(f"not a model name: {name[:80]!r}")
    return name


def _int(value: Any) -> int | None:
    """A JSON number as read by either engine (PostgreSQL's `#>>` gives text)."""
    return None if value is None else int(value)


def _text(evidence: dict[str, Any], key: str) -> str | None:
    """A short string from free-form evidence, or None (it may hold anything)."""
    value = evidence.get(key)
    return value[:128] if isinstance(value, str) else None
