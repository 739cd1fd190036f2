"""The scheduler as a component: a real ONNX Runtime session of the converted model, fake
sensors, and a gate in front of the model so queueing is deterministic."""

from __future__ import annotations

import threading
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
from conftest import needs_onnxruntime

from agent.errors import Refused, UnknownModel
from agent.serving.admission import Budget, Priority, Reading, ThermalLimits
from agent.serving.runtime import F32, LoadedModel, open_model
from agent.serving.scheduler import Done, Resident, Scheduler, request_bytes
from agent.testing import FakeClock, FakeSensors
from agent.trust.bundle import read_manifest

pytestmark = needs_onnxruntime  # every test here serves an ONNX model


LIMITS = ThermalLimits(throttle_c=78.0, critical_c=84.0, hysteresis_c=5.0)


class Gated:
    """The real model behind a gate the test opens, to hold the worker busy."""

    def __init__(self, model: LoadedModel) -> None:
        self.model, self.inputs, self.outputs = model, model.inputs, model.outputs
        self.gate = threading.Event()
        self.entered = threading.Event()

    def run(self, x: F32) -> F32:
        self.entered.set()
        self.gate.wait(10)
        return self.model.run(x)


@pytest.fixture
def onnx(onnx_run: Path, tmp_path: Path) -> tuple[LoadedModel, object]:
    m = read_manifest(onnx_run / "bundle")  # the raspberry-pi-4 bundle's manifest
    m = m.model_copy(update={"runtime": "onnx"})
    return open_model(onnx_run / "model_int8.onnx", "onnx"), m


def sched(sensors: FakeSensors | None = None, clock: FakeClock | None = None,
          **budget: int) -> Scheduler:
    b = {"memory_budget_bytes": 10**9, "min_available_bytes": 0, "queue_max": 8,
         "max_batch": 8} | budget
    return Scheduler(budget=Budget(**b), thermal_limits=LIMITS,
                     sensors=sensors or FakeSensors(), max_wait_s=0.05, sensor_interval_s=0,
                     clock=clock or FakeClock())


class Offset:
    """The real model with `delta` added to its outputs: another model, told apart by
    its outputs."""

    def __init__(self, model: LoadedModel, delta: float) -> None:
        self.model, self.delta = model, delta
        self.inputs, self.outputs = model.inputs, model.outputs

    def run(self, x: F32) -> F32:
        return self.model.run(x) + np.float32(self.delta)


def x(n: int = 1) -> F32:
    return np.random.default_rng(0).uniform(0, 1, (n, 1, 8, 8)).astype(np.float32)


def test_concurrent_requests_share_a_micro_batch_and_get_their_own_rows(onnx) -> None:  # type: ignore[no-untyped-def]
    """The worker is held on a first request; three more arrive meanwhile and run as one
    batch once it is free (a timing-free version: before, whether the worker woke between
    submits decided the batches)."""
    model, m = onnx
    s = sched()
    gated = Gated(model)
    s.load(Resident("digits", m, gated, 1000, batchable=True))
    inputs = [x(1) + i for i in range(4)]
    futs: list[Future[F32]] = [s.submit("digits", inputs[0])]
    assert gated.entered.wait(5)  # the worker runs the first and holds the model
    futs += [s.submit("digits", xi) for xi in inputs[1:]]
    gated.gate.set()
    outs = [f.result(5) for f in futs]
    for xi, yi in zip(inputs, outs, strict=True):
        np.testing.assert_allclose(yi, model.run(xi), atol=1e-5)
    assert s.metrics.counter("edge_agent_batches_total", model="digits") == 2
    s.stop()


def test_queue_bound_and_deadline_in_the_queue(onnx) -> None:  # type: ignore[no-untyped-def]
    model, m = onnx
    gated, clock = Gated(model), FakeClock()
    s = sched(queue_max=2, clock=clock)
    s.load(Resident("digits", m, gated, 1000, batchable=False))
    first = s.submit("digits", x())
    assert gated.entered.wait(5)
    late = s.submit("digits", x(), timeout_s=0.01)
    s.submit("digits", x())
    with pytest.raises(Refused) as err:
        s.submit("digits", x())
    assert (err.value.reason, err.value.status) == ("queue_full", 429)
    clock.jump(0.05)  # past the late request's deadline while it waits in the queue
    gated.gate.set()
    first.result(5)
    with pytest.raises(Refused, match="deadline"):
        late.result(5)
    assert s.metrics.counter("edge_agent_refusals_total", reason="deadline") == 1
    s.stop()


