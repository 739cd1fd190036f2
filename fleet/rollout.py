"""Staged rollouts: signed deploys to a group in waves, judged by `fleet.policy`, halted
with signed rollbacks to every device touched when the criteria fail.

All state lives in the fleet database (tables `rollouts`, `rollout_devices`), and every
step reads it afresh: the controller can be killed at any point and started again, and it
goes on from where the database says. Results arrive on `+/cmd/result` through a
persistent MQTT session (fixed client id, session expiry), so results published while the
controller was down are delivered when it returns.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import statistics
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from agent.link.wire import PREFIX, CommandResult, device_topic, fleet_topic
from fleet._mqtt import BrokerAuth, connect
from fleet.commands import build_command, deploy_fields, sign_command
from fleet.errors import FleetError
from fleet.ingest import ReportGate
from fleet.keys import SigningKey
from fleet.policy import Criteria, Health, Outcome, Status, judge, next_status, wave_sizes
from fleet.publish import HEARTBEAT_EVERY_S, heartbeat
from fleet.state import FleetDB, FleetWatcher

TABLES = """
CREATE TABLE IF NOT EXISTS rollouts (
  id TEXT PRIMARY KEY, model TEXT, version INTEGER, group_name TEXT, archive TEXT,
  urls_json TEXT, sizes_json TEXT, criteria_json TEXT, status TEXT, wave INTEGER,
  wave_started REAL, wave_timeout_s REAL, reason TEXT, created REAL,
  health_window_s REAL NOT NULL DEFAULT 0, settled_at REAL);
CREATE TABLE IF NOT EXISTS rollout_devices (
  rollout TEXT, device TEXT, wave INTEGER, command_id TEXT, outcome TEXT, sent_at REAL,
  rollback_id TEXT, rollback_result TEXT, detail TEXT, PRIMARY KEY (rollout, device));
CREATE INDEX IF NOT EXISTS rollout_devices_device ON rollout_devices (device);
"""
log = logging.getLogger("edge_fleet.rollout")
# Columns added after the first release of these tables: (table, column, declaration).
ADDED = [("rollouts", "health_window_s", "REAL NOT NULL DEFAULT 0"),
         ("rollouts", "settled_at", "REAL"), ("rollout_devices", "detail", "TEXT")]


@dataclass(frozen=True, kw_only=True)
class Rollout:
    """One row of `rollouts`."""

    id: str
    model: str
    version: int
    group: str
    archive: Path
    urls: list[str]
    sizes: list[int]  # cumulative devices per wave
    criteria: Criteria
    status: Status
    wave: int  # 0-based
    wave_started: float | None
    wave_timeout_s: float
    reason: str
    created: float
    health_window_s: float
    settled_at: float | None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Rollout:
        return cls(id=row["id"], model=row["model"], version=row["version"],
                   group=row["group_name"], archive=Path(row["archive"]),
                   urls=json.loads(row["urls_json"]), sizes=json.loads(row["sizes_json"]),
                   criteria=Criteria(**json.loads(row["criteria_json"])),
                   status=Status(row["status"]), wave=row["wave"],
                   wave_started=row["wave_started"], wave_timeout_s=row["wave_timeout_s"],
                   reason=row["reason"], created=row["created"],
                   health_window_s=row["health_window_s"], settled_at=row["settled_at"])


@dataclass(frozen=True, kw_only=True)
class RolloutDevice:
    """One row of `rollout_devices`: a device's part in a rollout."""

    rollout: str
    device: str
    wave: int
    command_id: str | None  # the deploy sent, None before
    outcome: Outcome
    sent_at: float | None
    rollback_id: str | None  # the rollback sent, None before
    rollback_result: str | None
    detail: str | None

    @property
    def may_serve_release(self) -> bool:
        """Sent the release and not known to have refused or undone it: committed, or
        still pending (possibly serving it in its health window)."""
        return self.command_id is not None and self.outcome in (Outcome.COMMITTED,
                                                                Outcome.PENDING)

    @property
    def shown_outcome(self) -> str:
        return "not sent" if self.command_id is None else self.outcome.value


