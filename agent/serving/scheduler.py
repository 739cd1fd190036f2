"""The scheduler: resident models, bounded priority queues, micro-batching, admission.

Every request goes through `agent.serving.admission.admit` (pure) with the current load, budgets,
sensor reading and time; a refusal is raised as `Refused` with its reason and HTTP status
and counted. Admitted work waits in its model's bounded heap (priority, then deadline);
one worker thread per resident model takes the most urgent job, gathers more jobs of the
same model for up to `max_wait_s` or `max_batch` samples (only when the model has a dynamic
batch dimension), drops jobs whose deadline passed, runs one batch and completes each job's
`concurrent.futures.Future`.

Fast path: a request for an idle model with an empty queue whose runs take less than
`inline_max_s` runs at once on the caller's thread, skipping the hand-off to the worker
(~130 µs of thread wake-ups, more than a small int8 model takes to run), unless the caller
says other requests are coming (`inline=False`: the HTTP server has another request in
progress, or bytes waiting on an idle keep-alive connection; idle connections of a client's
pool do not count). That matters: run inline, a request holds the event loop, the next one
is not even read until it is done, the queue never fills and nothing batches or overlaps;
handed off, the loop parses the next requests while the worker runs, and they batch.
Micro-batches wait for more jobs only when there is evidence of concurrency (a non-empty
queue or a last batch above one), so a lone client never pays `max_wait_s`.

Hot swap: `load` replaces a model's entry under the lock. A worker reads the entry once per
batch, so a batch that started on the old model finishes on it, the next one runs on the
new model, and no request fails during the swap. Several models stay resident within the
memory budget; loading past it unloads the least recently used first, and so does a
request that would fit beside its own model but not beside the idle others.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from agent.errors import Refused, UnknownModel
from agent.serving.admission import (
    Admit,
    Budget,
    Load,
    Priority,
    Refusal,
    Request,
    Thermal,
    ThermalLimits,
    admit,
    limits_for,
    memory_verdict,
    thermal_state,
)
from agent.serving.metrics import Labels, Metrics, labels_key
from agent.serving.runtime import LoadedModel, prepared
from agent.serving.sensors import Sensors
from agent.trust.manifest import Manifest

F32 = npt.NDArray[np.float32]

log = logging.getLogger("edge_agent.serving")


@dataclass
class DriftSample:
    """What a sample of served batches looked like, on the manifest's reference bins
    (input values after the bundle's preprocessing; for a classifier predicted classes and
    top-1 softmax confidence; for an autoencoder the reconstruction error, and how many
    samples scored above the threshold). Taken and reset by the fleet link once per
    telemetry window, for the drift detectors."""

    input_counts: npt.NDArray[np.float64]
    class_counts: npt.NDArray[np.float64]
    score_counts: npt.NDArray[np.float64]
    confidence_sum: float = 0.0
    over_threshold: int = 0
    samples: int = 0

    @classmethod
    def empty(cls, manifest: Manifest) -> DriftSample:
        score = manifest.reference.output.score
        return cls(np.zeros(len(manifest.reference.input.histogram.fractions)),
                   np.zeros(len(manifest.reference.output.class_fractions)),
                   np.zeros(len(score.histogram.fractions) if score else 0))

    def add(self, manifest: Manifest, x: F32, y: F32) -> None:
        edges = manifest.reference.input.histogram.bin_edges
        clipped = np.clip(x.ravel(), edges[0], edges[-1])
        self.input_counts += np.histogram(clipped, bins=edges)[0]
        score = manifest.reference.output.score
        if manifest.task == "reconstruct" and score is not None:
            err = reconstruction_error(x, y)
            se = score.histogram.bin_edges
            self.score_counts += np.histogram(np.clip(err, se[0], se[-1]), bins=se)[0]
            self.over_threshold += int((err > score.threshold).sum())
            self.samples += len(y)
        elif manifest.task == "regress":
            self.samples += len(y)
        elif y.ndim == 2 and y.shape[1] == len(self.class_counts):
            self.class_counts += np.bincount(y.argmax(1), minlength=y.shape[1])
            z = y - y.max(1, keepdims=True)
            p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
            self.confidence_sum += float(p.max(1).sum())
            self.samples += len(y)


def reconstruction_error(x: F32, y: F32) -> npt.NDArray[np.float64]:
    """Per-sample mean squared difference between an autoencoder's (normalized) input and
    its output: the anomaly score."""
    d = y.reshape(len(y), -1).astype(np.float64) - x.reshape(len(x), -1)
    return np.asarray((d * d).mean(axis=1))


@dataclass
class Resident:
    """A loaded model as the scheduler serves it."""

    name: str
    manifest: Manifest
    model: LoadedModel
    resident_bytes: int
    batchable: bool
    last_used: float = 0.0
    # Runtimes such as TFLite's interpreter are not thread-safe: one run at a time.
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Moving average of one run's duration (None until measured) and the last batch size.
    run_s: float | None = None
    last_batch: int = 1
    batches: int = 0
    # Sampled batches (references, no copies) waiting for the drift statistics, which are
    # computed by whoever takes them (the telemetry thread), not on the request path.
    drift_batches: deque[tuple[F32, F32]] = field(default_factory=lambda: deque(maxlen=32))
    # its metric series' labels, keyed once (`Metrics.add`)
    key: Labels = field(init=False)
    costs: Costs = field(init=False)  # `planned_bytes`' terms, worked out once
    # what an inline run of one sample counts (`Scheduler._count`'s), made once
    inline_one: tuple[tuple[str, Labels, float], ...] = field(init=False)

    def __post_init__(self) -> None:
        self.key = labels_key(model=self.name)
        self.costs = costs_of(self.manifest)
        self.inline_one = batch_counts(self.key, 1, inline=True)

    def take_drift(self) -> DriftSample | None:
        """Drift statistics of the batches sampled since the last call (None: none)."""
        with self.lock:
            batches = list(self.drift_batches)
            self.drift_batches.clear()
        if not batches:
            return None
        sample = DriftSample.empty(self.manifest)
        for x, y in batches:
            sample.add(self.manifest, prepared(self.model, x), y)
        return sample


def batch_counts(key: Labels, samples: int, *, inline: bool
                 ) -> tuple[tuple[str, Labels, float], ...]:
    """The counters one batch run adds to (`Metrics.add`): batches, samples, and inline
    runs when the caller's thread ran it (the fast path)."""
    counted = (("edge_agent_batches_total", key, 1.0),
               ("edge_agent_inferences_total", key, float(samples)))
    return counted + ((("edge_agent_inline_runs_total", key, 1.0),) if inline else ())


