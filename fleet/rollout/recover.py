"""`edge-fleet recover`: a signed rollback, restart or reload to a device or a group, with
every device's result collected and summarised. A result counts only when its device
signed it with its registered key (`fleet.devices.gate`).

The expected devices of a group are the members the fleet state knows (from their
retained `state`); a device that does not answer within the timeout is listed as such,
never counted as a success.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from agent.link.wire import PREFIX, CommandResult, device_topic, group_cmd_topic
from fleet._mqtt import BrokerAuth, close, connect
from fleet.devices.gate import KeySource, ReportGate
from fleet.trust.commands import build_command, sign_command
from fleet.trust.keys import SigningKey


@dataclass
class Summary:
    command_id: str
    expected: list[str]
    ok: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def silent(self) -> list[str]:
        return [d for d in self.expected if d not in self.ok and d not in self.failed]

    def lines(self) -> list[str]:
        out = [f"{d}: ok, {r}" for d, r in sorted(self.ok.items())]
        out += [f"{d}: FAILED, {r}" for d, r in sorted(self.failed.items())]
        out += [f"{d}: no answer" for d in self.silent]
        out.append(f"{len(self.ok)} ok, {len(self.failed)} failed, {len(self.silent)} silent "
                   f"of {len(self.expected)}")
        return out


def recover(broker_url: BrokerAuth | str, fleet: str, keys: Iterable[SigningKey],
            registry: KeySource, *, action: str,
            expected: list[str], device: str | None = None, group: str | None = None,
            model: str | None = None, reason: str = "", timeout_s: float = 30.0) -> Summary:
    fields: dict[str, Any] = {}
    if action == "rollback":
        fields = {"model": model, "reason": reason or "edge-fleet recover"}
    cmd = build_command(action, fleet=fleet, device=device, group=group,
                        ttl=timedelta(seconds=max(60.0, timeout_s * 2)), **fields)
    raw = sign_command(cmd, keys)
    summary = Summary(cmd.id, expected)
    done = threading.Event()
    gate = ReportGate(registry, fleet)

    def on_message(client: Any, userdata: Any, msg: Any) -> None:
        report = gate.open(msg.topic, bytes(msg.payload))  # only what a device signed
        if report is None or not isinstance(report.payload, CommandResult):
            return
        r = report.payload
        if r.command_id != cmd.id:
            return
        (summary.ok if r.ok else summary.failed)[r.device] = r.result
        if not summary.silent:
            done.set()

    client, subscribed = connect(broker_url, f"edge-fleet-recover-{cmd.id}",
                                 topics=[f"{PREFIX}/{fleet}/+/cmd/result"],
                                 on_message=on_message)
    try:
        subscribed.wait(10)
        topic = device_topic(fleet, device, "cmd") if device else group_cmd_topic(fleet, group
                                                                                   or "")
        client.publish(topic, raw, qos=1).wait_for_publish(10)
        done.wait(timeout_s) if expected else time.sleep(min(timeout_s, 2.0))
    finally:
        close(client)
    return summary



