"""Releasing a bundle: seal (optional), sign, pack, verify.

    edge-convert's bundle/  --seal-->  --sign (release keys, until threshold)-->  --pack-->
    NAME-vN.tar.zst  --verify (the device's own code path)-->  deploy command

Signing refuses a manifest that is not canonical JSON or whose files do not match it, so
what is signed is exactly what the converter described. Several operators sign in turn:
each run appends its keys' signatures to `signatures.json` and reports how far the release
role's threshold is from being met.
"""

from __future__ import annotations

import gzip
import json
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Literal

import nacl.public
import nacl.secret
import nacl.utils

from agent.durable import write_atomic
from agent.errors import SignatureError
from agent.trust.archive import unpack_bundle
from agent.trust.bundle import (
    check_files,
    file_entry,
    read_capped,
    read_manifest,
    verify_bundle_dir,
)
from agent.trust.manifest import (
    MANIFEST_FILE,
    MAX_MANIFEST_BYTES,
    SELFTEST_FILE,
    SIGNATURES_FILE,
    Manifest,
    Sealed,
    canonical_json,
    parse_manifest,
)
from agent.trust.root import Root
from agent.trust.signatures import (
    MAX_SIGNATURES_BYTES,
    Signature,
    SignatureFile,
    canonical,
    parse_signature_file,
    verify_threshold,
)
from agent.trust.verify import Device, Verified
from fleet.errors import FleetError
from fleet.trust.keys import SigningKey

Compression = Literal["zst", "gz"]


def _canonical_manifest(bundle: Path) -> tuple[bytes, Manifest]:
    raw = read_capped(bundle / MANIFEST_FILE, MAX_MANIFEST_BYTES, check="manifest")
    m = parse_manifest(raw)
    if canonical_json(m) != raw:
        raise FleetError(f"{bundle / MANIFEST_FILE} is not canonical JSON (edited by hand?); "
                         "rebuild the bundle with edge-convert")
    return raw, m


def _signatures(bundle: Path) -> list[Signature]:
    path = bundle / SIGNATURES_FILE
    if not path.exists():
        return []
    return parse_signature_file(read_capped(path, MAX_SIGNATURES_BYTES,
                                            check="signatures")).signatures


@dataclass(frozen=True)
class SignResult:
    signatures: int
    valid: int
    threshold: int | None


def sign_bundle(bundle: Path, keys: Iterable[SigningKey], root: Root | None = None
                ) -> SignResult:
    """Append the keys' signatures over the manifest to `signatures.json`.

    Args:
        root: when given, count the valid release signatures against its threshold.

    Raises:
        FleetError: a key is not a release key, or the manifest is not canonical.
        BundleError: the files do not match the manifest.
    """
    raw, m = _canonical_manifest(bundle)
    check_files(bundle, m)
    keys = list(keys)
    wrong = [k.name for k in keys if k.role != "release"]
    if wrong:
        raise FleetError(f"bundles are signed with release keys; {', '.join(wrong)} are not")
    sigs = {s.keyid: s for s in _signatures(bundle)}
    sigs.update({k.keyid: k.sign(raw) for k in keys})
    out = SignatureFile(signatures=list(sigs.values()))
    write_atomic(bundle / SIGNATURES_FILE, canonical(out.model_dump(by_alias=True)))
    if root is None:
        return SignResult(len(sigs), 0, None)
    role = root.role("release")
    try:
        valid = len(verify_threshold(raw, sigs.values(), role=role, keys=root.keys,
                                     what="manifest"))
    except SignatureError as exc:
        valid = len(exc.details.get("valid", []))
    return SignResult(len(sigs), valid, role.threshold)


@contextmanager
def _compressor(fh: IO[bytes], compression: Compression) -> Iterator[IO[bytes]]:
    if compression == "gz":
        with gzip.GzipFile(fileobj=fh, mode="wb", compresslevel=6, mtime=0) as gz:
            yield gz  # type: ignore[misc]  # GzipFile is a binary IO in all but name
    else:
        import zstandard  # noqa: PLC0415  # host side only needs it when packing zstd

        with zstandard.ZstdCompressor(level=10).stream_writer(fh, closefd=False) as zw:
            yield zw


