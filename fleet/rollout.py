"""Staged rollouts: signed deploys to a group in waves, judged by `fleet.policy`, halted
with signed rollbacks to every device touched when the criteria fail.

The ground truth is a per-device execution record, as AWS IoT Jobs and Mender keep one:

    rollouts           one row per rollout: status, wave, criteria, its controller's lock
    rollout_devices    one row per device: its execution's status, attempts, the command
                       in flight, the rollback sent and its answer
    rollout_history    every change of an execution's status, with its cause
    rollout_commands   every signed command, recorded *to send* before it is published
                       and marked *sent* only when the broker acknowledged it

Every status change goes through `fleet.policy.EXEC_TRANSITIONS` (`Rollouts.transition`),
caused by an authenticated device report (a signed result or event, its retained state)
or an explicit controller decision (send, broker ack, timeout, retry, fleet rollback).

Faults: the controller can be killed at any point and started again, and it goes on from
what the database says: commands recorded and never acknowledged are published again
(the device's nonce store refuses a second copy; that refusal is recognised and ignored).
Results arrive through a persistent MQTT session per rollout (client id
`edge-fleet-rollout-{id}`; only the holder of the rollout's lock uses it), so results
published while no controller ran are delivered when one returns; the devices' retained
state settles what a lost result leaves open. A broker outage is waited out (paho
reconnects; nothing is published while disconnected; nothing uncaught).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sqlite3
import statistics
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.link.wire import PREFIX, CommandResult, Event, device_topic, fleet_topic
from fleet._mqtt import BrokerAuth, close, connect_patiently
from fleet._proc import pid_alive
from fleet.commands import build_command, deploy_fields, sign_command
from fleet.errors import FleetError
from fleet.ingest import Report, ReportGate
from fleet.keys import SigningKey
from fleet.policy import (
    DEFAULT_RETRY,
    DONE,
    FINAL,
    MAY_SERVE,
    OPEN,
    Criteria,
    Exec,
    Health,
    Pace,
    RetryPolicy,
    Status,
    judge,
    next_exec,
    next_status,
    wave_sizes,
)
from fleet.publish import HEARTBEAT_EVERY_S, heartbeat
from fleet.state import CONTROLLER_GROUP, FleetDB, FleetWatcher

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
CREATE TABLE IF NOT EXISTS rollout_history (
  rollout TEXT NOT NULL, device TEXT NOT NULL, at REAL NOT NULL, from_status TEXT,
  to_status TEXT NOT NULL, event TEXT NOT NULL, cause TEXT);
CREATE INDEX IF NOT EXISTS rollout_history_device ON rollout_history (rollout, device);
CREATE TABLE IF NOT EXISTS rollout_commands (
  id TEXT PRIMARY KEY, rollout TEXT NOT NULL, device TEXT NOT NULL, kind TEXT NOT NULL,
  attempt INTEGER NOT NULL, created REAL NOT NULL, expires REAL NOT NULL,
  state TEXT NOT NULL, sent_at REAL, payload BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS rollout_commands_state ON rollout_commands (rollout, state);
"""
log = logging.getLogger("edge_fleet.rollout")
_EXEC = {e.value: e for e in Exec}
# Columns added after the first release of these tables: (table, column, declaration).
ADDED = [("rollouts", "health_window_s", "REAL NOT NULL DEFAULT 0"),
         ("rollouts", "settled_at", "REAL"), ("rollout_devices", "detail", "TEXT"),
         ("rollouts", "retry_json", "TEXT"), ("rollouts", "command_ttl_s", "REAL"),
         ("rollouts", "max_per_minute", "INTEGER NOT NULL DEFAULT 0"),
         ("rollouts", "continuous", "INTEGER NOT NULL DEFAULT 0"),
         ("rollouts", "culprits_json", "TEXT"), ("rollouts", "owner", "TEXT"),
         ("rollouts", "owner_beat", "REAL"), ("rollouts", "ended", "REAL"),
         ("rollout_devices", "status", "TEXT"),
         ("rollout_devices", "attempts", "INTEGER NOT NULL DEFAULT 0"),
         ("rollout_devices", "updated", "REAL"), ("rollout_devices", "retry_at", "REAL"),
         ("rollout_devices", "failure", "TEXT"), ("rollout_devices", "report_epoch", "INTEGER"),
         ("rollout_devices", "report_seq", "INTEGER")]
#: Statuses of rows written before the execution record (their `outcome` column).
LEGACY = {"pending": "CASE WHEN command_id IS NULL THEN 'queued' ELSE 'sent' END",
          "committed": "'committed'", "rolled_back": "'rolled_back'", "failed": "'failed'",
          "offline": "'timed_out'"}
