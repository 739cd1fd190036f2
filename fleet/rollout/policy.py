"""Rollout policy, pure: wave sizes and the verdict on a wave from what its devices said.

A rollout of a group goes in waves of cumulative fractions (default 1 %, 10 %, 50 %,
100 %; every wave has at least one device). After each wave's deploys, the controller
waits for results; the wave's verdict compares what happened with the criteria:

* each device's execution moves along `EXEC_TRANSITIONS` (queued -> to_send -> sent ->
  in_progress -> committed / already_current / failed / rolled_back / timed_out); a
  failure counts against `max_failed_share` only once it is final (`RetryPolicy`), a
  device that rolled back in its health window counts at once; a timeout is not a
  failure, and a late success after it is a success;
* devices that are away (offline, not sent yet) are neither waited for nor counted;
  they are sent the release when they come back;
* the share of updated devices that reported an anomaly during the wave must not exceed
  the rest of the group's (the baseline: devices the rollout has not reached) by more than
  `max_anomalous_excess`, and their median p95 latency must not exceed the baseline's by
  more than `max_latency_ratio` (no baseline left in the last wave: the anomalous share is
  compared with zero and latency is not compared);
* when every device of the wave reached has answered, timed out or is away, the wave may
  advance;
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
from collections import deque
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


class Exec(StrEnum):
    """Where one device's execution of a rollout stands (its record in `rollout_devices`,
    with every change in `rollout_history`)."""

    QUEUED = "queued"  # its wave has not come, it is away, or a retry waits
    TO_SEND = "to_send"  # a command is recorded; the broker has not acknowledged it
    SENT = "sent"  # the broker acknowledged the command (QoS 1 PUBACK)
    IN_PROGRESS = "in_progress"  # the device reported progress on it
    COMMITTED = "committed"  # the device serves the release, committed
    ALREADY_CURRENT = "already_current"  # it served the release (or a later one) already
    FAILED = "failed"  # the device refused or failed it (final once no retry is left)
    ROLLED_BACK = "rolled_back"  # undone: by its health window, or by the fleet's rollback
    TIMED_OUT = "timed_out"  # no answer within the execution timeout (not a failure)


#: Statuses where the device may serve the release or still start serving it.
MAY_SERVE = frozenset({Exec.TO_SEND, Exec.SENT, Exec.IN_PROGRESS, Exec.COMMITTED,
                       Exec.TIMED_OUT})
DONE = frozenset({Exec.COMMITTED, Exec.ALREADY_CURRENT})
OPEN = frozenset({Exec.TO_SEND, Exec.SENT, Exec.IN_PROGRESS})
_ANSWERED = frozenset({Exec.QUEUED, Exec.TO_SEND, Exec.SENT, Exec.IN_PROGRESS,
                       Exec.TIMED_OUT, Exec.FAILED})
#: Every change of an execution's status: (status, event) -> status. Events come from an
#: authenticated device report ("progress", "committed", "already", "failed",
#: "rolled_back", a retained state seen: "serves_release", "serves_older") or from the
#: controller ("send", "acked", "timeout", "retry", "fleet_rollback", "unsent_expired").
#: Anything not in the table is refused and logged; late truths are in it on purpose: a
#: success after a timeout or after a retry was queued is a success.
EXEC_TRANSITIONS: dict[tuple[Exec, str], Exec] = {
    (Exec.QUEUED, "send"): Exec.TO_SEND,
    (Exec.TO_SEND, "acked"): Exec.SENT,
    (Exec.TO_SEND, "unsent_expired"): Exec.QUEUED,
    **{(s, "progress"): Exec.IN_PROGRESS for s in (Exec.TO_SEND, Exec.SENT, Exec.TIMED_OUT)},
    **{(s, "committed"): Exec.COMMITTED for s in _ANSWERED | {Exec.ROLLED_BACK}},
    **{(s, "serves_release"): Exec.COMMITTED for s in _ANSWERED | {Exec.ROLLED_BACK}},
    **{(s, "already"): Exec.ALREADY_CURRENT for s in _ANSWERED},
    **{(s, "failed"): Exec.FAILED for s in (Exec.TO_SEND, Exec.SENT, Exec.IN_PROGRESS,
                                             Exec.TIMED_OUT)},
    **{(s, "rolled_back"): Exec.ROLLED_BACK for s in (Exec.TO_SEND, Exec.SENT,
                                                       Exec.IN_PROGRESS, Exec.TIMED_OUT,
                                                       Exec.COMMITTED)},
    **{(s, "timeout"): Exec.TIMED_OUT for s in (Exec.SENT, Exec.IN_PROGRESS)},
    **{(s, "retry"): Exec.QUEUED for s in (Exec.FAILED, Exec.TIMED_OUT)},
    **{(s, "fleet_rollback"): Exec.ROLLED_BACK for s in MAY_SERVE | {Exec.QUEUED}},
    (Exec.COMMITTED, "serves_older"): Exec.ROLLED_BACK,
}


def next_exec(status: Exec, event: str) -> Exec:
    """The execution status after `event`.

    Raises:
        ValueError: the table has no such step (e.g. a failure reported after a commit).
    """
    try:
        return EXEC_TRANSITIONS[(status, event)]
    except KeyError:
        raise ValueError(f"a {status.value} execution cannot take {event!r}") from None


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How often a failed or timed-out execution is tried again, per kind of failure (the
    device's `check`; "timeout" for no answer). Kinds not listed are final at once: a bad
    signature, a manifest pin or a self-test does not get better by asking again."""

    retries: tuple[tuple[str, int], ...] = (("busy", 3), ("download", 2), ("install", 1),
                                           ("timeout", 1), ("interrupted", 2))
    backoff_s: float = 5.0  # before the first retry; doubles for each one after

    def allows(self, kind: str, attempts: int) -> bool:
        """True when an execution that failed with `kind` after `attempts` sends may be
        sent again."""
        return attempts <= dict(self.retries).get(kind, 0)

    def delay_s(self, attempts: int) -> float:
        return float(self.backoff_s * 2 ** max(0, attempts - 1))


