"""The Debian package (scripts/build-deb.sh: dh-virtualenv, lintian without errors) on a
fresh Debian 12: `apt install ./edgekeeper.deb` makes the user, the state directory and an
enabled unit pointing at the packaged binary; the packaged TFLite runtime runs a real
bundle's self-test; `apt remove`, `dpkg -i` and `apt purge` work."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from debroot import REPO, fresh_root, unpack_release

# One worker runs the package tests (tests/test_systemd_boot.py too): they share one
# package build and the cached Debian root.
pytestmark = pytest.mark.xdist_group("debian-package")


def test_lintian_finds_no_error_and_every_override_says_why(deb: Path) -> None:
    lint = (deb.parent / "lintian.txt").read_text()
    assert not [line for line in lint.splitlines() if line.startswith("E:")], lint
    overrides = (REPO / "debian/edgekeeper.lintian-overrides").read_text().splitlines()
    for i, line in enumerate(overrides):
        if line.startswith("edgekeeper:"):
            assert any(o.startswith("#") for o in overrides[:i]), line


def test_install_run_remove_and_purge_on_a_fresh_debian_12(
        deb: Path, tmp_path: Path, releases: dict[str, Path]) -> None:
    with fresh_root(tmp_path) as root:
        shutil.copy(deb, root.path / "tmp/edgekeeper.deb")
        root.run("apt-get", "update", "-qq")
        root.run("apt-get", "install", "-y", "-qq", "--no-install-recommends",
                 "/tmp/edgekeeper.deb")
        assert root.run("edge-agent", "--version").stdout.startswith("edge-agent ")
        user = root.run("getent", "passwd", "edge-agent").stdout
        assert ":/var/lib/edge-agent:/usr/sbin/nologin" in user, user
        state = root.run("stat", "-c", "%U %G %a", "/var/lib/edge-agent").stdout.split()
        assert state == ["edge-agent", "edge-agent", "750"], state
        wants = root.path / "etc/systemd/system/multi-user.target.wants/edge-agent.service"
        assert wants.is_symlink(), "the unit is not enabled"
        (unit_file,) = [p for p in (root.path / "lib/systemd/system/edge-agent.service",
                                    root.path / "usr/lib/systemd/system/edge-agent.service")
                        if p.is_file()][:1]
        unit = unit_file.read_text()
        assert "ExecStart=/usr/bin/edge-agent run --config /etc/edge-agent/agent.toml" in unit
        assert (root.path / "usr/bin/edge-agent").resolve(strict=False).as_posix() \
            .endswith("/opt/venvs/edgekeeper/bin/edge-agent")
        # The example configuration is there; without root.json it is named as missing.
        check = root.run("edge-agent", "check-config", check=False)
        assert check.returncode == 2 and "root.json does not exist" in check.stderr, check
        # A TFLite-only device install: the runtime it ships; no onnxruntime, no converter
        # (a host tool) and no pip (nothing on a device installs into this environment).
        py = "/opt/venvs/edgekeeper/bin/python"
        root.run(py, "-c", "import ai_edge_litert.interpreter")
        for module in ("onnxruntime", "converter", "pip"):
            gone = root.run(py, "-c", f"import {module}", check=False)
            assert gone.returncode == 1 and "ModuleNotFoundError" in gone.stderr, module
        bins = {p.name for p in (root.path / "opt/venvs/edgekeeper/bin").iterdir()}
        assert {"edge-agent", "edge-fleet", "python"} <= bins, bins
        assert not {"edge-convert", "pip", "pip3"} & bins, bins
        # The unit's Documentation= names a file the package installs.
        (doc,) = [line.split("=", 1)[1] for line in unit.splitlines()
                  if line.startswith("Documentation=")]
        assert doc.startswith("file:/") and (root.path / doc[len("file:/"):]).is_file(), doc
        # A real bundle's self-test with the packaged runtime.
        unpack_release(releases["tflite1"], root.path / "tmp/bundle")
        test = root.run("edge-agent", "selftest", "/tmp/bundle")
        assert "passed" in test.stdout, test.stdout

        root.run("apt-get", "remove", "-y", "-qq", "edgekeeper")
        assert not (root.path / "opt/venvs/edgekeeper/bin/edge-agent").exists()
        assert not list((root.path / "opt/venvs").glob("edgekeeper/**/__pycache__"))
        assert (root.path / "etc/edge-agent/agent.toml").exists()  # a conffile stays
        root.run("dpkg", "-i", "/tmp/edgekeeper.deb")  # its dependencies are there now
        root.run("edge-agent", "--version")
        root.run("apt-get", "purge", "-y", "-qq", "edgekeeper")
        assert not (root.path / "var/lib/edge-agent").exists()
        assert not (root.path / "etc/edge-agent").exists()
        assert not (root.path / "opt/venvs/edgekeeper").exists()

