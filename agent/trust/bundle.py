"""A bundle directory on disk: the edge that feeds `agent.trust.verify` its bytes.

`verify_bundle_dir` is the one path both the device and `edge-fleet verify` take: read
`manifest.json` and `signatures.json` (capped), verify them against the trusted root, check
the file set, then stream every file in chunks through `trust.FileCheck`, reading at most
one byte past a file's declared size. Memory stays flat whatever the bundle's size.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path

from agent.errors import BundleError
from agent.trust.manifest import (
    MANIFEST_FILE,
    MAX_MANIFEST_BYTES,
    SIGNATURES_FILE,
    FileEntry,
    Manifest,
    parse_manifest,
)
from agent.trust.root import Root
from agent.trust.signatures import MAX_SIGNATURES_BYTES
from agent.trust.verify import Device, FileCheck, Verified, check_file_set, verify_manifest

CHUNK_BYTES = 1 << 20


def read_capped(path: Path, cap: int, *, check: str) -> bytes:
    """A small file's bytes, refused when longer than `cap`.

    Raises:
        BundleError: with `check` when it is missing, unreadable or too long.
    """
    try:
        with path.open("rb") as fh:
            # In chunks: read(cap + 1) would allocate the whole cap up front.
            parts: list[bytes] = []
            got = 0
            while got <= cap and (chunk := fh.read(min(1 << 16, cap + 1 - got))):
                parts.append(chunk)
                got += len(chunk)
            raw = b"".join(parts)
    except OSError as exc:
        raise BundleError(f"cannot read {path.name}: {exc.strerror}", check=check,
                          path=path.name) from exc
    if len(raw) > cap:
        raise BundleError(f"{path.name} is longer than {cap} bytes", check=check,
                          path=path.name)
    return raw


def read_manifest(bundle_dir: Path) -> Manifest:
    """Load and validate `manifest.json` of a bundle directory (no signature check).

    Raises:
        BundleError: missing or invalid manifest.
    """
    return parse_manifest(read_capped(bundle_dir / MANIFEST_FILE, MAX_MANIFEST_BYTES,
                                      check="manifest"))


def present_files(bundle_dir: Path) -> list[str]:
    """Relative POSIX paths of everything in the bundle that is not a directory."""
    return sorted(p.relative_to(bundle_dir).as_posix() for p in bundle_dir.rglob("*")
                  if not p.is_dir())


def check_files(bundle_dir: Path, manifest: Manifest) -> None:
    """Check that exactly the listed files are present, with their sizes and sha256.

    Raises:
        BundleError: check "unlisted", "missing", "size", "truncated" or "sha256".
    """
    check_file_set(manifest, present_files(bundle_dir))
    for rel, entry in sorted(manifest.files.items()):
        stream_file(bundle_dir / rel, FileCheck(rel, entry))


def stream_file(path: Path, check: FileCheck) -> None:
    """Feed a file to its check in chunks, never reading past its declared size + 1."""
    try:
        # O_NOFOLLOW: a symlink could be re-pointed between verification and use.
        fh = os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), "rb")
    except FileNotFoundError as exc:
        raise BundleError(f"file {check.rel} is missing", check="missing",
                          path=check.rel) from exc
    except OSError as exc:  # ELOOP: a symlink
        raise BundleError(f"{check.rel} is not a regular file", check="not_regular",
                          path=check.rel) from exc
    with fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise BundleError(f"{check.rel} is not a regular file", check="not_regular",
                              path=check.rel)
        while chunk := fh.read(min(CHUNK_BYTES, check.remaining + 1)):
            check.update(chunk)
    check.finish()


def verify_bundle_dir(bundle_dir: Path, root: Root, *, device: Device, now: datetime,
                      new_roots: Iterable[bytes] = ()) -> Verified:
    """Verify a signed bundle directory completely (trust steps 1-8).

    Raises:
        RootError, SignatureError, BundleError: the first check that fails.
    """
    manifest_raw = read_capped(bundle_dir / MANIFEST_FILE, MAX_MANIFEST_BYTES,
                               check="manifest")
    sig_path = bundle_dir / SIGNATURES_FILE
    signatures_raw = (read_capped(sig_path, MAX_SIGNATURES_BYTES, check="signatures")
                      if sig_path.exists() else None)
    verified = verify_manifest(root, manifest_raw, signatures_raw, device=device, now=now,
                               new_roots=new_roots)
    check_files(bundle_dir, verified.manifest)
    return verified


def file_entry(path: Path) -> FileEntry:
    """The manifest entry (sha256 and size) of a file, hashed in chunks."""
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return FileEntry(sha256=digest.hexdigest(), size_bytes=size)
