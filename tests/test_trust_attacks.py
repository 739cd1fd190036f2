"""One named test per attack of TUF's and Uptane's list: each must be rejected, by the check
named, with the values involved. Real Ed25519 keys; bundles on disk are read by the same
`verify_bundle_dir` the device and `edge-fleet verify` use."""

from __future__ import annotations

import itertools
import json
from datetime import timedelta
from pathlib import Path

import pytest
from fixture_trust import (
    DEVICE,
    KEYS,
    NOW,
    OUTSIDER,
    PROFILE,
    make_bundle,
    root,
    root_bytes,
    sign_dir,
    signed_bundle,
)

from agent.errors import BundleError, RejectedError, RootError, SignatureError
from agent.trust.bundle import verify_bundle_dir
from agent.trust.manifest import FileEntry
from agent.trust.root import load_pinned_root, update_root, update_root_chain
from agent.trust.verify import Device, FileCheck


def verify(bundle: Path, **kw):  # type: ignore[no-untyped-def]
    kw.setdefault("device", DEVICE)
    kw.setdefault("now", NOW)
    return verify_bundle_dir(bundle, kw.pop("trusted", root()), **kw)


def rejected(exc_type: type[RejectedError], check: str, bundle: Path, **kw) -> RejectedError:  # type: ignore[no-untyped-def]
    with pytest.raises(exc_type) as err:
        verify(bundle, **kw)
    assert err.value.check == check, err.value
    return err.value


def test_a_properly_signed_bundle_verifies(tmp_path: Path) -> None:
    v = verify(signed_bundle(tmp_path))
    assert v.manifest.version == 3
    assert v.signers == {KEYS["release-1"].keyid, KEYS["release-2"].keyid}


# -- arbitrary installation -------------------------------------------------------------

def test_arbitrary_install_unsigned_bundle(tmp_path: Path) -> None:
    err = rejected(SignatureError, "unsigned", make_bundle(tmp_path))
    assert err.details["threshold"] == 2


def test_arbitrary_install_empty_signature_list(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path)
    sign_dir(bundle, [])
    rejected(SignatureError, "unsigned", bundle)


def test_arbitrary_install_signed_by_unknown_keys(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path)
    sign_dir(bundle, [OUTSIDER, "release-1"])
    err = rejected(SignatureError, "threshold", bundle)
    assert err.details["unknown"] == [OUTSIDER.keyid]
    assert err.details["valid"] == [KEYS["release-1"].keyid]


def test_arbitrary_install_signed_by_keys_of_the_wrong_role(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path)
    sign_dir(bundle, ["command-1", "root-1", "root-2"])
    err = rejected(SignatureError, "threshold", bundle)
    assert len(err.details["other_role"]) == 3
    assert err.details["valid"] == []


def test_arbitrary_install_signature_by_the_right_key_over_other_bytes(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path)
    other = b'{"name":"evil"}'
    sigs = [{"keyid": KEYS[k].keyid, "sig": KEYS[k].sign(other).sig}
            for k in ("release-1", "release-2")]
    (bundle / "signatures.json").write_text(json.dumps({"schema": 1, "signatures": sigs}))
    err = rejected(SignatureError, "threshold", bundle)
    assert len(err.details["bad"]) == 2


def test_under_threshold_one_of_two_release_signatures(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path)
    sign_dir(bundle, ["release-3"])
    err = rejected(SignatureError, "threshold", bundle)
    assert (len(err.details["valid"]), err.details["threshold"]) == (1, 2)


def test_under_threshold_the_same_key_twice_counts_once(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path)
    sign_dir(bundle, ["release-1", "release-1"])
    err = rejected(SignatureError, "threshold", bundle)
    assert err.details["valid"] == [KEYS["release-1"].keyid]


# -- rollback, freeze, fast-forward -----------------------------------------------------

def test_rollback_to_a_lower_version(tmp_path: Path) -> None:
    err = rejected(BundleError, "rollback", signed_bundle(tmp_path, version=1))
    assert (err.details["version"], err.details["committed"]) == (1, 2)