def pack_bundle(bundle: Path, out: Path, compression: Compression = "zst") -> Path:
    """Pack a bundle directory into one archive: manifest, signatures, then the files.

    Members are normalised (owner 0, mode 0644, mtime 0), so packing is reproducible.

    Raises:
        BundleError: the files do not match the manifest.
    """
    _, m = _canonical_manifest(bundle)
    check_files(bundle, m)
    names = [MANIFEST_FILE, *([SIGNATURES_FILE] if (bundle / SIGNATURES_FILE).exists()
                              else []), *sorted(m.files)]
    tmp = out.with_name(f".{out.name}.tmp")
    with tmp.open("wb") as fh, _compressor(fh, compression) as cz, \
            tarfile.open(fileobj=cz, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = (bundle / name).stat().st_size
            info.mode, info.mtime = 0o644, 0
            with (bundle / name).open("rb") as src:
                tar.addfile(info, src)
    tmp.replace(out)
    return out


def archive_name(m: Manifest, compression: Compression = "zst") -> str:
    return f"{m.name}-v{m.version}.tar.{compression}"


def verify_release(path: Path, root: Root, *, device: Device, now: datetime,
                   new_roots: Iterable[bytes] = ()) -> Verified:
    """Verify a bundle directory or archive exactly as a device would.

    Raises:
        RootError, SignatureError, BundleError: the first check that fails.
    """
    if path.is_dir():
        return verify_bundle_dir(path, root, device=device, now=now, new_roots=new_roots)
    with tempfile.TemporaryDirectory(prefix="edge-verify-") as tmp:
        return unpack_bundle(path, Path(tmp) / "bundle", root, device=device, now=now,
                             new_roots=new_roots)


def sha256_file(path: Path) -> str:
    return file_entry(path).sha256


def load_device_public(path: Path) -> tuple[str, nacl.public.PublicKey]:
    """(device id, X25519 public key) from a `DEVICE.pub` file made by `edge-agent
    device-key`."""
    try:
        data = json.loads(path.read_bytes())
        if data.get("keytype") != "x25519":
            raise ValueError("keytype must be x25519")
        return str(data["device"]), nacl.public.PublicKey(bytes.fromhex(data["public"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FleetError(f"device public key {path} unreadable or invalid: {exc}") from exc


def seal_bundle(bundle: Path, devices: Iterable[tuple[str, nacl.public.PublicKey]]) -> Manifest:
    """Encrypt the model file under a fresh key sealed to each device, before signing.

    The model file is replaced by its ciphertext and the manifest updated (hash, size,
    `sealed.recipients`); the self-test file stays in the clear (golden data, not the
    model).

    Raises:
        FleetError: the bundle is already signed or sealed.
    """
    _, m = _canonical_manifest(bundle)
    check_files(bundle, m)
    if (bundle / SIGNATURES_FILE).exists():
        raise FleetError("seal before signing: sealing changes the manifest and would void "
                         f"the signatures in {bundle / SIGNATURES_FILE}")
    if m.sealed is not None:
        raise FleetError(f"{m.name} v{m.version} is sealed already")
    file_key = nacl.utils.random(nacl.secret.SecretBox.KEY_SIZE)
    recipients = {dev: nacl.public.SealedBox(pub).encrypt(file_key).hex()
                  for dev, pub in devices}
    if not recipients:
        raise FleetError("seal needs at least one device public key")
    model = bundle / m.model_file
    write_atomic(model, bytes(nacl.secret.SecretBox(file_key).encrypt(model.read_bytes())))
    files = {**m.files, m.model_file: file_entry(model)}
    sealed = m.model_copy(update={"files": files, "sealed": Sealed(recipients=recipients)})
    sealed = parse_manifest(canonical_json(sealed))  # re-validate the edited manifest
    write_atomic(bundle / MANIFEST_FILE, canonical_json(sealed))
    return sealed


def describe(v: Verified) -> str:
    m = v.manifest
    return (f"{m.name} v{m.version} verified: {len(v.signers)} release signature(s) of "
            f"threshold {v.root.roles['release'].threshold} (root v{v.root.version}), "
            f"{len(m.files)} file(s) match, expires {m.expires:%Y-%m-%d}"
            + (f", sealed to {len(m.sealed.recipients)} device(s)" if m.sealed else ""))


def break_golden_outputs(bundle: Path) -> None:
    """For drills and tests of the halt path: make an unsigned bundle whose model can no
    longer reproduce its golden outputs (the self-test fails on every real device), with
    the manifest re-hashed so that it verifies and signs like a good release."""
    import numpy as np  # noqa: PLC0415  # only for this drill

    path = bundle / SELFTEST_FILE
    with np.load(path) as npz:
        inputs, outputs = npz["inputs"], npz["outputs"]
    np.savez(path, inputs=inputs, outputs=np.roll(outputs, 3, axis=1) + 5.0)
    m = read_manifest(bundle)
    m = m.model_copy(update={"files": {**m.files, SELFTEST_FILE: file_entry(path)}})
    (bundle / MANIFEST_FILE).write_bytes(canonical_json(m))
