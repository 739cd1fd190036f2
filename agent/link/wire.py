"""The MQTT topic tree (v1) and the payload of every topic, as versioned pydantic models.

    edge/v1/{fleet}/{device}/state        retained; birth and Last Will   StatePayload
    edge/v1/{fleet}/{device}/telemetry    every interval                   Telemetry
    edge/v1/{fleet}/{device}/event        anomalies, update progress       Event
    edge/v1/{fleet}/{device}/cmd          signed commands to the device    agent.trust.command
    edge/v1/{fleet}/group/{group}/cmd     signed commands to a group       agent.trust.command
    edge/v1/{fleet}/{device}/cmd/result   command outcome                  CommandResult
    edge/v1/{fleet}/root                  retained; the newest root         RootAnnouncement
    edge/v1/{fleet}/heartbeat             retained; signed freshness        agent.trust.heartbeat
    edge/v1/{fleet}/infer-replies/{client}/...   remote inference replies

Everything a device publishes is an envelope signed by its report key
(`agent.trust.identity`): `{"signed": <payload>, "signatures": [...]}`.

Every payload carries `schema` (the payload version); `json_schemas()` exports the JSON
Schema of each topic for dashboard authors (`edge-agent schema`, docs/telemetry.md).
Units are in field names (`_bytes`, `_ms`, `_c`, `_s`); times are UTC ISO 8601.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from agent.trust.command import COMMAND_ADAPTER
from agent.trust.heartbeat import Heartbeat
from agent.trust.signatures import Name

PREFIX = "edge/v1"
Severity = Literal["info", "warning", "error", "critical"]


def device_topic(fleet: str, device: str, kind: str) -> str:
    """`kind`: state, telemetry, event, cmd or cmd/result."""
    return f"{PREFIX}/{fleet}/{device}/{kind}"


def group_cmd_topic(fleet: str, group: str) -> str:
    return f"{PREFIX}/{fleet}/group/{group}/cmd"


def fleet_topic(fleet: str, kind: str) -> str:
    """`kind`: root or heartbeat (fleet-wide, retained, from the operator)."""
    return f"{PREFIX}/{fleet}/{kind}"


def infer_reply_prefix(fleet: str) -> str:
    """Remote inference replies go under this prefix only (`agent.link.remote`)."""
    return f"{PREFIX}/{fleet}/infer-replies/"


class _Wire(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class ModelState(_Wire):
    version: int
    runtime: Literal["onnx", "tflite"]
    committed: int | None = None


class TrustState(_Wire):
    """What the device trusts and how fresh it is."""

    root_version: int
    root_expires: AwareDatetime
    heartbeat_counter: int | None = None
    heartbeat_expires: AwareDatetime | None = None
    stale: bool = Field(default=False, description="the newest valid heartbeat expired: "
                                                    "the fleet's messages are withheld")


class RootAnnouncement(_Wire):
    """Retained on `edge/v1/{fleet}/root` by `edge-fleet root publish`: the newest root
    (its own signatures make it trustworthy, not this message) and where the roots before
    it can be fetched (`{url}{N}.root.json`) by a device that missed some."""

    schema_version: Literal[1] = Field(default=1, alias="schema")
    version: int = Field(ge=1)
    root: dict[str, Any]
    chain: list[Annotated[str, Field(pattern=r"^https?://\S+/$", max_length=1024)]] = Field(
        default_factory=list, max_length=8)


class ReportOrder(_Wire):
    """Where a report stands among everything its device signed (`agent.link.outbox`):
    compared as (epoch, seq). The fleet applies a report only when it is newer in this
    order than what it applied last from that device, so a late, duplicated or replayed
    message changes nothing (`fleet.devices.ordering`)."""

    epoch: int = Field(ge=1, description="when this device's report sequence began "
                                         "(microseconds since the Unix epoch); a device "
                                         "whose state was wiped starts a later one")
    seq: int = Field(ge=1, description="device-wide, +1 for every report the device "
                                       "signs (state, telemetry, event, result), "
                                       "persisted across restarts and power cuts")


def order_field() -> Any:
    return Field(default=None, description="the report's place in its device's order; "
                                           "required by the fleet (a report without one "
                                           "is refused as unordered)")


class StatePayload(_Wire):
    """Retained on `state`: the birth message when connected, the Last Will when not."""

    schema_version: Literal[1] = Field(default=1, alias="schema")
    device: Name
    fleet: Name
    online: bool
    agent_version: str = Field(max_length=64)
    profile: str = Field(max_length=128)
    groups: list[Name] = Field(default_factory=list, max_length=64)
    models: dict[Name, ModelState] = Field(default_factory=dict, max_length=256)
    trust: TrustState | None = None
    at: AwareDatetime
    started_at: AwareDatetime | None = Field(
        default=None, description="when the agent process started")
    seen_at: AwareDatetime | None = Field(
        default=None, description="Last Will only: the device was last known alive at "
                                  "least until then (the connection this Will belongs to "
                                  "was made then; a Will is fixed when it is registered). "
                                  "When the broker noticed it gone is when the Will "
                                  "arrives: at once when its connection closed, 1.5 "
                                  "keepalives after it went silent otherwise.")
    order: ReportOrder | None = order_field()
    connection: int | None = Field(
        default=None, ge=1, description="the order seq of the Last Will registered for the "
                                        "connection this state went out on (the Will's own "
                                        "seq in the Will): a Will closes its connection, so "
                                        "it supersedes every state of that connection")


class ModelTelemetry(_Wire):
    requests: int = Field(ge=0, description="requests answered in the interval")
    errors: int = Field(ge=0)
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    latency_p99_ms: float | None = None
    throughput_per_s: float = Field(ge=0)


class Memory(_Wire):
    process_rss_bytes: int
    system_available_bytes: int
    system_total_bytes: int


class Telemetry(_Wire):
    schema_version: Literal[1] = Field(default=1, alias="schema")
    seq: int = Field(ge=1, description="per device, +1 per message; gaps are losses")
    device: Name
    at: AwareDatetime
    interval_s: float
    uptime_s: float
    cpu_percent: float = Field(description="of one core, process")
    memory: Memory
    temperature_c: float | None
    throttle: Literal["normal", "throttled", "critical"]
    queue_depth: int
    refusals: dict[str, int] = Field(default_factory=dict,
                                     description="requests refused in the interval, by reason")
    models: dict[Name, ModelTelemetry] = Field(default_factory=dict, max_length=256)
    dropped: dict[str, int] = Field(default_factory=dict,
                                    description="messages the outbox cap dropped, by stream")
    commands_dropped: dict[str, int] = Field(
        default_factory=dict, description="messages on the cmd topics refused in the "
                                          "interval, by check (format, unsigned, threshold, "
                                          "replay, expired...)")
    order: ReportOrder | None = order_field()


class Event(_Wire):
    schema_version: Literal[1] = Field(default=1, alias="schema")
    seq: int = Field(ge=1)
    device: Name
    at: AwareDatetime
    kind: str = Field(max_length=64, description="e.g. anomaly, deploy.verified, "
                                                 "deploy.rolled_back, command.rejected")
    severity: Severity
    message: str = Field(max_length=4096)
    model: Name | None = None
    version: int | None = None
    command_id: str | None = None
    evidence: dict[str, Any] = Field(default_factory=dict)
    order: ReportOrder | None = order_field()


class CommandResult(_Wire):
    schema_version: Literal[1] = Field(default=1, alias="schema")
    device: Name
    command_id: str | None = Field(pattern=r"^[0-9a-f]{32}$",
                                   description="None when the command could not be parsed")
    kind: str | None = Field(max_length=32)
    ok: bool
    result: str = Field(max_length=4096)
    check: str | None = Field(default=None, max_length=64,
                              description="the failed check, if rejected")
    at: AwareDatetime
    order: ReportOrder | None = order_field()
    installed_by: str | None = Field(
        default=None, pattern=r"^[0-9a-f]{32}$",
        description="an `already` answer to a deploy: the command that installed the "
                    "version it serves, when the device knows it (a retry of a rollout "
                    "whose first attempt landed is that rollout's commit, not 'already')")


def dump(payload: BaseModel) -> bytes:
    return payload.model_dump_json(by_alias=True).encode()


JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def _envelope(payload: dict[str, Any], *, signed_by: str) -> dict[str, Any]:
    """The signed envelope around a payload's schema, with the payload's definitions at
    the envelope's root (where its `$ref`s point)."""
    payload = dict(payload)
    defs = payload.pop("$defs", {})
    out: dict[str, Any] = {
        "type": "object", "required": ["signed", "signatures"],
        "additionalProperties": False,
        "description": f"signed by {signed_by}; the payload is `signed`",
        "properties": {"signed": payload,
                       "signatures": {"type": "array", "items": {
                           "type": "object", "required": ["keyid", "sig"],
                           "properties": {"keyid": {"type": "string"},
                                          "sig": {"type": "string"}}}}}}
    if defs:
        out["$defs"] = defs
    return out


def json_schemas() -> dict[str, dict[str, Any]]:
    """The JSON Schema (draft 2020-12, declared in `$schema`) of every topic's message as
    it is on the wire, keyed by topic suffix: the signed envelope with the payload under
    `signed` (the retained `root` announcement is not enveloped: the root inside carries
    its own signatures). Every `$ref` points into its own document."""
    device = "the device's report key"
    schemas = {
        "state": _envelope(StatePayload.model_json_schema(by_alias=True), signed_by=device),
        "telemetry": _envelope(Telemetry.model_json_schema(by_alias=True), signed_by=device),
        "event": _envelope(Event.model_json_schema(by_alias=True), signed_by=device),
        "cmd": _envelope(COMMAND_ADAPTER.json_schema(), signed_by="command keys"),
        "cmd/result": _envelope(CommandResult.model_json_schema(by_alias=True),
                                signed_by=device),
        "heartbeat": _envelope(Heartbeat.model_json_schema(by_alias=True),
                               signed_by="command keys"),
        "root": RootAnnouncement.model_json_schema(by_alias=True),
    }
    return {topic: {"$schema": JSON_SCHEMA_DIALECT, **schema}
            for topic, schema in schemas.items()}
