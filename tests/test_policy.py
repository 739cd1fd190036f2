"""Rollout policy as a pure core (`fleet.policy`): the execution and rollout status
tables written out here (not read back from the module), the verdict on a wave, the halt
rules, wave sizes, retries and the pace. Milliseconds in all: fit for a mutation tool."""

from __future__ import annotations

import pytest

from fleet.rollout.policy import (
    DEFAULT_RETRY,
    Criteria,
    Exec,
    Health,
    Pace,
    RetryPolicy,
    Status,
    exponential_fractions,
    judge,
    next_exec,
    next_status,
    wave_sizes,
)

E = Exec
EVENTS = ("send", "acked", "unsent_expired", "progress", "committed", "serves_release",
          "already", "failed", "rolled_back", "timeout", "retry", "fleet_rollback",
          "serves_older")
# Every (status, event) of an execution, in the order of EVENTS; "-" is refused.
Q, TS, S, IP, C, AC, F, RB, TO = ("queued", "to_send", "sent", "in_progress", "committed",
                                  "already_current", "failed", "rolled_back", "timed_out")
EXEC_TABLE = {
    # send, acked, unsent_expired, progress, committed, serves_release, already, failed,
    # rolled_back, timeout, retry, fleet_rollback, serves_older
    Q: (TS, "-", "-", "-", C, C, AC, "-", "-", "-", "-", RB, "-"),
    TS: ("-", S, Q, IP, C, C, AC, F, RB, "-", "-", RB, "-"),
    S: ("-", "-", "-", IP, C, C, AC, F, RB, TO, "-", RB, "-"),
    IP: ("-", "-", "-", "-", C, C, AC, F, RB, TO, "-", RB, "-"),
    C: ("-", "-", "-", "-", "-", "-", "-", "-", RB, "-", "-", RB, RB),
    AC: ("-",) * 13,
    F: ("-", "-", "-", "-", C, C, AC, "-", "-", "-", Q, "-", "-"),
    RB: ("-", "-", "-", "-", C, C, "-", "-", "-", "-", "-", "-", "-"),
    TO: ("-", "-", "-", IP, C, C, AC, F, RB, "-", Q, RB, "-"),
}


@pytest.mark.parametrize("status", list(EXEC_TABLE))
def test_every_execution_step_is_the_one_written_here(status: str) -> None:
    assert {s.value for s in Exec} == set(EXEC_TABLE)
    for event, want in zip(EVENTS, EXEC_TABLE[status], strict=True):
        if want == "-":
            with pytest.raises(ValueError, match="cannot take"):
                next_exec(Exec(status), event)
        else:
            assert next_exec(Exec(status), event) is Exec(want), (status, event)


STATUS_TABLE = {  # (status, action) -> status; everything else refused
    ("running", "pause"): "paused", ("paused", "resume"): "running",
    ("running", "halt"): "halted", ("running", "abort"): "aborted",
    ("paused", "abort"): "aborted", ("running", "complete"): "completed",
}


def test_every_rollout_status_step_is_the_one_written_here() -> None:
    for status in Status:
        for action in ("pause", "resume", "halt", "abort", "complete"):
            want = STATUS_TABLE.get((status.value, action))
            if want is None:
                with pytest.raises(ValueError, match="cannot"):
                    next_status(status, action)
            else:
                assert next_status(status, action) is Status(want)


def test_a_final_rollout_says_so_when_refused() -> None:
    with pytest.raises(ValueError, match=r"a halted \(final\) rollout cannot resume"):
        next_status(Status.HALTED, "resume")


# -- the verdict on a wave --------------------------------------------------------------
STRICT = Criteria()  # no failure allowed, 90 % committed


def test_a_wave_waits_for_open_and_queued_online_devices() -> None:
    v = judge({"a": E.COMMITTED, "b": E.SENT, "c": E.QUEUED}, criteria=STRICT)
    assert (v.action, v.reason) == ("wait", "2 device(s) have not answered yet")


