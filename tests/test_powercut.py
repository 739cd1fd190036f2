"""Real power cuts (tests/powercut.py): the state directory on ext4 in an image file on a
loop device, cut by copying the image without syncing, repaired with `e2fsck -p` and
started again. The long run (200 cuts) is bench/bench_powercut.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from powercut import InstallCuts, WriterCuts, available, run_cuts, summary

pytestmark = pytest.mark.skipif(available() is not None, reason=str(available()))


def test_power_cuts_during_install_leave_a_verified_model_and_keep_what_was_promised(
        tmp_path: Path, releases: dict[str, Path]) -> None:
    harness = InstallCuts(tmp_path, releases["keys"], releases["onnx1"], releases["onnx2"])
    outcomes = run_cuts(harness, 12, 1.5 * harness.window_s, seed=3)
    found = summary(outcomes)
    assert found["broken"] == 0, (found, [o for o in outcomes if o.broken])
    inside = sum(not o.acknowledged for o in outcomes)
    assert inside >= 5, found  # most cuts land inside the install, before its answer


def test_power_cuts_find_the_damage_when_the_agent_does_not_fsync(
        tmp_path: Path, releases: dict[str, Path]) -> None:
    """The harness exists to find this: with every fsync off, a cut after the install was
    answered loses it (the disk never got it)."""
    harness = InstallCuts(tmp_path, releases["keys"], releases["onnx1"], releases["onnx2"],
                          no_sync=True)
    outcomes = []
    for o in run_cuts(harness, 20, 2.0 * harness.window_s, seed=5):
        outcomes.append(o)
        if o.broken:
            break
    assert any(o.broken for o in outcomes), summary(outcomes)


def test_power_cuts_keep_every_acknowledged_message_and_nonce(tmp_path: Path) -> None:
    outcomes = run_cuts(WriterCuts(tmp_path), 6, 0.5, seed=7)
    found = summary(outcomes)
    assert found["broken"] == 0 and found["acknowledged_before_cut"] == 6, (found, outcomes)
    lost = run_cuts(WriterCuts(tmp_path / "nosync", no_sync=True), 3, 0.5, seed=7)
    assert all("acknowledged telemetry lost" in o.broken for o in lost), summary(lost)
