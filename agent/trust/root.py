"""The fleet's root of trust: `root.json`, its keys and roles, and root rotation.

`root.json` is an envelope (see `agent.trust.signatures`) whose `signed` part lists Ed25519 keys
by id and three roles with thresholds: `root` (signs roots), `release` (signs bundles) and
`command` (signs operator commands). The device pins one root at provisioning time.

Rotation follows TUF spec 5.3.4-5.3.10: root N+1 is accepted only when signed by a
threshold of root N's root keys *and* a threshold of its own, with version exactly N+1; the
chain is walked one version at a time, and only the final root's expiry matters. A key left
out of the new root is revoked: its signatures count for nothing from then on.
Pure: bytes and a reference time in, a `Root` or a `RejectedError` out.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, model_validator

from agent.errors import RootError
from agent.trust.signatures import (
    KeyId,
    Name,
    PublicKey,
    Role,
    Signature,
    parse_envelope,
    validation_message,
    verify_threshold,
)

RoleName = Literal["root", "release", "command"]
ROLES: tuple[RoleName, ...] = ("root", "release", "command")
MAX_ROOT_BYTES = 256 * 1024


class RoleKeys(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    keyids: list[KeyId] = Field(min_length=1)
    threshold: int = Field(ge=1)

    @model_validator(mode="after")
    def _sane(self) -> RoleKeys:
        if len(set(self.keyids)) != len(self.keyids):
            raise ValueError("keyids must be unique")
        if self.threshold > len(self.keyids):
            raise ValueError(f"threshold {self.threshold} exceeds {len(self.keyids)} keys")
        return self


class Root(BaseModel):
    """The `signed` part of root.json."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    schema_version: Literal[1] = Field(default=1, alias="schema")
    type: Literal["root"] = "root"
    fleet: Name
    version: int = Field(ge=1)
    expires: AwareDatetime
    keys: dict[KeyId, PublicKey]
    roles: dict[RoleName, RoleKeys]

    @model_validator(mode="after")
    def _consistent(self) -> Root:
        missing = [r for r in ROLES if r not in self.roles]
        if missing:
            raise ValueError(f"roles missing: {', '.join(missing)}")
        for keyid, key in self.keys.items():
            if key.keyid != keyid:
                raise ValueError(f"key id {keyid[:12]}… does not match its public key")
        for name, role in self.roles.items():
            unknown = [k for k in role.keyids if k not in self.keys]
            if unknown:
                raise ValueError(f"role {name} names unknown key {unknown[0][:12]}…")
        return self

    def role(self, name: RoleName) -> Role:
        r = self.roles[name]
        return Role(name=name, keyids=frozenset(r.keyids), threshold=r.threshold)


def parse_root(raw: bytes) -> tuple[Root, list[Signature], bytes]:
    """Parse root.json bytes into (root, signatures, signed bytes).

    Raises:
        RootError: check "format" when the bytes are not a valid root.
    """
    env, signed = parse_envelope(raw, what="root.json", max_bytes=MAX_ROOT_BYTES,
                                 error=RootError)
    try:
        root = Root.model_validate(env.signed)
    except ValidationError as exc:
        raise RootError(validation_message("root.json", exc), check="format") from exc
    return root, env.signatures, signed


def load_pinned_root(raw: bytes) -> Root:
    """The root a device was provisioned with: trusted by provisioning, but it must be
    intact (self-signed by its root threshold) before anything relies on it.

    Raises:
        RootError, SignatureError.
    """
    root, sigs, signed = parse_root(raw)
    verify_threshold(signed, sigs, role=root.role("root"), keys=root.keys,
                     what=f"root.json v{root.version}")
    return root


def update_root(trusted: Root, raw: bytes) -> Root:
    """Accept root version N+1 on top of trusted root N (expiry is checked by the caller
    on the final root of a chain, as TUF does).

    Raises:
        RootError: malformed, another fleet, or not version N+1 (check "format", "fleet",
            "version").
        SignatureError: under the old root's or its own root threshold (role "root").
    """
    new, sigs, signed = parse_root(raw)
    what = f"root.json v{new.version}"
    # 5.3.5: signed by a threshold of the trusted root's root keys ...
    verify_threshold(signed, sigs, role=trusted.role("root"), keys=trusted.keys,
                     what=f"{what} (by root v{trusted.version}'s keys)")
    # ... and by a threshold of its own.
    verify_threshold(signed, sigs, role=new.role("root"), keys=new.keys,
                     what=f"{what} (by its own keys)")
    if new.fleet != trusted.fleet:
        raise RootError(f"{what} is for fleet {new.fleet!r}, not {trusted.fleet!r}",
                        check="fleet", expected=trusted.fleet, got=new.fleet)
    # 5.3.6: exactly N+1, so no version can be skipped or replayed.
    if new.version != trusted.version + 1:
        raise RootError(f"{what} does not follow trusted root v{trusted.version}",
                        check="version", trusted=trusted.version, got=new.version)
    return new


def check_root_fresh(root: Root, now: datetime) -> None:
    """Raises RootError check "expired" when the root's expiry has passed (freeze attack)."""
    if now >= root.expires:
        raise RootError(f"root.json v{root.version} expired at {root.expires.isoformat()}",
                        check="expired", expires=root.expires.isoformat(),
                        now=now.isoformat())


def update_root_chain(trusted: Root, chain: Iterable[bytes], now: datetime) -> Root:
    """Walk new roots in order from `trusted`; the final one must not be expired."""
    for raw in chain:
        trusted = update_root(trusted, raw)
    check_root_fresh(trusted, now)
    return trusted
