"""Fakes shipped with the package for tests of the pure cores and of whole components:
a clock that jumps, and sensors that report what the test sets."""

from __future__ import annotations

from dataclasses import dataclass

from agent.serving.admission import Reading


class FakeClock:
    """A monotonic clock that moves only when told to (`jump`)."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def jump(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a monotonic clock does not go back")
        self.now += seconds


@dataclass
class FakeSensors:
    temperature_c: float | None = 45.0
    available_bytes: int = 4 * 1024**3

    def read(self) -> Reading:
        return Reading(temperature_c=self.temperature_c, available_bytes=self.available_bytes)
