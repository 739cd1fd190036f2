"""The fleet's heartbeat: freshness, as TUF's timestamp role gives it.

The controller publishes, retained on `edge/v1/{fleet}/heartbeat`, an envelope signed by a
threshold of the root's `command` keys whose `signed` part is a `Heartbeat`: a counter that
only grows and an expiry a few minutes ahead. A device keeps the newest valid one; once its
expiry has passed, someone is withholding the fleet's messages (a freeze: a broker or
network that drops commands, a stale retained message) and the device says so (`stale`),
while it keeps serving. Pure: bytes, the trusted root and the last counter in; a
`Heartbeat` or a rejection out.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from agent.errors import CommandError
from agent.trust.root import Root
from agent.trust.signatures import Name, parse_envelope, validation_message, verify_threshold

MAX_HEARTBEAT_BYTES = 16 * 1024


class Heartbeat(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    schema_version: Literal[1] = Field(default=1, alias="schema")
    type: Literal["heartbeat"] = "heartbeat"
    fleet: Name
    counter: int = Field(ge=1)
    issued_at: AwareDatetime
    expires: AwareDatetime


def verify_heartbeat(root: Root, raw: bytes, *, fleet: str, last_counter: int,
                     now: datetime) -> Heartbeat:
    """A heartbeat newer than `last_counter`, signed by the root's command threshold.

    Raises:
        CommandError: check "format", "fleet", "replay" (counter not above the last one)
            or "expired"; SignatureError: not signed by the command threshold.
    """
    env, signed = parse_envelope(raw, what="heartbeat", max_bytes=MAX_HEARTBEAT_BYTES,
                                 error=CommandError)
    verify_threshold(signed, env.signatures, role=root.role("command"), keys=root.keys,
                     what="heartbeat")
    try:
        hb = Heartbeat.model_validate(env.signed)
    except ValidationError as exc:
        raise CommandError(validation_message("heartbeat", exc), check="format") from exc
    if hb.fleet != fleet:
        raise CommandError(f"heartbeat is for fleet {hb.fleet}, not {fleet}", check="fleet")
    if hb.counter <= last_counter:
        raise CommandError(f"heartbeat {hb.counter} is not newer than {last_counter}",
                           check="replay", counter=hb.counter, last=last_counter)
    if now >= hb.expires:
        raise CommandError(f"heartbeat {hb.counter} expired at {hb.expires.isoformat()}",
                           check="expired")
    return hb
