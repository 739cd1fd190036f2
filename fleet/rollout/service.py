"""`edge-fleet controller`: a controller that serves every rollout needing one.

Any number of them run, on any number of hosts, against one database (PostgreSQL; or
SQLite for one host). Each claims rollouts that have no live lease
(`Leases.claim`: `SELECT … FOR UPDATE SKIP LOCKED`), up to `max_rollouts` at once, and
steps each in turn while it holds its lease; a rollout whose controller died is claimed
by another within one lease period and carried on from its record. A controller whose
lease was taken (it was stopped or cut off past it) lets that rollout go, having written
nothing; no error in one rollout's step stops the others or the service.
"""

from __future__ import annotations

import logging
import threading
import time

from fleet.errors import LeaseHeld, LeaseLost
from fleet.rollout.controller import Controller
from fleet.rollout.policy import Status
from fleet.rollout.record import pause_after
from fleet.trust.publish import HEARTBEAT_EVERY_S

log = logging.getLogger("edge_fleet.rollout")


def serve(controller: Controller, *, stop: threading.Event, max_rollouts: int = 16,
          poll_s: float = 0.5, rollback_wait_s: float = 30.0) -> dict[str, str]:
    """Claim and drive rollouts until `stop` is set; returns how each rollout this
    controller let go ended for it (completed, halted, paused, ..., or "lost": its lease
    was taken by another controller)."""
    driving: dict[str, float | None] = {}  # rollout -> until when its rollbacks are waited
    let_go: dict[str, str] = {}
    beat = -1e9
    while not stop.is_set():
        started = time.monotonic()
        if len(driving) < max_rollouts:
            try:
                for rid in controller.rollouts.leases.claim(
                        controller.owner, controller.lease_s, limit=max_rollouts - len(driving),
                        ended_within_s=rollback_wait_s):
                    if rid in driving:  # its own lease ran out between two of its steps
                        log.warning("controller.lease_ran_out rollout=%s: claimed back; a "
                                    "pass over the rollouts took longer than the lease "
                                    "(%.1f s)", rid, controller.lease_s)
                    else:
                        log.info("controller.claimed rollout=%s owner=%s", rid,
                                 controller.owner)
                    driving.setdefault(rid, None)
            except Exception:  # the database away a moment: claim again next pass
                log.exception("controller.claim_failed")
        if time.monotonic() - beat >= HEARTBEAT_EVERY_S and controller.publish_heartbeat():
            beat = time.monotonic()
        for rid in list(driving):
            status = _step(controller, rid)
            if status is Status.RUNNING:
                continue
            if status in (Status.HALTED, Status.ABORTED):  # its rollbacks answered, or time
                until = driving[rid] or time.monotonic() + rollback_wait_s
                driving[rid] = until
                if time.monotonic() < until and controller.outstanding(rid):
                    continue
            del driving[rid]
            let_go[rid] = "lost" if status is None else status.value
            if status is not None:
                controller.sender.release(rid)
            log.info("controller.let_go rollout=%s status=%s", rid, let_go[rid])
        stop.wait(_pause(controller, time.monotonic() - started, poll_s,
                         len(driving) < max_rollouts, rollback_wait_s))
    return let_go


def _pause(controller: Controller, took_s: float, poll_s: float, room: bool,
           rollback_wait_s: float) -> float:
    """The pause before the next pass: its poll (or as long as this pass took), cut short
    to wake just after another controller's lease runs out when there is room to claim."""
    pause = pause_after(took_s, poll_s)
    if not room:
        return pause
    try:
        ends = controller.rollouts.leases.next_expiry_s(rollback_wait_s)
    except Exception:  # the database away a moment: the next pass's claim says so
        return pause
    return pause if ends is None else min(pause, ends + 0.005)


def _step(controller: Controller, rid: str) -> Status | None:
    """One step of a rollout; None once its lease is another controller's."""
    try:
        return controller.step(rid)
    except (LeaseLost, LeaseHeld) as exc:
        log.warning("controller.lease_lost rollout=%s: %s", rid, exc)
        return None
    except Exception:  # one rollout's error never stops the others
        log.exception("controller.step_failed rollout=%s", rid)
        return Status.RUNNING
