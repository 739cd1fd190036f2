"""Reading a bundle directory and checking its files against the manifest.

Hashing streams in chunks with a hard cap at the declared size, so a file longer than
declared is refused without reading it whole, and memory stays flat whatever the size.
Signature checks arrive with the trust layer; this module only checks that the bytes on disk
are the bytes the manifest names.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from agent.errors import BundleError
from agent.manifest import MANIFEST_FILE, SIGNATURES_FILE, FileEntry, Manifest, parse_manifest

CHUNK_BYTES = 1 << 20


def read_manifest(bundle_dir: Path) -> Manifest:
    """Load and validate `manifest.json` of a bundle directory.

    Raises:
        BundleError: missing or invalid manifest.
    """
    path = bundle_dir / MANIFEST_FILE
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise BundleError(f"cannot read {path}: {exc.strerror}", check="manifest") from exc
    return parse_manifest(raw)


def check_files(bundle_dir: Path, manifest: Manifest) -> None:
    """Check every listed file's size and sha256, and that no unlisted file is present.

    Raises:
        BundleError: with check "missing", "unlisted", "size" or "sha256".
    """
    allowed = {MANIFEST_FILE, SIGNATURES_FILE, *manifest.files}
    for path in sorted(p for p in bundle_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(bundle_dir).as_posix()
        if rel not in allowed:
            raise BundleError(f"file {rel} is not listed in the manifest", check="unlisted",
                              path=rel)
    for rel, entry in sorted(manifest.files.items()):
        _check_one(bundle_dir / rel, rel, entry.size_bytes, entry.sha256)


def _stream_sha256(path: Path, cap: int | None) -> tuple[str, int] | None:
    """(hex digest, bytes read) in chunks; None as soon as more than `cap` bytes appear."""
    digest = hashlib.sha256()
    seen = 0
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK_BYTES if cap is None else min(CHUNK_BYTES, cap - seen + 1)):
            seen += len(chunk)
            if cap is not None and seen > cap:
                return None
            digest.update(chunk)
    return digest.hexdigest(), seen


def file_entry(path: Path) -> FileEntry:
    """The manifest entry (sha256 and size) of a file, hashed in chunks."""
    streamed = _stream_sha256(path, cap=None)
    assert streamed is not None
    return FileEntry(sha256=streamed[0], size_bytes=streamed[1])


def _check_one(path: Path, rel: str, size: int, sha256: str) -> None:
    try:
        streamed = _stream_sha256(path, cap=size)
    except FileNotFoundError as exc:
        raise BundleError(f"file {rel} is missing", check="missing", path=rel) from exc
    if streamed is None:
        raise BundleError(f"file {rel} is longer than its declared {size} bytes",
                          check="size", path=rel)
    digest, seen = streamed
    if seen != size:
        raise BundleError(f"file {rel} has {seen} bytes, manifest says {size}", check="size",
                          path=rel)
    if digest != sha256:
        raise BundleError(f"file {rel} does not match its sha256", check="sha256", path=rel)
