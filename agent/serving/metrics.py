"""Counters, gauges and latency histograms, rendered in the Prometheus text format.

Small and lock-protected: the request path does one histogram observation and one counter
increment per request. Names follow Prometheus conventions (`_total`, `_seconds`, `_bytes`).
Every family has HELP and TYPE (`FAMILIES`), also before its first sample; collectors
(`add_collector`) add gauges computed at scrape time: the process (`process_*`, as
prometheus_client names them), build information, the fleet link's state.

Not prometheus_client: measured, importing it and keeping one counter and one histogram
adds 1.01 MiB USS to the agent's process (Python 3.11, prometheus_client 0.26), and the
telemetry windows and detectors need `Snapshot`s of the raw buckets, which this keeps.
"""

from __future__ import annotations

import bisect
import contextlib
import platform
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable

import numpy as np

# Inference latency buckets, seconds: 50 µs .. 5 s, at most 1.5x apart from 0.5 to 100 ms,
# where edge models run: quantiles estimated from them (p50 for the latency detector, p95
# for the rollout controller's comparison) are then within ~20 %, where 2.5x-wide buckets
# made a steady model's p95 jump between 5 and 9 ms from one window to the next.
BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 7.5e-4, 1e-3, 1.5e-3, 2e-3, 3e-3, 4e-3, 5e-3, 6e-3,
           8e-3, 1e-2, 1.5e-2, 2e-2, 3e-2, 4e-2, 5e-2, 7.5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


# Every family the agent exports: name -> (type, help).
FAMILIES: dict[str, tuple[str, str]] = {
    "edge_agent_request_duration_seconds": (
        "histogram", "Time from a request's admission to its answer, by model (queueing, "
        "batching and the runtime; the client also sees parsing and the network)."),
    "edge_agent_inferences_total": ("counter", "Samples inferred, by model."),
    "edge_agent_batches_total": ("counter", "Runtime invocations, by model."),
    "edge_agent_inline_runs_total": ("counter", "Requests run at once on the caller's thread "
                                     "(the fast path: nothing queued, nothing else waiting), "
                                     "by model."),
    "edge_agent_errors_total": ("counter", "Runtime failures, by model."),
    "edge_agent_refusals_total": (
        "counter", "Requests refused by admission, by reason (queue_full, deadline, memory, "
        "thermal, too_large, stopping)."),
    "edge_agent_http_responses_total": ("counter", "HTTP answers sent, by status code and "
                                        "kind (inference, health, metrics, api)."),
    "edge_agent_http_heavy_wait_seconds_total": (
        "counter", "Time requests with large JSON waited for the heavy gate (api."
                   "heavy_json_share of the wall time at most goes to large JSON)."),
    "edge_agent_http_connections": (
        "gauge", "Connections open now, by listener (unix, admin, tcp) and state (idle: "
        "waiting for a request; busy)."),
    "edge_agent_http_connections_refused_total": (
        "counter", "Connections refused with 503 at a full listener, none of its "
        "connections idle, by listener."),
    "edge_agent_http_idle_closed_total": (
        "counter", "Idle keep-alive connections closed to admit a new one at a full "
        "listener, by listener."),
    "edge_agent_updates_total": (
        "counter", "Bundle installs, by result (committed, failed, rejected_<check>)."),
    "edge_agent_model_reloads_total": (
        "counter", "Models loaded again after an unload to stay within the memory budget."),
    "edge_agent_model_unloads_total": (
        "counter", "Models unloaded (least recently used) to stay within the memory budget."),
    "edge_agent_model_version": ("gauge", "The bundle version each resident model serves."),
    "edge_agent_resident_model_bytes": (
        "gauge", "Memory charged to each resident model (its file and runtime session)."),
    "edge_agent_queue_depth": ("gauge", "Requests waiting in the scheduler's queues."),
    "edge_agent_temperature_celsius": ("gauge", "The last thermal sensor reading."),
    "edge_agent_thermal_sensor_ok": ("gauge", "1 when the last sensor read gave a value."),
    "edge_agent_throttle_state": ("gauge", "Thermal state: 0 normal, 1 throttled, 2 critical."),
    "edge_agent_available_memory_bytes": (
        "gauge", "The system's available memory (MemAvailable), which admission keeps "
        "above scheduler.min_available_bytes; the agent's own is process_resident_memory_bytes."),
    "edge_agent_build_info": (
        "gauge", "Always 1; the labels say which agent, Python and runtimes are running."),
    "edge_agent_mqtt_connected": ("gauge", "1 while the fleet link is connected to a broker."),
    "edge_agent_mqtt_connects_total": ("counter", "Successful connections to a broker."),
    "edge_agent_outbox_messages": (
        "gauge", "Reports waiting in the outbox for the broker (telemetry, events, results)."),
    "edge_agent_outbox_dropped_total": (
        "counter", "Reports the outbox dropped at its cap while the broker was away."),
    "process_resident_memory_bytes": ("gauge", "Resident memory size in bytes."),
    "process_virtual_memory_bytes": ("gauge", "Virtual memory size in bytes."),
    "process_cpu_seconds_total": ("counter", "Total user and system CPU time in seconds."),
    "process_open_fds": ("gauge", "Number of open file descriptors."),
    "process_start_time_seconds": ("gauge", "Start time of the process since the epoch."),
}
Sample = tuple[str, dict[str, str], float]  # family, labels, value