def test_rollback_equal_version_is_not_an_update(tmp_path: Path) -> None:
    rejected(BundleError, "equal_version", signed_bundle(tmp_path, version=2))


def test_freeze_expired_manifest(tmp_path: Path) -> None:
    bundle = signed_bundle(tmp_path, expires=NOW - timedelta(seconds=1))
    err = rejected(BundleError, "expired", bundle)
    assert err.details["now"] == NOW.isoformat()


def test_freeze_expired_root(tmp_path: Path) -> None:
    rejected(RootError, "expired", signed_bundle(tmp_path),
             trusted=root(expires=NOW - timedelta(days=1)))


def test_fast_forward_unsigned_huge_version_is_refused(tmp_path: Path) -> None:
    bundle = signed_bundle(tmp_path)
    raw = (bundle / "manifest.json").read_bytes()
    (bundle / "manifest.json").write_bytes(raw.replace(b'"version":3', b'"version":999999999'))
    rejected(SignatureError, "threshold", bundle)


def test_fast_forward_is_accepted_only_once_signed(tmp_path: Path) -> None:
    v = verify(signed_bundle(tmp_path, version=10**9))
    assert v.manifest.version == 10**9


# -- mix-and-match, extra/missing, endless data, truncation -----------------------------

def test_mix_and_match_model_from_another_signed_bundle(tmp_path: Path) -> None:
    a = signed_bundle(tmp_path, name="a", model=b"A" * 1200)
    b = signed_bundle(tmp_path, name="b", model=b"B" * 1200)
    verify(b)
    (a / "model.tflite").write_bytes((b / "model.tflite").read_bytes())
    err = rejected(BundleError, "sha256", a)
    assert err.path == "model.tflite"


def test_mix_and_match_manifest_and_signatures_of_another_bundle(tmp_path: Path) -> None:
    a = signed_bundle(tmp_path, name="a", model=b"A" * 1200)
    b = signed_bundle(tmp_path, name="b", model=b"B" * 1200, version=4)
    (a / "signatures.json").write_bytes((b / "signatures.json").read_bytes())
    rejected(SignatureError, "threshold", a)


def test_extra_file_in_the_bundle(tmp_path: Path) -> None:
    bundle = signed_bundle(tmp_path)
    (bundle / "payload.so").write_bytes(b"\x7fELF")
    assert rejected(BundleError, "unlisted", bundle).path == "payload.so"


def test_extra_symlink_in_the_bundle(tmp_path: Path) -> None:
    bundle = signed_bundle(tmp_path)
    (bundle / "link").symlink_to("/etc/passwd")
    rejected(BundleError, "unlisted", bundle)


def test_a_listed_file_that_is_a_symlink_is_refused_even_if_its_target_matches(
        tmp_path: Path) -> None:
    bundle = signed_bundle(tmp_path)
    real = tmp_path / "elsewhere.tflite"
    (bundle / "model.tflite").rename(real)
    (bundle / "model.tflite").symlink_to(real)
    rejected(BundleError, "not_regular", bundle)


def test_missing_file(tmp_path: Path) -> None:
    bundle = signed_bundle(tmp_path)
    (bundle / "selftest.npz").unlink()
    assert rejected(BundleError, "missing", bundle).path == "selftest.npz"


def test_endless_data_file_longer_than_declared(tmp_path: Path) -> None:
    bundle = signed_bundle(tmp_path)
    with (bundle / "model.tflite").open("ab") as fh:
        fh.write(b"\x00" * 10_000_000)
    err = rejected(BundleError, "size", bundle)
    assert err.details["declared"] == 1200


def test_endless_data_download_stops_at_the_cap() -> None:
    """A stream that never ends is refused at the first chunk past the declared size."""
    check = FileCheck("model.tflite", FileEntry(sha256="0" * 64, size_bytes=5000))
    consumed = 0
    with pytest.raises(BundleError) as err:
        for chunk in itertools.repeat(b"x" * 1024):
            consumed += len(chunk)
            check.update(chunk)
    assert err.value.check == "size"
    assert consumed <= 5000 + 1024