#: A controller that has not written its beat for this long has lost its lock, and its
#: running rollout shows as stalled.
LOCK_STALE_S = 15.0
#: A command handed to paho and not acknowledged for this long is published again (a
#: copy that arrives twice is refused by the device as a replay, and that is ignored).
UNACKED_S = 60.0
#: Devices' failure checks that mean "the device is on this release or ahead of it",
#: settled against its retained state.
VERSION_CHECKS = ("equal_version", "rollback")


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
    wave_timeout_s: float  # per execution: sent and no answer for this long = timed out
    reason: str
    created: float
    health_window_s: float
    settled_at: float | None
    retry: RetryPolicy
    command_ttl_s: float
    max_per_minute: int  # 0: no limit
    continuous: bool  # after the last wave, keep targeting devices that come or join
    culprits: list[str]  # the devices whose failure halted it
    owner: str | None  # the controller holding its lock
    owner_beat: float | None
    ended: float | None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Rollout:
        retry = json.loads(row["retry_json"]) if row["retry_json"] else {}
        if "retries" in retry:
            retry["retries"] = tuple(tuple(r) for r in retry["retries"])
        return cls(id=row["id"], model=row["model"], version=row["version"],
                   group=row["group_name"], archive=Path(row["archive"]),
                   urls=json.loads(row["urls_json"]), sizes=json.loads(row["sizes_json"]),
                   criteria=Criteria(**json.loads(row["criteria_json"])),
                   status=Status(row["status"]), wave=row["wave"],
                   wave_started=row["wave_started"], wave_timeout_s=row["wave_timeout_s"],
                   reason=row["reason"], created=row["created"],
                   health_window_s=row["health_window_s"], settled_at=row["settled_at"],
                   retry=RetryPolicy(**retry), command_ttl_s=row["command_ttl_s"] or 3600.0,
                   max_per_minute=row["max_per_minute"], continuous=bool(row["continuous"]),
                   culprits=json.loads(row["culprits_json"] or "[]"), owner=row["owner"],
                   owner_beat=row["owner_beat"], ended=row["ended"])

    def shown_status(self, now: float | None = None) -> str:
        """Its status, except that a running rollout whose controller has not written for
        `LOCK_STALE_S` shows as stalled."""
        now = time.time() if now is None else now
        if self.status is Status.RUNNING and (self.owner_beat is None
                                              or now - self.owner_beat > LOCK_STALE_S):
            return "stalled"
        return self.status.value


@dataclass(frozen=True, kw_only=True)
class RolloutDevice:
    """One row of `rollout_devices`: a device's execution of a rollout."""

    rollout: str
    device: str
    wave: int
    status: Exec
    attempts: int  # deploy commands recorded for it
    command_id: str | None  # the newest deploy command, None before the first
    sent_at: float | None
    updated: float | None
    retry_at: float | None
    failure: str | None  # the check of the last failure (or "timeout")
    detail: str | None
    rollback_id: str | None  # the rollback sent, None before
    rollback_result: str | None
    report_order: tuple[int, int] | None = None  # of the device report that last moved it

    @property
    def may_serve_release(self) -> bool:
        """Sent the release and not known to have refused or undone it (a queued retry
        counts: an earlier attempt may still land)."""
        return self.status in MAY_SERVE or (self.status is Exec.QUEUED and self.attempts > 0)

    def shown(self, online: set[str]) -> str:
        """Its status as status and the dashboard show it: `offline` for a queued device
        that is away."""
        if self.status is Exec.QUEUED and self.device not in online:
            return "offline"
        return self.status.value


@dataclass(frozen=True)
class HistoryEntry:
    at: float
    from_status: str | None
    to_status: str
    event: str
    cause: str


