"""Opening a sealed model file on the device, into memory only.

A device holds an X25519 private key (in its key file, `agent.trust.identity`). The manifest's
`sealed.recipients` maps device ids to the release's file key sealed to each device; the
device unseals its copy and decrypts the model file (already hash-checked as ciphertext)
into bytes that go straight to the runtime. Nothing decrypted touches the disk.
"""

from __future__ import annotations

from pathlib import Path

import nacl.exceptions
import nacl.public
import nacl.secret

from agent.errors import BundleError
from agent.trust.manifest import Manifest


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
