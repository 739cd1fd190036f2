"""The one install sequence (`agent.updates.install.Installer`) over a real store and real
signed bundles, with a `ModelHost` that the test holds: one update at a time, a refused
second one changes nothing, and a failed self-test leaves the old model serving."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from fixture_trust import NOW, root, signed_bundle

from agent.errors import BundleError, Busy
from agent.serving.metrics import Metrics
from agent.trust.manifest import Manifest
from agent.trust.verify import Device
from agent.updates.install import Installer
from agent.updates.store import ModelStore


class HeldHost:
    """A ModelHost whose load waits for the test; what it serves is recorded."""

    def __init__(self) -> None:
        self.entered, self.release = threading.Event(), threading.Event()
        self.serving: dict[str, int] = {}
        self.fail_selftest = False

    def load(self, path: Path, manifest: Manifest) -> Manifest:
        self.entered.set()
        assert self.release.wait(10)
        return manifest

    def self_test(self, path: Path, manifest: Manifest, loaded: Manifest) -> str:
        if self.fail_selftest:
            raise BundleError("self-test failed", check="selftest")
        return "passed"

    def serve(self, manifest: Manifest, loaded: Manifest) -> None:
        self.serving[manifest.name] = manifest.version

    def serve_active(self, name: str) -> str:
        self.serving[name] = int(self.store.slots(name).active.split("-")[0])  # type: ignore[union-attr]
        return f"{name} v{self.serving[name]}"


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Installer[Any], HeldHost, ModelStore]:
    store, host = ModelStore(tmp_path / "state"), HeldHost()
    host.store = store  # type: ignore[attr-defined]
    installer: Installer[Any] = Installer(
        store, host, root=root, metrics=Metrics(), changed=lambda: None,
        device=lambda: Device(profile="raspberry-pi-4", agent_version="0.1.0",
                              committed=store.committed()))
    return installer, host, store


def bundle(tmp_path: Path, version: int) -> Path:
    return signed_bundle(tmp_path, version=version, name=f"src{version}",
                         model=bytes([version]) * 1200)


def test_a_second_install_while_one_runs_is_refused_and_changes_nothing(
        setup: Any, tmp_path: Path) -> None:
    installer, host, store = setup
    first: dict[str, Any] = {}
    t = threading.Thread(target=lambda: first.update(
        r=installer.install(bundle(tmp_path, 1), now=NOW)))
    t.start()
    assert host.entered.wait(10)  # the first holds the sequence, loading
    journal = store.journal()
    with pytest.raises(Busy):
        installer.install(bundle(tmp_path, 2), now=NOW)
    assert store.journal() == journal  # the refused one staged and journaled nothing
    host.release.set()
    t.join(10)
    assert (first["r"].version, host.serving) == (1, {"digits": 1})
    assert store.slots("digits").committed == 1


def test_a_failed_self_test_keeps_the_old_model_and_rollback_serves_previous(
        setup: Any, tmp_path: Path) -> None:
    installer, host, store = setup
    host.release.set()
    installer.install(bundle(tmp_path, 1), now=NOW)
    host.fail_selftest = True
    with pytest.raises(BundleError, match="self-test"):
        installer.install(bundle(tmp_path, 2), now=NOW)
    assert host.serving == {"digits": 1} and store.slots("digits").committed == 1
    host.fail_selftest = False
    result = installer.install(bundle(tmp_path, 3), now=NOW, commit=False)
    assert result.previous is not None and host.serving == {"digits": 3}
    assert installer.roll_back("digits", "health window") == "digits v1"
    assert store.slots("digits").committed == 1  # never committed
    with pytest.raises(KeyError):
        installer.commit_pending("digits")  # the rollback dropped the pending update
    states = [e.state.value for e in store.journal() if e.version == 3]
    assert states == ["verified", "staged", "loaded", "self_tested", "active", "rolled_back"]
