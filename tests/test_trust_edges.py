"""The trust and update cores at their edges, each test written to kill a change a mutation
run showed its neighbours let through (issue 26, item 5): thresholds and fleets of roots,
the root validators, strict JSON's duplicate keys and size cap, canonical JSON's exact
bytes, the manifest's size cap, expiry at the instant itself, the terminal states written
out, and the tar reader's pax, GNU long-name and base-256 headers, valid and not."""

from __future__ import annotations

import io
import json
import re
import tarfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fixture_trust import DEVICE, KEYS, NOW, root, root_bytes, root_signed

from agent.errors import BundleError, RejectedError, RootError, SignatureError
from agent.trust.manifest import MAX_MANIFEST_BYTES
from agent.trust.root import check_root_fresh, load_pinned_root, parse_root, update_root
from agent.trust.signatures import canonical, strict_json
from agent.trust.tar import MAX_EXTENSION_BYTES, TarReader
from agent.trust.verify import check_policy, verify_manifest
from agent.updates import deploy, lifecycle
from fleet.trust.keys import sign_envelope

# -- roots ----------------------------------------------------------------------------------


def test_a_pinned_root_needs_its_own_root_threshold() -> None:
    """Threshold 2 of the root keys: one signature is refused, two are taken."""
    with pytest.raises(SignatureError) as exc:
        load_pinned_root(root_bytes(signers=("root-1",)))
    assert exc.value.check == "threshold"
    assert load_pinned_root(root_bytes(signers=("root-1", "root-3"))).version == 1


def test_a_root_of_another_fleet_is_refused_however_well_signed() -> None:
    other = root_signed(version=2)
    other["fleet"] = "another-fleet"
    raw = sign_envelope(other, [KEYS["root-1"], KEYS["root-2"]])
    with pytest.raises(RootError) as exc:
        update_root(root(), raw)
    assert exc.value.check == "fleet"
    same = sign_envelope(root_signed(version=2), [KEYS["root-1"], KEYS["root-2"]])
    assert update_root(root(), same).version == 2


def _with(change: Any) -> bytes:
    signed = root_signed()
    change(signed)
    return sign_envelope(signed, [KEYS["root-1"], KEYS["root-2"]])


def _swap_key(s: dict[str, Any]) -> None:
    a, b = KEYS["root-1"].keyid, KEYS["root-2"].keyid
    s["keys"][a], s["keys"][b] = s["keys"][b], s["keys"][a]


def _unknown_key_in_a_role(s: dict[str, Any]) -> None:
    s["roles"]["command"]["keyids"].append("ab" * 32)


def _duplicate_key_ids(s: dict[str, Any]) -> None:
    ids = s["roles"]["release"]["keyids"]
    ids.append(ids[0])


def _threshold_above_keys(s: dict[str, Any]) -> None:
    s["roles"]["command"]["threshold"] = 3  # of 2 keys


def _role_missing(s: dict[str, Any]) -> None:
    del s["roles"]["command"]


@pytest.mark.parametrize(("change", "message"), [
    (_swap_key, "does not match its public key"),
    (_unknown_key_in_a_role, "names unknown key"),
    (_duplicate_key_ids, "keyids must be unique"),
    (_threshold_above_keys, "threshold 3 exceeds 2 keys"),
    (_role_missing, "roles missing: command"),
])
def test_every_root_validator_refuses_its_case(change: Any, message: str) -> None:
    with pytest.raises(RootError, match=message) as exc:
        parse_root(_with(change))
    assert exc.value.check == "format"


def test_a_root_expires_at_its_expiry_instant_not_after() -> None:
    r = root(expires=NOW)
    with pytest.raises(RootError) as exc:
        check_root_fresh(r, NOW)
    assert exc.value.check == "expired"
    check_root_fresh(r, NOW - timedelta(microseconds=1))