class Rollouts:
    """The rollout tables of a fleet database."""

    def __init__(self, db: FleetDB) -> None:
        self.db = db
        self.sql: sqlite3.Connection = db.connection
        self._lock = db.lock  # one lock for the one connection (watcher writes too)
        with self._lock:  # executescript commits whatever transaction is open: not another's
            self.sql.executescript(TABLES)
            for table, column, decl in ADDED:  # databases made by an earlier version
                have = {r[1] for r in self.sql.execute(f"PRAGMA table_info({table})")}
                if column not in have:
                    self.sql.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
            cases = " ".join(f"WHEN '{k}' THEN {v}" for k, v in LEGACY.items())
            self.sql.execute(f"UPDATE rollout_devices SET status = CASE outcome {cases} "
                             "ELSE 'queued' END, attempts = (command_id IS NOT NULL) "
                             "WHERE status IS NULL")

    def _tx(self) -> contextlib.AbstractContextManager[None]:
        """One write transaction (a record and its history change together)."""
        return self.db.tx()

    def create(self, *, archive: Path, urls: list[str], group: str, devices: list[str],
               fractions: list[float], criteria: Criteria, wave_timeout_s: float,
               health_window_s: float = 0.0, retry: RetryPolicy = DEFAULT_RETRY,
               command_ttl_s: float = 3600.0, max_per_minute: int = 0,
               continuous: bool = False) -> str:
        """A running rollout of `archive` to `devices` (every known member of `group`,
        online or not: those away are sent the release when they come back)."""
        fields = deploy_fields(archive, urls)
        if not devices:
            raise FleetError(f"group {group} has no known device")
        rid = uuid.uuid4().hex[:12]
        sizes = wave_sizes(len(devices), fractions)
        now = time.time()
        with self._tx():
            self.sql.execute(
                "INSERT INTO rollouts (id, model, version, group_name, archive, urls_json, "
                "sizes_json, criteria_json, status, wave, wave_started, wave_timeout_s, "
                "reason, created, health_window_s, settled_at, retry_json, command_ttl_s, "
                "max_per_minute, continuous) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (rid, fields["model"], fields["version"], group, str(archive),
                 json.dumps(urls), json.dumps(sizes), json.dumps(asdict(criteria)),
                 Status.RUNNING.value, 0, None, wave_timeout_s, "", now, health_window_s,
                 None, json.dumps(asdict(retry)), command_ttl_s, max_per_minute,
                 int(continuous)))
            for i, d in enumerate(devices):  # in the caller's order (canaries first)
                self._add_device(rid, d, next(w for w, n in enumerate(sizes) if i < n),
                                 "in the group when the rollout started", now)
        return rid

    def _add_device(self, rid: str, device: str, wave: int, cause: str, now: float) -> None:
        self.sql.execute("INSERT INTO rollout_devices (rollout, device, wave, status, "
                         "attempts, updated) VALUES (?,?,?,?,0,?)",
                         (rid, device, wave, Exec.QUEUED.value, now))
        self._history(rid, device, now, None, Exec.QUEUED, "queued", cause)

    def _history(self, rid: str, device: str, at: float, old: Exec | None, new: Exec,
                 event: str, cause: str) -> None:
        self.sql.execute("INSERT INTO rollout_history VALUES (?,?,?,?,?,?,?)",
                         (rid, device, at, old.value if old else None, new.value, event,
                          cause[:500]))

    def add_member(self, rid: str, device: str) -> None:
        """A device that joined the group (or was first seen) during the rollout: queued
        in the last wave (a newcomer is not a canary)."""
        ro = self.get(rid)
        with self._tx():
            self._add_device(rid, device, len(ro.sizes) - 1, "joined the group", time.time())

    def ids(self) -> list[str]:
        return [r[0] for r in self.sql.execute("SELECT id FROM rollouts ORDER BY created")]

    def get(self, rid: str) -> Rollout:
        with self._lock:
            cur = self.sql.execute("SELECT * FROM rollouts WHERE id = ?", (rid,))
            row = cur.fetchone()
            if row is None:
                raise FleetError(f"no rollout {rid}")
            return Rollout.from_row(dict(zip([c[0] for c in cur.description], row,
                                             strict=True)))

    def devices(self, rid: str, device: str | None = None) -> list[RolloutDevice]:
        """The rollout's executions (one device's, with `device`), by wave and device."""
        where = "rollout = ?" + (" AND device = ?" if device is not None else "")
        with self._lock:
            rows = self.sql.execute(
                "SELECT rollout, device, wave, status, attempts, command_id, sent_at, "
                "updated, retry_at, failure, detail, rollback_id, rollback_result, "
                "report_epoch, report_seq FROM "
                f"rollout_devices WHERE {where} ORDER BY wave, device",
                (rid,) if device is None else (rid, device)).fetchall()
        # built directly, statuses looked up: a controller reads every execution of a
        # rollout a few times a step (dicts per row and Exec(...) were a third of a step)
        return [RolloutDevice(rollout=r, device=dev, wave=wave, status=_EXEC[st],
                              attempts=attempts, command_id=cmd, sent_at=sent, updated=upd,
                              retry_at=retry, failure=failure, detail=detail,
                              rollback_id=rb, rollback_result=rbr,
                              report_order=None if epoch is None else (int(epoch), int(seq)))
                for (r, dev, wave, st, attempts, cmd, sent, upd, retry, failure, detail, rb,
                     rbr, epoch, seq) in rows]

    def outsiders(self, rid: str) -> list[tuple[str, str]]:
        """(device, groups_json) of each registered device with a state that is not in
        the rollout (one indexed lookup each: a controller asks every step)."""
        with self._lock:
            return self.sql.execute(
                "SELECT d.device, d.groups_json FROM devices d "
                "JOIN device_keys k ON k.device = d.device WHERE NOT EXISTS (SELECT 1 FROM "
                "rollout_devices r WHERE r.rollout = ? AND r.device = d.device) "
                "ORDER BY d.device", (rid,)).fetchall()

    def device(self, rid: str, device: str) -> RolloutDevice | None:
        found = self.devices(rid, device)
        return found[0] if found else None

    def history(self, rid: str, device: str) -> list[HistoryEntry]:
        with self._lock:
            rows = self.sql.execute("SELECT at, from_status, to_status, event, cause FROM "
                                    "rollout_history WHERE rollout = ? AND device = ? "
                                    "ORDER BY rowid", (rid, device)).fetchall()
        return [HistoryEntry(*r) for r in rows]

    def set(self, rid: str, **fields: Any) -> None:
        """Progress fields of a rollout; its status changes only through `move`."""
        if "status" in fields:
            raise TypeError("a rollout's status changes through Rollouts.move")
        cols = ", ".join(f"{k} = ?" for k in fields)
        with self._lock:
            self.sql.execute(f"UPDATE rollouts SET {cols} WHERE id = ?",
                             (*fields.values(), rid))

    def move(self, rid: str, action: str, reason: str | None = None) -> Status:
        """Change a rollout's status along `fleet.policy.STATUS_TRANSITIONS`.

        Raises:
            FleetError: the table has no such step (e.g. resuming a halted rollout).
        """
        with self._tx():  # read and write in one transaction: two shells cannot both move it
            ro = self.get(rid)
            try:
                status = next_status(ro.status, action)
            except ValueError as exc:
                raise FleetError(f"rollout {rid}: {exc}"
                                 + (f" ({ro.reason})" if ro.reason else "")) from exc
            self.sql.execute("UPDATE rollouts SET status = ?, reason = ?, ended = ? "
                             "WHERE id = ?", (status.value, ro.reason if reason is None
                                              else reason,
                                              time.time() if status in FINAL else None, rid))
        return status

    # -- the lock: one controller drives a rollout -----------------------------------------
    def acquire(self, rid: str, owner: str) -> None:
        """Take the rollout's lock for `owner`, or renew it.

        Raises:
            FleetError: another controller holds it and wrote within `LOCK_STALE_S`.
        """
        now = time.time()
        with self._tx():
            ro = self.get(rid)
            if (ro.owner not in (None, owner) and ro.owner_beat is not None
                    and now - ro.owner_beat < LOCK_STALE_S and _alive(ro.owner)):
                raise FleetError(f"rollout {rid} is driven by controller {ro.owner} "
                                 f"(seen {now - ro.owner_beat:.0f} s ago); stop it first")
            self.sql.execute("UPDATE rollouts SET owner = ?, owner_beat = ? WHERE id = ?",
                             (owner, now, rid))

    def release(self, rid: str, owner: str) -> None:
        with self._lock:
            self.sql.execute("UPDATE rollouts SET owner = NULL WHERE id = ? AND owner = ?",
                             (rid, owner))

    # -- executions ------------------------------------------------------------------------
    def transition(self, rid: str, device: str, event: str, cause: str, *,
                   order: tuple[int, int] | None = None, **fields: Any) -> Exec | None:
        """Move one execution along `EXEC_TRANSITIONS` and write the change to its history,
        together with `fields`; None (and nothing written) when the table has no such
        step (logged: a report that arrives after a truer one). `order`: the (epoch, seq)
        of the device report that caused it (`fleet.ordering`), kept on the execution so a
        retained state older than that report never overrides it."""
        if order is not None:
            fields = {**fields, "report_epoch": order[0], "report_seq": order[1]}
        with self._tx():
            row = self.sql.execute("SELECT status FROM rollout_devices WHERE rollout = ? AND "
                                   "device = ?", (rid, device)).fetchone()
            if row is None:
                return None
            old = Exec(row[0])
            try:
                new = next_exec(old, event)
            except ValueError:
                log.info("rollout.transition_refused rollout=%s device=%s status=%s "
                         "event=%s cause=%.200s", rid, device, old, event, cause)
                return None
            now = time.time()
            values = {"status": new.value, "updated": now, **fields}
            cols = ", ".join(f"{k} = ?" for k in values)
            self.sql.execute(f"UPDATE rollout_devices SET {cols} WHERE rollout = ? AND "
                             "device = ?", (*values.values(), rid, device))
            self._history(rid, device, now, old, new, event, cause)
        return new

    def set_device(self, rid: str, device: str, **fields: Any) -> None:
        """Fields of an execution other than its status (which `transition` writes)."""
        if "status" in fields:
            raise TypeError("an execution's status changes through Rollouts.transition")
        cols = ", ".join(f"{k} = ?" for k in fields)
        with self._lock:
            self.sql.execute(f"UPDATE rollout_devices SET {cols} WHERE rollout = ? AND "
                             "device = ?", (*fields.values(), rid, device))

    # -- commands --------------------------------------------------------------------------
    def record_command(self, rid: str, device: str, kind: str, cmd_id: str, attempt: int,
                       expires: float, payload: bytes) -> None:
        with self._lock:
            self.sql.execute("INSERT INTO rollout_commands VALUES (?,?,?,?,?,?,?,?,?,?)",
                             (cmd_id, rid, device, kind, attempt, time.time(), expires,
                              "to_send", None, payload))

    def unsent(self, rid: str) -> list[tuple[str, str, str, float, bytes]]:
        """(id, device, kind, expires, payload) of the commands never acknowledged."""
        with self._lock:
            return self.sql.execute("SELECT id, device, kind, expires, payload FROM "
                                    "rollout_commands WHERE rollout = ? AND state = "
                                    "'to_send' ORDER BY created", (rid,)).fetchall()

    def command(self, cmd_id: str) -> tuple[str, str, str, int] | None:
        """(rollout, device, kind, attempt) of a command this database sent."""
        with self._lock:
            row = self.sql.execute("SELECT rollout, device, kind, attempt FROM "
                                   "rollout_commands WHERE id = ?", (cmd_id,)).fetchone()
        return None if row is None else (row[0], row[1], row[2], int(row[3]))

    def sent_at(self, cmd_id: str) -> float | None:
        """When the broker acknowledged a command (None: not yet, or unknown)."""
        with self._lock:
            row = self.sql.execute("SELECT sent_at FROM rollout_commands WHERE id = ?",
                                   (cmd_id,)).fetchone()
        return None if row is None else row[0]

    def mark_sent(self, cmd_id: str) -> None:
        with self._lock:
            self.sql.execute("UPDATE rollout_commands SET state = 'sent', sent_at = ? "
                             "WHERE id = ? AND state = 'to_send'", (time.time(), cmd_id))

    def drop_unsent(self, cmd_id: str) -> None:
        with self._lock:
            self.sql.execute("UPDATE rollout_commands SET state = 'expired' WHERE id = ? "
                             "AND state = 'to_send'", (cmd_id,))

    # -- reading ---------------------------------------------------------------------------
    def status_lines(self, rid: str, *, every_device: bool = False) -> list[str]:
        """The rollout, the versions its group runs, then its devices: each one for small
        rollouts (or `every_device`), otherwise a count per wave and status, and only the
        devices that are not done."""
        ro = self.get(rid)
        devices = self.devices(rid)
        states = {r.device: r for r in self.db.devices()}
        online = {d for d, r in states.items() if r.online}
        out = [f"rollout {rid}: {ro.model} v{ro.version} to group {ro.group}, "
               f"{ro.shown_status()}, wave {ro.wave + 1} of {len(ro.sizes)}"
               + (f" — {ro.reason}" if ro.reason else "")]
        if ro.culprits:
            out.append("  caused by: " + ", ".join(ro.culprits[:20])
                       + (", …" if len(ro.culprits) > 20 else ""))
        versions = Counter(_running(states.get(d.device), ro.model) for d in devices)
        out.append("  group runs: " + ", ".join(f"{n} on {v}" for v, n in
                                                sorted(versions.items())))

        def line(d: RolloutDevice) -> str:
            return (f"  wave {d.wave + 1}  {d.device:14} {d.shown(online):15} "
                    f"{_running(states.get(d.device), ro.model):6}"
                    + (f" {d.detail}" if d.detail and d.status not in DONE else "")
                    + (f"; rollback {d.rollback_result or 'sent'}" if d.rollback_id
                       else ""))
        if every_device or len(devices) <= 20:
            return out + [line(d) for d in devices]
        for w in range(len(ro.sizes)):
            mine = [d for d in devices if d.wave == w]
            counts = Counter(d.shown(online) for d in mine)
            rolled = sum(1 for d in mine if d.rollback_id)
            out.append(f"  wave {w + 1}: {len(mine)} device(s): "
                       + ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
                       + (f"; {rolled} sent a rollback" if rolled else ""))
        return out + [line(d) for d in devices
                      if d.status not in DONE and (d.attempts or d.status is not Exec.QUEUED)]


