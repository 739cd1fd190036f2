"""What operators read of the device registry: the `edge-fleet status` table, and how far
a root has reached (`edge-fleet root status`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fleet.devices.registry import DeviceRow, FleetDB


def shown_models(models: Mapping[str, Any]) -> str:
    """"digits v2" for a committed version, "digits v2*" for one in its health window
    (above the committed floor), "digits v1 (rolled back from v2)" below it."""
    out = []
    for n, m in models.items():
        v, floor = m["version"], m.get("committed")
        mark = ("*" if floor is None or v > floor
                else f" (rolled back from v{floor})" if v < floor else "")
        out.append(f"{n} v{v}{mark}")
    return ", ".join(out) or "-"


def status_lines(rows: list[DeviceRow], *, unknown: Sequence[tuple[str, int]] = (),
                 ignored: Mapping[str, int] | None = None) -> list[str]:
    """The `edge-fleet status` table: devices, then devices that published without a
    registered key (never counted), then what the ingest gate ignored."""
    head = (f"{'device':16} {'online':7} {'profile':18} {'models':22} {'root':17} "
            f"{'health':12} last anomaly")
    out = [head, "-" * len(head)]
    for r in rows:
        out.append(f"{r.device:16} {'yes' if r.online else 'no':7} {r.profile or '-':18} "
                   f"{shown_models(r.models):22} {r.root:17} {r.health:12} "
                   f"{r.last_anomaly or '-'}")
    for dev, n in unknown:
        out.append(f"{dev:16} {'?':7} {'-':18} {'-':22} {'-':17} {'unknown':12} "
                   "no registered key; "
                   f"{n} message(s) ignored")
    out.append(f"{len(rows)} device(s), {sum(r.online for r in rows)} online; "
               "* = in its health window, not committed yet"
               + (f"; {len(unknown)} unknown" if unknown else ""))
    if ignored:
        out.append("ignored messages: " + ", ".join(f"{n} {k}" for k, n in ignored.items()))
    return out


@dataclass(frozen=True)
class RootReach:
    """Where a root version has got to in the fleet, from each device's signed state."""

    version: int
    adopted: list[str]  # reports this version (or a later one)
    behind: dict[str, int | None]  # online, on an older root (None: reports none)
    offline: dict[str, int | None]  # away: adopts the retained announcement on return
    silent: list[str]  # registered, never reported a state

    @property
    def done(self) -> bool:
        """Every device that is online runs the version (the offline ones cannot yet)."""
        return not self.behind

    def lines(self) -> list[str]:
        def shown(v: int | None) -> str:
            return "-" if v is None else f"v{v}"

        out = [f"{'device':24} {'online':7} root"]
        out += [f"{d:24} {'yes':7} v{self.version}+" for d in self.adopted]
        out += [f"{d:24} {'yes':7} {shown(v)}  not yet" for d, v in self.behind.items()]
        out += [f"{d:24} {'no':7} {shown(v)}  offline: adopts the retained announcement "
                "when it reconnects" for d, v in self.offline.items()]
        out += [f"{d:24} {'?':7} -   registered, never reported" for d in self.silent]
        out.append(f"root v{self.version}: {len(self.adopted)} device(s) run it, "
                   f"{len(self.behind)} online not yet, {len(self.offline)} offline, "
                   f"{len(self.silent)} never reported")
        return out


def root_reach(db: FleetDB, version: int) -> RootReach:
    """How far `version` has reached, from the fleet database a `FleetWatcher` fills."""
    adopted, behind, offline = [], {}, {}
    rows = {r.device: r for r in db.devices()}
    for dev, row in rows.items():
        have = row.trust.get("root_version") if row.trust else None
        have = have if isinstance(have, int) else None
        if have is not None and have >= version:
            adopted.append(dev)
        elif row.online:
            behind[dev] = have
        else:
            offline[dev] = have
    silent = [d for d in db.registered() if d not in rows]
    return RootReach(version, adopted, behind, offline, silent)