class Done:
    """The outcome of a run on the caller's thread (the inline fast path), with the
    `concurrent.futures.Future` methods its callers use: complete before `submit` returns,
    so it needs none of a future's condition variable (one per request, a measurable part
    of a 300 µs request)."""

    __slots__ = ("_exc", "_value")

    def __init__(self) -> None:
        self._value: F32 | None = None
        self._exc: BaseException | None = None

    def set_result(self, value: F32) -> None:
        self._value = value

    def set_exception(self, exc: BaseException) -> None:
        self._exc = exc

    def done(self) -> bool:
        return True

    def cancelled(self) -> bool:
        return False

    def exception(self, timeout: float | None = None) -> BaseException | None:
        return self._exc

    def result(self, timeout: float | None = None) -> F32:
        if self._exc is not None:
            raise self._exc
        assert self._value is not None
        return self._value

    def add_done_callback(self, fn: Callable[[Done], object]) -> None:
        fn(self)


#: What `submit` gives: a future, or the outcome itself when the job ran inline.
Outcome = Future[F32] | Done


@dataclass(order=True, slots=True)
class _Job:
    priority: int
    deadline: float
    seq: int
    x: F32 = field(compare=False)
    arena_bytes: int = field(compare=False)
    future: Future[F32] = field(compare=False)
    submitted: float = field(compare=False)


