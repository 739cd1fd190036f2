"""The persistent outbox: per-stream sequence numbers, nothing lost across a restart,
delete only on acknowledgement, and a cap whose drops are counted (telemetry first). The
contract without durability holds for the simulator's `MemoryOutbox` too."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.link.outbox import AnyOutbox, MemoryOutbox, Order, Outbox

Make = Callable[..., AnyOutbox]


@pytest.fixture(params=["sqlite", "memory"])
def make(request: Any, tmp_path: Path) -> Make:
    """A new outbox of either kind (`cap` as given)."""
    names = iter(range(1000))
    if request.param == "memory":
        return MemoryOutbox
    return lambda **kw: Outbox(tmp_path / f"o{next(names)}.sqlite", **kw)


def body(seq: int, order: Order) -> bytes:
    return json.dumps({"seq": seq, "order": [order.epoch, order.seq]}).encode()


def test_sequence_numbers_per_stream_survive_a_restart(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite")
    assert [box.enqueue("telemetry", "t", body) for _ in range(3)] == [1, 2, 3]
    assert box.enqueue("event", "e", body) == 1
    box.close()
    again = Outbox(tmp_path / "o.sqlite")
    assert len(again) == 4
    assert again.enqueue("telemetry", "t", body) == 4
    assert [json.loads(m.payload)["seq"] for m in again.pending(10)
            if m.stream == "telemetry"] == [1, 2, 3, 4]


def test_one_report_order_for_every_stream_survives_a_restart(tmp_path: Path) -> None:
    """The device-wide order the fleet puts reports in: +1 for every message of any
    stream and for every reserved one (birth, Last Will), kept across a restart under the
    same epoch; a wiped state starts a later epoch."""
    box = Outbox(tmp_path / "o.sqlite")
    box.enqueue("telemetry", "t", body)
    assert box.reserve() == Order(box.epoch, 2)
    box.enqueue("event", "e", body)
    box.enqueue("result", "r", body)
    epoch = box.epoch
    box.close()
    again = Outbox(tmp_path / "o.sqlite")
    assert again.epoch == epoch
    again.enqueue("state", "s", body)
    assert [json.loads(m.payload)["order"] for m in again.pending(10)] == [
        [epoch, 1], [epoch, 3], [epoch, 4], [epoch, 5]]
    assert again.reserve() == Order(epoch, 6)
    (tmp_path / "o.sqlite").unlink()
    wiped = Outbox(tmp_path / "o.sqlite")
    assert wiped.epoch > epoch and wiped.reserve() == Order(wiped.epoch, 1)
    assert Order(wiped.epoch, 1) > Order(epoch, 6)


def test_sequences_and_the_report_order_count_up(make: Make) -> None:
    box = make()
    assert [box.enqueue("telemetry", "t", body) for _ in range(2)] == [1, 2]
    assert box.reserve() == Order(box.epoch, 3)
    assert box.enqueue("event", "e", body) == 1
    assert [json.loads(m.payload) for m in box.pending(10)] == [
        {"seq": 1, "order": [box.epoch, 1]}, {"seq": 2, "order": [box.epoch, 2]},
        {"seq": 1, "order": [box.epoch, 4]}]


def test_enqueue_tells_the_link(make: Make) -> None:
    box, told = make(), []
    box.on_enqueue = lambda: told.append(len(box))
    box.enqueue("event", "e", body)
    assert told == [1]  # after the message is stored


def test_only_an_acknowledgement_removes_a_message(make: Make) -> None:
    box = make()
    for _ in range(3):
        box.enqueue("event", "e", body)
    first = box.pending(2)
    assert [m.seq for m in first] == [1, 2]
    assert [m.seq for m in box.pending(5)] == [3]  # in flight ones are not handed out twice
    box.ack(first[0].id)
    box.requeue_in_flight()  # disconnected before the other PUBACKs arrived
    assert [m.seq for m in box.pending(5)] == [2, 3]
    assert len(box) == 2


def test_what_was_not_acknowledged_is_there_after_a_restart(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite")
    for _ in range(3):
        box.enqueue("event", "e", body)
    box.ack(box.pending(1)[0].id)
    box.close()
    assert [m.seq for m in Outbox(tmp_path / "o.sqlite").pending(5)] == [2, 3]


def test_the_cap_drops_telemetry_before_events_and_counts_it(make: Make) -> None:
    box = make(cap=3)
    box.enqueue("event", "e", body)
    for _ in range(4):
        box.enqueue("telemetry", "t", body)
    kept = [(m.stream, m.seq) for m in box.pending(10)]
    assert kept == [("event", 1), ("telemetry", 3), ("telemetry", 4)]
    assert box.take_dropped() == {"telemetry": 2}
    assert box.take_dropped() == {}
    for _ in range(3):
        box.enqueue("event", "e", body)
    assert box.take_dropped() == {"telemetry": 2, "event": 1}


def test_unknown_streams_and_bad_caps_are_programmer_errors(make: Make) -> None:
    with pytest.raises(ValueError):
        make(cap=0)
    with pytest.raises(ValueError):
        make().enqueue("nope", "x", body)
