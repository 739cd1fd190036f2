"""The fleet database's queries a rollout controller runs every step, read by SQLite's JSON
functions and joins rather than parsed in Python: each answer written out."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from agent.link.wire import (
    Memory,
    ModelState,
    ModelTelemetry,
    ReportOrder,
    StatePayload,
    Telemetry,
)
from agent.trust.signatures import PublicKey
from fleet.devices.gate import Report
from fleet.devices.registry import FleetDB
from fleet.devices.registry import StateOfModel as Said
from fleet.rollout.record import Rollouts

KEY = PublicKey(public="11" * 32)


def state(device: str, models: dict[str, ModelState], order: tuple[int, int] | None,
          groups: tuple[str, ...] = ("lab",)) -> StatePayload:
    return StatePayload(device=device, fleet="acme", online=True, agent_version="0.1.0",
                        profile="x86_64-generic", groups=list(groups), models=models,
                        at=datetime.now(UTC),
                        order=None if order is None else ReportOrder(epoch=order[0],
                                                                     seq=order[1]))


def telemetry(device: str, seq: int, p95: dict[str, float]) -> Report:
    return Report("telemetry", device, Telemetry(
        seq=seq, order=ReportOrder(epoch=1, seq=seq), device=device, at=datetime.now(UTC),
        interval_s=10.0, uptime_s=10.0, cpu_percent=1.0,
        memory=Memory(process_rss_bytes=1, system_available_bytes=1, system_total_bytes=2),
        temperature_c=None, throttle="normal", queue_depth=0, refusals={}, dropped={},
        models={m: ModelTelemetry(requests=1, errors=0, latency_p50_ms=1.0,
                                  latency_p95_ms=v, latency_p99_ms=v, throughput_per_s=1.0)
                for m, v in p95.items()}))


def test_what_each_state_says_of_one_model_with_its_device_order(fleet_db: str) -> None:
    db = FleetDB(fleet_db)
    db.put_state(state("a", {"digits": ModelState(version=2, runtime="onnx", committed=2),
                             "other": ModelState(version=7, runtime="tflite")}, (3, 41)))
    db.put_state(state("b", {"digits": ModelState(version=1, runtime="onnx")}, (1, 5)))
    db.put_state(state("c", {"other": ModelState(version=1, runtime="onnx")}, (2, 9)))
    db.put_state(state("d", {"digits": ModelState(version=2, runtime="onnx")}, None))
    db.put_state(state("e.x", {"d.x": ModelState(version=4, runtime="onnx", committed=3)},
                       (1, 1)))
    assert db.model_states("digits") == {
        "a": Said(2, 2, (3, 41)), "b": Said(1, None, (1, 5)), "c": Said(None, None, (2, 9)),
        "e.x": Said(None, None, (1, 1))}  # "d": no order, never counted
    assert db.model_states("d.x")["e.x"] == Said(4, 3, (1, 1))  # a dot is not a path step
    with pytest.raises(ValueError, match="not a model name"):
        db.model_states('x"')


def test_latency_of_one_model_from_telemetry_since_a_time(tmp_path: Path, fleet_db: str) -> None:
    db = FleetDB(fleet_db)
    for d in ("a", "b", "c"):
        db.register(d, KEY)
        db.put_state(state(d, {}, (1, 1)))
    before = time.time() - 100
    db.apply([(telemetry("a", 2, {"digits": 4.5, "other": 9.0}), time.time()),
              (telemetry("b", 2, {"other": 3.0}), time.time()),
              (telemetry("c", 2, {"digits": 7.25}), before)])
    assert db.latency_p95_since("digits", before + 1) == {"a": 4.5}
    assert db.latency_p95_since("digits", before - 1) == {"a": 4.5, "c": 7.25}
    assert db.latency_p95_since("other", before + 1) == {"a": 9.0, "b": 3.0}


def test_outsiders_are_registered_devices_with_a_state_not_in_the_rollout(
        tmp_path: Path, fleet_db: str) -> None:
    db = FleetDB(fleet_db)
    for d in ("m1", "m2", "new", "unregistered"):
        db.put_state(state(d, {}, (1, 1), groups=("lab", "x") if d == "new" else ("lab",)))
    for d in ("m1", "m2", "new", "no-state"):
        db.register(d, KEY)
    rollouts = Rollouts(db)
    rid = "r1"
    with db.tx():
        rollouts.store.execute("INSERT INTO rollouts (id, status) VALUES (?, 'running')", (rid,))
        for d in ("m1", "m2"):
            rollouts.store.execute("INSERT INTO rollout_devices (rollout, device, wave, status, "
                                 "attempts) VALUES (?, ?, 0, 'queued', 0)", (rid, d))
    assert rollouts.outsiders(rid) == [("new", '["lab", "x"]')]
    assert [d for d, _ in rollouts.outsiders("another")] == ["m1", "m2", "new"]


def test_first_reports_of_a_device_through_two_consumers_stay_in_its_order(
        postgres: Any) -> None:
    """Two ingest consumers on PostgreSQL (two hosts' connections) get the very first
    telemetry of a device, the newer one first: the second waits for the first's commit
    and finds its report stale, instead of both inserting a mark and the older winning."""
    import threading
    import uuid

    from polling import wait_until

    url = postgres.create_database(f"t_{uuid.uuid4().hex}")
    a, b, watch = FleetDB(url), FleetDB(url), FleetDB(url)
    a.register("dev", KEY)
    newer, older = telemetry("dev", 5, {"digits": 1.0}), telemetry("dev", 3, {"digits": 2.0})
    got: list[list[Report]] = []
    with a.tx():
        assert a.apply([(newer, time.time())]) == [newer]
        t = threading.Thread(target=lambda: got.append(b.apply([(older, time.time())])))
        t.start()
        wait_until(lambda: watch.store.one("SELECT COUNT(*) FROM pg_locks WHERE NOT "
                                           "granted")[0] >= 1, timeout_s=10,
                   what="the second consumer waiting on the first's transaction")
    t.join(10)
    assert got == [[]]  # stale: the newer one was applied first
    assert watch.store.one("SELECT epoch, seq FROM report_marks WHERE device = 'dev' AND "
                           "kind = 'telemetry'") == (1, 5)
    assert b.counter("ignored_stale") == 1
