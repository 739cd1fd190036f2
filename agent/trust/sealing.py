"""Opening a sealed model file on the device, into memory only.

A device holds an X25519 private key (`device.key`, JSON, mode 0600). The manifest's
`sealed.recipients` maps device ids to the release's file key sealed to each device; the
device unseals its copy and decrypts the model file (already hash-checked as ciphertext)
into bytes that go straight to the runtime. Nothing decrypted touches the disk.
"""

from __future__ import annotations

import json
from pathlib import Path

import nacl.exceptions
import nacl.public
import nacl.secret
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.durable import write_atomic
from agent.errors import BundleError, ConfigError
from agent.trust.manifest import Manifest


class DeviceKeyFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    keytype: str = Field(pattern="^x25519$")
    device: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    private: str = Field(pattern=r"^[0-9a-f]{64}$")


def load_device_key(path: Path) -> tuple[str, nacl.public.PrivateKey]:
    """(device id, private key) from a device key file.

    Raises:
        ConfigError: unreadable or invalid key file.
    """
    try:
        f = DeviceKeyFile.model_validate(json.loads(path.read_bytes()))
    except (OSError, ValueError, ValidationError) as exc:
        raise ConfigError(f"device key {path} unreadable or invalid: {str(exc)[:200]}") from exc
    return f.device, nacl.public.PrivateKey(bytes.fromhex(f.private))


def open_sealed(manifest: Manifest, ciphertext: bytes, *, device: str,
                key: nacl.public.PrivateKey) -> bytes:
    """Decrypt a sealed model file for this device.

    Raises:
        BundleError: check "sealed" when the bundle is not sealed to this device or the
            key or ciphertext do not open (wrong key, altered bytes).
    """
    if manifest.sealed is None:
        raise ValueError("manifest is not sealed")
    sealed_key = manifest.sealed.recipients.get(device)
    if sealed_key is None:
        raise BundleError(f"{manifest.name} v{manifest.version} is not sealed to device "
                          f"{device}", check="sealed", device=device,
                          recipients=sorted(manifest.sealed.recipients))
    try:
        file_key = nacl.public.SealedBox(key).decrypt(bytes.fromhex(sealed_key))
        return nacl.secret.SecretBox(file_key).decrypt(ciphertext)
    except nacl.exceptions.CryptoError as exc:
        raise BundleError(f"sealed model of {manifest.name} v{manifest.version} does not "
                          f"open with device {device}'s key", check="sealed",
                          device=device) from exc


def model_source(bundle_dir: Path, manifest: Manifest, *,
                 device_key: tuple[str, nacl.public.PrivateKey] | None = None) -> Path | bytes:
    """What to hand the runtime: the model file's path, or its decrypted bytes if sealed.

    Raises:
        BundleError: sealed and no key given, or the key does not open it.
    """
    path = bundle_dir / manifest.model_file
    if manifest.sealed is None:
        return path
    if device_key is None:
        raise BundleError(f"{manifest.name} v{manifest.version} is sealed and this device "
                          "has no device key configured", check="sealed")
    return open_sealed(manifest, path.read_bytes(), device=device_key[0], key=device_key[1])


def generate_device_key(device: str, out_dir: Path) -> tuple[Path, Path]:
    """Create this device's X25519 key pair: `DEVICE.key` (0600, stays on the device) and
    `DEVICE.pub` (give it to the operator for `edge-fleet seal`).

    Raises:
        ConfigError: the key file exists already (never overwrite a device key).
    """
    key_path, pub_path = out_dir / f"{device}.key", out_dir / f"{device}.pub"
    if key_path.exists():
        raise ConfigError(f"{key_path} exists; refusing to overwrite a device key")
    key = nacl.public.PrivateKey.generate()
    write_atomic(key_path, json.dumps({"keytype": "x25519", "device": device,
                                       "private": bytes(key).hex()}).encode(), mode=0o600)
    write_atomic(pub_path, json.dumps({"keytype": "x25519", "device": device,
                                       "public": bytes(key.public_key).hex()}).encode())
    return key_path, pub_path
