"""The pure cores of the daemon: admission (with a fake clock and fake sensor values),
thermal hysteresis, and the update state machine's table."""

from __future__ import annotations

import pytest

from agent.serving.admission import (
    Admit,
    Budget,
    Load,
    Priority,
    Refusal,
    Request,
    Thermal,
    ThermalLimits,
    admit,
    thermal_state,
)
from agent.testing import FakeClock, FakeSensors
from agent.updates.lifecycle import TERMINAL, TRANSITIONS, State, advance

LIMITS = ThermalLimits(throttle_c=78.0, critical_c=84.0, hysteresis_c=5.0)
BUDGET = Budget(memory_budget_bytes=100_000, min_available_bytes=10_000, queue_max=8,
                max_batch=8)
IDLE = Load(queue_depth=0, resident_bytes=50_000, arena_in_flight_bytes=0)


def decide(clock: FakeClock, sensors: FakeSensors, *, priority: Priority = Priority.NORMAL,
           load: Load = IDLE, thermal: Thermal = Thermal.NORMAL, arena: int = 1000,
           deadline_in: float = 1.0) -> Admit | Refusal:
    req = Request(priority=priority, deadline=clock() + deadline_in, arena_bytes=arena)
    return admit(req, load=load, budget=BUDGET, reading=sensors.read(), thermal=thermal,
                 now=clock())


def test_an_idle_cool_device_admits_with_the_full_batch() -> None:
    assert decide(FakeClock(), FakeSensors()) == Admit(8)


def test_a_passed_deadline_is_refused() -> None:
    clock = FakeClock()
    req = Request(priority=Priority.NORMAL, deadline=clock() + 0.01, arena_bytes=0)
    clock.jump(0.02)
    r = admit(req, load=IDLE, budget=BUDGET, reading=FakeSensors().read(),
              thermal=Thermal.NORMAL, now=clock())
    assert isinstance(r, Refusal) and (r.reason, r.status) == ("deadline", 503)


def test_a_full_queue_is_429_and_throttling_halves_it() -> None:
    clock, sensors = FakeClock(), FakeSensors()
    full = Load(queue_depth=8, resident_bytes=0, arena_in_flight_bytes=0)
    r = decide(clock, sensors, load=full)
    assert isinstance(r, Refusal) and (r.reason, r.status) == ("queue_full", 429)
    half = Load(queue_depth=4, resident_bytes=0, arena_in_flight_bytes=0)
    assert decide(clock, sensors, load=half) == Admit(8)
    r = decide(clock, sensors, load=half, thermal=Thermal.THROTTLED)
    assert isinstance(r, Refusal) and "halved" in r.detail
    assert decide(clock, sensors, thermal=Thermal.THROTTLED) == Admit(4)


def test_critical_serves_only_high_priority() -> None:
    clock, sensors = FakeClock(), FakeSensors(temperature_c=90.0)
    r = decide(clock, sensors, thermal=Thermal.CRITICAL)
    assert isinstance(r, Refusal) and r.reason == "thermal" and "90.0" in r.detail
    assert decide(clock, sensors, thermal=Thermal.CRITICAL, priority=Priority.HIGH) == Admit(4)


def test_memory_budget_counts_resident_models_and_arenas_in_flight() -> None:
    clock, sensors = FakeClock(), FakeSensors()
    busy = Load(queue_depth=1, resident_bytes=90_000, arena_in_flight_bytes=9_000)
    assert decide(clock, sensors, load=busy, arena=1000) == Admit(8)
    r = decide(clock, sensors, load=busy, arena=1001)
    assert isinstance(r, Refusal) and (r.reason, r.status) == ("memory", 503)


def test_a_request_that_can_never_fit_is_413_not_503() -> None:
    busy = Load(queue_depth=0, resident_bytes=90_000, arena_in_flight_bytes=0)
    r = decide(FakeClock(), FakeSensors(), load=busy, arena=10_001)
    assert isinstance(r, Refusal) and (r.reason, r.status) == ("too_large", 413)


def test_low_system_memory_refuses_before_the_kernel_would_kill() -> None:
    r = decide(FakeClock(), FakeSensors(available_bytes=10_500), arena=1000)
    assert isinstance(r, Refusal) and r.reason == "memory" and "available" in r.detail


def test_thermal_rises_at_once_and_falls_only_past_the_hysteresis() -> None:
    readings = [70, 78, 80, 84, 82, 79.5, 78.9, 76, 73.5, 72.9, None, 85]
    states, s = [], Thermal.NORMAL
    for t in readings:
        s = thermal_state(s, t, LIMITS)
        states.append(s.name[0])
    #            70   78   80   84   82   79.5 78.9 76   73.5 72.9 None 85
    assert states == ["N", "T", "T", "C", "C", "C", "T", "T", "T", "N", "N", "C"]


def test_a_missing_sensor_reading_is_the_configured_policy_not_the_last_state() -> None:
    # A sensor that stops answering at 90 °C must not leave the device critical for ever.
    assert thermal_state(Thermal.CRITICAL, None, LIMITS) == Thermal.NORMAL
    assert thermal_state(Thermal.NORMAL, None, LIMITS,
                         unknown=Thermal.CRITICAL) == Thermal.CRITICAL


