"""What a device says to the fleet: events, command results and anomalies, into the
outbox with the wire models (`agent.link.wire`). Shared by the daemon's fleet link and the
fleet simulator (`fleet.sim`), so a simulated device speaks exactly like a real one."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel

from agent.link.detectors import Anomaly
from agent.link.outbox import AnyOutbox, Order
from agent.link.wire import CommandResult, Event, ReportOrder, Severity, device_topic
from agent.trust.command import Addressee, Command
from agent.trust.identity import ReportSigner
from agent.trust.manifest import Manifest

log = logging.getLogger("edge_agent.fleet")
#: `command.rejected` events per check and minute; the rest are counted in telemetry.
REJECTED_PER_MINUTE = 5


class RateLimit:
    """At most `burst` per key in any `period_s`; `allow` also says how many were refused
    since the last one allowed."""

    def __init__(self, burst: int, period_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.burst, self.period_s, self._clock = burst, period_s, clock
        self._times: dict[str, deque[float]] = {}
        self._refused: Counter[str] = Counter()
        self._lock = threading.Lock()

    def allow(self, key: str) -> tuple[bool, int]:
        now = self._clock()
        with self._lock:
            times = self._times.setdefault(key, deque())
            while times and now - times[0] >= self.period_s:
                times.popleft()
            if len(times) >= self.burst:
                self._refused[key] += 1
                return False, 0
            times.append(now)
            return True, self._refused.pop(key, 0)


class Reporter:
    """Every message is signed by the device's report key (`agent.trust.identity`) as it
    is built, so the fleet can tell this device's reports from anyone else's."""

    def __init__(self, me: Addressee, outbox: AnyOutbox, signer: ReportSigner) -> None:
        self.me, self.outbox, self.signer = me, outbox, signer
        self.commands_dropped: Counter[str] = Counter()
        self._limit = RateLimit(REJECTED_PER_MINUTE, 60.0)

    def seal(self, payload: BaseModel) -> bytes:
        return self.signer.seal(payload)

    def topic(self, kind: str) -> str:
        return device_topic(self.me.fleet, self.me.device, kind)

    def event(self, kind: str, severity: Severity, message: str, *,
              manifest: Manifest | None = None, command_id: str | None = None,
              evidence: dict[str, Any] | None = None) -> None:
        def build(seq: int, order: Order) -> bytes:
            return self.seal(Event(seq=seq, order=wire_order(order), device=self.me.device,
                                   at=datetime.now(UTC),
                              kind=kind, severity=severity, message=message[:4000],
                              model=manifest.name if manifest else None,
                              version=manifest.version if manifest else None,
                              command_id=command_id, evidence=evidence or {}))
        self.outbox.enqueue("event", self.topic("event"), build)
        log.info("event %s %s", kind, message)

    def result(self, cmd: Command | None, ok: bool, text: str, check: str | None = None,
               *, installed_by: str | None = None) -> None:
        self.result_for(cmd.id if cmd else None, cmd.kind if cmd else None, ok, text, check,
                        installed_by=installed_by)

    def result_for(self, command_id: str | None, kind: str | None, ok: bool, text: str,
                   check: str | None = None, *, installed_by: str | None = None) -> None:
        """A result for a command known by its id (e.g. one answered after a restart)."""
        def build(_seq: int, order: Order) -> bytes:
            return self.seal(CommandResult(
                device=self.me.device, command_id=command_id, kind=kind, ok=ok,
                result=text[:4000], check=check, at=datetime.now(UTC),
                order=wire_order(order), installed_by=installed_by))
        self.outbox.enqueue("result", self.topic("cmd/result"), build)

    def anomaly(self, a: Anomaly, *, command_id: str | None = None) -> None:
        self.event("anomaly", "warning", f"{a.detector}: {a.statistic} {a.value:.4g} above "
                   f"{a.threshold:g} over {a.window_s:g} s", command_id=command_id,
                   evidence={"detector": a.detector, "statistic": a.statistic,
                             "value": a.value, "threshold": a.threshold,
                             "window_s": a.window_s, "model": a.model, **a.evidence})

    def rejected(self, exc: Any, *, signed: bool) -> None:
        """A command that did not verify, counted by check. A `command.rejected` event (at
        most `REJECTED_PER_MINUTE` per check a minute, the next one saying how many were
        left out) and, when it was signed by the fleet (e.g. expired, replayed,
        misaddressed), a result the operator waits for. Junk (unsigned, badly signed,
        malformed) gets no result: answering it would let anyone make the device publish."""
        self.commands_dropped[exc.check] += 1
        allowed, suppressed = self._limit.allow(exc.check)
        if allowed:
            self.event("command.rejected", "warning", str(exc)[:500], evidence={
                "check": exc.check, "suppressed": suppressed,
                **({} if suppressed else jsonable(exc.details))})
            if signed:
                self.result(None, False, str(exc), exc.check)

    def take_commands_dropped(self) -> dict[str, int]:
        """Commands refused since the last call, by check (then reset)."""
        out = dict(self.commands_dropped)
        self.commands_dropped.clear()
        return out


def wire_order(order: Order) -> ReportOrder:
    return ReportOrder(epoch=order.epoch, seq=order.seq)


def jsonable(details: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(json.dumps(details, default=str))
    return out
