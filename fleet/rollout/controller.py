"""The rollout controller: steps a rollout from its record (`fleet.rollout.record`),
judged by the pure policy (`fleet.rollout.policy`), with commands sent by
`fleet.rollout.sending` and answers applied by `fleet.rollout.results`.

Faults: the controller can be killed at any point and started again, and it goes on from
what the database says. A broker outage is waited out (paho reconnects; nothing is
published while disconnected; nothing uncaught).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import statistics
import time
import uuid
from collections.abc import Iterable
from dataclasses import replace

from agent.link.wire import CommandResult, fleet_topic
from fleet._mqtt import BrokerAuth
from fleet.devices.gate import ReportGate
from fleet.devices.registry import FleetDB
from fleet.devices.watcher import CONTROLLER_GROUP, FleetWatcher
from fleet.errors import LeaseHeld
from fleet.rollout.lease import LEASE_S, session_s
from fleet.rollout.policy import MAY_SERVE, OPEN, Exec, Health, Pace, Status, judge
from fleet.rollout.record import Rollouts, pause_after
from fleet.rollout.results import Results
from fleet.rollout.rows import Rollout, RolloutDevice
from fleet.rollout.sending import Sender
from fleet.trust.commands import deploy_fields
from fleet.trust.keys import SigningKey
from fleet.trust.publish import HEARTBEAT_EVERY_S, heartbeat

log = logging.getLogger("edge_fleet.rollout")


class Controller:
    """Carries out rollouts: sends deploys, listens for results, judges waves.

    Its `FleetWatcher` keeps device state, telemetry and events current in the database,
    on the controllers' shared subscription (two controllers on one database split that
    load); monitoring tools read on their own."""

    def __init__(self, db: FleetDB, broker_url: BrokerAuth | str, fleet: str,
                 keys: Iterable[SigningKey], *, connect_wait_s: float = 60.0,
                 lease_s: float = LEASE_S) -> None:
        self.db, self.broker = db, broker_url
        self.rollouts = Rollouts(db)
        self.fleet, self.keys = fleet, list(keys)
        #: This instance, unique across hosts and restarts: its MQTT client ids and the
        #: owner its leases name.
        self.instance = uuid.uuid4().hex[:12]
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{self.instance}"
        # device reports are recorded without a lease (`fleet.rollout.results`)
        self.results = Results(db, Rollouts(db), ReportGate(db, fleet))
        self.lease_s = lease_s
        self.sender = Sender(self.rollouts, broker_url, fleet, self.keys, owner=self.owner,
                             instance=self.instance, connect_wait_s=connect_wait_s,
                             lease_s=lease_s)
        # A session kept one lease past a disconnect (a broker restart loses no result),
        # and a keepalive of one lease: the broker notices a dead controller within 1.5
        # leases, so its share of the group is lost for at most 2.5 leases (then
        # retained states settle each execution; the bench saw 50 % of results and
        # events go to a dead host for 90 s with paho's 60-s keepalive).
        self.watcher = FleetWatcher(db, broker_url, fleet, share_group=CONTROLLER_GROUP,
                                    client_id=f"edge-fleet-ctl-{self.instance}",
                                    on_report=self.results.event,
                                    on_result=self.results.message,
                                    session_expiry_s=session_s(lease_s),
                                    keepalive_s=session_s(lease_s),
                                    connect_wait_s=connect_wait_s)
        self.watcher.synced()  # the devices' retained states first: who is online
        self._pace: dict[str, Pace] = {}  # per rollout: `max_per_minute`

    def close(self) -> None:
        self.watcher.stop()
        self.sender.close()

    def record_result(self, r: CommandResult) -> None:
        """Apply a device's signed result (`Results.record_result`)."""
        self.results.record_result(r)

    def step(self, rid: str) -> Status:
        """One pass over a rollout; returns its status."""
        self.sender.session(rid)  # the lease first: LeaseHeld, or LeaseLost when taken
        self.sender.collect_acks(rid)
        ro = self.rollouts.get(rid)
        devices = self.rollouts.devices(rid)
        moved = self.results.reconcile(ro, devices, self.rollouts)
        if ro.status in (Status.HALTED, Status.ABORTED):
            self._roll_back_touched(rid)  # resumes rollbacks a crash interrupted
            self.sender.flush(rid, deploys=False)
            return ro.status
        if ro.status is not Status.RUNNING:
            return ro.status
        moved += self._join_newcomers(ro)
        now = time.time()
        if moved:  # the executions are read again only when this step changed them
            devices = self.rollouts.devices(rid)
        timed_out = [d for d in devices if d.status in (Exec.SENT, Exec.IN_PROGRESS)
                     and d.sent_at is not None and now - d.sent_at > ro.wave_timeout_s]
        with self.rollouts.batch(rid):  # timeouts, then their retries
            for d in timed_out:
                self.rollouts.transition(rid, d.device, "timeout", f"no answer in "
                                         f"{ro.wave_timeout_s:g} s", failure="timeout")
                self.results.maybe_retry(rid, d.device, "timeout")
        moved += len(timed_out)
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
            self.sender.record(rid, "deploy", due, ro.command_ttl_s,
                         **deploy_fields(ro.archive, ro.urls))
            pace.spent(len(due), time.monotonic())
        if ro.wave_started is None:  # the wave's clock starts with its first pass
            self.rollouts.set(rid, wave_started=time.time())
        self.sender.flush(rid, deploys=True)
        ro = self.rollouts.get(rid)
        # read again: the reports that arrived during this step moved executions
        status = self._judge(ro, self.rollouts.devices(rid), online)
        if status is Status.HALTED:
            self._roll_back_touched(rid)
            self.sender.flush(rid, deploys=False)
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
                        health=wave_health(self.db, ro, devices, ro.wave_started))
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
            self.sender.record(rid, "rollback", targets, ro.command_ttl_s, model=ro.model,
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
        publish that fails is waited out, never fatal.

        A standby: while another controller's lease runs, it waits (up to `timeout_s`),
        then takes the lease and carries the rollout on from its record.

        Raises:
            LeaseHeld: another controller still held the lease at `timeout_s`.
            LeaseLost: another controller took the lease while this one was stopped or cut
                off; this one wrote nothing after that.
        """
        end = time.monotonic() + timeout_s
        self._take_lease(rid, end)
        status = Status.RUNNING
        beat = -1e9
        while time.monotonic() < end:
            if time.monotonic() - beat >= HEARTBEAT_EVERY_S and self.publish_heartbeat():
                beat = time.monotonic()
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

    def publish_heartbeat(self) -> bool:
        """The fleet's signed heartbeat, retained (freshness for every device); False
        while disconnected."""
        client = self.sender.client
        if not client.is_connected():
            return False
        client.publish(fleet_topic(self.fleet, "heartbeat"), heartbeat(self.fleet, self.keys),
                       qos=1, retain=True)
        return True

    def _take_lease(self, rid: str, end: float) -> None:
        """Wait until this controller holds the rollout's lease (a standby waits for the
        holder's lease to run out), or raise `LeaseHeld` at `end`."""
        while True:
            try:
                self.sender.session(rid)
                return
            except LeaseHeld as exc:
                if time.monotonic() >= end:
                    raise
                log.info("rollout.standby rollout=%s: %s", rid, exc)
                # until the holder's lease runs out (a renewal meanwhile: wait again)
                time.sleep(min(max(0.02, exc.remaining_s + 0.02),
                               max(0.0, end - time.monotonic())))


def wave_health(db: FleetDB, ro: Rollout, devices: list[RolloutDevice], since: float) -> Health:
    """Updated devices (sent this release, not failed) against the baseline (devices
    of the rollout not reached yet) since the wave started."""
    updated = [d.device for d in devices if d.status in MAY_SERVE]
    baseline = [d.device for d in devices if d.attempts == 0 and d.status is Exec.QUEUED]
    anomalies = db.anomalies_since(since)
    latency = db.latency_p95_since(ro.model, since)

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
