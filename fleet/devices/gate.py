"""The fleet's gate for what devices report: a message is believed only when the topic's
device, the payload's device and the signing key agree, and the key is the one registered
for that device (`edge-fleet devices add`).

Checked in order, cheapest first, each failure counted under its reason and otherwise
ignored (never stored, never judged):

    topic         not `edge/v1/{fleet}/{device}/{state|telemetry|event|cmd/result}` with a
                  valid device id
    unregistered  no key registered for the topic's device (the device is listed as
                  "unknown", and never counts toward a rollout)
    format        not a signed envelope, or too big (`agent.trust.identity.MAX_REPORT_BYTES`)
    unsigned, threshold   not signed by the registered key
    device        signed, but the payload names another device
    invalid       the payload does not validate against its wire model
    fleet         a state for another fleet
    unordered     no `order` (an agent older than the device order): its replays could
                  not be told from the truth (`fleet.devices.ordering`)

What passes is then put in its device's order by the database (`FleetDB.admit`): a
report older than one applied is `stale`.
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from dataclasses import dataclass
from typing import Literal, Protocol

from pydantic import BaseModel, ValidationError

from agent.errors import ReportError
from agent.link.wire import PREFIX, CommandResult, Event, StatePayload, Telemetry
from agent.trust.identity import open_report
from agent.trust.signatures import NAME_PATTERN, PublicKey

log = logging.getLogger("edge_fleet.ingest")
Kind = Literal["state", "telemetry", "event", "cmd/result"]
MODELS: dict[str, type[BaseModel]] = {"state": StatePayload, "telemetry": Telemetry,
                                      "event": Event, "cmd/result": CommandResult}
DEVICE_ID = re.compile(NAME_PATTERN)
#: A device not registered when asked is asked again after this long.
MISS_TTL_S = 5.0


class KeySource(Protocol):
    """Where registered device keys come from (the fleet database)."""

    def registered_key(self, device: str) -> PublicKey | None: ...

    def note_unknown(self, device: str) -> None: ...

    def bump(self, name: str) -> None: ...


@dataclass(frozen=True)
class Report:
    kind: Kind
    device: str
    payload: BaseModel


class ReportGate:
    def __init__(self, keys: KeySource, fleet: str) -> None:
        self.keys, self.fleet = keys, fleet
        self.prefix = f"{PREFIX}/{fleet}/"
        self.ignored: Counter[str] = Counter()
        # CPU seconds: verify (envelope, signature), parse (the wire model)
        self.cpu: dict[str, float] = {"verify": 0.0, "parse": 0.0}
        self._cache: dict[str, tuple[PublicKey | None, float]] = {}
        self._logged: dict[str, float] = {}

    def open(self, topic: str, payload: bytes) -> Report | None:
        """The verified report, or None (counted under its reason)."""
        parsed = self._topic(topic)
        if parsed is None:
            self._ignore("topic", topic)
            return None
        device, kind = parsed
        key = self._key(device)
        if key is None:
            self.keys.note_unknown(device)
            self._ignore("unregistered", topic)
            return None
        t0 = time.thread_time()
        try:
            signed = open_report(payload, device=device, key=key, what=f"{kind} of {device}")
        except ReportError as exc:
            self._ignore(exc.check, topic)
            return None
        finally:
            t1 = time.thread_time()
            self.cpu["verify"] += t1 - t0
        try:
            model = MODELS[kind].model_validate(signed)
        except ValidationError:
            self._ignore("invalid", topic)
            return None
        finally:
            self.cpu["parse"] += time.thread_time() - t1
        refused = ("fleet" if isinstance(model, StatePayload) and model.fleet != self.fleet
                   else "unordered" if getattr(model, "order", None) is None else None)
        if refused is not None:
            self._ignore(refused, topic)
            return None
        return Report(kind, device, model)

    def _topic(self, topic: str) -> tuple[str, Kind] | None:
        if not topic.startswith(self.prefix):
            return None
        device, _, kind = topic[len(self.prefix):].partition("/")
        if kind not in MODELS or not DEVICE_ID.match(device):
            return None
        return device, kind  # type: ignore[return-value]  # checked against MODELS

    def _key(self, device: str) -> PublicKey | None:
        hit = self._cache.get(device)
        now = time.monotonic()
        if hit is not None and (hit[0] is not None or now - hit[1] < MISS_TTL_S):
            return hit[0]
        if len(self._cache) > 100_000:  # bounded: topics are chosen by whoever publishes
            self._cache.clear()
        key = self.keys.registered_key(device)
        self._cache[device] = (key, now)
        return key

    def forget(self, device: str) -> None:
        """A key changed (`edge-fleet devices add` again): read it afresh."""
        self._cache.pop(device, None)

    def _ignore(self, reason: str, topic: str) -> None:
        """Count and (at most once a minute per reason) log a message that is ignored."""
        self.ignored[reason] += 1
        self.keys.bump(f"ignored_{reason}")
        now = time.monotonic()
        if now - self._logged.get(reason, -1e9) >= 60:  # one line per reason a minute
            self._logged[reason] = now
            log.warning("ingest.ignored reason=%s topic=%.200s (total %d)", reason, topic,
                        self.ignored[reason])