class _Queue:
    def __init__(self) -> None:
        self.heap: list[_Job] = []
        self.worker: threading.Thread | None = None


def request_bytes(manifest: Manifest, x: F32) -> int:
    """What one request holds while it waits and runs: its input as queued, its outputs
    (float32, `len(x)` rows of every output's static shape) and the model's arena, which
    the manifest gives for one sample. onnxruntime runs the whole batch at once, so its
    activations grow with the rows; TFLite with a batch fixed at 1 runs row by row."""
    return planned_bytes(manifest, list(x.shape) if x.ndim else [1])


def planned_bytes(manifest: Manifest, shape: list[int]) -> int:
    """`request_bytes` of a float32 input of `shape`, known before it is decoded."""
    return bytes_for(costs_of(manifest), shape)


#: What a model's requests cost besides their input: output bytes per row, whether the
#: runtime goes row by row, and the arena of one run (`costs_of`, `bytes_for`).
Costs = tuple[int, bool, int]


def costs_of(manifest: Manifest) -> Costs:
    out_row = sum(math.prod(d for d in t.shape[1:] if d is not None) * 4
                  for t in manifest.outputs)
    row_by_row = manifest.runtime == "tflite" and manifest.inputs[0].shape[:1] == [1]
    return out_row, row_by_row, manifest.resources.arena_bytes


def bytes_for(costs: Costs, shape: Sequence[int]) -> int:
    """`planned_bytes` with the model's costs worked out once."""
    rows = shape[0] if shape else 1
    out_row, row_by_row, arena = costs
    return math.prod(shape) * 4 + rows * out_row + (1 if row_by_row else rows) * arena


