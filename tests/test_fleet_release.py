"""The operator's path on a real converted bundle, through the real `edge-fleet` and
`edge-agent` commands: keys (passphrase-protected, 0600), sealing, threshold signing by two
operators, packing, verification of the archive as a device does it, rotation with
revocation, and a signed deploy command the device's verifier accepts."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent.errors import BundleError
from agent.serving.selftest import run_selftest
from agent.trust.archive import unpack_bundle
from agent.trust.command import Addressee, DeployCommand, verify_command
from agent.trust.identity import load_device_key
from agent.trust.root import load_pinned_root
from agent.trust.sealing import model_source
from agent.trust.verify import Device

PASS = "correct horse battery staple"


def run(tool: str, *args: object, ok: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EDGE_FLEET_PASSPHRASE": PASS}
    p = subprocess.run([sys.executable, "-m", f"{tool}.cli", *map(str, args)],
                       capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL,
                       check=False)
    if ok:
        assert p.returncode == 0, p.stderr
    return p


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("fleet-keys")
    run("fleet", "keys", "init", "--dir", d, "--fleet", "acme")
    return d


@pytest.fixture
def bundle(onnx_run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(onnx_run / "bundle", tmp_path / "bundle"))


def device(**kw: object) -> Device:
    return Device(profile="raspberry-pi-4", agent_version="0.1.0", **kw)  # type: ignore[arg-type]


def test_keys_are_private_and_passphrase_protected(keys: Path) -> None:
    files = sorted((keys / "keys").glob("*.key"))
    assert len(files) == 8  # 3 root, 3 release, 2 command
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
        data = json.loads(f.read_text())
        assert "seed" not in data and data["encrypted"]["kdf"] == "argon2id"
    root = load_pinned_root((keys / "root.json").read_bytes())
    assert (root.roles["release"].threshold, len(root.roles["release"].keyids)) == (2, 3)


def test_a_wrong_passphrase_is_named(keys: Path, bundle: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "fleet.cli", "sign", str(bundle), "--key",
                        str(keys / "keys/release-1.key")], capture_output=True, text=True,
                       env={**os.environ, "EDGE_FLEET_PASSPHRASE": "nope"},
                       stdin=subprocess.DEVNULL, check=False)
    assert p.returncode == 2
    assert "wrong passphrase" in p.stderr


def test_two_operators_sign_until_the_threshold_then_the_archive_verifies(
        keys: Path, bundle: Path, tmp_path: Path) -> None:
    root = keys / "root.json"
    first = run("fleet", "sign", bundle, "--key", keys / "keys/release-1.key", "--root", root)
    assert "1 of 2 release signature(s); 1 more needed" in first.stdout
    early = run("fleet", "verify", bundle, "--root", root, ok=False)
    assert early.returncode == 3 and "(threshold)" in early.stderr
    second = run("fleet", "sign", bundle, "--key", keys / "keys/release-3.key", "--root", root)
    assert "2 of 2 release signature(s); threshold met" in second.stdout
    sizes = {}
    for comp in ("zst", "gz"):
        out = tmp_path / f"digits.tar.{comp}"
        run("fleet", "pack", bundle, "--out", out, "--compression", comp)
        ok = run("fleet", "verify", out, "--root", root)
        assert "verified: 2 release signature(s) of threshold 2" in ok.stdout
        sizes[comp] = out.stat().st_size
    raw_size = sum(p.stat().st_size for p in bundle.iterdir())
    assert max(sizes.values()) < raw_size


def test_signing_with_a_command_key_is_refused(keys: Path, bundle: Path) -> None:
    p = run("fleet", "sign", bundle, "--key", keys / "keys/command-1.key", ok=False)
    assert p.returncode == 2 and "release keys" in p.stderr


def test_a_byte_changed_in_the_archive_is_rejected(keys: Path, bundle: Path,
                                                   tmp_path: Path) -> None:
    run("fleet", "sign", bundle, "--key", keys / "keys/release-1.key",
        "--key", keys / "keys/release-2.key")
    archive = tmp_path / "a.tar.zst"
    run("fleet", "pack", bundle, "--out", archive)
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0x01
    archive.write_bytes(bytes(data))
    p = run("fleet", "verify", archive, "--root", keys / "root.json", ok=False)
    assert p.returncode == 3 and "rejected" in p.stderr


def _evil_archive(bundle: Path, out: Path, extra: tarfile.TarInfo, data: bytes = b"") -> Path:
    with tarfile.open(out, "w:gz") as tar:
        for name in ("manifest.json", "signatures.json"):
            tar.add(bundle / name, arcname=name)
        tar.addfile(extra, io.BytesIO(data) if data else None)
    return out


@pytest.mark.parametrize("kind", ["symlink", "traversal", "endless"])
def test_archive_members_that_could_escape_or_overflow_are_rejected(
        keys: Path, bundle: Path, tmp_path: Path, kind: str) -> None:
    run("fleet", "sign", bundle, "--key", keys / "keys/release-1.key",
        "--key", keys / "keys/release-2.key")
    model = json.loads((bundle / "manifest.json").read_text())["model_file"]
    if kind == "symlink":
        info = tarfile.TarInfo(model)
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/shadow"
        data = b""
    elif kind == "traversal":
        info, data = tarfile.TarInfo("../../etc/cron.d/x"), b"* * * * * root evil\n"
        info.size = len(data)
    else:
        data = (bundle / model).read_bytes() + b"\x00" * 1_000_000
        info = tarfile.TarInfo(model)
        info.size = len(data)
    archive = _evil_archive(bundle, tmp_path / "evil.tar.gz", info, data)
    dest = tmp_path / "staging"
    root = load_pinned_root((keys / "root.json").read_bytes())
    with pytest.raises(BundleError) as err:
        unpack_bundle(archive, dest, root, device=device(), now=datetime.now(UTC))
    assert err.value.check == {"symlink": "archive", "traversal": "unlisted",
                               "endless": "size"}[kind]
    assert not dest.exists()


def test_rotation_revokes_a_release_key(keys: Path, bundle: Path, tmp_path: Path) -> None:
    d = Path(shutil.copytree(keys, tmp_path / "keys"))
    run("fleet", "sign", bundle, "--key", d / "keys/release-1.key",
        "--key", d / "keys/release-2.key")
    p = run("fleet", "keys", "rotate", "--dir", d, "--revoke", "release-1", "--add",
            "release=1")
    assert "root.json v1 -> v2" in p.stdout
    new_root = d / "roots/2.root.json"
    refused = run("fleet", "verify", bundle, "--root", d / "roots/1.root.json",
                  "--new-root", new_root, ok=False)
    assert refused.returncode == 3 and "unknown or revoked" in refused.stderr
    run("fleet", "sign", bundle, "--key", d / "keys/release-4.key")
    run("fleet", "verify", bundle, "--root", d / "roots/1.root.json", "--new-root", new_root)


def test_a_signed_deploy_command_pins_the_archive_and_manifest(
        keys: Path, bundle: Path, tmp_path: Path) -> None:
    run("fleet", "sign", bundle, "--key", keys / "keys/release-1.key",
        "--key", keys / "keys/release-2.key")
    archive = tmp_path / "digits-v1.tar.zst"
    run("fleet", "pack", bundle, "--out", archive)
    out = tmp_path / "cmd.json"
    run("fleet", "command", "deploy", "--archive", archive, "--url",
        "http://127.0.0.1:8080/digits-v1.tar.zst", "--device", "pi-1", "--key",
        keys / "keys/command-1.key", "--root", keys / "root.json", "--out", out)
    root = load_pinned_root((keys / "root.json").read_bytes())
    me = Addressee(fleet="acme", device="pi-1")
    cmd = verify_command(root, out.read_bytes(), me=me, now=datetime.now(UTC), seen=set())
    assert isinstance(cmd, DeployCommand)
    assert cmd.manifest_sha256 == hashlib.sha256(
        (bundle / "manifest.json").read_bytes()).hexdigest()
    assert (cmd.archive.size_bytes, cmd.archive.sha256) == (
        archive.stat().st_size, hashlib.sha256(archive.read_bytes()).hexdigest())


def test_a_sealed_model_opens_only_on_its_device_in_memory(
        keys: Path, bundle: Path, tmp_path: Path) -> None:
    for dev in ("pi-1", "pi-2"):
        run("agent", "device-key", dev, "--out", tmp_path)
    assert stat.S_IMODE((tmp_path / "pi-1.key").stat().st_mode) == 0o600
    plain = (bundle / json.loads((bundle / "manifest.json").read_text())["model_file"]
             ).read_bytes()
    run("fleet", "seal", bundle, "--device-pub", tmp_path / "pi-1.pub")
    run("fleet", "sign", bundle, "--key", keys / "keys/release-1.key",
        "--key", keys / "keys/release-2.key")
    archive = tmp_path / "sealed.tar.zst"
    run("fleet", "pack", bundle, "--out", archive)
    root = load_pinned_root((keys / "root.json").read_bytes())
    v = unpack_bundle(archive, tmp_path / "staged", root, device=device(),
                      now=datetime.now(UTC))
    on_disk = (tmp_path / "staged" / v.manifest.model_file).read_bytes()
    assert plain[:4096] not in on_disk
    model = model_source(tmp_path / "staged", v.manifest,
                         device_key=load_device_key(tmp_path / "pi-1.key"))
    assert isinstance(model, bytes)
    assert run_selftest(tmp_path / "staged", v.manifest, model=model).passed
    with pytest.raises(BundleError) as err:
        model_source(tmp_path / "staged", v.manifest,
                     device_key=load_device_key(tmp_path / "pi-2.key"))
    assert err.value.check == "sealed"
