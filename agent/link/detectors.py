"""Anomaly detectors, pure: window statistics and the model's reference in, anomalies out.

The daemon cuts serving into windows (e.g. one telemetry interval) and hands each one's
statistics here; every detector says which statistic it computed, its value, the threshold
and the window, so an operator (or a rollout controller) can judge the evidence.

* latency: an EWMA baseline of each window's median latency for the model; a window whose
  z-score exceeds `latency_z` (after `latency_warmup` windows) fires. Anomalous windows do
  not update the baseline, so a regression never becomes the new normal.
* error and refusal rates over the window, once it has `min_requests`.
* input drift: the population stability index (PSI) of input values against the histogram
  the converter stored in the manifest (same bin edges); output drift: PSI of the predicted
  class distribution, and the drop of mean top-1 confidence. For an autoencoder: PSI of its
  reconstruction-error (anomaly score) distribution, and the share of samples scoring above
  the manifest's threshold (`anomalous_samples`).
* resources: least-squares slope of process memory over recent readings (growth per hour),
  and temperature against the throttle point.

The thresholds are `agent.config.Thresholds`, the `[detectors]` section of agent.toml.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from agent.config import Thresholds
from agent.trust.manifest import ReferenceStats

EPS = 1e-4


@dataclass(frozen=True)
class Anomaly:
    detector: str
    statistic: str
    value: float
    threshold: float
    window_s: float
    model: str | None = None
    evidence: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Window:
    """What one model did during one window."""

    model: str
    seconds: float
    requests: int
    errors: int = 0
    refusals: int = 0
    latency_p50_s: float | None = None
    input_counts: Sequence[float] = ()  # per reference bin (same edges as the manifest)
    class_counts: Sequence[float] = ()
    mean_confidence: float | None = None
    score_counts: Sequence[float] = ()  # autoencoder: per reference score bin
    over_threshold: int = 0  # autoencoder: samples scoring above the manifest's threshold


def psi(expected: Sequence[float], observed_counts: Sequence[float]) -> float:
    """Population stability index of observed counts against expected fractions."""
    total = sum(observed_counts)
    if total <= 0 or len(expected) != len(observed_counts):
        return 0.0
    out = 0.0
    for e, o in zip(expected, observed_counts, strict=True):
        p, q = max(e, EPS), max(o / total, EPS)
        out += (q - p) * math.log(q / p)
    return out


class LatencyDetector:
    """EWMA mean and variance of window median latency, per model."""

    def __init__(self, thresholds: Thresholds) -> None:
        self.t = thresholds
        self.mean: float | None = None
        self.var = 0.0
        self.windows = 0

    def observe(self, w: Window) -> Anomaly | None:
        x = w.latency_p50_s
        if x is None or w.requests == 0:
            return None
        if self.mean is None:
            self.mean, self.windows = x, 1
            return None
        std = math.sqrt(self.var)
        floor = self.t.latency_min_relative * self.mean / self.t.latency_z
        z = (x - self.mean) / max(std, floor, 1e-9)
        if self.windows >= self.t.latency_warmup and z > self.t.latency_z:
            return Anomaly("latency", "z_score", z, self.t.latency_z, w.seconds, w.model,
                           {"p50_s": x, "baseline_s": self.mean, "baseline_std_s": std})
        a = self.t.latency_alpha
        diff = x - self.mean
        self.mean += a * diff
        self.var = (1 - a) * (self.var + a * diff * diff)
        self.windows += 1
        return None


def rate_anomalies(w: Window, t: Thresholds) -> list[Anomaly]:
    attempts = w.requests + w.refusals
    out = []
    if w.requests >= t.min_requests and w.errors / w.requests > t.error_rate:
        out.append(Anomaly("errors", "error_rate", w.errors / w.requests, t.error_rate,
                           w.seconds, w.model, {"errors": w.errors, "requests": w.requests}))
    if attempts >= t.min_requests and w.refusals / attempts > t.refusal_rate:
        out.append(Anomaly("refusals", "refusal_rate", w.refusals / attempts, t.refusal_rate,
                           w.seconds, w.model, {"refusals": w.refusals,
                                                "attempts": attempts}))
    return out


def reference_confidence(ref: ReferenceStats) -> float:
    """The mean top-1 confidence of the reference (bin midpoints of its histogram)."""
    assert ref.output.confidence is not None  # a classifier's reference (manifest checks)
    edges, fr = ref.output.confidence.bin_edges, ref.output.confidence.fractions
    return sum((lo + hi) / 2 * f for lo, hi, f in zip(edges, edges[1:], fr, strict=False))


def drift_anomalies(w: Window, ref: ReferenceStats, t: Thresholds) -> list[Anomaly]:
    out: list[Anomaly] = []
    if w.requests < t.min_requests:
        return out
    if w.input_counts:
        value = psi(ref.input.histogram.fractions, w.input_counts)
        if value > t.input_psi:
            out.append(Anomaly("input_drift", "psi", value, t.input_psi, w.seconds, w.model,
                               {"samples": float(sum(w.input_counts))}))
    if w.class_counts:
        value = psi(ref.output.class_fractions, w.class_counts)
        if value > t.output_psi:
            out.append(Anomaly("output_drift", "psi", value, t.output_psi, w.seconds,
                               w.model, {"samples": float(sum(w.class_counts))}))
    out += _score_anomalies(w, ref, t)
    if w.mean_confidence is not None and ref.output.confidence is not None:
        expected = reference_confidence(ref)
        drop = expected - w.mean_confidence
        if drop > t.confidence_drop:
            out.append(Anomaly("output_drift", "confidence_drop", drop, t.confidence_drop,
                               w.seconds, w.model, {"mean_confidence": w.mean_confidence,
                                                    "reference": expected}))
    return out


def _score_anomalies(w: Window, ref: ReferenceStats, t: Thresholds) -> list[Anomaly]:
    """An autoencoder's window: its score distribution against the reference (drift), and
    the share of samples above the threshold (anomalous inputs)."""
    score = ref.output.score
    total = float(sum(w.score_counts))
    if score is None or total <= 0:
        return []
    out = []
    value = psi(score.histogram.fractions, w.score_counts)
    if value > t.output_psi:
        out.append(Anomaly("output_drift", "score_psi", value, t.output_psi, w.seconds,
                           w.model, {"samples": total}))
    rate = w.over_threshold / total
    if rate > t.anomaly_rate:
        out.append(Anomaly("anomalous_samples", "over_threshold_rate", rate, t.anomaly_rate,
                           w.seconds, w.model,
                           {"over_threshold": float(w.over_threshold), "samples": total,
                            "score_threshold": score.threshold,
                            "expected_rate": 1 - score.quantile}))
    return out


class MemoryTrend:
    """Least-squares growth of process memory over the last readings."""

    def __init__(self, thresholds: Thresholds, keep: int = 60) -> None:
        self.t = thresholds
        self.points: deque[tuple[float, float]] = deque(maxlen=keep)

    def observe(self, now_s: float, rss_bytes: float) -> Anomaly | None:
        self.points.append((now_s, rss_bytes))
        if (len(self.points) < self.t.memory_min_readings
                or self.points[-1][0] - self.points[0][0] < self.t.memory_min_span_s):
            return None
        n = len(self.points)
        mx = sum(p[0] for p in self.points) / n
        my = sum(p[1] for p in self.points) / n
        sxx = sum((p[0] - mx) ** 2 for p in self.points)
        if sxx == 0:
            return None
        slope = sum((p[0] - mx) * (p[1] - my) for p in self.points) / sxx * 3600
        if slope > self.t.memory_growth_bytes_per_hour:
            span = self.points[-1][0] - self.points[0][0]
            return Anomaly("memory_growth", "bytes_per_hour", slope,
                           self.t.memory_growth_bytes_per_hour, span, None,
                           {"rss_bytes": rss_bytes, "readings": float(n)})
        return None


def temperature_anomaly(temperature_c: float | None, throttle_c: float,
                        window_s: float) -> Anomaly | None:
    if temperature_c is None or temperature_c < throttle_c:
        return None
    return Anomaly("temperature", "celsius", temperature_c, throttle_c, window_s)
