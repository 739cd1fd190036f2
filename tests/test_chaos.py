"""A 300-device rollout under injected faults (broker killed and restarted, across a wave
change too; the controller killed, during a send too; devices stalled past the timeout;
devices off the broker and back), one seed (`tests/chaos.py`; more seeds in
`bench/bench_chaos.py`). At the end the rollout's record must equal what every device
runs, no healthy device may have been sent a rollback, and the exit code must say what
became of the rollout."""

from __future__ import annotations

from pathlib import Path

from chaos import KINDS, Chaos


def test_a_rollout_under_chaos_converges_to_what_the_devices_run(
        releases: dict[str, Path], tmp_path: Path) -> None:
    chaos = Chaos(tmp_path, releases, devices=299, agents=1, seed=1)
    try:
        result = chaos.run()
    finally:
        chaos.close()
    print(result)
    assert set(result.faults) == set(KINDS), result.faults
    assert result.problems() == [], result
    assert result.statuses["committed"] + result.statuses["already_current"] == 300