def test_devices_away_are_neither_waited_for_nor_counted() -> None:
    v = judge({"a": E.COMMITTED, "b": E.QUEUED}, criteria=STRICT, away=frozenset({"b"}))
    assert (v.action, v.reason) == ("advance", "1 committed or current, 1 timed out or away")
    v = judge({"a": E.QUEUED, "b": E.QUEUED}, criteria=STRICT, away=frozenset({"a", "b"}))
    assert (v.action, v.reason) == ("wait", "all 2 device(s) are away")


def test_one_final_failure_halts_at_once_with_no_failure_allowed() -> None:
    v = judge({"a": E.FAILED, "b": E.SENT}, criteria=STRICT)
    assert (v.action, v.reason) == ("halt", "1 of 2 device(s) failed or rolled back: a")
    v = judge({"a": E.ROLLED_BACK, "b": E.COMMITTED}, criteria=STRICT)
    assert v.action == "halt"


def test_the_failed_share_is_a_strict_upper_bound() -> None:
    lenient = Criteria(max_failed_share=0.25, min_committed_share=0.5)
    four = {"a": E.FAILED, "b": E.COMMITTED, "c": E.COMMITTED, "d": E.COMMITTED}
    assert judge(four, criteria=lenient).action == "advance"  # 1/4 == 0.25: allowed
    five = {**four, "e": E.FAILED}
    assert judge(five, criteria=lenient).action == "halt"  # 2/5 > 0.25


def test_a_timeout_is_not_a_failure_but_a_wave_of_timeouts_halts() -> None:
    v = judge({"a": E.TIMED_OUT, "b": E.COMMITTED}, criteria=STRICT)
    assert (v.action, v.reason) == ("advance", "1 committed or current, 1 timed out or away")
    v = judge({"a": E.TIMED_OUT, "b": E.TIMED_OUT}, criteria=STRICT)
    assert (v.action, v.reason) == ("halt", "none of 2 device(s) answered in time")


def test_too_few_committed_halts() -> None:
    crit = Criteria(max_failed_share=1.0, min_committed_share=0.75)
    ok = {"a": E.COMMITTED, "b": E.ALREADY_CURRENT, "c": E.COMMITTED, "d": E.FAILED}
    assert judge(ok, criteria=crit).action == "advance"  # 3/4 == 0.75
    bad = {"a": E.COMMITTED, "b": E.FAILED, "c": E.COMMITTED, "d": E.FAILED}
    v = judge(bad, criteria=crit)
    assert (v.action, v.reason) == ("halt", "only 2 of 4 committed")


def test_anomalies_above_the_baseline_halt_beyond_the_allowed_excess() -> None:
    done = {"a": E.COMMITTED}
    crit = Criteria(max_anomalous_excess=0.25)  # exact in binary: the edge is the edge
    at_edge = Health(updated_anomalous=0.75, baseline_anomalous=0.5)
    assert judge(done, criteria=crit, health=at_edge).action == "advance"
    worse = Health(updated_anomalous=0.40, baseline_anomalous=0.0)
    v = judge(done, criteria=STRICT, health=worse)
    assert (v.action, v.reason) == ("halt", "40% of updated devices reported anomalies "
                                            "against 0% of the rest of the group")
    # ... and it halts before the wave has answered
    assert judge({"a": E.SENT}, criteria=STRICT, health=worse).action == "halt"


def test_latency_above_the_ratio_halts_and_no_baseline_compares_nothing() -> None:
    done = {"a": E.COMMITTED}
    edge = Health(updated_latency_ms=15.0, baseline_latency_ms=10.0)  # exactly 1.5x
    assert judge(done, criteria=STRICT, health=edge).action == "advance"
    slow = Health(updated_latency_ms=15.1, baseline_latency_ms=10.0)
    v = judge(done, criteria=STRICT, health=slow)
    assert v.action == "halt" and "p95 latency 15.1 ms is above 1.5x" in v.reason
    alone = Health(updated_latency_ms=500.0, baseline_latency_ms=None)
    assert judge(done, criteria=STRICT, health=alone).action == "advance"


