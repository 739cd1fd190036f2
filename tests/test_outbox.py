"""The persistent outbox: per-stream sequence numbers, nothing lost across a restart,
delete only on acknowledgement, and a cap whose drops are counted (telemetry first)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.link.outbox import Outbox


def body(seq: int) -> bytes:
    return json.dumps({"seq": seq}).encode()


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


def test_only_an_acknowledgement_removes_a_message(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite")
    for _ in range(3):
        box.enqueue("event", "e", body)
    first = box.pending(2)
    assert [m.seq for m in first] == [1, 2]
    assert [m.seq for m in box.pending(5)] == [3]  # in flight ones are not handed out twice
    box.ack(first[0].id)
    box.requeue_in_flight()  # disconnected before the other PUBACKs arrived
    assert [m.seq for m in box.pending(5)] == [2, 3]
    box.close()
    assert [m.seq for m in Outbox(tmp_path / "o.sqlite").pending(5)] == [2, 3]


def test_the_cap_drops_telemetry_before_events_and_counts_it(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite", cap=3)
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


def test_unknown_streams_and_bad_caps_are_programmer_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        Outbox(tmp_path / "o.sqlite", cap=0)
    with pytest.raises(ValueError):
        Outbox(tmp_path / "p.sqlite").enqueue("nope", "x", body)
