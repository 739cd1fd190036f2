"""Building signed operator commands (the wire schema lives in `agent.trust.command`).

Each command gets a fresh random id and nonce, `issued_at` now and `expires` a short time
later, is validated against the same model the device parses, and is signed by command
keys into an envelope. A deploy command pins the archive (size, sha256) and the exact
signed manifest (sha256), read from the archive itself.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from agent.trust.archive import read_archive_head
from agent.trust.command import COMMAND_ADAPTER, Command, SettingValue
from agent.trust.manifest import parse_manifest
from agent.trust.signatures import validation_message
from fleet.errors import FleetError
from fleet.trust.keys import SigningKey, sign_envelope
from fleet.trust.release import sha256_file


def build_command(kind: str, *, fleet: str, device: str | None = None,
                  group: str | None = None, ttl: timedelta = timedelta(hours=1),
                  now: datetime | None = None, **fields: Any) -> Command:
    """A validated, unsigned command.

    Raises:
        FleetError: the fields do not make a valid command.
    """
    issued = (now or datetime.now(UTC)).replace(microsecond=0)
    data = {"kind": kind, "id": secrets.token_hex(16), "nonce": secrets.token_hex(16),
            "fleet": fleet, "target": {"device": device, "group": group},
            "issued_at": issued.isoformat(), "expires": (issued + ttl).isoformat(), **fields}
    try:
        return COMMAND_ADAPTER.validate_python(data)
    except ValidationError as exc:
        raise FleetError(validation_message(f"{kind} command", exc)) from exc


def deploy_fields(archive: Path, urls: Iterable[str]) -> dict[str, Any]:
    """The deploy-specific fields for an archive served at `urls`."""
    manifest_raw, signatures_raw = read_archive_head(archive)
    if signatures_raw is None:
        raise FleetError(f"{archive} is unsigned; sign the bundle before deploying it")
    m = parse_manifest(manifest_raw)
    return {"model": m.name, "version": m.version,
            "manifest_sha256": hashlib.sha256(manifest_raw).hexdigest(),
            "archive": {"urls": list(urls), "size_bytes": archive.stat().st_size,
                        "sha256": sha256_file(archive)}}


def parse_settings(pairs: Iterable[str]) -> dict[str, SettingValue]:
    """`key=value` strings into typed settings (bool, int, float, else string)."""
    out: dict[str, SettingValue] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise FleetError(f"setting {pair!r} is not key=value")
        out[key] = _typed(value)
    return out


def _typed(value: str) -> SettingValue:
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def sign_command(cmd: Command, keys: Iterable[SigningKey]) -> bytes:
    """The signed envelope bytes, ready to publish on the device's or group's cmd topic.

    Raises:
        FleetError: a key is not a command key.
    """
    keys = list(keys)
    wrong = [k.name for k in keys if k.role != "command"]
    if wrong:
        raise FleetError(f"commands are signed with command keys; {', '.join(wrong)} are not")
    signed: dict[str, Any] = cmd.model_dump(mode="json", by_alias=True, exclude_none=False)
    if signed.get("kind") == "rollback" and signed.get("version") is None:
        del signed["version"]  # a plain rollback reads as before to agents without it
    return sign_envelope(signed, keys)