def test_a_root_past_its_size_cap_is_refused_at_the_byte() -> None:
    from agent.trust.root import MAX_ROOT_BYTES

    assert MAX_ROOT_BYTES == 262_144
    with pytest.raises(RootError, match=r"root\.json is 262145 bytes, more than the 262144 "
                                        r"allowed") as exc:
        parse_root(b" " * (MAX_ROOT_BYTES + 1))
    assert exc.value.check == "format"
    with pytest.raises(RootError, match="not strict UTF-8 JSON"):  # at the cap: parsed
        parse_root(b" " * MAX_ROOT_BYTES)


def test_root_messages_name_a_key_by_its_first_twelve_hex_digits() -> None:
    with pytest.raises(RootError) as exc:
        parse_root(_with(_swap_key))
    named = re.search(r"key id ([0-9a-f]+)… does not match its public key", str(exc.value))
    assert named is not None and named.group(1) in {KEYS["root-1"].keyid[:12],
                                                    KEYS["root-2"].keyid[:12]}, exc.value
    with pytest.raises(RootError, match="role command names unknown key abababababab…"):
        parse_root(_with(_unknown_key_in_a_role))


def test_trust_records_are_frozen_and_built_by_field_name_or_wire_name() -> None:
    """A parsed root, its roles, keys and signature files cannot be changed after the
    checks; the fleet's tools build them by field name (`schema_version`), the wire says
    `schema`."""
    from pydantic import ValidationError

    from agent.trust.root import Root
    from agent.trust.signatures import Signature, SignatureFile

    r = root()
    for obj, field, value in ((r, "version", 9), (r.roles["root"], "threshold", 1),
                              (next(iter(r.keys.values())), "public", "00" * 32)):
        with pytest.raises(ValidationError, match="frozen"):
            setattr(obj, field, value)
    by_name = Root(schema_version=1, **{k: v for k, v in root_signed().items()
                                        if k != "schema"})
    assert by_name == r and by_name.model_dump(by_alias=True)["schema"] == 1
    sig = Signature(keyid="ab" * 32, sig="cd" * 64)
    assert SignatureFile(schema_version=1, signatures=[sig]).signatures == [sig]


# -- strict and canonical JSON --------------------------------------------------------------


def test_strict_json_refuses_a_duplicate_key_at_any_depth() -> None:
    for raw in (b'{"a": 1, "a": 2}', b'{"x": {"k": 1, "k": 1}}', b'[{"b": 0, "b": 0}]'):
        with pytest.raises(RejectedError, match="duplicate key") as exc:
            strict_json(raw, what="m", max_bytes=100, error=RejectedError, check="format")
        assert exc.value.check == "format"
    assert strict_json(b'{"a": 1, "b": {"a": 2}}', what="m", max_bytes=100,
                       error=RejectedError, check="format") == {"a": 1, "b": {"a": 2}}


def test_strict_json_takes_exactly_its_cap_and_refuses_one_byte_more() -> None:
    raw = b'{"a": "' + b"x" * 91 + b'"}'
    assert len(raw) == 100
    assert strict_json(raw, what="m", max_bytes=100, error=RejectedError, check="c")
    with pytest.raises(RejectedError, match="101 bytes, more than the 100 allowed"):
        strict_json(raw + b" ", what="m", max_bytes=100, error=RejectedError, check="c")


def test_signature_files_hold_at_most_64_signatures_and_64_kib() -> None:
    from agent.trust.signatures import (
        MAX_SIGNATURES,
        MAX_SIGNATURES_BYTES,
        parse_signature_file,
    )

    assert (MAX_SIGNATURES, MAX_SIGNATURES_BYTES) == (64, 65_536)

    def file(n: int) -> bytes:
        return json.dumps({"schema": 1, "signatures": [
            {"keyid": f"{i:064x}", "sig": "cd" * 64} for i in range(n)]}).encode()

    assert len(parse_signature_file(file(64)).signatures) == 64
    with pytest.raises(SignatureError, match="at most 64 items") as exc:
        parse_signature_file(file(65))
    assert exc.value.check == "signatures"
    with pytest.raises(SignatureError, match="65537 bytes, more than the 65536 allowed"):
        parse_signature_file(b" " * (MAX_SIGNATURES_BYTES + 1))
    with pytest.raises(SignatureError, match="not strict UTF-8 JSON"):  # at the cap: parsed
        parse_signature_file(b" " * MAX_SIGNATURES_BYTES)


