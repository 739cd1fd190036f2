"""What every simulated device of a run shares, and where the simulator keeps its
scratch state (tmpfs), removed however a run ends."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fleet._proc import pid_alive
from fleet.errors import FleetError

log = logging.getLogger("edge_fleet.simulate")
DEFAULT_FAULTS = ("selftest", "latency", "drift")

_SHM = Path("/dev/shm")

#: Devices a worker process gets at least before another process (up to one per core) is
#: worth its own interpreter.
MIN_PER_PROCESS = 250

FAULTS = (*DEFAULT_FAULTS, "errors")


def fault_plan(names: list[str], percent: float, kinds: tuple[str, ...] = DEFAULT_FAULTS
               ) -> dict[str, str]:
    """Which devices are faulty and how: `percent` of them, spread evenly over the sorted
    names (the first is always faulty when percent > 0), `kinds` taken in turn."""
    if unknown := set(kinds) - set(FAULTS):
        raise FleetError(f"unknown fault kinds {sorted(unknown)}; known: {', '.join(FAULTS)}")
    if percent <= 0 or not kinds:
        return {}
    order = sorted(names)
    count = max(1, round(len(order) * percent / 100))
    step = len(order) / count
    return {order[int(i * step)]: kinds[i % len(kinds)] for i in range(count)}


def device_names(count: int, prefix: str = "sim") -> list[str]:
    """`sim-0000`, `sim-0001`, …: as many digits as the largest needs, at least four."""
    width = max(4, len(str(count - 1)))
    return [f"{prefix}-{i:0{width}d}" for i in range(count)]


@dataclass(frozen=True, kw_only=True)
class SimSettings:
    """What every simulated device shares (picklable: it goes to worker processes)."""

    broker: str
    root_file: Path
    fleet: str | None = None  # default: the root's fleet
    groups: tuple[str, ...] = ("sim",)
    profile: str = "raspberry-pi-4"
    initial: Path | None = None  # a release every device has installed and committed
    telemetry_interval_s: float = 2.0
    health_window_s: float = 2.0
    requests_per_s: float = 40.0
    # Each device's key file (`edge-agent device-key`): DEVICE.key and DEVICE.pub. Made
    # when missing; register the .pub files with `edge-fleet devices import DIR`.
    keys_dir: Path | None = None
    # A broker with mutual TLS: its CA, and each device's certificate `{certs_dir}/{name}.crt`
    # and key `.key` (CN = the device id, `edge-fleet pki issue`).
    ca_file: Path | None = None
    certs_dir: Path | None = None
    # Where the workers keep their devices' state; `SimulatedFleet` makes it and removes
    # it however its workers end.
    state_root: Path | None = None


def scratch_dir(kind: str) -> Path:
    """A new directory on tmpfs (where a thousand devices' fsyncs cost nothing) named for
    this process, so a later run can remove what a killed one left."""
    return Path(tempfile.mkdtemp(prefix=f"edge-sim-{kind}{os.getpid()}-",
                                 dir=_SHM if _SHM.is_dir() else None))


def remove_orphans() -> list[Path]:
    """Remove the simulator's directories on tmpfs whose process is gone (a run killed
    before it could clean up); returns them."""
    gone = []
    for d in (_SHM.glob("edge-sim-*") if _SHM.is_dir() else []):
        pid = d.name.removeprefix("edge-sim-").removeprefix("keys").partition("-")[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)
            gone.append(d)
    return gone
