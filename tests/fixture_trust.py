"""Keys, roots, bundles and commands built in memory for the trust tests (real Ed25519)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import nacl.signing

from agent.trust.manifest import (
    FileEntry,
    Histogram,
    InputReference,
    Manifest,
    OutputReference,
    Preprocessing,
    ReferenceStats,
    ResourceEstimate,
    SelfTest,
    TensorSpec,
    canonical_json,
)
from agent.trust.root import RoleKeys, Root
from agent.trust.signatures import SignatureFile, canonical
from agent.trust.verify import Device
from fleet.trust.keys import SigningKey, sign_envelope

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
FLEET = "test-fleet"
PROFILE = "raspberry-pi-4"
DEVICE = Device(profile=PROFILE, agent_version="0.1.0", committed={"digits": 2})


def _key(name: str, role: str) -> SigningKey:
    # Deterministic seeds keep failures reproducible; they are never used outside tests.
    seed = hashlib.sha256(name.encode()).digest()
    return SigningKey(name, role, nacl.signing.SigningKey(seed))


KEYS: dict[str, SigningKey] = {
    n: _key(n, n.rsplit("-", 1)[0])
    for n in ("root-1", "root-2", "root-3", "release-1", "release-2", "release-3",
              "command-1", "command-2", "root-4", "release-4")
}
OUTSIDER = _key("outsider-1", "release")


def root_signed(version: int = 1, *, expires: datetime = NOW + timedelta(days=365),
                roles: Mapping[str, tuple[list[str], int]] | None = None) -> dict[str, Any]:
    roles = roles or {"root": (["root-1", "root-2", "root-3"], 2),
                      "release": (["release-1", "release-2", "release-3"], 2),
                      "command": (["command-1", "command-2"], 1)}
    names = {n for ids, _ in roles.values() for n in ids}
    root = Root(fleet=FLEET, version=version, expires=expires,
                keys={KEYS[n].keyid: KEYS[n].public for n in names},
                roles={r: RoleKeys(keyids=[KEYS[n].keyid for n in ids], threshold=t)
                       for r, (ids, t) in roles.items()})  # type: ignore[misc]
    return root.model_dump(mode="json", by_alias=True)


def root_bytes(signers: Iterable[str] = ("root-1", "root-2"), **kw: Any) -> bytes:
    return sign_envelope(root_signed(**kw), [KEYS[n] for n in signers])


def root(**kw: Any) -> Root:
    return Root.model_validate(root_signed(**kw))


def reference(classes: int, samples: int = 4) -> ReferenceStats:
    """Plain reference statistics for test manifests (a two-bin input histogram and a
    uniform class distribution)."""
    hist = Histogram(bin_edges=[0.0, 0.5, 1.0], fractions=[0.5, 0.5])
    return ReferenceStats(samples=samples, input=InputReference(
        histogram=hist, mean=0.5, std=0.29, feature_mean=[0.5], feature_std=[0.29]),
        output=OutputReference(class_fractions=[1 / classes] * classes, confidence=hist))


def make_bundle(tmp_path: Path, *, version: int = 3, model: bytes = b"\x00model-bytes" * 100,
                expires: datetime = NOW + timedelta(days=30), profiles: list[str] | None = None,
                min_agent_version: str = "0.1.0", name: str = "bundle") -> Path:
    """A small unsigned bundle directory with a canonical manifest."""
    bundle = tmp_path / name
    bundle.mkdir()
    files = {"model.tflite": model, "selftest.npz": b"golden"}
    for fname, data in files.items():
        (bundle / fname).write_bytes(data)
    m = Manifest(
        name="digits", version=version, created=expires - timedelta(days=60),
        expires=expires, min_agent_version=min_agent_version,
        profiles=profiles or [PROFILE], runtime="tflite", model_file="model.tflite",
        files={n: FileEntry(sha256=hashlib.sha256(d).hexdigest(), size_bytes=len(d))
               for n, d in files.items()},
        inputs=[TensorSpec(name="x", dtype="int8", shape=[1, 4])],
        outputs=[TensorSpec(name="y", dtype="int8", shape=[1, 2])], labels=["a", "b"],
        preprocessing=Preprocessing(layout="NC"),
        reference=reference(classes=2),
        resources=ResourceEstimate(model_bytes=1, arena_bytes=1, peak_memory_bytes=2),
        selftest=SelfTest(atol=0.1, min_top1_agreement=0.9),
    )
    (bundle / "manifest.json").write_bytes(canonical_json(m))
    return bundle


def sign_dir(bundle: Path, signers: Iterable[str | SigningKey] = ("release-1", "release-2")
             ) -> None:
    """Write signatures.json directly (no policy checks: tests sign what they like)."""
    raw = (bundle / "manifest.json").read_bytes()
    keys = [KEYS[s] if isinstance(s, str) else s for s in signers]
    sigs = SignatureFile(signatures=[k.sign(raw) for k in keys])
    (bundle / "signatures.json").write_bytes(canonical(sigs.model_dump(by_alias=True)))


def signed_bundle(tmp_path: Path, **kw: Any) -> Path:
    bundle = make_bundle(tmp_path, **kw)
    sign_dir(bundle)
    return bundle
