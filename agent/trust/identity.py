"""A device's own keys, and the reports it signs with them.

One key file per device (`DEVICE.key`, JSON, mode 0600, made by `edge-agent device-key`)
holds two keys:

* X25519 (`private`): opens models sealed to this device (`agent.trust.sealing`);
* Ed25519 (`report_seed`): signs every message the device publishes (state, telemetry,
  events, command results), so the fleet can tell its reports from anyone else's.

`DEVICE.pub` holds both public halves; the operator registers it (`edge-fleet devices
add`). A report is an envelope like a command (`agent.trust.signatures`): the payload as
`signed`, one signature by the device key over its canonical JSON. `open_report` is the
fleet's check: the signature is the registered key's and the payload names the device the
topic names. Pure apart from reading and writing the key files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import nacl.public
import nacl.signing
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.durable import write_atomic
from agent.errors import ConfigError, ReportError, SignatureError
from agent.trust.signatures import (
    Hex64,
    Name,
    PublicKey,
    Role,
    canonical,
    key_id,
    parse_envelope,
    verify_threshold,
)

#: A report larger than this is refused before it is parsed.
MAX_REPORT_BYTES = 128 * 1024


class DeviceKeyFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    keytype: str = Field(pattern="^x25519$")
    device: Name
    private: Hex64
    # Absent in key files made before devices signed their reports.
    report_seed: Hex64 | None = None


class DevicePublicFile(BaseModel):
    """`DEVICE.pub`: what the operator needs of a device."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    keytype: str = Field(pattern="^x25519$")
    device: Name
    public: Hex64
    report_public: Hex64 | None = None

    @property
    def report_key(self) -> PublicKey | None:
        return None if self.report_public is None else PublicKey(public=self.report_public)


def _read_key_file(path: Path) -> DeviceKeyFile:
    try:
        return DeviceKeyFile.model_validate(json.loads(path.read_bytes()))
    except (OSError, ValueError, ValidationError) as exc:
        raise ConfigError(f"device key {path} unreadable or invalid: {str(exc)[:200]}") from exc


def load_device_key(path: Path) -> tuple[str, nacl.public.PrivateKey]:
    """(device id, X25519 private key) from a device key file.

    Raises:
        ConfigError: unreadable or invalid key file.
    """
    f = _read_key_file(path)
    return f.device, nacl.public.PrivateKey(bytes.fromhex(f.private))


@dataclass(frozen=True)
class ReportSigner:
    """Signs this device's reports."""

    device: str
    key: nacl.signing.SigningKey

    @classmethod
    def generate(cls, device: str) -> ReportSigner:
        return cls(device, nacl.signing.SigningKey.generate())

    @property
    def public(self) -> PublicKey:
        return PublicKey(public=bytes(self.key.verify_key).hex())

    def seal(self, payload: BaseModel) -> bytes:
        """The payload as a signed envelope, in canonical JSON."""
        signed = payload.model_dump(mode="json", by_alias=True)
        sig = self.key.sign(canonical(signed)).signature.hex()
        return canonical({"signed": signed,
                          "signatures": [{"keyid": self._keyid, "sig": sig}]})

    @property
    def _keyid(self) -> str:
        return _keyid_of(bytes(self.key.verify_key).hex())


@lru_cache(maxsize=4096)
def _keyid_of(public_hex: str) -> str:
    return key_id(PublicKey(public=public_hex))


def load_report_signer(path: Path) -> ReportSigner:
    """The report key of a device key file.

    Raises:
        ConfigError: unreadable, invalid, or made before reports were signed (no report key).
    """
    f = _read_key_file(path)
    if f.report_seed is None:
        raise ConfigError(f"device key {path} has no report key (made by an older "
                          "edge-agent); make a new one with `edge-agent device-key` and "
                          "register its .pub with `edge-fleet devices add`")
    return ReportSigner(f.device, nacl.signing.SigningKey(bytes.fromhex(f.report_seed)))


def generate_device_key(device: str, out_dir: Path) -> tuple[Path, Path]:
    """Create this device's keys: `DEVICE.key` (0600, stays on the device: X25519 for
    sealed models, Ed25519 for reports) and `DEVICE.pub` (for the operator: `edge-fleet
    seal` and `edge-fleet devices add`).

    Raises:
        ConfigError: the key file exists already (never overwrite a device key).
    """
    key_path, pub_path = out_dir / f"{device}.key", out_dir / f"{device}.pub"
    if key_path.exists():
        raise ConfigError(f"{key_path} exists; refusing to overwrite a device key")
    DeviceKeyFile(keytype="x25519", device=device, private="0" * 64)  # validates the id
    box = nacl.public.PrivateKey.generate()
    report = nacl.signing.SigningKey.generate()
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(key_path, json.dumps({"keytype": "x25519", "device": device,
                                       "private": bytes(box).hex(),
                                       "report_seed": bytes(report).hex()}).encode(),
                 mode=0o600)
    write_atomic(pub_path, json.dumps({
        "keytype": "x25519", "device": device, "public": bytes(box.public_key).hex(),
        "report_public": bytes(report.verify_key).hex()}).encode())
    return key_path, pub_path


def read_device_public(raw: bytes, *, what: str) -> DevicePublicFile:
    """Parse a `DEVICE.pub`.

    Raises:
        ConfigError: not a device public key file.
    """
    try:
        return DevicePublicFile.model_validate(json.loads(raw))
    except (ValueError, ValidationError) as exc:
        raise ConfigError(f"{what} is not a device public key file: {str(exc)[:200]}"
                          ) from exc


def open_report(raw: bytes, *, device: str, key: PublicKey, what: str) -> dict[str, Any]:
    """The signed payload of a report that `device`'s registered `key` signed and that
    names `device`; the caller validates it against the topic's wire model.

    Raises:
        ReportError: check "format" (not an envelope, too big), "threshold"/"unsigned"
            (not signed by the registered key: a SignatureError's checks, re-raised as
            ReportError) or "device" (the payload names another device).
    """
    env, signed = parse_envelope(raw, what=what, max_bytes=MAX_REPORT_BYTES,
                                 error=ReportError)
    kid = _keyid_of(key.public)
    try:
        verify_threshold(signed, env.signatures, role=Role(name="device", keyids=frozenset(
            {kid}), threshold=1), keys={kid: key}, what=what)
    except SignatureError as exc:  # one kind of rejection for the caller
        raise ReportError(str(exc), check=exc.check) from exc
    claimed = env.signed.get("device")
    if claimed != device:
        raise ReportError(f"{what} names device {str(claimed)[:80]!r}, not {device!r}",
                          check="device")
    return env.signed
