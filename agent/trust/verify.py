"""The bundle verifier: bytes and a reference time in, a verified manifest or one rejection.

In the manner of python-tuf's `TrustedMetadataSet`, nothing here touches the network, the
disk or the clock; `agent.trust.bundle` and `agent.trust.archive` feed it bytes. The
checks run in this order, and each names the TUF/Uptane attack it stops:

1. root chain: new roots walked from the pinned one, each signed by old and new root
   thresholds, version N+1; the final root unexpired (`agent.trust.root`)      - key compromise
2. `signatures.json`: a threshold of distinct `release` keys over the exact manifest
   bytes                                                 - arbitrary install, revoked keys
3. the manifest parses and validates (only once its signature holds)
4. version strictly above the committed one for that model name       - rollback
5. not expired                                                           - freeze
6. built for this device's firmware profile, and for this agent version or older
7. the set of files present equals the set listed                     - extra/missing file
8. each file streamed against its declared size and sha256, refused the moment it
   passes its declared size                           - mix-and-match, endless data

A version far in the future (fast-forward) passes only when signed: step 2 covers it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from agent.errors import BundleError
from agent.trust.manifest import (
    MANIFEST_FILE,
    MAX_MANIFEST_BYTES,
    SIGNATURES_FILE,
    FileEntry,
    Manifest,
    parse_manifest,
)
from agent.trust.root import Root, update_root_chain
from agent.trust.signatures import parse_signature_file, verify_threshold


@dataclass(frozen=True, kw_only=True)
class Device:
    """What a bundle is checked against on one device.

    Attributes:
        profile: the device's firmware profile name.
        agent_version: this agent's version, "X.Y.Z".
        committed: committed version per model name (absent: nothing installed yet).
    """

    profile: str
    agent_version: str
    committed: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Verified:
    """A manifest whose signatures and policy checks passed (files still to stream)."""

    manifest: Manifest
    root: Root
    signers: frozenset[str]
    manifest_sha256: str


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split("."))


def verify_manifest(root: Root, manifest_raw: bytes, signatures_raw: bytes | None, *,
                    device: Device, now: datetime, new_roots: Iterable[bytes] = ()) -> Verified:
    """Steps 1-6: the root chain, release signatures, then the manifest's policy checks.

    Args:
        root: the trusted (pinned or last accepted) root.
        manifest_raw: `manifest.json` exactly as received.
        signatures_raw: `signatures.json` as received; None when there is none.
        device: profile, agent version and committed versions to check against.
        now: the reference time for every expiry.
        new_roots: root.json versions N+1, N+2, ... to accept first, in order.

    Raises:
        RootError, SignatureError, BundleError: the first check that fails.
    """
    root = update_root_chain(root, new_roots, now)
    if len(manifest_raw) > MAX_MANIFEST_BYTES:  # before hashing it for signatures
        raise BundleError(f"manifest is {len(manifest_raw)} bytes, more than "
                          f"{MAX_MANIFEST_BYTES}", check="manifest",
                          size_bytes=len(manifest_raw))
    sigs = [] if signatures_raw is None else parse_signature_file(signatures_raw).signatures
    signers = verify_threshold(manifest_raw, sigs, role=root.role("release"),
                               keys=root.keys, what="manifest")
    m = parse_manifest(manifest_raw)
    check_policy(m, device=device, now=now)
    return Verified(m, root, signers, hashlib.sha256(manifest_raw).hexdigest())


def check_policy(m: Manifest, *, device: Device, now: datetime) -> None:
    """Steps 4-6 on an already signature-checked manifest.

    Raises:
        BundleError: check "rollback", "equal_version", "expired", "profile" or
            "agent_version".
    """
    committed = device.committed.get(m.name)
    if committed is not None and m.version <= committed:
        check = "rollback" if m.version < committed else "equal_version"
        raise BundleError(f"{m.name} v{m.version} is not above the committed v{committed}",
                          check=check, version=m.version, committed=committed)
    if now >= m.expires:
        raise BundleError(f"{m.name} v{m.version} expired at {m.expires.isoformat()}",
                          check="expired", expires=m.expires.isoformat(),
                          now=now.isoformat())
    if device.profile not in m.profiles:
        raise BundleError(f"{m.name} v{m.version} is built for {', '.join(m.profiles)}, "
                          f"not {device.profile}", check="profile",
                          profiles=m.profiles, device_profile=device.profile)
    if _version_tuple(device.agent_version) < _version_tuple(m.min_agent_version):
        raise BundleError(f"{m.name} v{m.version} needs agent {m.min_agent_version} or "
                          f"newer, this is {device.agent_version}", check="agent_version",
                          min_agent_version=m.min_agent_version,
                          agent_version=device.agent_version)


def check_file_set(m: Manifest, present: Iterable[str]) -> None:
    """Step 7: the files present (relative POSIX paths) are exactly the listed ones.

    Raises:
        BundleError: check "unlisted" or "missing".
    """
    names = set(present) - {MANIFEST_FILE, SIGNATURES_FILE}
    for rel in sorted(names - set(m.files)):
        raise BundleError(f"file {rel} is not listed in the manifest", check="unlisted",
                          path=rel)
    for rel in sorted(set(m.files) - names):
        raise BundleError(f"file {rel} is missing", check="missing", path=rel)


class FileCheck:
    """Step 8 for one file: feed chunks as they arrive, then `finish()`.

    `update` refuses the chunk that carries the file past its declared size, so a reader
    can stop there (endless data) without buffering anything.
    """

    def __init__(self, rel: str, entry: FileEntry) -> None:
        self.rel = rel
        self.entry = entry
        self.seen = 0
        self._hash = hashlib.sha256()

    @property
    def remaining(self) -> int:
        return self.entry.size_bytes - self.seen

    def update(self, chunk: bytes | memoryview) -> None:
        """Raises BundleError check "size" once more bytes arrive than declared."""
        self.seen += len(chunk)
        if self.seen > self.entry.size_bytes:
            raise BundleError(f"file {self.rel} is longer than its declared "
                              f"{self.entry.size_bytes} bytes", check="size", path=self.rel,
                              declared=self.entry.size_bytes, seen_at_least=self.seen)
        self._hash.update(chunk)

    def finish(self) -> None:
        """Raises BundleError check "truncated" or "sha256"."""
        if self.seen != self.entry.size_bytes:
            raise BundleError(f"file {self.rel} has {self.seen} bytes, manifest says "
                              f"{self.entry.size_bytes}", check="truncated", path=self.rel,
                              declared=self.entry.size_bytes, seen=self.seen)
        if self._hash.hexdigest() != self.entry.sha256:
            raise BundleError(f"file {self.rel} does not match its sha256", check="sha256",
                              path=self.rel, declared=self.entry.sha256,
                              got=self._hash.hexdigest())


def verify_installed(root: Root, manifest_raw: bytes, signatures_raw: bytes | None) -> Manifest:
    """Re-check a bundle already installed on this device (at start): release signatures
    and a valid manifest. Version, expiry and compatibility were checked at install time
    and are deliberately not re-checked, so an expired release keeps serving until a new
    one arrives rather than leaving the device with nothing.

    Raises:
        SignatureError, BundleError.
    """
    sigs = [] if signatures_raw is None else parse_signature_file(signatures_raw).signatures
    verify_threshold(manifest_raw, sigs, role=root.role("release"), keys=root.keys,
                     what="installed manifest")
    return parse_manifest(manifest_raw)