def pause_after(step_s: float, poll_s: float) -> float:
    """How long a controller waits before its next step: `poll_s`, or as long as the step
    took when that was longer, so stepping a large rollout (its cost grows with the
    fleet) takes at most half of a core from ingest and from everything else."""
    return max(poll_s, step_s)


def printable(text: str, limit: int) -> str:
    """`text` cut to `limit` with every control character (terminal escapes, newlines)
    replaced by "?": what a device says is shown in operators' terminals."""
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


def _alive(owner: str) -> bool:
    """False when `owner` ("host:pid:tag") was a process of this host that is gone (a
    controller killed a moment ago need not wait for its lock to go stale)."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    return host != socket.gethostname() or not pid.isdigit() or pid_alive(int(pid))


def _order(payload: Any) -> tuple[int, int] | None:
    """The (epoch, seq) of a device report (`fleet.ordering`)."""
    o = getattr(payload, "order", None)
    return None if o is None else (o.epoch, o.seq)


def _running(state: Any, model: str) -> str:
    """The version a device's retained state says it serves: "v2", or "-"."""
    m = (state.models.get(model) if state is not None else None) or {}
    return f"v{m['version']}" if "version" in m else "-"


class Controller:
    """Carries out rollouts: sends deploys, listens for results, judges waves.

    Its `FleetWatcher` keeps device state, telemetry and events current in the database,
    on the controllers' shared subscription (two controllers on one database split that
    load); monitoring tools read on their own."""

    def __init__(self, db: FleetDB, broker_url: BrokerAuth | str, fleet: str,
                 keys: Iterable[SigningKey], *, connect_wait_s: float = 60.0) -> None:
        self.db, self.broker = db, broker_url
        self.rollouts = Rollouts(db)
        self.fleet, self.keys = fleet, list(keys)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.gate = ReportGate(db, fleet)
        self.connect_wait_s = connect_wait_s
        self.watcher = FleetWatcher(db, broker_url, fleet, share_group=CONTROLLER_GROUP,
                                    on_report=self._report, connect_wait_s=connect_wait_s)
        self.watcher.synced()  # the devices' retained states first: who is online
        self._sessions: dict[str, paho.Client] = {}
        # command id -> (rollout, paho's message info): handed to paho, not acknowledged
        self._publishing: dict[str, tuple[str, paho.MQTTMessageInfo, float]] = {}
        self._pace: dict[str, Pace] = {}  # per rollout: `max_per_minute`

    def close(self) -> None:
        self.watcher.stop()
        for rid, client in self._sessions.items():
            self.rollouts.release(rid, self.owner)
            close(client)
        self._sessions.clear()

    # -- MQTT ------------------------------------------------------------------------------
    def _session(self, rid: str) -> paho.Client:
        """The rollout's results session, opened once this controller holds its lock."""
        self.rollouts.acquire(rid, self.owner)
        client = self._sessions.get(rid)
        if client is None:
            def on_message(client: Any, userdata: Any, msg: Any) -> None:
                self._message(rid, msg)
            client, _ = connect_patiently(
                self.broker, f"edge-fleet-rollout-{rid}",
                topics=[f"{PREFIX}/{self.fleet}/+/cmd/result"],
                on_message=on_message, session_expiry_s=24 * 3600,
                max_inflight=1000, wait_s=self.connect_wait_s)
            self._sessions[rid] = client
        return client

    def _message(self, rid: str, msg: Any) -> None:
        """A command result on rollout `rid`'s session: believed only when its device
        signed it (`fleet.ingest`), applied only when it answers one of this rollout's
        commands (every rollout's session receives every result) and is new in its
        device's order (`fleet.ordering`: a duplicate or a replay is counted stale); an
        error while recording one is counted and logged, never fatal."""
        try:
            report = self.gate.open(msg.topic, bytes(msg.payload))
            p = None if report is None else report.payload
            if report is None or not isinstance(p, CommandResult) or not p.command_id:
                return
            sent = self.rollouts.command(p.command_id)
            if sent is None or sent[0] != rid or sent[1] != p.device:
                return
            with self.db.tx():
                if self.db.admit(report):
                    self.record_result(p)
        except Exception:  # one bad message must never stop the results
            self.db.bump("ingest_errors")
            log.exception("rollout.result_crashed topic=%.200s", msg.topic)

    def _report(self, report: Report) -> None:
        """A device's signed event about a deploy command of a rollout (from the watcher,
        which admitted it in its device's order)."""
        p = report.payload
        if isinstance(p, Event) and p.command_id and p.kind.startswith("deploy."):
            sent = self.rollouts.command(p.command_id)
            if sent is not None and sent[2] == "deploy" and sent[1] == p.device:
                self.rollouts.transition(sent[0], p.device, "progress", f"event {p.kind}",
                                         order=_order(p))

    def _collect_acks(self, rid: str) -> None:
        """Commands the broker acknowledged since the last step: marked sent, and their
        executions moved from to_send to sent. (paho keeps what was in flight across a
        reconnect and sends it again itself.)"""
        now = time.monotonic()
        for cmd_id, (r, info, handed) in list(self._publishing.items()):
            if r != rid:
                continue
            if not info.is_published():
                if now - handed > UNACKED_S:  # paho lost it (a reconnect): publish again
                    del self._publishing[cmd_id]
                continue
            del self._publishing[cmd_id]
            self.rollouts.mark_sent(cmd_id)
            sent = self.rollouts.command(cmd_id)
            if sent is None or sent[2] != "deploy":
                continue
            d = self.rollouts.device(rid, sent[1])
            if d is None or d.command_id != cmd_id:
                continue
            if d.status is Exec.TO_SEND:
                self.rollouts.transition(rid, sent[1], "acked", "the broker acknowledged "
                                         f"deploy {cmd_id[:8]}", sent_at=time.time())
            elif d.sent_at is None:  # the device answered before the ack was collected
                self.rollouts.set_device(rid, sent[1], sent_at=time.time())

    # -- device reports --------------------------------------------------------------------
    def record_result(self, r: CommandResult) -> None:
        """Match a signed result to the command it answers (any attempt of it: a late
        answer to an earlier attempt is still the truth) and move the execution."""
        assert r.command_id is not None
        sent = self.rollouts.command(r.command_id)
        if sent is None or sent[1] != r.device:
            return
        rid, device, kind, attempt = sent
        if r.check == "replay":
            return  # a copy of a command re-sent after a crash; the first one answers
        said = printable(r.result, 300)  # a device's words, shown in terminals
        why = f"{kind} {r.command_id[:8]}: {said[:200]}"
        if kind == "rollback":
            self.rollouts.set_device(rid, device, rollback_result=("ok: " if r.ok
                                                                   else "failed: ") + said)
            d = self.rollouts.device(rid, device)
            # "not_serving" from a device that never reported starting the deploy: it
            # stays what it was (it never ran the release); otherwise the release is undone
            never_started = r.check == "not_serving" and d is not None and \
                d.status is not Exec.IN_PROGRESS and d.status is not Exec.COMMITTED
            if r.ok and not never_started:
                self.rollouts.transition(rid, device, "fleet_rollback", why, order=_order(r))
            return
        d = self.rollouts.device(rid, device)
        if d is None:
            return
        event = self._result_event(rid, device, r)
        if event == "failed" and attempt < d.attempts:
            log.info("rollout.stale_failure rollout=%s device=%s %s", rid, device, why)
            return  # a newer attempt is under way; this one's failure is history
        new = self.rollouts.transition(rid, device, event, why, detail=said,
                                       order=_order(r),
                                       **({"failure": r.check or "failed"}
                                          if event == "failed" else {}))
        if new is Exec.FAILED:
            self._maybe_retry(rid, device, r.check or "failed")
        if new is Exec.COMMITTED and self.rollouts.get(rid).status is not Status.RUNNING:
            # committed after a halt or abort: it needs a rollback of its own
            self.rollouts.set_device(rid, device, rollback_id=None, rollback_result=None)

    def _result_event(self, rid: str, device: str, r: CommandResult) -> str:
        """The execution event a deploy's result stands for."""
        if r.ok and r.check == "already" and r.installed_by is not None and (
                (by := self.rollouts.command(r.installed_by)) is not None
                and by[0] == rid and by[1] == device):
            return "committed"  # an earlier attempt of this rollout installed it
        if r.ok:
            return "already" if r.check == "already" else "committed"
        if r.check in ("health", "cancelled"):
            return "rolled_back"
        if r.check in VERSION_CHECKS and self._serves_at_least(rid, device):
            return "already"
        return "failed"

    def _maybe_retry(self, rid: str, device: str, kind: str) -> None:
        ro, d = self.rollouts.get(rid), self.rollouts.device(rid, device)
        if d is None or ro.status is not Status.RUNNING or not ro.retry.allows(kind, d.attempts):
            return
        self.rollouts.transition(rid, device, "retry", f"{kind}: attempt {d.attempts + 1} "
                                 f"of {dict(ro.retry.retries).get(kind, 0) + 1}",
                                 retry_at=time.time() + ro.retry.delay_s(d.attempts))

    def _serves_at_least(self, rid: str, device: str) -> bool:
        """Its retained state says it serves the rollout's version or a later one."""
        ro = self.rollouts.get(rid)
        m = self.db.models_of(device).get(ro.model) or {}
        v = m.get("version")
        return v is not None and v >= ro.version

    def _reconcile(self, ro: Rollout, devices: list[RolloutDevice]) -> int:
        """What the devices' retained states say settles what reports left open: a device
        on the release (committed) or ahead of it is done; one that no longer serves a
        release recorded as committed was rolled back. A state counts against what a
        device report recorded only when it is newer in the device's order (never by
        when it arrived: a late retained state from before a commit changes nothing).
        Returns how many executions it moved."""
        moved = 0
        states = self.db.model_states(ro.model)
        for d in devices:
            s = states.get(d.device)
            if s is None or s.version is None:
                continue
            v, floor, order = s.version, s.committed, s.order
            newer = d.report_order is None or order > d.report_order
            committed = floor is not None and floor >= v
            event, cause = None, ""
            if v > ro.version and d.status not in DONE:
                event, cause = "already", f"its state: serves v{v}, ahead of v{ro.version}"
            elif v == ro.version and committed and d.status not in DONE:
                if d.attempts == 0:
                    event, cause = "already", f"its state: serves v{v} committed"
                elif newer:
                    event, cause = "serves_release", f"its state: serves v{v} committed"
            elif v < ro.version and d.status is Exec.COMMITTED and newer:
                event, cause = "serves_older", f"its state: serves v{v}"
            if event is not None:
                self.rollouts.transition(ro.id, d.device, event, cause, order=order)
                moved += 1
        return moved

    # -- sending ---------------------------------------------------------------------------
    def _record(self, rid: str, kind: str, devices: list[RolloutDevice], ttl_s: float,
                **fields: Any) -> None:
        """Signed commands recorded *to send* (with the execution's transition for a
        deploy); `_flush` publishes them."""
        for d in devices:
            cmd = build_command(kind, fleet=self.fleet, device=d.device,
                                ttl=timedelta(seconds=ttl_s), **fields)
            raw = sign_command(cmd, self.keys)
            expires = cmd.expires.timestamp()
            if kind == "deploy":
                self.rollouts.record_command(rid, d.device, kind, cmd.id, d.attempts + 1,
                                             expires, raw)
                self.rollouts.transition(rid, d.device, "send", f"deploy {cmd.id[:8]}, "
                                         f"attempt {d.attempts + 1}", command_id=cmd.id,
                                         attempts=d.attempts + 1, retry_at=None,
                                         sent_at=None)
            else:
                self.rollouts.record_command(rid, d.device, kind, cmd.id, 1, expires, raw)
                self.rollouts.set_device(rid, d.device, rollback_id=cmd.id,
                                         rollback_result=None)

    def _flush(self, rid: str, *, deploys: bool) -> int:
        """Publish what is recorded and not acknowledged (QoS 1, expiring with the command)
        while connected; returns how many were handed to the broker."""
        client = self._session(rid)
        if not client.is_connected():
            return 0
        n, now = 0, time.time()
        for cmd_id, device, kind, expires, payload in self.rollouts.unsent(rid):
            if cmd_id in self._publishing or (kind == "deploy" and not deploys):
                continue
            if expires <= now + 1:
                self.rollouts.drop_unsent(cmd_id)
                if kind == "deploy":
                    self.rollouts.transition(rid, device, "unsent_expired",
                                             f"command {cmd_id[:8]} expired unsent")
                continue
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]  # paho
            props.MessageExpiryInterval = int(expires - now)
            info = client.publish(device_topic(self.fleet, device, "cmd"), payload, qos=1,
                                  properties=props)
            if info.rc != paho.MQTT_ERR_SUCCESS:
                break  # disconnected meanwhile: the next step tries again
            self._publishing[cmd_id] = (rid, info, time.monotonic())
            n += 1
        deadline = time.monotonic() + 2.0  # most acks come at once: record them now
        for r, info, _ in list(self._publishing.values()):
            if r == rid and (left := deadline - time.monotonic()) > 0:
                with contextlib.suppress(RuntimeError, ValueError):  # disconnected: later
                    info.wait_for_publish(left)
        self._collect_acks(rid)
        return n

    # -- stepping --------------------------------------------------------------------------
    def step(self, rid: str) -> Status:
        """One pass over a rollout; returns its status."""
        self._session(rid)  # the lock first: a second controller stops here
        self._collect_acks(rid)
        ro = self.rollouts.get(rid)
        devices = self.rollouts.devices(rid)
        moved = self._reconcile(ro, devices)
        if ro.status in (Status.HALTED, Status.ABORTED):
            self._roll_back_touched(rid)  # resumes rollbacks a crash interrupted
            self._flush(rid, deploys=False)
            return ro.status
        if ro.status is not Status.RUNNING:
            return ro.status
        moved += self._join_newcomers(ro)
        now = time.time()
        if moved:  # the executions are read again only when this step changed them
            devices = self.rollouts.devices(rid)
        for d in devices:  # timeouts, then their retries
            if d.status in (Exec.SENT, Exec.IN_PROGRESS) and d.sent_at is not None \
                    and now - d.sent_at > ro.wave_timeout_s:
                self.rollouts.transition(rid, d.device, "timeout", f"no answer in "
                                         f"{ro.wave_timeout_s:g} s", failure="timeout")
                self._maybe_retry(rid, d.device, "timeout")
                moved += 1
        if moved:
            devices = self.rollouts.devices(rid)
        online = self.db.online()
        last = len(ro.sizes) - 1
        due = [d for d in devices
               if (d.wave <= ro.wave or (ro.continuous and ro.wave == last))
               and d.status is Exec.QUEUED and d.device in online
               and (d.retry_at is None or d.retry_at <= now)]
        pace = self._pace.setdefault(rid, Pace(ro.max_per_minute))
        due = due[:pace.room(time.monotonic())]
        if due:
            self._record(rid, "deploy", due, ro.command_ttl_s,
                         **deploy_fields(ro.archive, ro.urls))
            pace.spent(len(due), time.monotonic())
        if ro.wave_started is None:  # the wave's clock starts with its first pass
            self.rollouts.set(rid, wave_started=time.time())
        self._flush(rid, deploys=True)
        ro = self.rollouts.get(rid)
        # read again: the reports that arrived during this step moved executions
        status = self._judge(ro, self.rollouts.devices(rid), online)
        if status is Status.HALTED:
            self._roll_back_touched(rid)
            self._flush(rid, deploys=False)
        return status

    def _join_newcomers(self, ro: Rollout) -> int:
        """Queue the group's registered devices the rollout does not have yet; returns
        how many."""
        joined = 0
        for device, groups in self.rollouts.outsiders(ro.id):
            if ro.group in json.loads(groups):
                self.rollouts.add_member(ro.id, device)
                joined += 1
        return joined

    def _judge(self, ro: Rollout, devices: list[RolloutDevice], online: set[str]) -> Status:
        reached = [d for d in devices if d.wave <= ro.wave]
        statuses = {d.device: d.status for d in reached}
        away = frozenset(d.device for d in reached
                         if d.status is Exec.QUEUED and d.device not in online)
        assert ro.wave_started is not None  # step sets it before judging
        verdict = judge(statuses, criteria=ro.criteria, away=away,
                        health=self._health(ro, devices, ro.wave_started))
        now = time.time()
        if verdict.action == "wait":
            return Status.RUNNING
        if verdict.action == "halt":
            bad = sorted(d.device for d in reached
                         if d.status in (Exec.FAILED, Exec.ROLLED_BACK, Exec.TIMED_OUT))
            self.rollouts.set(ro.id, culprits_json=json.dumps(bad))
            return self.rollouts.move(ro.id, "halt", verdict.reason)
        # advance: every device answered; watch them for the wave's health window first
        if ro.settled_at is None:
            self.rollouts.set(ro.id, settled_at=now)
            ro = replace(ro, settled_at=now)
        assert ro.settled_at is not None
        if now - ro.settled_at < ro.health_window_s:
            return Status.RUNNING
        if ro.wave + 1 >= len(ro.sizes):
            if ro.continuous:
                return Status.RUNNING  # targets devices that come back or join, until aborted
            return self.rollouts.move(ro.id, "complete", verdict.reason)
        self.rollouts.set(ro.id, wave=ro.wave + 1, wave_started=None, settled_at=None,
                          reason=verdict.reason)
        return Status.RUNNING

    def _health(self, ro: Rollout, devices: list[RolloutDevice], since: float) -> Health:
        """Updated devices (sent this release, not failed) against the baseline (devices
        of the rollout not reached yet) since the wave started."""
        updated = [d.device for d in devices if d.status in MAY_SERVE]
        baseline = [d.device for d in devices if d.attempts == 0 and d.status is Exec.QUEUED]
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
        not been sent one: committed, in progress, sent, not yet acknowledged, timed out,
        or waiting for a retry; again to one whose rollback went unanswered for a
        timeout. Each rollback names the release's version: a device that does not serve
        it (its deploy never arrived or expired) answers that there is nothing to undo,
        and one still deploying it cancels."""
        ro = self.rollouts.get(rid)
        now = time.time()

        def unanswered(d: RolloutDevice) -> bool:
            """Its rollback was acknowledged by the broker a timeout ago and never
            answered (a broker killed before it saved the session loses such messages)."""
            if d.rollback_id is None or d.rollback_result:
                return False
            sent = self.rollouts.sent_at(d.rollback_id)
            return sent is not None and now - sent > ro.wave_timeout_s
        targets = [d for d in self.rollouts.devices(rid) if d.may_serve_release
                   and (d.rollback_id is None or unanswered(d))]
        if targets:
            self._record(rid, "rollback", targets, ro.command_ttl_s, model=ro.model,
                         version=ro.version,
                         reason=f"rollout {rid} {ro.status}: {ro.reason}"[:500])

    def abort(self, rid: str, reason: str = "aborted by the operator") -> None:
        """Abort a running or paused rollout and roll back every device it touched.

        Raises:
            FleetError: the rollout already ended.
        """
        self.rollouts.move(rid, "abort", reason)
        self._roll_back_touched(rid)

    def outstanding(self, rid: str) -> list[RolloutDevice]:
        """After a halt or abort: devices whose rollback has not been answered, or whose
        deploy may still land."""
        return [d for d in self.rollouts.devices(rid)
                if (d.rollback_id and not d.rollback_result) or d.status in OPEN]

    def run(self, rid: str, *, poll_s: float = 0.5, timeout_s: float = 3600,
            rollback_wait_s: float = 30.0) -> Status:
        """Step until the rollout ends or pauses; after a halt or abort, keep stepping up
        to `rollback_wait_s` until every rollback is answered, so the record shows them
        (a device that commits meanwhile is sent its rollback too). A broker outage or a
        publish that fails is waited out, never fatal."""
        end = time.monotonic() + timeout_s
        status = Status.RUNNING
        beat = -1e9
        while time.monotonic() < end:
            if time.monotonic() - beat >= HEARTBEAT_EVERY_S:  # freshness for every device
                client = self._session(rid)
                if client.is_connected():
                    beat = time.monotonic()
                    client.publish(fleet_topic(self.fleet, "heartbeat"),
                                   heartbeat(self.fleet, self.keys), qos=1, retain=True)
            started = time.monotonic()
            status = self.step(rid)
            if status is not Status.RUNNING:
                break
            time.sleep(pause_after(time.monotonic() - started, poll_s))
        if status in (Status.HALTED, Status.ABORTED):
            until = min(end, time.monotonic() + rollback_wait_s)
            while time.monotonic() < until and self.outstanding(rid):
                time.sleep(poll_s)
                self.step(rid)
        return status
