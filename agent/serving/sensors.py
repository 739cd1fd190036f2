"""Sensor edges: temperature and available memory, read for the admission decision.

`SystemSensors` reads a thermal file (sysfs millidegrees, or plain degrees) or, without
one, psutil's sensors; memory from psutil. Tests and benches use `agent.testing`'s fakes
or point the thermal path at a file they write.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import psutil

from agent.serving.admission import Reading


class Sensors(Protocol):
    def read(self) -> Reading: ...


def parse_temperature(text: str) -> float | None:
    """sysfs gives millidegrees ("48312"); a plain file may give degrees ("48.3")."""
    try:
        value = float(text.strip())
    except ValueError:
        return None
    return value / 1000.0 if abs(value) >= 1000 else value


class SystemSensors:
    """Reads the thermal file (if any) and psutil each time `read` is called."""

    def __init__(self, thermal_path: Path | None) -> None:
        self.thermal_path = thermal_path

    def temperature_c(self) -> float | None:
        if self.thermal_path is not None:
            try:
                return parse_temperature(self.thermal_path.read_text())
            except OSError:
                return None
        temps: dict[str, list[Any]] = getattr(psutil, "sensors_temperatures", dict)()
        for entries in temps.values():
            if entries:
                return float(entries[0].current)
        return None

    def read(self) -> Reading:
        return Reading(temperature_c=self.temperature_c(),
                       available_bytes=int(psutil.virtual_memory().available))
