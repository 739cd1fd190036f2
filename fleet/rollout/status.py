"""What operators read of a rollout: `edge-fleet rollout status`."""

from __future__ import annotations

from collections import Counter
from typing import Any

from fleet.rollout.policy import DONE, Exec
from fleet.rollout.record import Rollouts
from fleet.rollout.rows import RolloutDevice


def rollout_lines(rollouts: Rollouts, rid: str, *, every_device: bool = False) -> list[str]:
    """The rollout, the versions its group runs, then its devices: each one for small
    rollouts (or `every_device`), otherwise a count per wave and status, and only the
    devices that are not done."""
    ro = rollouts.get(rid)
    devices = rollouts.devices(rid)
    states = {r.device: r for r in rollouts.db.devices()}
    online = {d for d, r in states.items() if r.online}
    out = [f"rollout {rid}: {ro.model} v{ro.version} to group {ro.group}, "
           f"{ro.shown_status()}, wave {ro.wave + 1} of {len(ro.sizes)}"
           + (f" — {ro.reason}" if ro.reason else "")]
    if ro.culprits:
        out.append("  caused by: " + ", ".join(ro.culprits[:20])
                   + (", …" if len(ro.culprits) > 20 else ""))
    versions = Counter(_running(states.get(d.device), ro.model) for d in devices)
    out.append("  group runs: " + ", ".join(f"{n} on {v}" for v, n in
                                            sorted(versions.items())))

    def line(d: RolloutDevice) -> str:
        return (f"  wave {d.wave + 1}  {d.device:14} {d.shown(online):15} "
                f"{_running(states.get(d.device), ro.model):6}"
                + (f" {d.detail}" if d.detail and d.status not in DONE else "")
                + (f"; rollback {d.rollback_result or 'sent'}" if d.rollback_id
                   else ""))
    if every_device or len(devices) <= 20:
        return out + [line(d) for d in devices]
    for w in range(len(ro.sizes)):
        mine = [d for d in devices if d.wave == w]
        counts = Counter(d.shown(online) for d in mine)
        rolled = sum(1 for d in mine if d.rollback_id)
        out.append(f"  wave {w + 1}: {len(mine)} device(s): "
                   + ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
                   + (f"; {rolled} sent a rollback" if rolled else ""))
    return out + [line(d) for d in devices
                  if d.status not in DONE and (d.attempts or d.status is not Exec.QUEUED)]


def _running(state: Any, model: str) -> str:
    """The version a device's retained state says it serves: "v2", or "-"."""
    m = (state.models.get(model) if state is not None else None) or {}
    return f"v{m['version']}" if "version" in m else "-"
