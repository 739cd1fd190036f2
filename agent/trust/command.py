"""Operator commands: the signed wire schema and their verification.

A command is an envelope (`agent.trust.signatures`) whose `signed` part is one of the models
below, told apart by `kind`. `verify_command` is pure: bytes, the trusted root, who this
device is, the seen nonces and a reference time in; a `Command` or one rejection out. It
checks, in order:

1. the root is unexpired                                              - freeze
2. the envelope parses
3. a threshold of distinct `command` keys signed it         - forgery, wrong-role keys
4. the command validates (only once its signature holds)
5. the fleet is ours and the target is this device or one of its groups  - misaddressed
6. not expired; `issued_at` neither in the future (beyond the clock skew allowed)
   nor older than the replay window                                       - freeze, replay
7. its nonce is not among those seen within the window                       - replay

The caller (the daemon) persists seen nonces (`agent.trust.nonces`) and records a command's
nonce only after it verified, so a forged command cannot burn a real one's nonce.
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from agent.errors import CommandError
from agent.trust.root import Root, check_root_fresh
from agent.trust.signatures import (
    Name,
    parse_envelope,
    validation_message,
    verify_threshold,
)

MAX_COMMAND_BYTES = 64 * 1024
Sha256Hex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Url = Annotated[str, Field(pattern=r"^(https?|file)://\S+$", max_length=2048)]
SettingValue = str | int | float | bool


class _Wire(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class Target(_Wire):
    """Exactly one of a device id or a group name."""

    device: Name | None = None
    group: Name | None = None

    @model_validator(mode="after")
    def _one(self) -> Target:
        if (self.device is None) == (self.group is None):
            raise ValueError("target names exactly one of device or group")
        return self


class _CommandBase(_Wire):
    schema_version: Literal[1] = Field(default=1, alias="schema")
    type: Literal["command"] = "command"
    id: str = Field(pattern=r"^[0-9a-f]{32}$")
    fleet: Name
    target: Target
    nonce: str = Field(pattern=r"^[0-9a-f]{32}$")
    issued_at: AwareDatetime
    expires: AwareDatetime

    @model_validator(mode="after")
    def _times(self) -> _CommandBase:
        if self.expires <= self.issued_at:
            raise ValueError("expires must be after issued_at")
        return self


class ArchiveRef(_Wire):
    """Where a bundle archive lives and what it must be: the download is capped at
    `size_bytes` and checked against `sha256` before it is unpacked."""

    urls: list[Url] = Field(min_length=1, max_length=8)
    size_bytes: int = Field(ge=1)
    sha256: Sha256Hex


class DeployCommand(_CommandBase):
    """Install a bundle. `manifest_sha256` pins the exact signed manifest, so a different
    (even validly signed) bundle served at the URL is refused."""

    kind: Literal["deploy"] = "deploy"
    model: Name
    version: int = Field(ge=1)
    manifest_sha256: Sha256Hex
    archive: ArchiveRef


class RollbackCommand(_CommandBase):
    kind: Literal["rollback"] = "rollback"
    model: Name
    version: int | None = Field(default=None, ge=1, description=(
        "undo only this version: a device that does not serve it (or deploy it) answers "
        "ok with check not_serving"))
    reason: str = Field(default="", max_length=500)


class RestartCommand(_CommandBase):
    """Restart the inference runtime (reload models) without restarting the daemon."""

    kind: Literal["restart"] = "restart"


class ReloadCommand(_CommandBase):
    """Re-read the configuration file."""

    kind: Literal["reload"] = "reload"


class ConfigCommand(_CommandBase):
    """Change runtime settings (e.g. telemetry interval, detector thresholds)."""

    kind: Literal["config"] = "config"
    settings: dict[Name, SettingValue] = Field(min_length=1, max_length=64)


Command = Annotated[DeployCommand | RollbackCommand | RestartCommand | ReloadCommand
                    | ConfigCommand, Field(discriminator="kind")]
COMMAND_ADAPTER: TypeAdapter[Command] = TypeAdapter(Command)


@dataclass(frozen=True, kw_only=True)
class Addressee:
    """Who this device is, for the addressee check."""

    fleet: str
    device: str
    groups: frozenset[str] = frozenset()


@dataclass(frozen=True, kw_only=True)
class ReplayPolicy:
    """Commands issued more than `window` ago are refused outright, so the nonce store
    only needs to remember that long; `max_skew` tolerates fleet-host clocks ahead."""

    window: timedelta = timedelta(hours=24)
    max_skew: timedelta = timedelta(minutes=5)


DEFAULT_REPLAY = ReplayPolicy()


def parse_command(signed: dict[str, Any]) -> Command:
    """Validate the `signed` part of a command envelope.

    Raises:
        CommandError: check "format".
    """
    try:
        return COMMAND_ADAPTER.validate_python(signed)
    except ValidationError as exc:
        raise CommandError(validation_message("command", exc), check="format") from exc


def verify_command(root: Root, raw: bytes, *, me: Addressee, now: datetime,
                   seen: Container[str], policy: ReplayPolicy = DEFAULT_REPLAY) -> Command:
    """Verify a signed command for this device (steps 1-7 of the module docstring).

    Raises:
        RootError, SignatureError, CommandError: the first check that fails.
    """
    check_root_fresh(root, now)
    env, signed = parse_envelope(raw, what="command", max_bytes=MAX_COMMAND_BYTES,
                                 error=CommandError)
    verify_threshold(signed, env.signatures, role=root.role("command"), keys=root.keys,
                     what="command")
    cmd = parse_command(env.signed)
    _check_addressee(cmd, me)
    _check_time(cmd, now, policy)
    if cmd.nonce in seen:
        raise CommandError(f"command {cmd.id} was already received (nonce {cmd.nonce})",
                           check="replay", id=cmd.id, nonce=cmd.nonce)
    return cmd


def check_signed(root: Root, raw: bytes) -> None:
    """Steps 2-3 alone: the bytes are a command envelope signed by a threshold of the
    root's command keys. What tells junk (anyone can publish it) from the fleet's own
    commands, before anything is queued or answered.

    Raises:
        CommandError (check "format"), SignatureError.
    """
    env, signed = parse_envelope(raw, what="command", max_bytes=MAX_COMMAND_BYTES,
                                 error=CommandError)
    verify_threshold(signed, env.signatures, role=root.role("command"), keys=root.keys,
                     what="command")


def _check_addressee(cmd: Command, me: Addressee) -> None:
    t = cmd.target
    if cmd.fleet != me.fleet:
        raise CommandError(f"command {cmd.id} is for fleet {cmd.fleet}, not {me.fleet}",
                           check="addressee", fleet=cmd.fleet, my_fleet=me.fleet)
    if t.device is not None and t.device != me.device:
        raise CommandError(f"command {cmd.id} is for device {t.device}, not {me.device}",
                           check="addressee", device=t.device, my_device=me.device)
    if t.group is not None and t.group not in me.groups:
        raise CommandError(f"command {cmd.id} is for group {t.group}, not one of this "
                           f"device's groups", check="addressee", group=t.group,
                           my_groups=sorted(me.groups))


def _check_time(cmd: Command, now: datetime, policy: ReplayPolicy) -> None:
    times = {"issued_at": cmd.issued_at.isoformat(), "expires": cmd.expires.isoformat(),
             "now": now.isoformat()}
    if now >= cmd.expires:
        raise CommandError(f"command {cmd.id} expired at {times['expires']}",
                           check="expired", **times)
    if cmd.issued_at > now + policy.max_skew:
        raise CommandError(f"command {cmd.id} is issued in the future ({times['issued_at']})",
                           check="future", **times)
    if cmd.issued_at < now - policy.window:
        raise CommandError(f"command {cmd.id} was issued before the replay window of "
                           f"{policy.window}", check="stale", **times)