def test_high_priority_jumps_the_queue(onnx) -> None:  # type: ignore[no-untyped-def]
    model, m = onnx
    gated = Gated(model)
    s = sched()
    s.load(Resident("digits", m, gated, 1000, batchable=False))
    s.submit("digits", x())
    assert gated.entered.wait(5)
    order: list[str] = []
    low = s.submit("digits", x(), priority=Priority.LOW)
    high = s.submit("digits", x(), priority=Priority.HIGH)
    low.add_done_callback(lambda _: order.append("low"))
    high.add_done_callback(lambda _: order.append("high"))
    gated.gate.set()
    low.result(5), high.result(5)
    assert order == ["high", "low"]
    s.stop()


def test_least_recently_used_model_is_unloaded_to_stay_in_budget(onnx) -> None:  # type: ignore[no-untyped-def]
    model, m = onnx
    clock, size = FakeClock(), 2000
    # room for two resident models and one request (input, outputs, arena), not three models
    s = sched(memory_budget_bytes=2 * size + request_bytes(m, x()), clock=clock)
    s.load(Resident("a", m, model, size, batchable=True))
    clock.jump(1)
    s.load(Resident("b", m, model, size, batchable=True))
    clock.jump(1)
    s.submit("a", x()).result(5)  # a, loaded first, is now the most recently used
    clock.jump(1)
    s.load(Resident("c", m, model, size, batchable=True))
    assert set(s.models()) == {"a", "c"}  # b went: least recently used, not first loaded
    with pytest.raises(UnknownModel):
        s.submit("b", x())
    assert s.metrics.counter("edge_agent_model_unloads_total", model="b") == 1
    s.stop()


def test_idle_models_make_room_for_a_request_that_fits_beside_its_own_model(onnx) -> None:  # type: ignore[no-untyped-def]
    """A big batch for b fits the budget with b alone, not with a resident too: a, idle,
    is unloaded (it loads again on its next request) and the batch runs. A model busy with
    a request is never unloaded for another's: then the batch is refused."""
    model, m = onnx
    size = 2000
    batch = request_bytes(m, x(8))
    s = sched(memory_budget_bytes=2 * size + batch - 1)
    s.load(Resident("a", m, model, size, batchable=True))
    s.load(Resident("b", m, model, size, batchable=True))
    assert set(s.models()) == {"a", "b"}
    assert s.submit("b", x(8)).result(5).shape == (8, 10)
    assert set(s.models()) == {"b"}
    assert s.metrics.counter("edge_agent_model_unloads_total", model="a") == 1
    gated = Gated(model)
    s.load(Resident("a", m, gated, size, batchable=True))  # back, and busy
    s.unload("b")
    s.load(Resident("b", m, model, size, batchable=True))
    busy = s.submit("a", x(), timeout_s=10)
    assert gated.entered.wait(5)
    with pytest.raises(Refused) as err:
        s.submit("b", x(8))
    assert err.value.reason in ("too_large", "memory")
    assert set(s.models()) == {"a", "b"}
    gated.gate.set()
    busy.result(5)
    s.stop()


def test_a_request_is_charged_its_real_bytes_not_a_fixed_arena(onnx) -> None:  # type: ignore[no-untyped-def]
    """A batch of 10,000 samples holds 2.6 MB of input, 400 KB of outputs and, onnxruntime
    running the batch at once, 10,000 samples' activations: charged as such, it cannot
    pass a budget a fixed arena would have let it through. TFLite at batch 1 runs row by
    row: one sample's arena."""
    model, m = onnx
    assert m.runtime == "onnx" and m.resources.arena_bytes > 0
    tfl = m.model_copy(update={"runtime": "tflite"})
    assert request_bytes(tfl, x(10_000)) - request_bytes(tfl, x()) == 9_999 * (64 + 10) * 4
    one = request_bytes(m, x())
    big = request_bytes(m, x(10_000))
    # rows of input (1x8x8), output (10) and arena
    assert big - one == 9_999 * ((64 + 10) * 4 + m.resources.arena_bytes)
    s = sched(memory_budget_bytes=1000 + 100 * one)
    s.load(Resident("digits", m, model, 1000, batchable=True))
    with pytest.raises(Refused) as err:
        s.submit("digits", x(10_000))
    assert (err.value.reason, err.value.status) == ("too_large", 413)
    assert s.submit("digits", x(8)).result(5).shape == (8, 10)
    s.stop()


def test_thermal_critical_sheds_normal_priority(onnx) -> None:  # type: ignore[no-untyped-def]
    model, m = onnx
    sensors = FakeSensors(temperature_c=90.0)
    s = sched(sensors)
    s.load(Resident("digits", m, model, 1000, batchable=True))
    with pytest.raises(Refused) as err:
        s.submit("digits", x())
    assert err.value.reason == "thermal"
    s.submit("digits", x(), priority=Priority.HIGH).result(5)
    sensors.temperature_c = 60.0
    s.submit("digits", x()).result(5)
    s.stop()