def test_strict_json_messages_say_where_and_what() -> None:
    """A wrong top level is `<root>`; an out-of-range number is quoted to 40 characters;
    a lone surrogate (no UTF-8 form) is named, not a crash."""
    from agent.trust.signatures import parse_envelope, parse_signature_file

    with pytest.raises(SignatureError, match=r"signatures\.json invalid at <root>: "):
        parse_signature_file(b"[]")
    number = "1" + "0" * 44 + "e400"
    with pytest.raises(RejectedError) as exc:
        strict_json(f"[{number}]".encode(), what="m", max_bytes=100, error=RejectedError,
                    check="c")
    assert str(exc.value) == f"m is not strict UTF-8 JSON: number {number[:40]} is out of range"
    with pytest.raises(RootError, match=r"root\.json holds a lone UTF-16 surrogate") as err:
        parse_envelope(b'{"signed": {"a": "\\ud800"}, "signatures": []}', what="root.json",
                       max_bytes=1000, error=RootError)
    assert err.value.check == "format"


def test_canonical_json_is_these_exact_bytes() -> None:
    """Signer and verifier share `canonical`: only a fixed vector catches a change to
    both (key order, separators, UTF-8 rather than \\u escapes, no NaN)."""
    data = {"z": [1, 2.5, None, True, False], "a": "é ☃", "m": {"y": "x", "b": {}}}
    assert canonical(data) == (b'{"a":"\xc3\xa9 \xe2\x98\x83","m":{"b":{},"y":"x"},'
                               b'"z":[1,2.5,null,true,false]}')
    with pytest.raises(ValueError):
        canonical({"n": float("nan")})


# -- installed bundles and their files -------------------------------------------------------


def test_an_installed_bundle_is_rechecked_by_its_release_signatures(tmp_path: Path) -> None:
    """At start a bundle on disk gives back its manifest when the release role's threshold
    of signatures holds, and none without them."""
    from fixture_trust import sign_dir, signed_bundle

    from agent.trust.verify import verify_installed

    b = signed_bundle(tmp_path)
    raw, sigs = (b / "manifest.json").read_bytes(), (b / "signatures.json").read_bytes()
    m = verify_installed(root(), raw, sigs)
    assert (m.name, m.version) == ("digits", 3)
    with pytest.raises(SignatureError) as exc:
        verify_installed(root(), raw, None)
    assert exc.value.check == "unsigned"
    sign_dir(b, ("release-1",))  # one of the two the role needs
    with pytest.raises(SignatureError, match="threshold"):
        verify_installed(root(), raw, (b / "signatures.json").read_bytes())


def test_the_files_present_are_exactly_the_listed_ones(tmp_path: Path) -> None:
    from fixture_trust import signed_bundle

    from agent.trust.manifest import parse_manifest
    from agent.trust.verify import check_file_set

    m = parse_manifest((signed_bundle(tmp_path) / "manifest.json").read_bytes())
    listed = ["manifest.json", "signatures.json", "model.tflite", "selftest.npz"]
    check_file_set(m, listed)
    with pytest.raises(BundleError) as exc:
        check_file_set(m, [f for f in listed if f != "selftest.npz"])
    assert (exc.value.check, exc.value.path) == ("missing", "selftest.npz")
    with pytest.raises(BundleError) as exc:
        check_file_set(m, [*listed, "extra.bin"])
    assert (exc.value.check, exc.value.path) == ("unlisted", "extra.bin")