def test_critical_without_a_temperature_is_a_refusal_not_a_type_error() -> None:
    r = decide(FakeClock(), FakeSensors(temperature_c=None), thermal=Thermal.CRITICAL)
    assert isinstance(r, Refusal) and r.reason == "thermal" and "unknown" in r.detail


def test_the_levels_and_priorities_are_pinned() -> None:
    """Thermal levels are exported as numbers (the thermal gauge); priorities are served
    lowest value first, each strictly before the next."""
    assert [(t.name, int(t)) for t in Thermal] == [("NORMAL", 0), ("THROTTLED", 1),
                                                   ("CRITICAL", 2)]
    assert [(p.name, int(p)) for p in Priority] == [("HIGH", 0), ("NORMAL", 1), ("LOW", 2)]


@pytest.mark.parametrize(("previous", "t", "expected"), [
    # falling: the level holds while the reading is above threshold - hysteresis, exactly
    # at that point it falls
    (Thermal.CRITICAL, 79.0, Thermal.THROTTLED), (Thermal.CRITICAL, 79.25, Thermal.CRITICAL),
    (Thermal.THROTTLED, 73.0, Thermal.NORMAL), (Thermal.THROTTLED, 73.25, Thermal.THROTTLED),
    (Thermal.CRITICAL, 73.0, Thermal.NORMAL),
    # rising: at the threshold itself
    (Thermal.NORMAL, 78.0, Thermal.THROTTLED), (Thermal.NORMAL, 77.75, Thermal.NORMAL),
    (Thermal.NORMAL, 84.0, Thermal.CRITICAL), (Thermal.THROTTLED, 83.75, Thermal.THROTTLED),
])
def test_thermal_boundaries_are_exact(previous: Thermal, t: float, expected: Thermal) -> None:
    assert thermal_state(previous, t, LIMITS) == expected


def test_throttling_halves_queue_and_batch_but_never_below_one() -> None:
    from agent.serving.admission import limits_for

    odd = Budget(memory_budget_bytes=1, min_available_bytes=0, queue_max=9, max_batch=5)
    one = Budget(memory_budget_bytes=1, min_available_bytes=0, queue_max=1, max_batch=1)
    assert limits_for(Thermal.NORMAL, odd) == (9, 5)
    assert limits_for(Thermal.THROTTLED, odd) == (4, 2)
    assert limits_for(Thermal.CRITICAL, odd) == (4, 2)
    assert limits_for(Thermal.THROTTLED, one) == (1, 1)


def test_admission_boundaries_are_exact() -> None:
    """A deadline reached is passed; a request that fills the budget or leaves exactly the
    minimum free is admitted; every refusal's status and detail written out."""
    clock = FakeClock()
    req = Request(priority=Priority.NORMAL, deadline=clock() + 0.005, arena_bytes=0)
    clock.jump(0.005)
    r = admit(req, load=IDLE, budget=BUDGET, reading=FakeSensors().read(),
              thermal=Thermal.NORMAL, now=clock() + 2.0)
    assert r == Refusal("deadline", 503, "deadline passed 2000.0 ms before admission")
    r = admit(req, load=IDLE, budget=BUDGET, reading=FakeSensors().read(),
              thermal=Thermal.NORMAL, now=req.deadline)
    assert isinstance(r, Refusal) and r.reason == "deadline"
    full = Load(queue_depth=0, resident_bytes=99_000, arena_in_flight_bytes=0)
    assert decide(clock, FakeSensors(), load=full, arena=1000) == Admit(8)
    assert decide(clock, FakeSensors(available_bytes=11_000), arena=1000) == Admit(8)
    assert decide(clock, FakeSensors(available_bytes=10_999), arena=1000) == Refusal(
        "memory", 503, "system has 10999 bytes available, keeping 10000 free")
    assert decide(clock, FakeSensors(temperature_c=90.0), thermal=Thermal.CRITICAL) == Refusal(
        "thermal", 503, "device at 90.0 °C, above its critical point; only high-priority "
        "requests are served")


def test_the_update_state_machine_is_a_table_with_one_path_to_commit() -> None:
    s = None
    for event in ("verified", "staged", "loaded", "self_tested", "activated", "committed"):
        s = advance(s, event)
    assert s == State.COMMITTED
    assert advance(State.COMMITTED, "rolled_back") == State.ROLLED_BACK
    assert advance(State.LOADED, "failed") == State.FAILED
    assert advance(State.ACTIVE, "interrupted") == State.ROLLED_BACK
    for terminal in TERMINAL - {State.COMMITTED}:
        assert not [k for k in TRANSITIONS if k[0] == terminal]


@pytest.mark.parametrize(("state", "event"), [(None, "staged"), (State.VERIFIED, "activated"),
                                              (State.ACTIVE, "failed"),
                                              (State.FAILED, "committed")])
def test_transitions_not_in_the_table_are_refused(state: State | None, event: str) -> None:
    with pytest.raises(ValueError, match="no transition"):
        advance(state, event)