class CountedSensors(FakeSensors):
    reads: int = 0

    def read(self) -> Reading:
        self.reads += 1
        return super().read()


def test_the_request_path_reads_the_sensors_only_when_the_polling_thread_fell_behind(
        onnx) -> None:  # type: ignore[no-untyped-def]
    """Readings come from the polling thread every interval (1 s here); a request reads
    the sensors itself (50-100 µs of /proc and sysfs) only when the last reading is two
    intervals old, the thread having missed one. Requests at these seconds after the
    last reading; whether each read, and the thermal state it decided on."""
    model, m = onnx
    sensors, clock = CountedSensors(temperature_c=60.0), FakeClock()
    s = Scheduler(budget=Budget(memory_budget_bytes=10**9, min_available_bytes=0,
                                queue_max=8, max_batch=8), thermal_limits=LIMITS,
                  sensors=sensors, sensor_interval_s=1.0, clock=clock)
    s.load(Resident("digits", m, model, 1000, batchable=True))
    assert sensors.reads == 1  # at start
    sensors.temperature_c = 90.0  # critical from now on, for whoever reads it
    seen = []
    for at in (0.5, 1.0, 1.99, 2.0, 2.5, 4.0):
        clock.now = 1000.0 + at  # FakeClock() starts at 1000 s
        before = sensors.reads
        try:
            s.submit("digits", x()).result(5)
            refused = False
        except Refused:
            refused = True
        seen.append((at, sensors.reads - before, refused))
    assert seen == [(0.5, 0, False), (1.0, 0, False), (1.99, 0, False),  # the thread's
                    (2.0, 1, True),  # two intervals without a reading: read, critical
                    (2.5, 0, True), (4.0, 1, True)]
    s.stop()


def test_a_hot_swap_lets_the_running_batch_finish_on_the_old_model(onnx) -> None:  # type: ignore[no-untyped-def]
    model, m = onnx
    old, new = Gated(model), Offset(model, 100.0)  # the new version's outputs are +100
    s = sched()
    s.load(Resident("digits", m, old, 1000, batchable=False))
    running = s.submit("digits", x())
    assert old.entered.wait(5)
    s.load(Resident("digits", m.model_copy(update={"version": 2}), new, 1000,
                    batchable=False))
    queued = s.submit("digits", x())
    old.gate.set()
    np.testing.assert_allclose(running.result(5), model.run(x()), atol=1e-5)  # old model
    np.testing.assert_allclose(queued.result(5), model.run(x()) + 100, atol=1e-4)  # new
    assert s.models()["digits"].manifest.version == 2
    s.stop()


def test_inline_runs_count_as_batches_do_and_fail_alone(onnx) -> None:  # type: ignore[no-untyped-def]
    """The fast path (a lone request run on the caller's thread) records what a worker's
    batch records: a batch, its samples, a latency observation each, plus an inline run;
    a runtime failure there fails that request, counts an error, and frees the model."""
    model, m = onnx
    s = sched()
    s.load(Resident("digits", m, model, 1000, batchable=True))
    first = s.submit("digits", x(1))  # run_s unknown: the worker measures it first
    assert isinstance(first, Future)
    first.result(5)
    s._models["digits"].run_s = 1e-5  # measured fast (a first run is slow: warm-up)
    outcomes = [s.submit("digits", x(n)) for n in (1, 3, 1)]
    assert all(isinstance(o, Done) for o in outcomes)
    np.testing.assert_allclose(outcomes[1].result(), model.run(x(3)), atol=1e-5)

    def count(name: str) -> float:
        return s.metrics.counter(name, model="digits")

    assert (count("edge_agent_batches_total"), count("edge_agent_inferences_total"),
            count("edge_agent_inline_runs_total")) == (4, 6, 3)
    histogram = s.metrics.histograms["edge_agent_request_duration_seconds"]
    assert histogram[(("model", "digits"),)].count == 4

    class Broken:
        inputs, outputs = model.inputs, model.outputs

        def run(self, x: F32) -> F32:
            raise RuntimeError("the runtime failed")

    s.load(Resident("digits", m, Broken(), 1000, batchable=True))
    s._models["digits"].run_s = 1e-6  # known fast: the next request runs inline
    failed = s.submit("digits", x(1))
    assert isinstance(failed, Done)
    with pytest.raises(RuntimeError, match="the runtime failed"):
        failed.result()
    assert count("edge_agent_errors_total") == 1 and count("edge_agent_batches_total") == 4
    assert not s._models["digits"].lock.locked() and s._arena_in_flight == 0
    s.stop()