# -- manifests ------------------------------------------------------------------------------


def test_a_manifest_past_its_size_cap_is_refused_before_its_signatures() -> None:
    big = b" " * (MAX_MANIFEST_BYTES + 1)
    with pytest.raises(BundleError) as exc:
        verify_manifest(root(), big, None, device=DEVICE, now=NOW)
    assert exc.value.check == "manifest"
    at_cap = b" " * MAX_MANIFEST_BYTES  # not refused for its size: for its signatures
    with pytest.raises(SignatureError):
        verify_manifest(root(), at_cap, None, device=DEVICE, now=NOW)


def test_a_manifest_expires_at_its_expiry_instant_not_after(tmp_path: Path) -> None:
    from fixture_trust import make_bundle

    from agent.trust.manifest import parse_manifest

    bundle = make_bundle(tmp_path, expires=NOW)
    m = parse_manifest((bundle / "manifest.json").read_bytes())
    with pytest.raises(BundleError) as exc:
        check_policy(m, device=DEVICE, now=NOW)
    assert exc.value.check == "expired"
    check_policy(m, device=DEVICE, now=NOW - timedelta(microseconds=1))


# -- terminal states, written out -----------------------------------------------------------


def test_the_lifecycles_terminal_states_are_these() -> None:
    S = lifecycle.State  # the enum, shorter
    assert {S.COMMITTED, S.FAILED, S.ROLLED_BACK} == lifecycle.TERMINAL


@pytest.mark.parametrize(("phase", "final"), [
    ("start", False), ("downloading", False), ("installing", False), ("watching", False),
    ("committed", True), ("rolled_back", True), ("failed", True), ("cancelled", True),
    ("already", True)])
def test_a_deploy_is_over_in_exactly_these_phases(phase: str, final: bool) -> None:
    flow = deploy.Flow(phase=deploy.Phase(phase))
    assert flow.final is final
    if final:  # a cancel that comes too late changes nothing, and is not kept
        assert deploy.advance(flow, deploy.Step.CANCEL) == flow


# -- the tar reader -------------------------------------------------------------------------


def _tar(fmt: int, members: dict[str, bytes], **pax: str) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt, pax_headers=pax or None) as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _read(raw: bytes) -> dict[str, bytes]:
    return {m.name: m.read() for m in TarReader(io.BytesIO(raw), max_total_bytes=1 << 24)}


def test_a_valid_pax_header_names_and_sizes_the_member() -> None:
    long = "d/" + "n" * 300 + ".bin"  # too long for ustar: tarfile writes a pax path
    raw = _tar(tarfile.PAX_FORMAT, {long: b"payload", "short.txt": b"s"})
    assert _read(raw) == {long: b"payload", "short.txt": b"s"}


def test_a_global_pax_header_is_skipped() -> None:
    raw = _tar(tarfile.PAX_FORMAT, {"a.txt": b"A"}, comment="made by a test")
    assert _read(raw) == {"a.txt": b"A"}


def test_a_gnu_long_name_names_the_member() -> None:
    long = "g/" + "x" * 200 + ".bin"
    raw = _tar(tarfile.GNU_FORMAT, {long: b"gnu"})
    assert _read(raw) == {long: b"gnu"}


def _header(name: bytes, size_field: bytes, kind: bytes = b"0") -> bytes:
    h = bytearray(512)
    h[0:len(name)] = name
    h[100:108] = b"0000644\x00"
    h[124:136] = size_field
    h[156:157] = kind
    h[257:263] = b"ustar\x00"
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\x00 " % sum(h)
    return bytes(h)


