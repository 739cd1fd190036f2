"""Rollout policy, pure: wave sizes and the verdict on a wave from what its devices said.

A rollout of a group goes in waves of cumulative fractions (default 1 %, 10 %, 50 %,
100 %; every wave has at least one device). After each wave's deploys, the controller
waits for results; the wave's verdict compares what happened with the criteria:

* any device that rolled back or failed its deploy counts against `max_failed_share`;
* devices that have not answered are `pending` until the wave deadline, then `offline`
  (retried in the next wave, not counted as failures);
* the share of updated devices that reported an anomaly during the wave must not exceed
  the rest of the group's (the baseline: devices the rollout has not reached) by more than
  `max_anomalous_excess`, and their median p95 latency must not exceed the baseline's by
  more than `max_latency_ratio` (no baseline left in the last wave: the anomalous share is
  compared with zero and latency is not compared);
* when all online devices of the wave answered and nothing failed, the wave may advance;
  the controller then watches the updated devices for the wave's health window first.

A rollout's own status moves only along `STATUS_TRANSITIONS` (one table; `fleet.rollout`
writes status through `next_status` only):

    running ──pause──▶ paused ──resume──▶ running
    running | paused ──abort──▶ aborted      running ──halt──▶ halted
    running ──complete──▶ completed          (halted, aborted, completed are final)

A halted rollout is never resumed: its touched devices have been sent rollbacks; a new
rollout (of a fixed release) is the way on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum


class Status(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    HALTED = "halted"
    ABORTED = "aborted"
    COMPLETED = "completed"


FINAL = frozenset({Status.HALTED, Status.ABORTED, Status.COMPLETED})
STATUS_TRANSITIONS: dict[tuple[Status, str], Status] = {
    (Status.RUNNING, "pause"): Status.PAUSED,
    (Status.PAUSED, "resume"): Status.RUNNING,
    (Status.RUNNING, "halt"): Status.HALTED,
    (Status.RUNNING, "abort"): Status.ABORTED,
    (Status.PAUSED, "abort"): Status.ABORTED,
    (Status.RUNNING, "complete"): Status.COMPLETED,
}


def next_status(status: Status, action: str) -> Status:
    """The status after `action`.

    Raises:
        ValueError: the table has no such step (e.g. resuming a halted rollout).
    """
    try:
        return STATUS_TRANSITIONS[(status, action)]
    except KeyError:
        final = " (final)" if status in FINAL else ""
        raise ValueError(f"a {status.value}{final} rollout cannot {action}") from None


class Outcome(StrEnum):
    PENDING = "pending"
    COMMITTED = "committed"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"
    OFFLINE = "offline"


@dataclass(frozen=True, kw_only=True)
class Criteria:
    max_failed_share: float = 0.0
    min_committed_share: float = 0.9
    max_anomalous_excess: float = 0.05
    max_latency_ratio: float = 1.5


@dataclass(frozen=True, kw_only=True)
class Health:
    """What the updated devices and the baseline did during the wave."""

    updated_anomalous: float = 0.0  # share of the devices with at least one anomaly
    baseline_anomalous: float = 0.0
    updated_latency_ms: float | None = None  # median of the devices' p95
    baseline_latency_ms: float | None = None


@dataclass(frozen=True)
class Verdict:
    action: str  # "wait", "advance", "halt"
    reason: str


def wave_sizes(total: int, fractions: list[float]) -> list[int]:
    """Cumulative device counts per wave (each wave adds at least one device)."""
    sizes: list[int] = []
    for f in fractions:
        n = min(total, max(math.ceil(total * f), (sizes[-1] + 1) if sizes else 1))
        if not sizes or n > sizes[-1]:
            sizes.append(n)
    if sizes and sizes[-1] < total:
        sizes.append(total)
    return sizes


def judge(outcomes: dict[str, Outcome], *, deadline_passed: bool, criteria: Criteria,
          health: Health = Health()) -> Verdict:
    """The verdict on one wave.

    Args:
        outcomes: device -> what it reported for this wave's deploy.
        deadline_passed: pending devices now count as offline.
        health: anomalies and latency of updated devices and of the baseline.
    """
    if (worse := _halt_now(outcomes, health, criteria)) is not None:
        return worse
    n = len(outcomes)
    pending = [d for d, o in outcomes.items() if o == Outcome.PENDING]
    if pending and not deadline_passed:
        return Verdict("wait", f"{len(pending)} device(s) have not answered yet")
    answered = [d for d, o in outcomes.items() if o not in (Outcome.PENDING, Outcome.OFFLINE)]
    committed = [d for d, o in outcomes.items() if o == Outcome.COMMITTED]
    if answered and len(committed) / len(answered) < criteria.min_committed_share:
        return Verdict("halt", f"only {len(committed)} of {len(answered)} committed")
    if not answered:
        return Verdict("halt", "no device of this wave answered before the deadline")
    return Verdict("advance", f"{len(committed)} committed, {n - len(answered)} offline")


def _halt_now(outcomes: dict[str, Outcome], h: Health, criteria: Criteria
              ) -> Verdict | None:
    """A halt, without waiting for the rest of the wave: too many devices failed, or the
    updated ones are worse than the baseline."""
    bad = [d for d, o in outcomes.items() if o in (Outcome.ROLLED_BACK, Outcome.FAILED)]
    if outcomes and len(bad) / len(outcomes) > criteria.max_failed_share:
        shown = ", ".join(sorted(bad)[:10]) + (", …" if len(bad) > 10 else "")
        return Verdict("halt", f"{len(bad)} of {len(outcomes)} device(s) failed or rolled "
                       f"back: {shown}")
    if h.updated_anomalous - h.baseline_anomalous > criteria.max_anomalous_excess:
        return Verdict("halt", f"{h.updated_anomalous:.0%} of updated devices reported "
                       f"anomalies against {h.baseline_anomalous:.0%} of the rest of the group")
    if (h.updated_latency_ms is not None and h.baseline_latency_ms
            and h.updated_latency_ms > criteria.max_latency_ratio * h.baseline_latency_ms):
        return Verdict("halt", f"updated devices' p95 latency {h.updated_latency_ms:.1f} ms "
                       f"is above {criteria.max_latency_ratio:g}x the rest of the group's "
                       f"{h.baseline_latency_ms:.1f} ms")
    return None
