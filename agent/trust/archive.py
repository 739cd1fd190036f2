"""Bundle archives: one compressed tar (zstd or gzip) that travels small, and the verified
unpacking the device does.

An archive holds `manifest.json` first, then `signatures.json` (when signed), then the
manifest's files. The tar stream is read by `agent.trust.tar.TarReader`, never by
`tarfile`: every header and extension header is capped, and so is what the stream may
expand to (the head alone until the manifest is verified, then the sizes it declares).
`unpack_bundle` streams it once: it reads the manifest and signatures,
runs the signature and policy checks before any model byte is read, then writes each file
into a fresh directory through its `trust.FileCheck`, stopping the moment a member runs
past its declared size. Only regular files with a listed name are accepted (no links,
devices, directories or duplicates), so nothing can land outside the directory.
On any rejection the directory is removed; the caller never sees a half-checked bundle.
"""

from __future__ import annotations

import gzip
import shutil
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from agent.durable import fsync, fsync_dir, write_synced
from agent.errors import BundleError
from agent.trust.manifest import MANIFEST_FILE, MAX_MANIFEST_BYTES, SIGNATURES_FILE
from agent.trust.root import Root
from agent.trust.signatures import MAX_SIGNATURES_BYTES
from agent.trust.tar import BLOCK, MAX_EXTENSION_BYTES, Member, TarReader
from agent.trust.verify import Device, FileCheck, Verified, check_file_set, verify_manifest

CHUNK_BYTES = 1 << 20
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


#: What the head (manifest, signatures and their headers) may expand to.
HEAD_BYTES = MAX_MANIFEST_BYTES + MAX_SIGNATURES_BYTES + 64 * 1024
#: Header blocks a member may need (pax header, its data, the ustar header).
MEMBER_OVERHEAD = BLOCK + MAX_EXTENSION_BYTES + BLOCK + BLOCK


def _decompression_errors() -> tuple[type[BaseException], ...]:
    errors: tuple[type[BaseException], ...] = (EOFError, zlib.error, gzip.BadGzipFile)
    try:
        import zstandard  # noqa: PLC0415  # optional on tiny devices: gzip still works
    except ImportError:
        return errors
    return (*errors, zstandard.ZstdError)


@contextmanager
def _archive_errors(path: Path) -> Iterator[None]:
    try:
        yield
    except _decompression_errors() as exc:
        raise BundleError(f"archive {path.name} is corrupt: {str(exc)[:200]}",
                          check="archive") from exc


def decompressed(fh: IO[bytes], path: Path) -> IO[bytes]:
    """A readable stream of the tar inside a zstd or gzip file (told apart by magic)."""
    magic = fh.read(4)
    fh.seek(0)
    if magic.startswith(GZIP_MAGIC):
        gz: IO[bytes] = gzip.GzipFile(fileobj=fh, mode="rb")  # type: ignore[assignment]
        return gz
    if magic == ZSTD_MAGIC:
        try:
            import zstandard  # noqa: PLC0415  # heavy or optional: loaded only when used
        except ImportError as exc:
            raise BundleError(f"{path.name} is zstd-compressed and the zstandard module is "
                              "not installed", check="archive") from exc
        reader: IO[bytes] = zstandard.ZstdDecompressor().stream_reader(fh)
        return reader
    raise BundleError(f"{path.name} is neither a zstd nor a gzip archive", check="archive",
                      magic=magic.hex())


def _read_small(member: Member, cap: int) -> bytes:
    if member.size > cap:
        raise BundleError(f"{member.name} in the archive is {member.size} bytes, more than "
                          f"{cap}", check="archive", path=member.name)
    return member.read(cap + 1)


def _write_member(member: Member, check: FileCheck, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("xb") as out:
        while chunk := member.read(min(CHUNK_BYTES, check.remaining + 1)):
            check.update(chunk)
            out.write(chunk)
        check.finish()
        out.flush()
        fsync(out.fileno())


def unpack_bundle(archive: Path, dest: Path, root: Root, *, device: Device, now: datetime,
                  new_roots: Iterable[bytes] = ()) -> Verified:
    """Verify a bundle archive while unpacking it into `dest` (which must not exist).

    Raises:
        RootError, SignatureError, BundleError: the first check that fails; `dest` is then
            removed.
    """
    dest.mkdir()
    try:
        with archive.open("rb") as fh, _archive_errors(archive):
            tar = TarReader(decompressed(fh, archive), max_total_bytes=HEAD_BYTES)
            return _unpack(tar, dest, root, device=device, now=now, new_roots=new_roots)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise


def _head(tar: TarReader) -> tuple[bytes, bytes | None, Member | None]:
    """manifest.json, signatures.json (or None) and the member after them."""
    first = next(tar, None)
    if first is None or first.name != MANIFEST_FILE:
        raise BundleError("an archive must start with manifest.json", check="archive")
    manifest_raw = _read_small(first, MAX_MANIFEST_BYTES)
    member = next(tar, None)
    if member is None or member.name != SIGNATURES_FILE:
        return manifest_raw, None, member
    signatures_raw = _read_small(member, MAX_SIGNATURES_BYTES)
    return manifest_raw, signatures_raw, next(tar, None)


def _unpack(tar: TarReader, dest: Path, root: Root, **verify: Any) -> Verified:
    manifest_raw, signatures_raw, member = _head(tar)
    verified = verify_manifest(root, manifest_raw, signatures_raw, **verify)
    files = verified.manifest.files
    # Signed now: the stream may expand to what the manifest declares, and no more.
    tar.max_total = tar.total + sum(f.size_bytes for f in files.values()) + (
        len(files) + 1) * MEMBER_OVERHEAD
    seen: list[str] = []
    while member is not None:
        name = member.name
        if name not in files:
            raise BundleError(f"file {name} is not listed in the manifest", check="unlisted",
                              path=name)
        if name in seen:
            raise BundleError(f"file {name} appears twice in the archive", check="archive",
                              path=name)
        _write_member(member, FileCheck(name, files[name]), dest / name)
        seen.append(name)
        member = next(tar, None)
    check_file_set(verified.manifest, seen)
    for raw, name in ((manifest_raw, MANIFEST_FILE), (signatures_raw, SIGNATURES_FILE)):
        if raw is not None:  # fsynced like the members: a power cut found them empty
            write_synced(dest / name, raw)
    fsync_dir(dest)
    return verified


def read_archive_head(archive: Path) -> tuple[bytes, bytes | None]:
    """The raw `manifest.json` and `signatures.json` (None if unsigned) at the head of an
    archive, without reading the rest. Nothing is verified here.

    Raises:
        BundleError: check "archive" when the archive is corrupt or misordered.
    """
    with archive.open("rb") as fh, _archive_errors(archive):
        tar = TarReader(decompressed(fh, archive), max_total_bytes=HEAD_BYTES)
        manifest_raw, signatures_raw, _ = _head(tar)
        return manifest_raw, signatures_raw