def process_samples() -> list[Sample]:
    """The `process_*` families from /proc (psutil), at scrape time."""
    import psutil  # noqa: PLC0415  # the agent has it; the registry does not need it

    p = psutil.Process()
    with p.oneshot():
        mem, cpu = p.memory_info(), p.cpu_times()
        out: list[Sample] = [
            ("process_resident_memory_bytes", {}, float(mem.rss)),
            ("process_virtual_memory_bytes", {}, float(mem.vms)),
            ("process_cpu_seconds_total", {}, cpu.user + cpu.system),
            ("process_start_time_seconds", {}, p.create_time())]
        with contextlib.suppress(AttributeError, OSError):  # not on every platform
            out.append(("process_open_fds", {}, float(p.num_fds())))
    return out


def build_info(agent_version: str) -> Callable[[], list[Sample]]:
    """edge_agent_build_info, its labels read once: the agent, Python, the machine and the
    installed runtimes' versions ("" when absent), from their metadata, not an import."""
    from importlib import metadata  # noqa: PLC0415

    labels = {"version": agent_version, "python": platform.python_version(),
              "machine": platform.machine()}
    for dist, label in (("onnxruntime", "onnxruntime"), ("ai-edge-litert", "litert"),
                        ("tflite-runtime", "tflite_runtime")):
        try:
            labels[label] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            labels[label] = ""
    return lambda: [("edge_agent_build_info", labels, 1.0)]


class Histogram:
    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, value)] += 1
        self.sum += value
        self.count += 1

    def observe_many(self, values: np.ndarray) -> None:
        """`observe` each of `values` (one pass in numpy: the fleet simulator records
        hundreds of synthetic latencies per device and interval)."""
        idx = np.searchsorted(BUCKETS, values, side="left")  # = bisect_left
        for i, n in enumerate(np.bincount(idx, minlength=len(self.counts)).tolist()):
            self.counts[i] += n
        self.sum += float(values.sum())
        self.count += len(values)

    def quantile(self, q: float) -> float | None:
        """The q-quantile, interpolated linearly inside its bucket, as Prometheus'
        `histogram_quantile` estimates it (the first bucket starts at 0; a quantile in
        the overflow bucket is its lower bound, the largest finite one).

        Interpolating matters to the latency detector: with the upper bound alone, a
        model whose median sits near a bound (say 5 ms) jumps between 5 and 10 ms from
        one window to the next, a 2x "regression" out of nothing (found by the fleet
        simulator, which rolled back healthy devices)."""
        if self.count == 0:
            return None
        target, seen, lower = q * self.count, 0, 0.0
        for bound, n in zip(BUCKETS, self.counts, strict=False):
            if n and seen + n >= target:
                return lower + (bound - lower) * (target - seen) / n
            seen += n
            lower = bound
        return BUCKETS[-1]


def _labels(pairs: tuple[tuple[str, str], ...]) -> str:
    if not pairs:
        return ""
    inner = ",".join(f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                     for k, v in pairs)
    return "{" + inner + "}"


Labels = tuple[tuple[str, str], ...]


def labels_key(**labels: str) -> Labels:
    """A series' labels as `Metrics` keys them (`Metrics.add` takes keys made once)."""
    return _key(labels)


def _key(labels: dict[str, str]) -> Labels:
    return tuple(sorted(labels.items()))


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


