"""Staged rollouts: signed deploys to a group in waves, judged by `fleet.rollout.policy`, halted
with signed rollbacks to every device touched when the criteria fail.

The ground truth is a per-device execution record, as AWS IoT Jobs and Mender keep one:

    rollouts           one row per rollout: status, wave, criteria, its controller's lock
    rollout_devices    one row per device: its execution's status, attempts, the command
                       in flight, the rollback sent and its answer
    rollout_history    every change of an execution's status, with its cause
    rollout_commands   every signed command, recorded *to send* before it is published
                       and marked *sent* only when the broker acknowledged it

Every status change goes through `fleet.rollout.policy.EXEC_TRANSITIONS` (`Rollouts.transition`),
caused by an authenticated device report (a signed result or event, its retained state)
or an explicit controller decision (send, broker ack, timeout, retry, fleet rollback).

The controller (`fleet.rollout.controller`) is the only writer besides the operator's
commands (create, pause, abort); it may be killed at any point and goes on from here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fleet.devices.registry import FleetDB
from fleet.errors import FleetError
from fleet.rollout.lease import Leases
from fleet.rollout.policy import (
    DEFAULT_RETRY,
    FINAL,
    Criteria,
    Exec,
    RetryPolicy,
    Status,
    next_exec,
    next_status,
    wave_sizes,
)
from fleet.rollout.rows import HistoryEntry, Rollout, RolloutDevice
from fleet.trust.commands import deploy_fields

log = logging.getLogger("edge_fleet.rollout")
_EXEC = {e.value: e for e in Exec}


class Rollouts:
    """The rollout tables of a fleet database."""

    def __init__(self, db: FleetDB) -> None:
        self.db = db
        self.store = db.store  # the schema is the store's (`fleet.store.schema`)
        self.leases = Leases(self.store)  # what this instance's controller holds
        self._checked: set[str] = set()  # rollouts whose open batch checked the lease

    def _tx(self) -> contextlib.AbstractContextManager[None]:
        """One write transaction of an operator's (not fenced: a rollout's creation, its
        status moved from the command line)."""
        return self.db.tx()

    @contextlib.contextmanager
    def _write(self, rid: str) -> Iterator[None]:
        """One write transaction on rollout `rid`; a controller's only while its lease
        is its own (`Leases.check`: else `LeaseLost`, and nothing is written). Inside a
        `batch` of the same rollout, part of it: checked once, committed together."""
        with self.db.tx():
            if rid not in self._checked:
                self.leases.check(rid)
            yield

    @contextlib.contextmanager
    def batch(self, rid: str) -> Iterator[None]:
        """Many writes on rollout `rid` in one transaction with one lease check (a step's
        deploys, acknowledgements, settled states): the check and the writes are one
        transaction, so no other controller can take the lease between them."""
        with self.db.tx():
            if rid in self._checked:
                yield
                return
            self.leases.check(rid)
            self._checked.add(rid)
            try:
                yield
            finally:
                self._checked.discard(rid)

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
            self.store.execute(
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
        self.store.execute("INSERT INTO rollout_devices (rollout, device, wave, status, "
                         "attempts, updated) VALUES (?,?,?,?,0,?)",
                         (rid, device, wave, Exec.QUEUED.value, now))
        self._history(rid, device, now, None, Exec.QUEUED, "queued", cause)

    def _history(self, rid: str, device: str, at: float, old: Exec | None, new: Exec,
                 event: str, cause: str) -> None:
        self.store.execute("INSERT INTO rollout_history (rollout, device, at, from_status, "
                           "to_status, event, cause) VALUES (?,?,?,?,?,?,?)",
                         (rid, device, at, old.value if old else None, new.value, event,
                          cause[:500]))

    def add_member(self, rid: str, device: str) -> None:
        """A device that joined the group (or was first seen) during the rollout: queued
        in the last wave (a newcomer is not a canary)."""
        ro = self.get(rid)
        with self._write(rid):
            self._add_device(rid, device, len(ro.sizes) - 1, "joined the group", time.time())

    def ids(self) -> list[str]:
        return [r[0] for r in self.store.execute("SELECT id FROM rollouts ORDER BY created")]

    def get(self, rid: str, *, for_update: bool = False) -> Rollout:
        """`for_update`: inside a transaction that changes it (PostgreSQL locks the row)."""
        with self.store.lock:
            cur = self.store.execute(
                f"SELECT *, lease_until > {self.store.now} AS leased FROM rollouts WHERE id "
                "= ?" + (self.store.for_update if for_update else ""), (rid,))
            row = cur.fetchone()
            if row is None:
                raise FleetError(f"no rollout {rid}")
            return Rollout.from_row(dict(zip([c[0] for c in cur.description], row,
                                             strict=True)))

    def devices(self, rid: str, device: str | None = None) -> list[RolloutDevice]:
        """The rollout's executions (one device's, with `device`), by wave and device."""
        where = "rollout = ?" + (" AND device = ?" if device is not None else "")
        with self.store.lock:
            rows = self.store.execute(
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
        with self.store.lock:
            return self.store.execute(
                "SELECT d.device, d.groups_json FROM devices d "
                "JOIN device_keys k ON k.device = d.device WHERE NOT EXISTS (SELECT 1 FROM "
                "rollout_devices r WHERE r.rollout = ? AND r.device = d.device) "
                "ORDER BY d.device", (rid,)).fetchall()

    def device(self, rid: str, device: str) -> RolloutDevice | None:
        found = self.devices(rid, device)
        return found[0] if found else None

    def history(self, rid: str, device: str) -> list[HistoryEntry]:
        with self.store.lock:
            rows = self.store.all("SELECT at, from_status, to_status, event, cause FROM "
                                  "rollout_history WHERE rollout = ? AND device = ? "
                                  f"ORDER BY {self.store.insertion_order}", (rid, device))
        return [HistoryEntry(*r) for r in rows]

    def set(self, rid: str, **fields: Any) -> None:
        """Progress fields of a rollout; its status changes only through `move`."""
        if "status" in fields:
            raise TypeError("a rollout's status changes through Rollouts.move")
        cols = ", ".join(f"{k} = ?" for k in fields)
        with self._write(rid):
            self.store.execute(f"UPDATE rollouts SET {cols} WHERE id = ?",
                             (*fields.values(), rid))

    def move(self, rid: str, action: str, reason: str | None = None) -> Status:
        """Change a rollout's status along `fleet.rollout.policy.STATUS_TRANSITIONS`.

        Raises:
            FleetError: the table has no such step (e.g. resuming a halted rollout).
        """
        with self._write(rid):  # read and write in one transaction: two cannot both move it
            ro = self.get(rid, for_update=True)
            try:
                status = next_status(ro.status, action)
            except ValueError as exc:
                raise FleetError(f"rollout {rid}: {exc}"
                                 + (f" ({ro.reason})" if ro.reason else "")) from exc
            self.store.execute("UPDATE rollouts SET status = ?, reason = ?, ended = ? "
                             "WHERE id = ?", (status.value, ro.reason if reason is None
                                              else reason,
                                              time.time() if status in FINAL else None, rid))
        return status

    # -- executions ------------------------------------------------------------------------
    def transition(self, rid: str, device: str, event: str, cause: str, *,
                   order: tuple[int, int] | None = None, **fields: Any) -> Exec | None:
        """Move one execution along `EXEC_TRANSITIONS` and write the change to its history,
        together with `fields`; None (and nothing written) when the table has no such
        step (logged: a report that arrives after a truer one). `order`: the (epoch, seq)
        of the device report that caused it (`fleet.devices.ordering`), kept on the execution so a
        retained state older than that report never overrides it."""
        if order is not None:
            fields = {**fields, "report_epoch": order[0], "report_seq": order[1]}
        with self._write(rid):
            row = self.store.one("SELECT status FROM rollout_devices WHERE rollout = ? AND "
                                 "device = ?" + self.store.for_update, (rid, device))
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
            self.store.execute(f"UPDATE rollout_devices SET {cols} WHERE rollout = ? AND "
                             "device = ?", (*values.values(), rid, device))
            self._history(rid, device, now, old, new, event, cause)
        return new

    def set_device(self, rid: str, device: str, **fields: Any) -> None:
        """Fields of an execution other than its status (which `transition` writes)."""
        if "status" in fields:
            raise TypeError("an execution's status changes through Rollouts.transition")
        cols = ", ".join(f"{k} = ?" for k in fields)
        with self._write(rid):
            self.store.execute(f"UPDATE rollout_devices SET {cols} WHERE rollout = ? AND "
                             "device = ?", (*fields.values(), rid, device))

    # -- commands --------------------------------------------------------------------------
    def record_command(self, rid: str, device: str, kind: str, cmd_id: str, attempt: int,
                       expires: float, payload: bytes) -> None:
        with self._write(rid):
            self.store.execute("INSERT INTO rollout_commands VALUES (?,?,?,?,?,?,?,?,?,?)",
                             (cmd_id, rid, device, kind, attempt, time.time(), expires,
                              "to_send", None, payload))

    def unsent(self, rid: str) -> list[tuple[str, str, str, float, bytes]]:
        """(id, device, kind, expires, payload) of the commands never acknowledged."""
        with self.store.lock:
            return self.store.execute("SELECT id, device, kind, expires, payload FROM "
                                    "rollout_commands WHERE rollout = ? AND state = "
                                    "'to_send' ORDER BY created", (rid,)).fetchall()

    def command(self, cmd_id: str) -> tuple[str, str, str, int] | None:
        """(rollout, device, kind, attempt) of a command this database sent."""
        with self.store.lock:
            row = self.store.execute("SELECT rollout, device, kind, attempt FROM "
                                   "rollout_commands WHERE id = ?", (cmd_id,)).fetchone()
        return None if row is None else (row[0], row[1], row[2], int(row[3]))

    def sent_at(self, cmd_id: str) -> float | None:
        """When the broker acknowledged a command (None: not yet, or unknown)."""
        with self.store.lock:
            row = self.store.execute("SELECT sent_at FROM rollout_commands WHERE id = ?",
                                   (cmd_id,)).fetchone()
        return None if row is None else row[0]

    def mark_sent(self, rid: str, cmd_id: str) -> None:
        with self._write(rid):
            self.store.execute("UPDATE rollout_commands SET state = 'sent', sent_at = ? "
                             "WHERE id = ? AND state = 'to_send'", (time.time(), cmd_id))

    def drop_unsent(self, rid: str, cmd_id: str) -> None:
        with self._write(rid):
            self.store.execute("UPDATE rollout_commands SET state = 'expired' WHERE id = ? "
                             "AND state = 'to_send'", (cmd_id,))


def pause_after(step_s: float, poll_s: float) -> float:
    """How long a controller waits before its next step: `poll_s`, or as long as the step
    took when that was longer, so stepping a large rollout (its cost grows with the
    fleet) takes at most half of a core from ingest and from everything else."""
    return max(poll_s, step_s)


def printable(text: str, limit: int) -> str:
    """`text` cut to `limit` with every control character (terminal escapes, newlines)
    replaced by "?": what a device says is shown in operators' terminals."""
    return "".join(c if c.isprintable() else "?" for c in text[:limit])
