"""The rows of the rollout record, as the controller and operators read them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleet.rollout.policy import MAY_SERVE, Criteria, Exec, RetryPolicy, Status


@dataclass(frozen=True, kw_only=True)
class Rollout:
    """One row of `rollouts`."""

    id: str
    model: str
    version: int
    group: str
    archive: Path
    urls: list[str]
    sizes: list[int]  # cumulative devices per wave
    criteria: Criteria
    status: Status
    wave: int  # 0-based
    wave_started: float | None
    wave_timeout_s: float  # per execution: sent and no answer for this long = timed out
    reason: str
    created: float
    health_window_s: float
    settled_at: float | None
    retry: RetryPolicy
    command_ttl_s: float
    max_per_minute: int  # 0: no limit
    continuous: bool  # after the last wave, keep targeting devices that come or join
    culprits: list[str]  # the devices whose failure halted it
    owner: str | None  # the controller that took its lease last (`fleet.rollout.lease`)
    owner_beat: float | None  # when it renewed it, by the database's clock
    ended: float | None
    lease_until: float | None = None  # by the database's clock
    lease_token: int = 0
    leased: bool = False  # its lease was running when the row was read (database clock)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Rollout:
        retry = json.loads(row["retry_json"]) if row["retry_json"] else {}
        if "retries" in retry:
            retry["retries"] = tuple(tuple(r) for r in retry["retries"])
        return cls(id=row["id"], model=row["model"], version=row["version"],
                   group=row["group_name"], archive=Path(row["archive"]),
                   urls=json.loads(row["urls_json"]), sizes=json.loads(row["sizes_json"]),
                   criteria=Criteria(**json.loads(row["criteria_json"])),
                   status=Status(row["status"]), wave=row["wave"],
                   wave_started=row["wave_started"], wave_timeout_s=row["wave_timeout_s"],
                   reason=row["reason"], created=row["created"],
                   health_window_s=row["health_window_s"], settled_at=row["settled_at"],
                   retry=RetryPolicy(**retry), command_ttl_s=row["command_ttl_s"] or 3600.0,
                   max_per_minute=row["max_per_minute"], continuous=bool(row["continuous"]),
                   culprits=json.loads(row["culprits_json"] or "[]"), owner=row["owner"],
                   owner_beat=row["owner_beat"], ended=row["ended"],
                   lease_until=row.get("lease_until"), lease_token=row.get("lease_token") or 0,
                   leased=bool(row.get("leased")))

    def shown_status(self, now: float | None = None) -> str:
        """Its status, except that a running rollout whose controller's lease has run out
        (when the row was read, by the database's clock; or at `now`) shows as stalled."""
        leased = self.leased if now is None else (self.lease_until or 0) > now
        if self.status is Status.RUNNING and not leased:
            return "stalled"
        return self.status.value


@dataclass(frozen=True, kw_only=True)
class RolloutDevice:
    """One row of `rollout_devices`: a device's execution of a rollout."""

    rollout: str
    device: str
    wave: int
    status: Exec
    attempts: int  # deploy commands recorded for it
    command_id: str | None  # the newest deploy command, None before the first
    sent_at: float | None
    updated: float | None
    retry_at: float | None
    failure: str | None  # the check of the last failure (or "timeout")
    detail: str | None
    rollback_id: str | None  # the rollback sent, None before
    rollback_result: str | None
    report_order: tuple[int, int] | None = None  # of the device report that last moved it

    @property
    def may_serve_release(self) -> bool:
        """Sent the release and not known to have refused or undone it (a queued retry
        counts: an earlier attempt may still land)."""
        return self.status in MAY_SERVE or (self.status is Exec.QUEUED and self.attempts > 0)

    def shown(self, online: set[str]) -> str:
        """Its status as status and the dashboard show it: `offline` for a queued device
        that is away."""
        if self.status is Exec.QUEUED and self.device not in online:
            return "offline"
        return self.status.value


@dataclass(frozen=True)
class HistoryEntry:
    at: float
    from_status: str | None
    to_status: str
    event: str
    cause: str