def test_truncated_file(tmp_path: Path) -> None:
    bundle = signed_bundle(tmp_path)
    (bundle / "model.tflite").write_bytes((bundle / "model.tflite").read_bytes()[:-100])
    err = rejected(BundleError, "truncated", bundle)
    assert (err.details["seen"], err.details["declared"]) == (1100, 1200)


# -- compatibility ----------------------------------------------------------------------

def test_wrong_hardware_profile(tmp_path: Path) -> None:
    err = rejected(BundleError, "profile", signed_bundle(tmp_path, profiles=["coral-edgetpu"]))
    assert err.details["device_profile"] == PROFILE


def test_agent_too_old(tmp_path: Path) -> None:
    err = rejected(BundleError, "agent_version", signed_bundle(tmp_path,
                                                               min_agent_version="0.10.0"))
    assert err.details == {"min_agent_version": "0.10.0", "agent_version": "0.1.0"}


def test_first_install_has_no_committed_version(tmp_path: Path) -> None:
    fresh = Device(profile=PROFILE, agent_version="0.1.0")
    assert verify(signed_bundle(tmp_path, version=1), device=fresh).manifest.version == 1


# -- root rotation and revocation -------------------------------------------------------

NEW_ROLES = {"root": (["root-2", "root-3", "root-4"], 2),
             "release": (["release-2", "release-3", "release-4"], 2),
             "command": (["command-1", "command-2"], 1)}


def test_root_rotation_signed_by_old_and_new_thresholds_is_accepted() -> None:
    raw = root_bytes(["root-1", "root-2", "root-3", "root-4"], version=2, roles=NEW_ROLES)
    new = update_root(load_pinned_root(root_bytes()), raw)
    assert new.version == 2
    assert KEYS["release-1"].keyid not in new.keys


def test_root_rotation_signed_by_too_few_old_keys() -> None:
    raw = root_bytes(["root-3", "root-4"], version=2, roles=NEW_ROLES)
    with pytest.raises(SignatureError) as err:
        update_root(root(), raw)
    assert err.value.check == "threshold"
    assert err.value.details["role"] == "root"
    assert len(err.value.details["valid"]) == 1


def test_root_rotation_without_the_new_roots_own_threshold() -> None:
    raw = root_bytes(["root-1", "root-2"], version=2, roles=NEW_ROLES)  # root-4 never signed
    with pytest.raises(SignatureError, match="its own keys"):
        update_root(root(), raw)


def test_root_rotation_must_not_skip_a_version() -> None:
    raw = root_bytes(["root-1", "root-2", "root-3"], version=3)
    with pytest.raises(RootError) as err:
        update_root(root(), raw)
    assert (err.value.check, err.value.details) == ("version", {"trusted": 1, "got": 3})


def test_root_rotation_replayed_old_root_is_refused() -> None:
    with pytest.raises(RootError, match="does not follow"):
        update_root(root(version=2), root_bytes())


def test_revoked_key_no_longer_counts(tmp_path: Path) -> None:
    bundle = signed_bundle(tmp_path)  # release-1 + release-2
    verify(bundle)
    rotation = root_bytes(["root-1", "root-2", "root-3", "root-4"], version=2, roles=NEW_ROLES)
    err = rejected(SignatureError, "threshold", bundle, new_roots=[rotation])
    assert err.details["unknown"] == [KEYS["release-1"].keyid]
    sign_dir(bundle, ["release-2", "release-4"])
    assert verify(bundle, new_roots=[rotation]).root.version == 2


def test_root_chain_checks_expiry_of_the_final_root_only() -> None:
    v2 = root_bytes(["root-1", "root-2", "root-3"], version=2)
    trusted = root(expires=NOW - timedelta(days=1))  # expired v1, fresh v2: fine
    assert update_root_chain(trusted, [v2], NOW).version == 2
