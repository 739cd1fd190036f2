"""Reports in their device's order (`fleet.devices.ordering`), pure: the newest state and
telemetry win, events and results are each applied once inside an anti-replay window, a
Will closes its connection, a later epoch starts afresh and an earlier one is stale."""

from __future__ import annotations

import pytest

from fleet.devices.ordering import WINDOW, Mark, admit


def feed(kind: str, seqs: list[int], epoch: int = 7) -> list[bool]:
    """Which of `seqs`, arriving in this order, are applied."""
    mark, out = None, []
    for seq in seqs:
        new = admit(kind, mark, epoch, seq)
        out.append(new is not None)
        mark = new or mark
    return out


def test_telemetry_newest_wins_late_and_duplicate_are_stale() -> None:
    assert feed("telemetry", [3, 5, 4, 5, 9, 1]) == [True, True, False, False, True, False]


@pytest.mark.parametrize("kind", ["event", "cmd/result"])
def test_events_and_results_apply_once_even_when_late(kind: str) -> None:
    # 5 after 9 is late but new (another consumer of the shared group had 9 first);
    # the second 5 is a replay; 9 again a duplicate.
    assert feed(kind, [3, 9, 5, 5, 9, 4, 3]) == [True, True, True, False, False, True, False]


def test_the_window_forgets_what_is_older_than_it() -> None:
    top = 100 + WINDOW
    assert feed("event", [100, top, 100]) == [True, True, False]  # seen: stale anyway
    assert feed("event", [top, top - WINDOW, top - WINDOW - 1]) == [True, True, False]
    assert feed("event", [1, 1 + WINDOW + 5, 2]) == [True, True, False]  # jumped past


def test_the_window_is_exact_at_its_edges() -> None:
    mark = admit("event", None, 1, 10)
    mark = admit("event", mark, 1, 12)
    assert mark == Mark(1, 12, window=0b10)  # 11 not seen, 10 seen
    assert admit("event", mark, 1, 10) is None
    assert admit("event", mark, 1, 11) == Mark(1, 12, window=0b11)


def test_a_later_epoch_starts_afresh_and_an_earlier_one_is_stale() -> None:
    mark = admit("telemetry", None, 5, 900)
    assert admit("telemetry", mark, 6, 1) == Mark(6, 1)  # the device was reset
    assert admit("telemetry", mark, 4, 10_000) is None  # from before an earlier reset
    ev = admit("event", None, 5, 900)
    assert admit("event", ev, 6, 1) == Mark(6, 1)
    assert admit("event", ev, 4, 901) is None


def test_a_will_closes_its_connection_and_the_next_connection_wins() -> None:
    birth = admit("state", None, 1, 11, connection=10)  # connection 10: Will seq 10
    later = admit("state", birth, 1, 40, connection=10)  # a model changed
    assert later == Mark(1, 40, 10, False)
    will = admit("state", later, 1, 10, connection=10, will=True)  # the broker sent it
    assert will == Mark(1, 10, 10, True)  # older seq, but it ends connection 10
    assert admit("state", will, 1, 40, connection=10) is None  # a copy of a state of it
    assert admit("state", will, 1, 9, connection=5, will=True) is None  # an older Will
    nxt = admit("state", will, 1, 42, connection=41)  # reconnected: Will 41, birth 42
    assert nxt == Mark(1, 42, 41, False)
    assert admit("state", nxt, 1, 10, connection=10, will=True) is None  # the old Will late
    assert admit("state", nxt, 1, 40, connection=10) is None  # the old retained state late


def test_a_state_from_before_is_stale_and_unknown_kinds_are_errors() -> None:
    mark = admit("state", None, 1, 30, connection=20)
    assert admit("state", mark, 1, 25, connection=20) is None
    assert admit("state", mark, 1, 30, connection=20) is None  # the same one again
    with pytest.raises(ValueError):
        admit("heartbeat", None, 1, 1)
