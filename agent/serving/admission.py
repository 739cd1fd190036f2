"""Admission: whether one request may enter the queue, as a pure function.

Inputs are plain values: the request (priority, deadline, arena it needs), the scheduler's
load (queue depth, resident model bytes, arena in flight), the budgets (from the firmware
profile and config), a sensor reading (temperature, system memory available) and the time.
Output: `Admit` with the limits to apply, or `Refusal` with the reason, the HTTP status and
the values involved. Nothing here reads a clock, a file or psutil; the scheduler gathers
those and the tests feed fakes.

Thermal state has hysteresis: it rises as soon as a threshold is reached and falls only
once the temperature is `hysteresis_c` below it, so a sensor hovering at a threshold does
not flap. Throttled: half the batch size and half the queue; critical: only high priority.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple


class Thermal(IntEnum):
    NORMAL = 0
    THROTTLED = 1
    CRITICAL = 2


class Priority(IntEnum):
    """Lower value is served first."""

    HIGH = 0
    NORMAL = 1
    LOW = 2


PRIORITY = {"high": Priority.HIGH, "normal": Priority.NORMAL, "low": Priority.LOW}


@dataclass(frozen=True, kw_only=True)
class ThermalLimits:
    throttle_c: float
    critical_c: float
    hysteresis_c: float


@dataclass(frozen=True, kw_only=True)
class Budget:
    memory_budget_bytes: int
    min_available_bytes: int
    queue_max: int
    max_batch: int


# Load, Request and Admit are made on every request: named tuples, as immutable as the
# frozen dataclasses they were and a third of their cost to make.
class Load(NamedTuple):
    queue_depth: int
    resident_bytes: int
    arena_in_flight_bytes: int


@dataclass(frozen=True, kw_only=True)
class Reading:
    temperature_c: float | None
    available_bytes: int


class Request(NamedTuple):
    priority: Priority
    deadline: float  # monotonic seconds
    arena_bytes: int  # all it holds: input, outputs and the model's arena


class Admit(NamedTuple):
    max_batch: int


@dataclass(frozen=True)
class Refusal:
    reason: str  # stable: queue_full, deadline, memory, thermal, too_large
    status: int  # HTTP: 429 for "try later, you are too many", 503 for "cannot now"
    detail: str


def thermal_state(previous: Thermal, temperature_c: float | None,
                  limits: ThermalLimits, *, unknown: Thermal = Thermal.NORMAL) -> Thermal:
    """The thermal state after a reading, with hysteresis on the way down; `unknown` (the
    configured policy) when there is no reading."""
    if temperature_c is None:
        return unknown
    t = temperature_c
    rising = (Thermal.CRITICAL if t >= limits.critical_c
              else Thermal.THROTTLED if t >= limits.throttle_c else Thermal.NORMAL)
    threshold = {Thermal.CRITICAL: limits.critical_c, Thermal.THROTTLED: limits.throttle_c}
    for level in (Thermal.CRITICAL, Thermal.THROTTLED):
        # Stay at a level reached before until the reading is hysteresis_c below it.
        if previous >= level > rising and t > threshold[level] - limits.hysteresis_c:
            return level
    return rising


def limits_for(thermal: Thermal, budget: Budget) -> tuple[int, int]:
    """(queue_max, max_batch) under a thermal state."""
    if thermal == Thermal.NORMAL:
        return budget.queue_max, budget.max_batch
    return max(1, budget.queue_max // 2), max(1, budget.max_batch // 2)


def admit(req: Request, *, load: Load, budget: Budget, reading: Reading, thermal: Thermal,
          now: float) -> Admit | Refusal:
    """Decide on one request. Checks run cheapest first; the first refusal wins."""
    if now >= req.deadline:
        return Refusal("deadline", 503, f"deadline passed {1000 * (now - req.deadline):.1f} "
                       "ms before admission")
    if thermal == Thermal.CRITICAL and req.priority != Priority.HIGH:
        where = ("at an unknown temperature (no sensor reading; thermal.on_unknown)"
                 if reading.temperature_c is None
                 else f"at {reading.temperature_c:.1f} °C, above its critical point")
        return Refusal("thermal", 503, f"device {where}; only high-priority requests are "
                       "served")
    queue_max, max_batch = limits_for(thermal, budget)
    if load.queue_depth >= queue_max:
        return Refusal("queue_full", 429, f"queue holds {load.queue_depth} of {queue_max}"
                       + (" (halved while throttled)" if thermal else ""))
    return memory_verdict(req, load, budget, reading) or Admit(max_batch)


def memory_verdict(req: Request, load: Load, budget: Budget,
                   reading: Reading) -> Refusal | None:
    """The memory part of `admit`: None when the request's bytes fit."""
    if load.resident_bytes + req.arena_bytes > budget.memory_budget_bytes:
        return Refusal("too_large", 413, f"the request needs {req.arena_bytes} bytes (input, "
                       f"outputs and arena); with {load.resident_bytes} bytes of resident "
                       f"models it can never fit the budget of {budget.memory_budget_bytes}; "
                       "send fewer samples at a time")
    needed = load.resident_bytes + load.arena_in_flight_bytes + req.arena_bytes
    if needed > budget.memory_budget_bytes:
        return Refusal("memory", 503, f"{needed} bytes needed, budget "
                       f"{budget.memory_budget_bytes}")
    if reading.available_bytes - req.arena_bytes < budget.min_available_bytes:
        return Refusal("memory", 503, f"system has {reading.available_bytes} bytes "
                       f"available, keeping {budget.min_available_bytes} free")
    return None
