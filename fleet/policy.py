"""Rollout policy, pure: wave sizes and the verdict on a wave from what its devices said.

A rollout of a group goes in waves of cumulative fractions (default 1 %, 10 %, 50 %,
100 %; every wave has at least one device). After each wave's deploys, the controller
waits for results; the wave's verdict compares what happened with the criteria:

* any device that rolled back or failed its deploy counts against `max_failed_share`;
* devices that have not answered are `pending` until the wave deadline, then `offline`
  (retried in the next wave, not counted as failures);
* updated devices' anomaly rate against the rest of the group (the baseline) must not
  exceed it by more than `max_anomaly_excess` anomalies per device;
* when all online devices of the wave answered and nothing failed, the wave passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum


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
    max_anomaly_excess: float = 1.0


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
          updated_anomalies: float = 0.0, baseline_anomalies: float = 0.0) -> Verdict:
    """The verdict on one wave.

    Args:
        outcomes: device -> what it reported for this wave's deploy.
        deadline_passed: pending devices now count as offline.
        updated_anomalies, baseline_anomalies: anomalies per device during the wave.
    """
    n = len(outcomes)
    bad = [d for d, o in outcomes.items() if o in (Outcome.ROLLED_BACK, Outcome.FAILED)]
    if n and len(bad) / n > criteria.max_failed_share:
        return Verdict("halt", f"{len(bad)} of {n} device(s) failed or rolled back: "
                       f"{', '.join(sorted(bad))}")
    if updated_anomalies - baseline_anomalies > criteria.max_anomaly_excess:
        return Verdict("halt", f"updated devices show {updated_anomalies:.2f} anomalies per "
                       f"device against {baseline_anomalies:.2f} for the rest")
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