def test_a_base_256_size_is_read() -> None:
    size = (5).to_bytes(11, "big")
    raw = _header(b"b256.bin", b"\x80" + size) + b"12345".ljust(512, b"\x00") + bytes(1024)
    assert _read(raw) == {"b256.bin": b"12345"}
    huge = ((1 << 80) + 5).to_bytes(11, "big")  # every byte of the field counts
    member = next(TarReader(io.BytesIO(_header(b"huge.bin", b"\x80" + huge)),
                            max_total_bytes=1 << 24))
    assert member.size == (1 << 80) + 5
    with pytest.raises(BundleError, match="out of range"):  # negative base-256
        _read(_header(b"neg.bin", b"\xff" + size) + bytes(1024))


def _pax_member(records: bytes, name: bytes = b"m.bin", data: bytes = b"DATA") -> bytes:
    return (_header(b"PaxHeader", b"%011o\x00" % len(records), b"x")
            + records.ljust(-(-len(records) // 512) * 512, b"\x00")
            + _header(name, b"%011o\x00" % len(data)) + data.ljust(512, b"\x00")
            + bytes(1024))


def test_a_handmade_pax_record_overrides_path_and_size() -> None:
    records = b"16 path=pax.bin\n" + b"10 size=2\n"
    assert _read(_pax_member(records)) == {"pax.bin": b"DA"}


@pytest.mark.parametrize(("records", "message"), [
    (b"x path=a\n", "malformed pax record"),  # no length
    (b"99 path=a\n", "malformed pax record length"),  # past the data
    (b"3 a\n", "malformed pax record length"),  # too short to hold itself
    (b"3 \n", "malformed pax record length"),  # a newline and nothing else
    (b"10 patha.b\n", "pax record length"),  # its length points off the newline
    (b"9 path.a\n", "without '='"),
    (b"11 path=\xff\xfe\n", "not UTF-8"),
    (b"10 size=x\n", "pax size is not a number"),
])
def test_a_small_malformed_pax_record_is_refused(records: bytes, message: str) -> None:
    with pytest.raises(BundleError, match=message) as exc:
        _read(_pax_member(records))
    assert exc.value.check == "archive"


def test_a_pax_header_at_its_cap_is_read_and_one_byte_more_refused() -> None:
    pad = MAX_EXTENSION_BYTES - len(b"16 path=pax.bin\n")
    filler = b"%d c=" % pad
    filler += b"x" * (pad - len(filler) - 1) + b"\n"
    assert len(filler) == pad and filler.startswith(b"%d " % pad)
    assert _read(_pax_member(filler + b"16 path=pax.bin\n")) == {"pax.bin": b"DATA"}
    with pytest.raises(BundleError, match=r"pax header of 8193 bytes \(at most 8192\)"):
        _read(_pax_member(filler + b"17 path=pax.bin2\n"))


def test_a_threshold_equal_to_its_key_count_and_a_role_of_one_key_are_valid() -> None:
    """The validators' edges from the other side: all of a role's keys may be required,
    and one key is a role (the mutation run's survivors `>` → `>=` and `min_length` 2)."""
    def all_and_one(s: dict[str, Any]) -> None:
        s["roles"]["release"]["threshold"] = len(s["roles"]["release"]["keyids"])
        s["roles"]["command"]["keyids"] = s["roles"]["command"]["keyids"][:1]
        s["roles"]["command"]["threshold"] = 1

    parsed, _, _ = parse_root(_with(all_and_one))
    assert parsed.roles["release"].threshold == 3 and len(parsed.roles["command"].keyids) == 1


@pytest.mark.parametrize("where", ["root", "role"])
def test_a_root_with_a_field_it_does_not_define_is_refused(where: str) -> None:
    """An unknown field is refused, not ignored: a signer and a verifier that disagree on
    what a root says must not both accept it."""
    def extra(s: dict[str, Any]) -> None:
        (s if where == "root" else s["roles"]["root"])["delegations"] = {}

    with pytest.raises(RootError, match=r"[Ee]xtra") as exc:
        parse_root(_with(extra))
    assert exc.value.check == "format"