DEFAULT_RETRY = RetryPolicy()


class Pace:
    """At most `per_minute` sends in any sliding minute (0: no limit), as IoT Jobs'
    maximum rate."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._sent: deque[float] = deque()

    def room(self, now: float) -> int:
        """How many may be sent at `now` (monotonic seconds)."""
        if self.per_minute <= 0:
            return 1 << 30
        while self._sent and now - self._sent[0] >= 60:
            self._sent.popleft()
        return max(0, self.per_minute - len(self._sent))

    def spent(self, n: int, now: float) -> None:
        if self.per_minute > 0:
            self._sent.extend([now] * n)


def exponential_fractions(start_percent: float, factor: float) -> list[float]:
    """Cumulative wave fractions growing by `factor` from `start_percent` up to 100 %
    (IoT Jobs' exponential rollout rate, as waves)."""
    if not (0 < start_percent <= 100 and factor > 1):
        raise ValueError("exponential waves need 0 < start <= 100 and factor > 1")
    out, f = [], start_percent
    while f < 100:
        out.append(f / 100)
        f *= factor
    return [*out, 1.0]


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


def judge(statuses: dict[str, Exec], *, criteria: Criteria, away: frozenset[str] = frozenset(),
          health: Health = Health()) -> Verdict:
    """The verdict on the devices of the waves reached so far.

    Args:
        statuses: device -> its execution's status. A `failed` one is final (the
            controller turns a failure it will retry back into `queued` at once).
        away: queued devices that are offline: not waited for, not counted (they are
            sent the release when they come back).
        health: anomalies and latency of updated devices and of the baseline.
    """
    if (worse := _halt_now(statuses, health, criteria)) is not None:
        return worse
    waiting = [d for d, s in statuses.items()
               if s in OPEN or (s is Exec.QUEUED and d not in away)]
    if waiting:
        return Verdict("wait", f"{len(waiting)} device(s) have not answered yet")
    answered = [d for d, s in statuses.items() if s in DONE or s in _BAD]
    done = [d for d, s in statuses.items() if s in DONE]
    timed_out = sum(s is Exec.TIMED_OUT for s in statuses.values())
    left = len(statuses) - len(answered)
    if answered and len(done) / len(answered) < criteria.min_committed_share:
        return Verdict("halt", f"only {len(done)} of {len(answered)} committed")
    if not answered:
        if timed_out:
            return Verdict("halt", f"none of {len(statuses)} device(s) answered in time")
        return Verdict("wait", f"all {len(statuses)} device(s) are away")
    return Verdict("advance", f"{len(done)} committed or current"
                   + (f", {left} timed out or away" if left else ""))


_BAD = frozenset({Exec.ROLLED_BACK, Exec.FAILED})


def _halt_now(statuses: dict[str, Exec], h: Health, criteria: Criteria) -> Verdict | None:
    """A halt, without waiting for the rest of the wave: too many devices failed for good
    or rolled back, or the updated ones are worse than the baseline."""
    bad = [d for d, s in statuses.items() if s in _BAD]
    if statuses and len(bad) / len(statuses) > criteria.max_failed_share:
        shown = ", ".join(sorted(bad)[:10]) + (", …" if len(bad) > 10 else "")
        return Verdict("halt", f"{len(bad)} of {len(statuses)} device(s) failed or rolled "
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
