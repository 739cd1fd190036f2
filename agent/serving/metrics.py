"""Counters, gauges and latency histograms, rendered in the Prometheus text format.

Small and lock-protected: the request path does one histogram observation and one counter
increment per request. Names follow Prometheus conventions (`_total`, `_seconds`, `_bytes`).
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict

# Inference latency buckets, seconds: 50 µs .. 5 s, at most 1.5x apart from 0.5 to 100 ms,
# where edge models run: quantiles estimated from them (p50 for the latency detector, p95
# for the rollout controller's comparison) are then within ~20 %, where 2.5x-wide buckets
# made a steady model's p95 jump between 5 and 9 ms from one window to the next.
BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 7.5e-4, 1e-3, 1.5e-3, 2e-3, 3e-3, 4e-3, 5e-3, 6e-3,
           8e-3, 1e-2, 1.5e-2, 2e-2, 3e-2, 4e-2, 5e-2, 7.5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Histogram:
    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, value)] += 1
        self.sum += value
        self.count += 1

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


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


class Metrics:
    """The agent's metrics registry."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counters: dict[str, dict[Labels, float]] = defaultdict(dict)
        self.gauges: dict[str, dict[Labels, float]] = defaultdict(dict)
        self.histograms: dict[str, dict[Labels, Histogram]] = defaultdict(dict)
        self.help: dict[str, str] = {}

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self.counters[name]
            series[key] = series.get(key, 0.0) + value

    def set(self, name: str, value: float, **labels: str) -> None:
        with self._lock:
            self.gauges[name][tuple(sorted(labels.items()))] = value

    def observe(self, name: str, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            h = self.histograms[name].get(key)
            if h is None:
                h = self.histograms[name][key] = Histogram()
            h.observe(value)

    def gauge(self, name: str, **labels: str) -> float:
        with self._lock:
            return self.gauges[name].get(tuple(sorted(labels.items())), 0.0)

    def counter(self, name: str, **labels: str) -> float:
        with self._lock:
            return self.counters[name].get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> str:
        """The Prometheus text exposition format (version 0.0.4)."""
        lines: list[str] = []
        with self._lock:
            for kind, table in (("counter", self.counters), ("gauge", self.gauges)):
                for name, series in sorted(table.items()):
                    lines.append(f"# TYPE {name} {kind}")
                    lines += [f"{name}{_labels(k)} {_num(v)}" for k, v in sorted(series.items())]
            for name, hseries in sorted(self.histograms.items()):
                lines.append(f"# TYPE {name} histogram")
                for k, h in sorted(hseries.items()):
                    cum = 0
                    for bound, n in zip((*BUCKETS, float("inf")), h.counts, strict=True):
                        cum += n
                        le = "+Inf" if bound == float("inf") else f"{bound:g}"
                        lines.append(f"{name}_bucket{_labels((*k, ('le', le)))} {cum}")
                    lines.append(f"{name}_sum{_labels(k)} {_num(h.sum)}")
                    lines.append(f"{name}_count{_labels(k)} {h.count}")
        return "\n".join(lines) + "\n"


class Snapshot:
    """A copy of the counters and histogram buckets at one moment; windows are differences
    of two snapshots (what telemetry and the detectors look at)."""

    def __init__(self, metrics: Metrics) -> None:
        with metrics._lock:  # a friend class in the same module
            self.counters = {n: dict(s) for n, s in metrics.counters.items()}
            self.buckets = {n: {k: list(h.counts) for k, h in s.items()}
                            for n, s in metrics.histograms.items()}

    def counter(self, name: str, **labels: str) -> float:
        return self.counters.get(name, {}).get(tuple(sorted(labels.items())), 0.0)

    def counters_by(self, name: str, label: str) -> dict[str, float]:
        return {dict(k).get(label, ""): v for k, v in self.counters.get(name, {}).items()}


def window_counter(before: Snapshot, after: Snapshot, name: str, **labels: str) -> float:
    return after.counter(name, **labels) - before.counter(name, **labels)


def window_quantile(before: Snapshot, after: Snapshot, name: str, q: float,
                    **labels: str) -> float | None:
    """The q-quantile (`Histogram.quantile`) of what was observed between two snapshots."""
    key = tuple(sorted(labels.items()))
    now = after.buckets.get(name, {}).get(key)
    if now is None:
        return None
    then = before.buckets.get(name, {}).get(key, [0] * len(now))
    h = Histogram()
    h.counts = [a - b for a, b in zip(now, then, strict=True)]
    h.count = sum(h.counts)
    return h.quantile(q)