class Metrics:
    """The agent's metrics registry."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counters: dict[str, dict[Labels, float]] = defaultdict(dict)
        self.gauges: dict[str, dict[Labels, float]] = defaultdict(dict)
        self.histograms: dict[str, dict[Labels, Histogram]] = defaultdict(dict)
        self._collectors: list[Callable[[], Iterable[Sample]]] = []

    def add_collector(self, collect: Callable[[], Iterable[Sample]]) -> None:
        """`collect()` gives samples of FAMILIES' counters and gauges at scrape time; one
        that fails is skipped for that scrape (a scrape never fails on it)."""
        self._collectors.append(collect)

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        key = _key(labels)
        with self._lock:
            series = self.counters[name]
            series[key] = series.get(key, 0.0) + value

    def add(self, counters: Iterable[tuple[str, Labels, float]],
            observations: Iterable[tuple[str, Labels, float]] = ()) -> None:
        """Several counter increments and histogram observations under one lock, each
        series named by its label key (`labels_key`), worked out once by the caller: what
        the request path records per inference, at the cost of one `inc`."""
        with self._lock:
            for name, key, value in counters:
                series = self.counters[name]
                series[key] = series.get(key, 0.0) + value
            for name, key, value in observations:
                self._histogram(name, key).observe(value)

    def set(self, name: str, value: float, **labels: str) -> None:
        with self._lock:
            self.gauges[name][_key(labels)] = value

    def set_family(self, name: str, label: str, values: dict[str, float]) -> None:
        """Replace every series of gauge `name` with one per `label` value (a model that
        was unloaded leaves no stale series behind)."""
        with self._lock:
            self.gauges[name] = {((label, k),): v for k, v in values.items()}

    def _histogram(self, name: str, key: Labels) -> Histogram:
        """The series' histogram, made on first use (under the lock)."""
        h = self.histograms[name].get(key)
        if h is None:
            h = self.histograms[name][key] = Histogram()
        return h

    def observe(self, name: str, value: float, **labels: str) -> None:
        with self._lock:
            self._histogram(name, _key(labels)).observe(value)

    def observe_many(self, name: str, values: np.ndarray, **labels: str) -> None:
        with self._lock:
            self._histogram(name, _key(labels)).observe_many(values)

    def gauge(self, name: str, **labels: str) -> float:
        with self._lock:
            return self.gauges[name].get(_key(labels), 0.0)

    def counter(self, name: str, **labels: str) -> float:
        with self._lock:
            return self.counters[name].get(_key(labels), 0.0)

    def render(self) -> str:
        """The Prometheus text exposition format (version 0.0.4): HELP and TYPE for every
        family in FAMILIES, samples where there are some."""
        collected: dict[str, dict[Labels, float]] = defaultdict(dict)
        for collect in self._collectors:
            try:
                for name, labels, value in collect():
                    collected[name][_key(labels)] = value
            except Exception:  # a scrape must not fail on one collector
                continue
        lines: list[str] = []
        with self._lock:
            scalar = {n: {**self.counters.get(n, {}), **self.gauges.get(n, {}),
                          **collected.get(n, {})}
                      for n in {*self.counters, *self.gauges, *collected}}
            names = sorted({*FAMILIES, *scalar, *self.histograms})
            for name in names:
                kind = FAMILIES.get(name, ("counter" if name in self.counters else
                                           "histogram" if name in self.histograms else
                                           "gauge", ""))[0]
                lines.append(f"# HELP {name} {_help(name)}")
                lines.append(f"# TYPE {name} {kind}")
                if kind == "histogram":
                    lines += self._histogram_lines(name)
                else:
                    lines += [f"{name}{_labels(k)} {_num(v)}"
                              for k, v in sorted(scalar.get(name, {}).items())]
        return "\n".join(lines) + "\n"

    def _histogram_lines(self, name: str) -> list[str]:
        lines = []
        for k, h in sorted(self.histograms.get(name, {}).items()):
            cum = 0
            for bound, n in zip((*BUCKETS, float("inf")), h.counts, strict=True):
                cum += n
                le = "+Inf" if bound == float("inf") else f"{bound:g}"
                lines.append(f"{name}_bucket{_labels((*k, ('le', le)))} {cum}")
            lines.append(f"{name}_sum{_labels(k)} {_num(h.sum)}")
            lines.append(f"{name}_count{_labels(k)} {h.count}")
        return lines


def _help(name: str) -> str:
    text = FAMILIES.get(name, ("", "(not documented in agent.serving.metrics.FAMILIES)"))[1]
    return text.replace("\\", "\\\\").replace("\n", "\\n")


class Snapshot:
    """A copy of the counters and histogram buckets at one moment; windows are differences
    of two snapshots (what telemetry and the detectors look at)."""

    def __init__(self, metrics: Metrics) -> None:
        with metrics._lock:  # a friend class in the same module
            self.counters = {n: dict(s) for n, s in metrics.counters.items()}
            self.buckets = {n: {k: list(h.counts) for k, h in s.items()}
                            for n, s in metrics.histograms.items()}

    def counter(self, name: str, **labels: str) -> float:
        return self.counters.get(name, {}).get(_key(labels), 0.0)

    def counters_by(self, name: str, label: str) -> dict[str, float]:
        return {dict(k).get(label, ""): v for k, v in self.counters.get(name, {}).items()}


def window_counter(before: Snapshot, after: Snapshot, name: str, **labels: str) -> float:
    return after.counter(name, **labels) - before.counter(name, **labels)


def window_quantile(before: Snapshot, after: Snapshot, name: str, q: float,
                    **labels: str) -> float | None:
    """The q-quantile (`Histogram.quantile`) of what was observed between two snapshots."""
    key = _key(labels)
    now = after.buckets.get(name, {}).get(key)
    if now is None:
        return None
    then = before.buckets.get(name, {}).get(key, [0] * len(now))
    h = Histogram()
    h.counts = [a - b for a, b in zip(now, then, strict=True)]
    h.count = sum(h.counts)
    return h.quantile(q)
