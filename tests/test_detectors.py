"""Anomaly detectors on crafted windows: each fires on what it watches, stays quiet on
noise, and reports the statistic, threshold and window."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fixture_trust import make_bundle

from agent.link.detectors import (
    LatencyDetector,
    MemoryTrend,
    Thresholds,
    Window,
    drift_anomalies,
    psi,
    rate_anomalies,
    temperature_anomaly,
)
from agent.serving.runtime import open_model
from agent.serving.scheduler import DriftSample
from agent.trust.bundle import read_manifest
from agent.trust.manifest import ReferenceStats

T = Thresholds()


def w(**kw: float) -> Window:
    base = {"model": "digits", "seconds": 10.0, "requests": 100}
    return Window(**(base | kw))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> ReferenceStats:
    return read_manifest(make_bundle(tmp_path_factory.mktemp("r"))).reference


def test_latency_baseline_learns_jitter_then_fires_on_a_regression() -> None:
    d = LatencyDetector(T)
    jitter = [0.010, 0.011, 0.0095, 0.0105, 0.010, 0.0102, 0.0098, 0.0101]
    assert [d.observe(w(latency_p50_s=x)) for x in jitter] == [None] * len(jitter)
    a = d.observe(w(latency_p50_s=0.030))
    assert a is not None and (a.detector, a.statistic, a.threshold) == ("latency", "z_score",
                                                                        4.0)
    assert a.evidence["p50_s"] == 0.030 and 0.009 < a.evidence["baseline_s"] < 0.011
    # the regression did not become the baseline
    assert d.observe(w(latency_p50_s=0.030)) is not None


def test_latency_stays_quiet_during_warmup_and_on_small_relative_changes() -> None:
    d = LatencyDetector(T)
    assert d.observe(w(latency_p50_s=0.01)) is None
    assert d.observe(w(latency_p50_s=0.05)) is None  # still warming up
    steady = LatencyDetector(T)
    for _ in range(10):
        steady.observe(w(latency_p50_s=0.010))
    assert steady.observe(w(latency_p50_s=0.0115)) is None  # +15 %, below the 25 % floor


def test_error_and_refusal_rates_need_enough_requests() -> None:
    assert rate_anomalies(w(requests=10, errors=5), T) == []
    fired = rate_anomalies(w(requests=100, errors=10, refusals=50), T)
    assert [(a.detector, round(a.value, 3)) for a in fired] == [("errors", 0.1),
                                                                 ("refusals", 0.333)]


def test_psi_is_zero_on_the_reference_and_grows_with_shift() -> None:
    assert psi([0.5, 0.5], [50, 50]) == pytest.approx(0.0)
    assert psi([0.5, 0.5], [90, 10]) > 0.25


def test_drift_fires_on_input_and_output_shift(reference: ReferenceStats) -> None:
    assert drift_anomalies(w(input_counts=[48, 52], class_counts=[51, 49]), reference, T) == []
    fired = drift_anomalies(w(input_counts=[95, 5], class_counts=[2, 98],
                              mean_confidence=0.2), reference, T)
    assert {(a.detector, a.statistic) for a in fired} == {
        ("input_drift", "psi"), ("output_drift", "psi"), ("output_drift", "confidence_drop")}


def test_memory_growth_is_a_slope_not_a_level() -> None:
    flat, leak = MemoryTrend(T), MemoryTrend(T)
    for i in range(20):
        assert flat.observe(i * 10.0, 80e6 + (i % 2) * 1e6) is None
        out = leak.observe(i * 10.0, 80e6 + i * 1e6)  # 1 MB / 10 s = 360 MB/h
    assert out is not None and out.statistic == "bytes_per_hour"
    assert out.value == pytest.approx(360e6, rel=0.01)


def test_temperature_at_the_throttle_point() -> None:
    assert temperature_anomaly(70.0, 78.0, 10) is None
    a = temperature_anomaly(79.0, 78.0, 10)
    assert a is not None and (a.value, a.threshold) == (79.0, 78.0)


def test_the_converters_reference_matches_what_the_agent_samples(
        onnx_run: Path, example: Path) -> None:
    """The converter's reference statistics (on its calibration data) and the agent's own
    sampling of served batches (`DriftSample`, on the manifest's bins) agree on the data
    set the model was converted from: quiet. The same model on shifted inputs: drift."""
    bundle = onnx_run / "bundle"
    m = read_manifest(bundle)
    x = np.load(example / "digits.npz")["x"].astype(np.float32)
    model = open_model(bundle / m.model_file, m.runtime)
    ref = m.reference
    assert len(ref.output.class_fractions) == 10

    def window(x: np.ndarray) -> Window:
        sample = DriftSample.empty(m)
        sample.add(m, x, model.run(x))
        assert sample.samples >= T.min_requests
        return w(requests=sample.samples, input_counts=sample.input_counts.tolist(),
                 class_counts=sample.class_counts.tolist(),
                 mean_confidence=sample.confidence_sum / sample.samples)

    assert drift_anomalies(window(x), ref, T) == []
    lo, hi = ref.input.histogram.bin_edges[0], ref.input.histogram.bin_edges[-1]
    shifted = np.clip(x + 0.5 * (hi - lo), lo, hi).astype(np.float32)
    found = drift_anomalies(window(shifted), ref, T)
    assert "input_drift" in {a.detector for a in found}, found


def test_many_latencies_at_once_fill_the_buckets_as_one_by_one() -> None:
    """The simulator records a device's synthetic latencies in one call; the histogram
    must be the one `observe` builds, bounds included (a value on a bound belongs to
    that bucket: Prometheus' `le`)."""
    from agent.serving.metrics import BUCKETS, Histogram

    values = np.concatenate([np.array(BUCKETS), np.array(BUCKETS) * 1.01, [0.0, 9.0],
                             np.random.default_rng(1).lognormal(-5, 1, 500)])
    one, many = Histogram(), Histogram()
    for v in values:
        one.observe(float(v))
    many.observe_many(values)
    assert many.counts == one.counts and many.count == one.count
    assert many.sum == pytest.approx(one.sum)
