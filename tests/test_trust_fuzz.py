"""Untrusted bytes either verify or raise the one rejection error (`RejectedError`), never
anything else; and no single flipped bit anywhere in a signed bundle goes unnoticed."""

from __future__ import annotations

import contextlib
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fixture_trust import DEVICE, FLEET, KEYS, NOW, root, root_bytes, signed_bundle
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.errors import RejectedError
from agent.trust.command import Addressee, verify_command
from agent.trust.root import parse_root, update_root
from agent.trust.signatures import parse_signature_file
from agent.trust.verify import FileCheck, check_file_set, verify_manifest
from fleet.trust.commands import build_command, sign_command
from fleet.trust.keys import sign_envelope

ME = Addressee(fleet=FLEET, device="pi-0007", groups=frozenset({"lab"}))


def verify_files(files: dict[str, bytes]) -> None:
    """The whole bundle check on in-memory bytes: the same steps `verify_bundle_dir` runs."""
    v = verify_manifest(root(), files["manifest.json"], files.get("signatures.json"),
                        device=DEVICE, now=NOW)
    check_file_set(v.manifest, files)
    for rel, entry in v.manifest.files.items():
        check = FileCheck(rel, entry)
        check.update(files[rel])
        check.finish()


@pytest.fixture(scope="module")
def bundle_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    bundle = signed_bundle(tmp_path_factory.mktemp("flip"))  # exactly the threshold: 2 of 2
    files = {p.name: p.read_bytes() for p in bundle.iterdir()}
    verify_files(files)
    return files


@pytest.mark.parametrize("name", ["manifest.json", "signatures.json", "model.tflite",
                                  "selftest.npz"])
def test_every_single_bit_flip_is_rejected(bundle_files: dict[str, bytes], name: str) -> None:
    """Flip bit 0, bit 5 (ASCII case: 'a' <-> 'A' in hex) and bit 7 of every byte."""
    original = bundle_files[name]
    tried = rejected = 0
    for i in range(len(original)):
        for mask in (0x01, 0x20, 0x80):
            flipped = bytearray(original)
            flipped[i] ^= mask
            tried += 1
            try:
                verify_files({**bundle_files, name: bytes(flipped)})
            except RejectedError:
                rejected += 1
    assert tried == 3 * len(original) > 0
    assert rejected == tried, f"{tried - rejected} of {tried} flips in {name} were accepted"


def _quiet(**kw: Any) -> Any:
    return settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
                    **kw)


@_quiet(max_examples=300)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_as_any_signed_object(raw: bytes) -> None:
    for parse in (parse_signature_file, parse_root,
                  lambda b: verify_command(root(), b, me=ME, now=NOW, seen=set()),
                  lambda b: verify_manifest(root(), b, b, device=DEVICE, now=NOW),
                  lambda b: update_root(root(), b)):
        with contextlib.suppress(RejectedError):
            parse(raw)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
    max_leaves=8)


def _mutate(data: Any, draw: Any) -> Any:
    """Replace one field somewhere in a JSON object with arbitrary JSON (or delete it)."""
    if not isinstance(data, dict) or not data:
        return draw(_json)
    key = draw(st.sampled_from(sorted(data)))
    out = dict(data)
    action = draw(st.sampled_from(["replace", "delete", "recurse"]))
    if action == "delete":
        del out[key]
    elif action == "recurse":
        out[key] = _mutate(out[key], draw)
    else:
        out[key] = draw(_json)
    return out


@_quiet(max_examples=300)
@given(st.data())
def test_validly_signed_but_mutated_commands(data: st.DataObject) -> None:
    """Signatures hold (re-signed after mutation), so the command model itself is fuzzed."""
    fields = {"model": "digits", "version": 4, "manifest_sha256": "a" * 64,
              "archive": {"urls": ["https://a/b.tar.zst"], "size_bytes": 9, "sha256": "b" * 64}}
    kind = data.draw(st.sampled_from(["deploy", "restart"]))
    cmd = build_command(kind, fleet=FLEET, device="pi-0007", now=NOW,
                        **(fields if kind == "deploy" else {}))
    signed = json.loads(sign_command(cmd, [KEYS["command-1"]]))["signed"]
    raw = sign_envelope(_mutate(signed, data.draw), [KEYS["command-1"]])
    with contextlib.suppress(RejectedError):
        verify_command(root(), raw, me=ME, now=NOW + timedelta(seconds=1), seen=set())


@_quiet(max_examples=200)
@given(st.data())
def test_validly_signed_but_mutated_roots(data: st.DataObject) -> None:
    signed = json.loads(root_bytes(version=2))["signed"]
    raw = sign_envelope(_mutate(signed, data.draw), [KEYS["root-1"], KEYS["root-2"]])
    with contextlib.suppress(RejectedError):
        update_root(root(), raw)


@_quiet(max_examples=200)
@given(st.data())
def test_mutated_signature_files(data: st.DataObject) -> None:
    sigs = {"schema": 1, "signatures": [KEYS["release-1"].sign(b"m").model_dump()]}
    with contextlib.suppress(RejectedError):
        parse_signature_file(json.dumps(_mutate(sigs, data.draw)).encode())


def test_deeply_nested_json_is_a_rejection_not_a_crash(tmp_path: Path) -> None:
    raw = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(RejectedError):
        verify_command(root(), raw, me=ME, now=NOW, seen=set())


@pytest.mark.parametrize("number", [b"1e400", b"-1e400", b"NaN", b"Infinity"])
def test_non_finite_numbers_are_a_rejection_not_a_crash(number: bytes) -> None:
    raw = b'{"signed":{"x":' + number + b'},"signatures":[]}'
    with pytest.raises(RejectedError, match="JSON"):
        verify_command(root(), raw, me=ME, now=NOW, seen=set())