# -- waves, retries, pace ---------------------------------------------------------------
@pytest.mark.parametrize(("total", "fractions", "sizes"), [
    (1000, [0.01, 0.1, 0.5, 1.0], [10, 100, 500, 1000]),
    (3, [0.01, 0.1, 0.5, 1.0], [1, 2, 3]),  # every wave adds at least one device
    (1, [0.01, 0.1, 0.5, 1.0], [1]),
    (10, [0.5], [5, 10]),  # the rest is a last wave
    (101, [0.01, 1.0], [2, 101]),  # ceil
])
def test_wave_sizes(total: int, fractions: list[float], sizes: list[int]) -> None:
    assert wave_sizes(total, fractions) == sizes


def test_exponential_fractions() -> None:
    assert exponential_fractions(1, 10) == [0.01, 0.1, 1.0]
    assert exponential_fractions(10, 2) == [0.1, 0.2, 0.4, 0.8, 1.0]
    with pytest.raises(ValueError):
        exponential_fractions(0, 2)
    with pytest.raises(ValueError):
        exponential_fractions(5, 1)


@pytest.mark.parametrize(("kind", "attempts", "allowed"), [
    ("busy", 3, True), ("busy", 4, False), ("download", 2, True), ("download", 3, False),
    ("install", 1, True), ("install", 2, False), ("timeout", 1, True), ("timeout", 2, False),
    ("interrupted", 2, True), ("interrupted", 3, False),
    ("selftest", 1, False), ("signature", 1, False), ("manifest_pin", 1, False),
])
def test_default_retries_by_kind(kind: str, attempts: int, allowed: bool) -> None:
    assert DEFAULT_RETRY.allows(kind, attempts) is allowed


def test_retry_backoff_doubles() -> None:
    r = RetryPolicy(backoff_s=5.0)
    assert [r.delay_s(n) for n in (0, 1, 2, 3)] == [5.0, 5.0, 10.0, 20.0]


def test_pace_counts_a_sliding_minute() -> None:
    pace = Pace(3)
    assert pace.room(0.0) == 3
    pace.spent(2, 0.0)
    assert pace.room(30.0) == 1
    pace.spent(1, 30.0)
    assert pace.room(59.9) == 0
    assert pace.room(60.0) == 2  # the first two left the window
    assert pace.room(90.0) == 3
    assert Pace(0).room(0.0) >= 1 << 30  # no limit


def test_a_pace_of_one_per_minute_and_no_pace_at_all() -> None:
    one = Pace(1)
    assert one.room(0.0) == 1
    one.spent(1, 0.0)
    assert one.room(59.0) == 0 and one.room(60.0) == 1
    unlimited = Pace(0)
    unlimited.spent(100_000, 0.0)
    assert unlimited.room(1.0) >= 1 << 30
    assert not unlimited._sent  # keeps no history it would never trim


def test_exponential_waves_start_at_most_at_100_percent() -> None:
    assert exponential_fractions(100, 2) == [1.0]
    with pytest.raises(ValueError, match="0 < start <= 100"):
        exponential_fractions(100.5, 2)


def test_a_halt_names_at_most_ten_devices() -> None:
    ten = {f"d{i:02d}": E.FAILED for i in range(10)}
    v = judge(ten, criteria=STRICT)
    assert v.reason == ("10 of 10 device(s) failed or rolled back: "
                        + ", ".join(f"d{i:02d}" for i in range(10)))
    v = judge({**ten, "d10": E.FAILED}, criteria=STRICT)
    assert v.reason == ("11 of 11 device(s) failed or rolled back: "
                        + ", ".join(f"d{i:02d}" for i in range(10)) + ", …")
