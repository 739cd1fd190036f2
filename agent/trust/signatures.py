"""Ed25519 signatures, key ids and the threshold check every signed object goes through.

Pure: bytes in, a verdict out. Two shapes of signed object exist (docs/architecture.md, Trust):

* the bundle manifest, signed as a file: `signatures.json` holds detached signatures over
  the manifest's exact bytes (which the signer insists are canonical JSON);
* envelopes (`root.json`, commands): `{"signed": {...}, "signatures": [...]}`, signatures
  over the canonical JSON of `signed` (sorted keys, no insignificant white space, UTF-8), as
  in TUF.

A role's threshold counts *distinct* keys of that role whose signature verifies: a key
signing twice counts once (TUF spec 5.4.3), and keys of other roles or unknown keys count
for nothing. All untrusted JSON goes through `strict_json`, which refuses NaN/Infinity
(spelled out or overflowing), duplicate object keys, over-deep nesting and oversized input
with the caller's error.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated, Any, Literal

import nacl.exceptions
import nacl.signing
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.errors import RejectedError, SignatureError

#: Names on the wire: device ids, fleets, groups, models, key names.
NAME_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
Name = Annotated[str, Field(pattern=NAME_PATTERN)]
HEX64_PATTERN = r"^[0-9a-f]{64}$"
Hex64 = Annotated[str, Field(pattern=HEX64_PATTERN)]
KeyId = Hex64
# Lower-case only: "A" and "a" decode to the same byte, and two spellings of one signature
# would let a flipped byte pass unnoticed.
SigHex = Annotated[str, Field(pattern=r"^[0-9a-f]{128}$")]
MAX_SIGNATURES = 64
MAX_SIGNATURES_BYTES = 64 * 1024


class _Wire(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class PublicKey(_Wire):
    keytype: Literal["ed25519"] = "ed25519"
    public: str = Field(pattern=r"^[0-9a-f]{64}$")

    @property
    def keyid(self) -> str:
        return key_id(self)


class Signature(_Wire):
    keyid: KeyId
    sig: SigHex


class SignatureFile(_Wire):
    """`signatures.json` of a bundle: detached signatures over `manifest.json`."""

    schema_version: Literal[1] = Field(default=1, alias="schema")
    signatures: list[Signature] = Field(max_length=MAX_SIGNATURES)


class Envelope(_Wire):
    signed: dict[str, Any]
    signatures: list[Signature] = Field(max_length=MAX_SIGNATURES)


def canonical(data: Any) -> bytes:
    """Canonical JSON bytes: sorted keys, compact separators, UTF-8."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def key_id(key: PublicKey) -> str:
    """sha256 of the key's canonical JSON, as in TUF."""
    return hashlib.sha256(canonical(key.model_dump(mode="json"))).hexdigest()


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate key in JSON object")
    return out


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # "1e400" parses to inf without complaint
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def strict_json(raw: bytes, *, what: str, max_bytes: int, error: type[RejectedError],
                check: str) -> Any:
    """Parse untrusted JSON, or raise `error(check=check)` naming `what` was wrong.

    Args:
        raw: the bytes as received.
        what: a noun for messages ("manifest", "command").
        max_bytes: longer input is refused before parsing.
        error: the RejectedError subclass to raise.
        check: its check name.
    """
    if len(raw) > max_bytes:
        raise error(f"{what} is {len(raw)} bytes, more than the {max_bytes} allowed",
                    check=check, size_bytes=len(raw), max_bytes=max_bytes)
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates,
                          parse_constant=_no_constant, parse_float=_finite)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # json.JSONDecodeError is a ValueError; deep nesting raises RecursionError.
        raise error(f"{what} is not strict UTF-8 JSON: {str(exc)[:200]}",
                    check=check) from exc


def validation_message(what: str, exc: ValidationError) -> str:
    """One line naming the first failing field of a pydantic error."""
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "<root>"
    return f"{what} invalid at {where}: {first['msg']} ({exc.error_count()} problem(s))"


def parse_signature_file(raw: bytes) -> SignatureFile:
    """Parse `signatures.json`.

    Raises:
        SignatureError: check "signatures" when it is not valid.
    """
    data = strict_json(raw, what="signatures.json", max_bytes=MAX_SIGNATURES_BYTES,
                       error=SignatureError, check="signatures")
    try:
        return SignatureFile.model_validate(data)
    except ValidationError as exc:
        raise SignatureError(validation_message("signatures.json", exc),
                             check="signatures") from exc


def parse_envelope(raw: bytes, *, what: str, max_bytes: int,
                   error: type[RejectedError]) -> tuple[Envelope, bytes]:
    """Parse a `{"signed", "signatures"}` envelope; returns it and the signed bytes.

    Raises:
        error: check "format" when the bytes are not a well-formed envelope.
    """
    data = strict_json(raw, what=what, max_bytes=max_bytes, error=error, check="format")
    try:
        env = Envelope.model_validate(data)
        return env, canonical(env.signed)
    except ValidationError as exc:
        raise error(validation_message(what, exc), check="format") from exc
    except UnicodeEncodeError as exc:  # "\ud800": a lone surrogate has no UTF-8 form
        raise error(f"{what} holds a lone UTF-16 surrogate ({exc.reason})",
                    check="format") from exc


@lru_cache(maxsize=16_384)  # a fleet's device keys: one per device, reused per report
def _verify_key(public_hex: str) -> nacl.signing.VerifyKey:
    return nacl.signing.VerifyKey(bytes.fromhex(public_hex))


def signature_valid(message: bytes, sig: Signature, key: PublicKey) -> bool:
    try:
        _verify_key(key.public).verify(message, bytes.fromhex(sig.sig))
    except nacl.exceptions.BadSignatureError:
        return False
    return True


@dataclass(frozen=True, kw_only=True)
class Role:
    """The keys of one role and how many of them must sign (taken from a root)."""

    name: str
    keyids: frozenset[str]
    threshold: int


def verify_threshold(message: bytes, signatures: Iterable[Signature], *, role: Role,
                     keys: Mapping[str, PublicKey], what: str) -> frozenset[str]:
    """Check that `message` carries valid signatures from `role.threshold` distinct keys.

    Returns:
        the key ids whose signatures verified.

    Raises:
        SignatureError: check "unsigned" (no signatures) or "threshold" (too few valid),
            with the valid, unknown, other-role and bad key ids in `details`.
    """
    sigs = list(signatures)
    if not sigs:
        raise SignatureError(f"{what} is unsigned; role {role.name} needs {role.threshold}",
                             check="unsigned", role=role.name, threshold=role.threshold)
    valid: set[str] = set()
    unknown: set[str] = set()
    other_role: set[str] = set()
    bad: set[str] = set()
    for sig in sigs:
        if sig.keyid not in keys:
            unknown.add(sig.keyid)
        elif sig.keyid not in role.keyids:
            other_role.add(sig.keyid)
        elif signature_valid(message, sig, keys[sig.keyid]):
            valid.add(sig.keyid)
        else:
            bad.add(sig.keyid)
    if len(valid) < role.threshold:
        why = ", ".join(f"{len(s)} {label}" for s, label in (
            (bad, "bad signature(s)"), (other_role, "from keys of another role"),
            (unknown, "from unknown or revoked keys")) if s)
        raise SignatureError(
            f"{what}: {len(valid)} valid signature(s) of role {role.name}, threshold "
            f"{role.threshold}" + (f" ({why})" if why else ""),
            check="threshold", role=role.name, threshold=role.threshold,
            valid=sorted(valid), bad=sorted(bad), other_role=sorted(other_role),
            unknown=sorted(unknown))
    return frozenset(valid)
