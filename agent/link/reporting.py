"""What a device says to the fleet: events, command results and anomalies, into the
outbox with the wire models (`agent.link.wire`). Shared by the daemon's fleet link and the
fleet simulator (`fleet.simulate`), so a simulated device speaks exactly like a real one."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

from agent.link.detectors import Anomaly
from agent.link.outbox import Outbox
from agent.link.wire import CommandResult, Event, Severity, device_topic, dump
from agent.trust.command import Addressee, Command
from agent.trust.manifest import Manifest

log = logging.getLogger("edge_agent.fleet")


class Reporter:
    def __init__(self, me: Addressee, outbox: Outbox) -> None:
        self.me, self.outbox = me, outbox

    def topic(self, kind: str) -> str:
        return device_topic(self.me.fleet, self.me.device, kind)

    def event(self, kind: str, severity: Severity, message: str, *,
              manifest: Manifest | None = None, command_id: str | None = None,
              evidence: dict[str, Any] | None = None) -> None:
        def build(seq: int) -> bytes:
            return dump(Event(seq=seq, device=self.me.device, at=datetime.now(UTC),
                              kind=kind, severity=severity, message=message,
                              model=manifest.name if manifest else None,
                              version=manifest.version if manifest else None,
                              command_id=command_id, evidence=evidence or {}))
        self.outbox.enqueue("event", self.topic("event"), build)
        log.info("event %s %s", kind, message)

    def result(self, cmd: Command | None, ok: bool, text: str, check: str | None = None
               ) -> None:
        payload = dump(CommandResult(device=self.me.device, command_id=cmd.id if cmd else None,
                                     kind=cmd.kind if cmd else None, ok=ok, result=text,
                                     check=check, at=datetime.now(UTC)))
        self.outbox.enqueue("result", self.topic("cmd/result"), lambda _seq: payload)

    def anomaly(self, a: Anomaly, *, command_id: str | None = None) -> None:
        self.event("anomaly", "warning", f"{a.detector}: {a.statistic} {a.value:.4g} above "
                   f"{a.threshold:g} over {a.window_s:g} s", command_id=command_id,
                   evidence={"detector": a.detector, "statistic": a.statistic,
                             "value": a.value, "threshold": a.threshold,
                             "window_s": a.window_s, "model": a.model, **a.evidence})

    def rejected(self, exc: Any) -> None:
        """A command that did not verify: an event and a result, nothing else."""
        self.event("command.rejected", "warning", str(exc),
                   evidence={"check": exc.check, **jsonable(exc.details)})
        self.result(None, False, str(exc), exc.check)


def jsonable(details: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(json.dumps(details, default=str))
    return out
