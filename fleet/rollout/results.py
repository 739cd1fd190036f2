"""What devices answer about a rollout's commands, moved into its execution record: a
signed result matched to the command it answers (any attempt of it), a signed deploy
event as progress. Every change goes through `Rollouts.transition`, in the device's order
(`fleet.devices.ordering`).

These are a device's facts, not a controller's decisions: results reach whichever
controller of the group the broker hands them to (`fleet.devices.watcher`), whatever
rollout they answer, and are recorded without a lease (`Results.rollouts` holds none);
the device's order keeps a stale or replayed one out. What the controller decides from
them (timeouts, settling by retained states, waves, halts) is written under its lease."""

from __future__ import annotations

import logging
import time
from typing import Any

from agent.link.wire import CommandResult, Event
from fleet.devices.gate import Report, ReportGate
from fleet.devices.registry import FleetDB
from fleet.rollout.policy import DONE, Exec, Status
from fleet.rollout.record import Rollouts, printable
from fleet.rollout.rows import Rollout, RolloutDevice

log = logging.getLogger("edge_fleet.rollout")
#: Devices' failure checks that mean "the device is on this release or ahead of it",
#: settled against its retained state.
VERSION_CHECKS = ("equal_version", "rollback")


def report_order(payload: Any) -> tuple[int, int] | None:
    """The (epoch, seq) of a device report (`fleet.devices.ordering`)."""
    o = getattr(payload, "order", None)
    return None if o is None else (o.epoch, o.seq)


class Results:
    def __init__(self, db: FleetDB, rollouts: Rollouts, gate: ReportGate) -> None:
        self.db, self.rollouts, self.gate = db, rollouts, gate
        self.received = 0  # result messages this controller was handed (any rollout's)

    def message(self, msg: Any) -> None:
        """A command result from the controllers' shared subscription: believed only when
        its device signed it (`fleet.devices.gate`), applied only when it answers a
        command a rollout sent to that device and is new in its device's order (a
        duplicate or a replay is counted stale); an error while recording one is counted
        and logged, never fatal."""
        self.received += 1
        try:
            report = self.gate.open(msg.topic, bytes(msg.payload))
            p = None if report is None else report.payload
            if report is None or not isinstance(p, CommandResult) or not p.command_id:
                return
            sent = self.rollouts.command(p.command_id)
            if sent is None or sent[1] != p.device:
                return
            with self.db.tx():
                if self.db.admit(report):
                    self.record_result(p)
        except Exception:  # one bad message must never stop the results
            self.db.bump("ingest_errors")
            log.exception("rollout.result_crashed topic=%.200s", msg.topic)

    def event(self, report: Report) -> None:
        """A device's signed event about a deploy command of a rollout (from the watcher,
        which admitted it in its device's order)."""
        p = report.payload
        if isinstance(p, Event) and p.command_id and p.kind.startswith("deploy."):
            sent = self.rollouts.command(p.command_id)
            if sent is not None and sent[2] == "deploy" and sent[1] == p.device:
                self.rollouts.transition(sent[0], p.device, "progress", f"event {p.kind}",
                                         order=report_order(p))

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
                self.rollouts.transition(rid, device, "fleet_rollback", why,
                                         order=report_order(r))
            return
        d = self.rollouts.device(rid, device)
        if d is None:
            return
        event = self._result_event(rid, device, r)
        if event == "failed" and attempt < d.attempts:
            log.info("rollout.stale_failure rollout=%s device=%s %s", rid, device, why)
            return  # a newer attempt is under way; this one's failure is history
        new = self.rollouts.transition(rid, device, event, why, detail=said,
                                       order=report_order(r),
                                       **({"failure": r.check or "failed"}
                                          if event == "failed" else {}))
        if new is Exec.FAILED:
            self.maybe_retry(rid, device, r.check or "failed")
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

    def maybe_retry(self, rid: str, device: str, kind: str) -> None:
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

    def reconcile(self, ro: Rollout, devices: list[RolloutDevice], fenced: Rollouts) -> int:
        """What the devices' retained states say settles what reports left open: a device
        on the release (committed) or ahead of it is done; one that no longer serves a
        release recorded as committed was rolled back. A state counts against what a
        device report recorded only when it is newer in the device's order (never by
        when it arrived: a late retained state from before a commit changes nothing).
        Written through `fenced`, the controller's own record: under its lease. Returns
        how many executions it moved."""
        moved = 0
        states = self.db.model_states(ro.model)
        with fenced.batch(ro.id):  # one transaction, one lease check
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
                    fenced.transition(ro.id, d.device, event, cause, order=order)
                    moved += 1
        return moved
