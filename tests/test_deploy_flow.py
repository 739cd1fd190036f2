"""The deploy flow (`agent.updates.deploy`) is a table: every path a deploy can take, a
cancel at each phase, and the steps the table refuses."""

from __future__ import annotations

import pytest

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
