"""The deploy flow (`agent.updates.deploy`) is a table: every path a deploy can take, a
cancel at each phase, and the steps the table refuses."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.link.deploying import DeployJournal
from agent.updates.deploy import FINAL, TRANSITIONS, Flow, Phase, Step, advance


def run(*steps: Step) -> Flow:
    flow = Flow()
    for s in steps:
        flow = advance(flow, s)
    return flow


def test_a_healthy_deploy_downloads_installs_watches_and_commits() -> None:
    assert run(Step.BEGIN, Step.DOWNLOADED, Step.INSTALLED, Step.WINDOW_OVER).phase \
        is Phase.COMMITTED


def test_a_release_already_serving_is_done_at_once() -> None:
    assert run(Step.ALREADY_SERVING) == Flow(Phase.ALREADY)


def test_an_anomaly_in_the_window_rolls_back() -> None:
    assert run(Step.BEGIN, Step.DOWNLOADED, Step.INSTALLED, Step.ANOMALY).phase \
        is Phase.ROLLED_BACK


@pytest.mark.parametrize(("cancel_after", "then", "ends"), [
    ((Step.BEGIN,), (Step.DOWNLOADED,), Phase.CANCELLED),  # nothing installed
    ((Step.BEGIN,), (Step.FAILED,), Phase.FAILED),
    ((Step.BEGIN, Step.DOWNLOADED), (Step.INSTALLED,), Phase.ROLLED_BACK),  # undone
    ((Step.BEGIN, Step.DOWNLOADED), (Step.FAILED,), Phase.FAILED),
    ((Step.BEGIN, Step.DOWNLOADED, Step.INSTALLED), (), Phase.ROLLED_BACK),  # at once
])
def test_a_cancel_takes_effect_when_the_phase_it_met_ends(
        cancel_after: tuple[Step, ...], then: tuple[Step, ...], ends: Phase) -> None:
    flow = advance(run(*cancel_after), Step.CANCEL)
    for s in then:
        flow = advance(flow, s)
    assert flow.phase is ends and not flow.cancelled


def test_a_cancel_that_meets_a_committed_deploy_changes_nothing() -> None:
    done = run(Step.BEGIN, Step.DOWNLOADED, Step.INSTALLED, Step.WINDOW_OVER)
    assert advance(done, Step.CANCEL) == done


@pytest.mark.parametrize(("steps", "step"), [
    ((), Step.INSTALLED),  # installed before downloading
    ((Step.BEGIN,), Step.WINDOW_OVER),  # committed without an install
    ((Step.BEGIN, Step.DOWNLOADED, Step.INSTALLED, Step.ANOMALY), Step.WINDOW_OVER),
    ((Step.BEGIN, Step.DOWNLOADED, Step.INSTALLED), Step.FAILED),  # activated: roll back
])
def test_steps_the_table_lacks_are_refused(steps: tuple[Step, ...], step: Step) -> None:
    with pytest.raises(ValueError, match="no transition"):
        advance(run(*steps), step)


def test_final_phases_have_no_way_out_but_a_no_op_cancel() -> None:
    for (phase, step, _), to in TRANSITIONS.items():
        if phase in FINAL:
            assert (step, to) == (Step.CANCEL, phase)


# Every (phase, cancelled, step) pair, written out: the phase it leads to, "+cancel" for a
# cancel recorded to take effect when the phase's work ends, "-" for a step refused.
# Columns: begin, already_serving, downloaded, installed, failed, anomaly, window_over,
# cancel.
COLUMNS = (Step.BEGIN, Step.ALREADY_SERVING, Step.DOWNLOADED, Step.INSTALLED, Step.FAILED,
           Step.ANOMALY, Step.WINDOW_OVER, Step.CANCEL)
EXPECTED = {
    ("start", False): "downloading already - - - - - cancelled",
    ("downloading", False): "- - installing - failed - - +cancel",
    ("installing", False): "- - - watching failed - - +cancel",
    ("watching", False): "- - - - - rolled_back committed rolled_back",
    ("committed", False): "- - - - - - - committed",
    ("rolled_back", False): "- - - - - - - rolled_back",
    ("failed", False): "- - - - - - - failed",
    ("cancelled", False): "- - - - - - - cancelled",
    ("already", False): "- - - - - - - already",
    ("downloading", True): "- - cancelled - failed - - +cancel",
    ("installing", True): "- - - rolled_back failed - - +cancel",
}


@pytest.mark.parametrize(("phase", "cancelled"), list(EXPECTED))
def test_every_phase_and_step_pair_goes_where_the_written_table_says(
        phase: str, cancelled: bool) -> None:
    """A rollback (cancel) is taken in every phase, START included (it once crashed the
    device's command handler: no transition from start on cancel)."""
    assert {p.value for p in Phase} == {p for p, _ in EXPECTED}
    for step, want in zip(COLUMNS, EXPECTED[(phase, cancelled)].split(), strict=True):
        flow = Flow(Phase(phase), cancelled)
        if want == "-":
            with pytest.raises(ValueError, match="no transition"):
                advance(flow, step)
            continue
        got = advance(flow, step)
        if want == "+cancel":
            assert got == Flow(Phase(phase), True), (phase, step)
        else:
            assert got == Flow(Phase(want), False), (phase, cancelled, step)


@pytest.mark.parametrize("text", ['{"installed_by": [1], "running": 5}', "[]", "{tor"])
def test_a_malformed_deploy_journal_is_forgotten_not_fatal(tmp_path: Path, text: str) -> None:
    """The journal is the device's own file, but a torn or odd one must not stop deploys:
    it is read as empty, and written afresh."""
    path = tmp_path / "deploy.json"
    path.write_text(text)
    journal = DeployJournal(path)
    assert journal.running() is None and journal.installed_by("digits", 1, None) is None
    journal.committed_id("digits", 2, "ab" * 32, "c" * 32)
    assert DeployJournal(path).installed_by("digits", 2, "ab" * 32) == "c" * 32