class Scheduler:
    """Admission, queues and worker threads for the resident models."""

    def __init__(self, *, budget: Budget, thermal_limits: ThermalLimits, sensors: Sensors,
                 metrics: Metrics | None = None, max_wait_s: float = 0.002,
                 clock: Callable[[], float] = time.monotonic,
                 sensor_interval_s: float = 1.0, inline_max_s: float = 0.001,
                 drift_every: int = 4, on_unknown: Thermal = Thermal.NORMAL) -> None:
        self.budget = budget
        self.thermal_limits = thermal_limits
        self.sensors = sensors
        self.metrics = metrics or Metrics()
        self.max_wait_s = max_wait_s
        self.clock = clock
        self.sensor_interval_s = sensor_interval_s
        # The request path reads the sensors itself only when the polling thread
        # (`poll_sensors`) has missed a reading: a read (/proc/meminfo, the thermal zone)
        # costs a request 50-100 µs, and at one interval the request path won the race
        # against the thread about every time.
        self._stale_s = 2 * sensor_interval_s
        self.inline_max_s = inline_max_s
        # One batch in `drift_every` is kept (by reference) for the drift statistics.
        self.drift_every = max(1, drift_every)
        self.on_unknown = on_unknown
        self.thermal = Thermal.NORMAL
        self._known = True  # the sensor gave a reading last time
        # the request path takes the condition's lock itself (`_mutex`): entering the
        # condition is a Python-level call, taking the lock a C-level one
        self._mutex = threading.RLock()
        self._cv = threading.Condition(self._mutex)
        self.reading = sensors.read()
        self._read_at = clock()
        self._apply_reading()
        self._models: dict[str, Resident] = {}
        self._queues: dict[str, _Queue] = {}
        self._arena_in_flight = 0
        self._seq = itertools.count()
        self._stopping = False

    # -- models --------------------------------------------------------------------------
    def load(self, entry: Resident) -> Resident | None:
        """Serve `entry` (replacing any model of that name); returns the replaced one."""
        with self._cv:
            self._make_room(entry)
            entry.last_used = self.clock()
            old = self._models.get(entry.name)
            self._models[entry.name] = entry
            q = self._queues.setdefault(entry.name, _Queue())
            if q.worker is None:
                q.worker = threading.Thread(target=self._work, args=(entry.name,),
                                            name=f"infer-{entry.name}", daemon=True)
                q.worker.start()
            self._gauges()
            return old

    def _make_room(self, entry: Resident) -> None:
        """Before `entry` is served: unload the least recently used others until the
        resident models fit the budget beside it."""
        def fits() -> bool:
            return (sum(m.resident_bytes for m in self._models.values() if m.name != entry.name)
                    + entry.resident_bytes <= self.budget.memory_budget_bytes)
        self._unload_lru(entry.name, fits, spare_running=False)

    def _unload_lru(self, keep: str, fits: Callable[[], bool], *, spare_running: bool) -> bool:
        """Unload models other than `keep`, least recently used first, until `fits()`;
        never one with queued work, nor (`spare_running`) one with a run in progress. True
        when one was unloaded. Under the lock."""
        evicted = False
        for victim in sorted((m for m in self._models.values() if m.name != keep),
                             key=lambda m: m.last_used):
            if fits():
                break
            if self._queues[victim.name].heap or (spare_running and victim.lock.locked()):
                continue
            del self._models[victim.name]
            self.metrics.inc("edge_agent_model_unloads_total", model=victim.name)
            evicted = True
        return evicted

    def unload(self, name: str) -> None:
        with self._cv:
            self._models.pop(name, None)
            self._gauges()

    def models(self) -> dict[str, Resident]:
        with self._cv:
            return dict(self._models)

    def resident(self, name: str) -> Resident | None:
        """One resident model (None: not loaded), without copying the table (one lookup
        in a dict, atomic under the GIL: no lock)."""
        return self._models.get(name)

    def _gauges(self) -> None:
        self.metrics.set_family("edge_agent_resident_model_bytes", "model",
                                {m.name: m.resident_bytes for m in self._models.values()})
        self.metrics.set_family("edge_agent_model_version", "model",
                                {m.name: m.manifest.version for m in self._models.values()})

    # -- requests ------------------------------------------------------------------------
    @property
    def thermal_name(self) -> str:
        """normal, throttled, critical, or unknown (no sensor reading)."""
        return ("unknown" if self.reading.temperature_c is None
                else self.thermal.name.lower())

    def _sense(self, now: float) -> None:
        self.reading = self.sensors.read()
        self._read_at = now
        self._apply_reading()

    def _apply_reading(self) -> None:
        before, was_known = self.thermal, self._known
        t = self.reading.temperature_c
        self.thermal = thermal_state(self.thermal, t, self.thermal_limits,
                                     unknown=self.on_unknown)
        self._known = t is not None
        if t is not None:
            self.metrics.set("edge_agent_temperature_celsius", t)
        self.metrics.set("edge_agent_throttle_state", int(self.thermal))
        self.metrics.set("edge_agent_thermal_sensor_ok", int(t is not None))
        self.metrics.set("edge_agent_available_memory_bytes", self.reading.available_bytes)
        if self.thermal != before or self._known != was_known:
            log.warning("thermal.state %s -> %s (%s)", before.name.lower(), self.thermal_name,
                        "no sensor reading" if t is None else f"{t:.1f} °C")

    def poll_sensors(self, stop: threading.Event) -> None:
        """Read the sensors every `sensor_interval_s` until `stop`, so an idle device knows
        its temperature (the daemon runs this on a thread of its own)."""
        while not stop.wait(self.sensor_interval_s):
            try:
                reading = self.sensors.read()
            except Exception:  # a broken sensor must not end the polling
                log.exception("thermal.read_failed")
                continue
            with self._cv:
                self.reading, self._read_at = reading, self.clock()
                self._apply_reading()

    def precheck(self, name: str, shape: list[int]) -> None:
        """Refuse, before the input is decoded, a request whose declared shape can never fit
        the memory budget or does not fit now (the decoded float32 batch would be the
        allocation admission exists to prevent). `submit` decides again on the real array.

        Raises:
            UnknownModel: no such model resident.
            Refused: `too_large` (413) or `memory` (503).
        """
        with self._cv:
            entry = self._models.get(name)
            if entry is None:
                raise UnknownModel(name)
            req = Request(priority=Priority.NORMAL, deadline=math.inf,
                          arena_bytes=bytes_for(entry.costs, shape))
            verdict = memory_verdict(req, self._load(), self.budget, self.reading)
            if verdict is not None and self._evict_for(entry, req.arena_bytes):
                verdict = memory_verdict(req, self._load(), self.budget, self.reading)
        if verdict is not None:
            self.metrics.inc("edge_agent_refusals_total", reason=verdict.reason)
            raise Refused(verdict.reason, verdict.status, verdict.detail)

    def _evict_for(self, entry: Resident, arena_bytes: int) -> bool:
        """Unload idle models other than `entry` (`_unload_lru`, sparing any with a run in
        progress) until `arena_bytes` more fit the budget; they load again on their next
        request. True when one was unloaded. Under the lock."""
        def fits() -> bool:
            load = self._load()
            return (load.resident_bytes + load.arena_in_flight_bytes + arena_bytes
                    <= self.budget.memory_budget_bytes)
        evicted = self._unload_lru(entry.name, fits, spare_running=True)
        if evicted:
            self._gauges()
        return evicted

    def _load(self) -> Load:
        return Load(self._queue_depth(), sum(m.resident_bytes for m in self._models.values()),
                    self._arena_in_flight)

    def _queue_depth(self) -> int:
        return sum(len(q.heap) for q in self._queues.values())

    def submit(self, name: str, x: F32, *, priority: Priority = Priority.NORMAL,
               timeout_s: float = 1.0, inline: bool = True) -> Outcome:
        """Queue a batch of inputs for `name`; the future gets its outputs. `inline`: the
        fast path may run it on the caller's thread (see the module's docstring).

        Raises:
            UnknownModel: no such model resident.
            Refused: admission said no (reason and HTTP status attached).
        """
        now = self.clock()
        with self._mutex:
            if now - self._read_at >= self._stale_s:
                self._sense(now)
            entry = self._models.get(name)
            if entry is None:
                raise UnknownModel(name)
            q = self._queues[name]
            arena = bytes_for(entry.costs, x.shape if x.ndim else (1,))
            req = Request(priority, now + timeout_s, arena)
            load = self._load()
            verdict = admit(req, load=load, budget=self.budget, reading=self.reading,
                            thermal=self.thermal, now=now)
            if (isinstance(verdict, Refusal) and verdict.reason in ("too_large", "memory")
                    and self._evict_for(entry, arena)):
                load = self._load()
                verdict = admit(req, load=load, budget=self.budget, reading=self.reading,
                                thermal=self.thermal, now=now)
            if not isinstance(verdict, Admit):
                self.metrics.inc("edge_agent_refusals_total", reason=verdict.reason)
                raise Refused(verdict.reason, verdict.status, verdict.detail)
            self._arena_in_flight += arena
            if not (inline and not q.heap and entry.run_s is not None
                    and entry.run_s * len(x) <= self.inline_max_s
                    and entry.lock.acquire(blocking=False)):
                fut: Future[F32] = Future()
                heapq.heappush(q.heap, _Job(int(priority), req.deadline, next(self._seq), x,
                                            arena, fut, now))
                self.metrics.set("edge_agent_queue_depth", load.queue_depth + 1)
                self._cv.notify_all()
                return fut
        done = Done()
        try:  # the fast path, outside the scheduler lock, holding only the model's lock
            started = time.perf_counter()
            try:
                y = entry.model.run(x)
            except Exception as exc:  # as `_run`: the request fails, not the caller
                self.metrics.inc("edge_agent_errors_total", model=entry.name)
                done.set_exception(exc)
                return done
            self._sample(entry, x, y, started)
            self._count(entry, len(x), (self.clock() - now,), inline=True)
            done.set_result(y)
        finally:
            entry.lock.release()
            with self._mutex:
                self._arena_in_flight -= arena
        return done

    # -- workers -------------------------------------------------------------------------
    def _take(self, name: str) -> tuple[Resident, list[_Job]] | None:
        """Block for the next batch of `name`; None when stopping."""
        q = self._queues[name]
        with self._cv:
            while not self._stopping and not (q.heap and name in self._models):
                self._cv.wait(0.5)
            if self._stopping:
                return None
            entry = self._models[name]
            jobs = [heapq.heappop(q.heap)]
            _, max_batch = limits_for(self.thermal, self.budget)
            if entry.batchable and max_batch > 1 and (q.heap or entry.last_batch > 1):
                until = self.clock() + self.max_wait_s
                while sum(len(j.x) for j in jobs) < max_batch:
                    if q.heap:
                        if sum(len(j.x) for j in jobs) + len(q.heap[0].x) > max_batch:
                            break
                        jobs.append(heapq.heappop(q.heap))
                        continue
                    left = until - self.clock()
                    if left <= 0 or not self._cv.wait(left):
                        break
            entry.last_used = self.clock()
            self.metrics.set("edge_agent_queue_depth", self._queue_depth())
            return entry, jobs

    def _work(self, name: str) -> None:
        while (taken := self._take(name)) is not None:
            entry, jobs = taken
            now = self.clock()
            live = []
            for j in jobs:
                if now >= j.deadline:
                    self.metrics.inc("edge_agent_refusals_total", reason="deadline")
                    j.future.set_exception(Refused("deadline", 503, "deadline passed in the "
                                                   "queue"))
                else:
                    live.append(j)
            self._run(entry, live)
            with self._cv:
                self._arena_in_flight -= sum(j.arena_bytes for j in jobs)

    def _run(self, entry: Resident, jobs: list[_Job]) -> None:
        if not jobs:
            return
        try:
            x = jobs[0].x if len(jobs) == 1 else np.concatenate([j.x for j in jobs])
            started = time.perf_counter()
            with entry.lock:
                y = entry.model.run(x)
                self._sample(entry, x, y, started)
        except Exception as exc:  # a runtime failure fails these jobs, not the worker
            self.metrics.inc("edge_agent_errors_total", model=entry.name)
            for j in jobs:
                j.future.set_exception(exc)
            return
        done = self.clock()
        # counted before any answer: a client that has one sees it counted
        self._count(entry, len(x), [done - j.submitted for j in jobs])
        start = 0
        for j in jobs:
            j.future.set_result(y if len(jobs) == 1 else y[start:start + len(j.x)])
            start += len(j.x)

    def _count(self, entry: Resident, samples: int, waited: Iterable[float], *,
               inline: bool = False) -> None:
        """The metrics of one batch run: its samples, and each request's time from submit
        to outcome."""
        key = entry.key
        counted = (entry.inline_one if inline and samples == 1  # the common lone sample
                   else batch_counts(key, samples, inline=inline))
        self.metrics.add(counted,
                         [("edge_agent_request_duration_seconds", key, w) for w in waited])

    def _sample(self, entry: Resident, x: F32, y: F32, started: float) -> None:
        """Bookkeeping after a run, under the model's lock: run time, batch size, and one
        batch in `drift_every` kept for the drift statistics."""
        took = (time.perf_counter() - started) / len(x)
        entry.run_s = took if entry.run_s is None else 0.9 * entry.run_s + 0.1 * took
        entry.last_batch = len(x)
        entry.batches += 1
        if entry.batches % self.drift_every == 0:
            entry.drift_batches.append((x, y))

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            for q in self._queues.values():
                for j in q.heap:
                    j.future.set_exception(Refused("stopping", 503, "agent is stopping"))
                q.heap.clear()
            self._cv.notify_all()