class Rollouts:
    """The rollout tables of a fleet database."""

    def __init__(self, db: FleetDB) -> None:
        self.db = db
        self.sql: sqlite3.Connection = db.connection
        self.sql.executescript(TABLES)
        for table, column, decl in ADDED:  # databases made by an earlier version
            have = {r[1] for r in self.sql.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                self.sql.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")

    def create(self, *, archive: Path, urls: list[str], group: str, devices: list[str],
               fractions: list[float], criteria: Criteria, wave_timeout_s: float,
               health_window_s: float = 0.0) -> str:
        fields = deploy_fields(archive, urls)
        if not devices:
            raise FleetError(f"group {group} has no known online device")
        rid = uuid.uuid4().hex[:12]
        sizes = wave_sizes(len(devices), fractions)
        self.sql.execute("INSERT INTO rollouts VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", (
            rid, fields["model"], fields["version"], group, str(archive), json.dumps(urls),
            json.dumps(sizes), json.dumps(asdict(criteria)), Status.RUNNING.value, 0, None,
            wave_timeout_s, "", time.time(), health_window_s, None))
        order = sorted(devices)
        for i, d in enumerate(order):
            wave = next(w for w, n in enumerate(sizes) if i < n)
            self.sql.execute("INSERT INTO rollout_devices VALUES (?,?,?,?,?,?,?,?,?)",
                             (rid, d, wave, None, Outcome.PENDING.value, None, None, None,
                              None))
        return rid

    def ids(self) -> list[str]:
        return [r[0] for r in self.sql.execute("SELECT id FROM rollouts ORDER BY created")]

    def get(self, rid: str) -> Rollout:
        cur = self.sql.execute("SELECT * FROM rollouts WHERE id = ?", (rid,))
        row = cur.fetchone()
        if row is None:
            raise FleetError(f"no rollout {rid}")
        return Rollout.from_row(dict(zip([c[0] for c in cur.description], row, strict=True)))

    def devices(self, rid: str) -> list[RolloutDevice]:
        cur = self.sql.execute("SELECT * FROM rollout_devices WHERE rollout = ? ORDER BY "
                               "wave, device", (rid,))
        cols = [c[0] for c in cur.description]
        out = []
        for r in cur.fetchall():
            row = dict(zip(cols, r, strict=True))
            out.append(RolloutDevice(**{**row, "outcome": Outcome(row["outcome"])}))
        return out

    def set(self, rid: str, **fields: Any) -> None:
        """Progress fields of a rollout; its status changes only through `move`."""
        if "status" in fields:
            raise TypeError("a rollout's status changes through Rollouts.move")
        cols = ", ".join(f"{k} = ?" for k in fields)
        self.sql.execute(f"UPDATE rollouts SET {cols} WHERE id = ?", (*fields.values(), rid))

    def move(self, rid: str, action: str, reason: str | None = None) -> Status:
        """Change a rollout's status along `fleet.policy.STATUS_TRANSITIONS`.

        Raises:
            FleetError: the table has no such step (e.g. resuming a halted rollout).
        """
        # Read and write in one transaction: two shells cannot both move it.
        self.sql.execute("BEGIN IMMEDIATE")
        try:
            ro = self.get(rid)
            try:
                status = next_status(ro.status, action)
            except ValueError as exc:
                raise FleetError(f"rollout {rid}: {exc}"
                                 + (f" ({ro.reason})" if ro.reason else "")) from exc
            self.sql.execute("UPDATE rollouts SET status = ?, reason = ? WHERE id = ?",
                             (status.value, ro.reason if reason is None else reason, rid))
        except BaseException:
            self.sql.execute("ROLLBACK")
            raise
        self.sql.execute("COMMIT")
        return status

    def set_device(self, rid: str, device: str, **fields: Any) -> None:
        cols = ", ".join(f"{k} = ?" for k in fields)
        self.sql.execute(f"UPDATE rollout_devices SET {cols} WHERE rollout = ? AND device = ?",
                         (*fields.values(), rid, device))

    def record_result(self, r: CommandResult) -> None:
        """Match a command result to the rollout device it answers."""
        if r.command_id is None:
            return
        row = self.sql.execute("SELECT rollout FROM rollout_devices WHERE device = ? AND "
                               "command_id = ?", (r.device, r.command_id)).fetchone()
        if row is not None:
            outcome = (Outcome.COMMITTED if r.ok else Outcome.ROLLED_BACK
                       if r.check in ("health", "cancelled") else Outcome.FAILED)
            self.set_device(row[0], r.device, outcome=outcome.value, detail=r.result[:300])
            return
        row = self.sql.execute("SELECT rollout FROM rollout_devices WHERE device = ? AND "
                               "rollback_id = ?", (r.device, r.command_id)).fetchone()
        if row is not None:
            self.set_device(row[0], r.device,
                            rollback_result=("ok: " if r.ok else "failed: ") + r.result)

    def status_lines(self, rid: str, *, every_device: bool = False) -> list[str]:
        """The rollout, then its devices: each one for small rollouts (or `every_device`),
        otherwise a count per wave and outcome and only the devices that did not commit."""
        ro = self.get(rid)
        sizes = ro.sizes
        out = [f"rollout {rid}: {ro.model} v{ro.version} to group {ro.group}, "
               f"{ro.status}, wave {ro.wave + 1} of {len(sizes)}"
               + (f" — {ro.reason}" if ro.reason else "")]
        devices = self.devices(rid)
        every_device = every_device or len(devices) <= 20

        def line(d: RolloutDevice) -> str:
            return (f"  wave {d.wave + 1}  {d.device:14} {d.shown_outcome:12}"
                    + (f" {d.detail}" if d.detail and d.outcome != "committed"
                       else "")
                    + (f"; rollback {d.rollback_result or 'sent'}" if d.rollback_id
                       else ""))
        if every_device:
            return out + [line(d) for d in devices]
        for w in range(len(sizes)):
            mine = [d for d in devices if d.wave == w]
            counts = Counter(d.shown_outcome for d in mine)
            rolled = sum(1 for d in mine if d.rollback_id)
            out.append(f"  wave {w + 1}: {len(mine)} device(s): "
                       + ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
                       + (f"; {rolled} sent a rollback" if rolled else ""))
        return out + [line(d) for d in devices
                      if d.outcome not in ("committed", "pending") or (d.rollback_result
                      and not d.rollback_result.startswith("ok"))]


class Controller:
    """Carries out rollouts: sends deploys, listens for results, judges waves.

    Telemetry and events reach the same database through a `FleetWatcher` on a shared
    subscription: two controllers on one database split that load between them."""

    def __init__(self, db: FleetDB, broker_url: BrokerAuth | str, fleet: str,
                 keys: Iterable[SigningKey],
                 *, client_id: str = "edge-fleet-controller") -> None:
        self.db = db
        self.rollouts = Rollouts(db)
        self.watcher = FleetWatcher(db, broker_url, fleet).start()
        self.fleet, self.keys = fleet, list(keys)
        self.gate = ReportGate(db, fleet)
        self._lock = threading.Lock()
        self.client, _ = connect(broker_url, client_id,
                                 topics=[f"{PREFIX}/{fleet}/+/cmd/result"],
                                 on_message=self._message, session_expiry_s=24 * 3600)

    def close(self) -> None:
        self.watcher.stop()
        self.client.loop_stop()
        self.client.disconnect()

    def _message(self, client: Any, userdata: Any, msg: Any) -> None:
        """A command result: believed only when its device signed it (`fleet.ingest`);
        an error while recording one is counted and logged, never fatal."""
        try:
            report = self.gate.open(msg.topic, bytes(msg.payload))
            if report is None or not isinstance(report.payload, CommandResult):
                return
            with self._lock:
                self.rollouts.record_result(report.payload)
        except Exception:  # one bad message must never stop the results
            self.db.bump("ingest_errors")
            log.exception("rollout.result_crashed topic=%.200s", msg.topic)

    def _send(self, rid: str, kind: str, devices: list[str], **fields: Any) -> None:
        """Signed commands to `devices`: their ids are recorded first (a result can come
        back before the broker's PUBACK), then all are published, then the PUBACKs are
        awaited, outside the lock (the network thread takes it to record results)."""
        cmds = [build_command(kind, fleet=self.fleet, device=d, **fields) for d in devices]
        with self._lock:
            for d, cmd in zip(devices, cmds, strict=True):
                if kind == "deploy":
                    self.rollouts.set_device(rid, d, command_id=cmd.id, sent_at=time.time(),
                                             outcome=Outcome.PENDING.value)
                else:
                    self.rollouts.set_device(rid, d, rollback_id=cmd.id)
        sent = [self.client.publish(device_topic(self.fleet, d, "cmd"),
                                    sign_command(cmd, self.keys), qos=1)
                for d, cmd in zip(devices, cmds, strict=True)]
        for info in sent:
            info.wait_for_publish(30)

    def step(self, rid: str) -> Status:
        """One pass over a rollout; returns its status."""
        with self._lock:
            ro = self.rollouts.get(rid)
        if ro.status in (Status.HALTED, Status.ABORTED):
            self._roll_back_touched(rid)  # resumes rollbacks a crash interrupted
            return ro.status
        if ro.status is not Status.RUNNING:
            return ro.status
        with self._lock:
            devices = [d for d in self.rollouts.devices(rid) if d.wave <= ro.wave]
            unsent = [d.device for d in devices if d.command_id is None
                      or d.outcome is Outcome.OFFLINE]
        if unsent:
            self._send(rid, "deploy", unsent, **deploy_fields(ro.archive, ro.urls))
        with self._lock:
            if ro.wave_started is None or unsent:
                self.rollouts.set(rid, wave_started=ro.wave_started or time.time())
                ro = self.rollouts.get(rid)
            status = self._judge(rid, ro, self.rollouts.devices(rid))
        if status is Status.HALTED:
            self._roll_back_touched(rid)
        return status

    def _judge(self, rid: str, ro: Rollout, devices: list[RolloutDevice]) -> Status:
        wave_devs = [d for d in devices if d.wave <= ro.wave]
        outcomes = {d.device: d.outcome for d in wave_devs}
        now = time.time()
        assert ro.wave_started is not None  # step sets it before judging
        verdict = judge(outcomes, deadline_passed=now - ro.wave_started > ro.wave_timeout_s,
                        criteria=ro.criteria,
                        health=self._health(ro, devices, ro.wave_started))
        if verdict.action == "wait":
            return Status.RUNNING
        if verdict.action == "halt":
            return self.rollouts.move(rid, "halt", verdict.reason)
        # advance: every device answered; watch them for the wave's health window first
        if ro.settled_at is None:
            self.rollouts.set(rid, settled_at=now)
            ro = replace(ro, settled_at=now)
        assert ro.settled_at is not None
        if now - ro.settled_at < ro.health_window_s:
            return Status.RUNNING
        for d in wave_devs:  # late devices: retried in the next wave
            if d.outcome is Outcome.PENDING:
                self.rollouts.set_device(rid, d.device, outcome=Outcome.OFFLINE.value)
        if ro.wave + 1 >= len(ro.sizes):
            return self.rollouts.move(rid, "complete", verdict.reason)
        self.rollouts.set(rid, wave=ro.wave + 1, wave_started=None, settled_at=None,
                          reason=verdict.reason)
        return Status.RUNNING

    def _health(self, ro: Rollout, devices: list[RolloutDevice], since: float) -> Health:
        """Updated devices (sent this release, not failed) against the baseline (devices
        of the rollout not reached yet) since the wave started."""
        updated = [d.device for d in devices if d.may_serve_release]
        baseline = [d.device for d in devices if d.command_id is None]
        anomalies = self.db.anomalies_since(since)
        latency = self.db.latency_p95_since(ro.model, since)

        def anomalous(names: list[str]) -> float:
            return sum(n in anomalies for n in names) / len(names) if names else 0.0

        def median(names: list[str]) -> float | None:
            """The median p95 of a set, once enough of it reported (a few devices' p95
            is noise, not a regression)."""
            values = [latency[n] for n in names if n in latency]
            enough = len(values) >= min(len(names), max(3, len(names) // 2))
            return statistics.median(values) if values and enough else None

        return Health(updated_anomalous=anomalous(updated),
                      baseline_anomalous=anomalous(baseline),
                      updated_latency_ms=median(updated),
                      baseline_latency_ms=median(baseline) if baseline else None)

    def _roll_back_touched(self, rid: str) -> None:
        """Signed rollbacks to every device this rollout may have changed and that has
        not been sent one. Failed deploys never activated and health-window rollbacks
        undid themselves; committed ones, and pending ones that may be in their window
        (the agent cancels a deploy in progress), go back."""
        with self._lock:
            ro = self.rollouts.get(rid)
            targets = [d.device for d in self.rollouts.devices(rid)
                       if d.may_serve_release and d.rollback_id is None]
        if targets:
            self._send(rid, "rollback", targets, model=ro.model,
                       reason=f"rollout {rid} {ro.status}: {ro.reason}")

    def abort(self, rid: str, reason: str = "aborted by the operator") -> None:
        """Abort a running or paused rollout and roll back every device it touched.

        Raises:
            FleetError: the rollout already ended.
        """
        with self._lock:
            self.rollouts.move(rid, "abort", reason)
        self._roll_back_touched(rid)

    def run(self, rid: str, *, poll_s: float = 0.5, timeout_s: float = 3600,
            rollback_wait_s: float = 30.0) -> Status:
        """Step until the rollout ends or pauses; after a halt or abort, wait up to
        `rollback_wait_s` for the rollbacks' results, so the summary shows them."""
        end = time.monotonic() + timeout_s
        status = Status.RUNNING
        beat = 0.0
        while time.monotonic() < end:
            if time.monotonic() - beat >= HEARTBEAT_EVERY_S:  # freshness for every device
                beat = time.monotonic()
                self.client.publish(fleet_topic(self.fleet, "heartbeat"),
                                    heartbeat(self.fleet, self.keys), qos=1, retain=True)
            status = self.step(rid)
            if status is not Status.RUNNING:
                break
            time.sleep(poll_s)
        if status in (Status.HALTED, Status.ABORTED):
            until = time.monotonic() + rollback_wait_s
            while time.monotonic() < until and any(
                    d.rollback_id and not d.rollback_result
                    for d in self.rollouts.devices(rid)):
                time.sleep(poll_s)
        return status
