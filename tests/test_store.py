"""The model store on disk: staging, slots, journal, and recovery from an interruption at
every step of an update (what a power cut leaves behind)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fixture_trust import DEVICE, NOW, root, signed_bundle

from agent.errors import BundleError
from agent.trust.verify import Device
from agent.updates.lifecycle import State
from agent.updates.store import ModelStore, Staged

FRESH = Device(profile=DEVICE.profile, agent_version="0.1.0")


def stage(store: ModelStore, tmp_path: Path, version: int) -> Staged:
    src = signed_bundle(tmp_path, version=version, name=f"src{version}",
                        model=bytes([version]) * 1200)
    return store.stage(src, root(), device=FRESH, now=NOW)


def install(store: ModelStore, tmp_path: Path, version: int) -> Staged:
    s = stage(store, tmp_path, version)
    store.record(s, "loaded")
    store.record(s, "self_tested")
    store.activate(s)
    store.commit(s)
    return s


def states(store: ModelStore, version: int) -> list[str]:
    return [e.state.value for e in store.journal() if e.version == version]


def test_install_commit_and_the_committed_version_floor(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "state")
    s1 = install(store, tmp_path, 1)
    s2 = install(store, tmp_path, 2)
    slots = store.slots("digits")
    assert (slots.active, slots.previous, slots.committed) == (s2.path.name, s1.path.name, 2)
    assert states(store, 2) == ["verified", "staged", "loaded", "self_tested", "active",
                                "committed"]
    with pytest.raises(BundleError) as err:
        (tmp_path / "again").mkdir()
        stage(store, tmp_path / "again", 2)
    assert err.value.check == "equal_version"


def test_only_active_and_previous_stay_on_disk(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "state")
    for v in (1, 2, 3):
        install(store, tmp_path, v)
    kept = sorted(p.name.split("-")[0] for p in (store.base / "bundles/digits").iterdir())
    assert kept == ["2", "3"]


def test_roll_back_serves_previous_and_keeps_the_committed_floor(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "state")
    s1 = install(store, tmp_path, 1)
    install(store, tmp_path, 2)
    slots = store.roll_back("digits", "latency regression")
    assert (slots.active, slots.previous, slots.committed) == (s1.path.name, None, 2)
    assert states(store, 2)[-1] == "rolled_back"
    with pytest.raises(BundleError) as err:
        store.roll_back("digits", "again")
    assert err.value.check == "no_previous"


@pytest.mark.parametrize("stop_after", ["verified", "staged", "loaded", "self_tested",
                                        "slots_written", "activated"])
def test_recover_rolls_back_an_update_interrupted_at_each_step(tmp_path: Path,
                                                               stop_after: str) -> None:
    store = ModelStore(tmp_path / "state")
    s1 = install(store, tmp_path, 1)
    s2 = stage(store, tmp_path, 2)
    steps = ["loaded", "self_tested"]
    for step in steps[:steps.index(stop_after) + 1] if stop_after in steps else (
            steps if stop_after in ("slots_written", "activated") else []):
        store.record(s2, step)
    if stop_after == "verified":  # the rename into the store never happened
        store.journal_path.write_text("".join(
            line + "\n" for line in store.journal_path.read_text().splitlines()
            if json.loads(line)["state"] != "staged"))
        (store.base / "staging" / "half-unpacked").mkdir()
    if stop_after == "slots_written":  # slots switched, journal line not yet written
        store._write_slots("digits", store.slots("digits").model_copy(
            update={"active": s2.path.name, "previous": s1.path.name}))
    if stop_after == "activated":
        store.activate(s2)
    with store.journal_path.open("ab") as fh:
        fh.write(b'{"update": "torn li')  # a line cut by the power loss

    reopened = ModelStore(tmp_path / "state")
    notes = reopened.recover()
    assert reopened.slots("digits").active == s1.path.name
    assert reopened.slots("digits").committed == 1
    assert states(reopened, 2)[-1] == "rolled_back"
    assert any("interrupted" in n for n in notes)
    assert not list((reopened.base / "staging").iterdir())
    assert not s2.path.exists()
    assert reopened.recover() == []  # nothing left to do


def test_fall_back_records_why(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "state")
    s1 = install(store, tmp_path, 1)
    s2 = install(store, tmp_path, 2)
    (s2.path / "model.tflite").write_bytes(b"\x00" * 1200)
    with pytest.raises(BundleError) as err:
        store.check_installed("digits", s2.path.name, root())
    assert err.value.check == "sha256"
    slots = store.fall_back("digits", "sha256 mismatch at start")
    assert slots.active == s1.path.name
    last = store.journal()[-1]
    assert (last.state, last.version, last.reason) == (State.ROLLED_BACK, 2,
                                                       "sha256 mismatch at start")


def test_check_installed_refuses_a_bundle_the_current_root_no_longer_trusts(
        tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "state")
    s1 = install(store, tmp_path, 1)
    store.check_installed("digits", s1.path.name, root())
    rotated = root(roles={"root": (["root-1", "root-2", "root-3"], 2),
                          "release": (["release-3", "release-4"], 1),
                          "command": (["command-1"], 1)})
    with pytest.raises(Exception, match="unknown or revoked"):
        store.check_installed("digits", s1.path.name, rotated)


def test_every_journal_write_of_the_store_goes_through_the_table(tmp_path: Path) -> None:
    """A rollback of an update that never activated (its last state FAILED) is a step the
    table lacks: the store must refuse it, not write ROLLED_BACK over it."""
    store = ModelStore(tmp_path / "state")
    staged = stage(store, tmp_path, 1)
    store.fail(staged, "self-test failed")
    with pytest.raises(ValueError, match="no transition from failed"):
        store._journal_rolled_back("digits", staged.path.name, "rollback of a failed one")
    assert [e.state for e in store.journal()][-1] == State.FAILED


def test_a_cut_between_the_commit_journal_line_and_the_floor_is_finished_at_start(
        tmp_path: Path) -> None:
    """The power-cut harness found the old order (floor first, then the journal line): a cut
    between them left floor v2 for an update rolled back as unfinished, and v2 could
    never be installed again. Journal first; `recover` writes the floor it lacks."""
    store = ModelStore(tmp_path / "state")
    install(store, tmp_path, 1)
    s2 = stage(store, tmp_path, 2)
    store.record(s2, "loaded")
    store.record(s2, "self_tested")
    store.activate(s2)
    store.record(s2, "committed")  # ... and the power went before the floor was written
    assert store.slots("digits").committed == 1
    notes = ModelStore(tmp_path / "state").recover()
    assert "digits: committed floor raised to v2" in notes
    slots = store.slots("digits")
    assert (slots.active, slots.committed) == (s2.path.name, 2)
