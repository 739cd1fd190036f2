"""Telemetry: every interval, one `Telemetry` message into the outbox, and the detectors
(`agent.link.detectors`, pure) run on the interval's window; anomalies become events.

The windows are differences of two `Snapshot`s of the agent's metrics, so nothing on the
request path changes for telemetry. While a deploy is in its health window, the deploy
flow (`agent.link.deploying`) judges the new model's latency and errors itself, through
the same per-model latency detector, and telemetry leaves them alone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol

import psutil

from agent.link.detectors import (
    LatencyDetector,
    MemoryTrend,
    Window,
    drift_anomalies,
    rate_anomalies,
    temperature_anomaly,
)
from agent.link.outbox import Order
from agent.link.port import AgentPort
from agent.link.reporting import Reporter, wire_order
from agent.link.settings import LinkSettings
from agent.link.wire import Memory, ModelTelemetry, Telemetry
from agent.serving.metrics import Snapshot, window_counter, window_quantile

log = logging.getLogger("edge_agent.fleet")
LATENCY = "edge_agent_request_duration_seconds"


class ProcessStats(Protocol):
    """What telemetry reads of the process (psutil.Process, or the simulator's figures)."""

    def cpu_percent(self, interval: Any = None) -> float: ...

    def memory_info(self) -> Any: ...


def window(model: str, before: Snapshot, after: Snapshot, seconds: float) -> Window:
    """What `model` did between two snapshots."""
    return Window(model=model, seconds=seconds,
                  requests=int(window_counter(before, after, "edge_agent_inferences_total",
                                              model=model)),
                  errors=int(window_counter(before, after, "edge_agent_errors_total",
                                            model=model)),
                  latency_p50_s=window_quantile(before, after, LATENCY, 0.5, model=model))


class TelemetryLoop:
    """The detectors' state across windows, and the periodic message."""

    def __init__(self, agent: AgentPort, reporter: Reporter,
                 settings: Callable[[], LinkSettings], *, deploying: Callable[[], bool],
                 online: Callable[[], bool],
                 on_tick: Callable[[int], None] = lambda _n: None) -> None:
        """Args:
            deploying: a deploy is in its flow (its window judges the model itself).
            online: the broker connection is up; what the outbox cap dropped is taken and
                reported only then, as one total, not an event per interval offline.
            on_tick: called first in every tick with the number of ticks so far.
        """
        self._on_tick, self._ticks = on_tick, 0
        self.agent, self.report = agent, reporter
        self._settings, self._deploying, self._online = settings, deploying, online
        self._latency: dict[str, LatencyDetector] = {}
        self._memory = MemoryTrend(settings().thresholds)
        self._loaded: frozenset[tuple[str, int]] = frozenset()
        self._started = time.monotonic()
        self._snap = Snapshot(agent.metrics)

    def latency_detector(self, model: str) -> LatencyDetector:
        """The model's latency baseline, kept across deploys and windows."""
        return self._latency.setdefault(model, LatencyDetector(self._settings().thresholds))

    def thresholds_changed(self) -> None:
        """New limits for the detectors that exist; their baselines stay."""
        t = self._settings().thresholds
        for detector in self._latency.values():
            detector.t = t
        self._memory.t = t

    def run(self, stop: Any, proc: ProcessStats | None = None) -> None:
        """Tick every interval until `stop` (an Event) is set; a failed tick is logged."""
        proc = proc or psutil.Process()
        proc.cpu_percent(None)
        while not stop.wait(self._settings().interval_s):
            try:
                self.tick(proc)
            except Exception:  # telemetry must keep going; the log says what broke
                log.exception("telemetry.failed")

    def _drift(self, name: str, interval_s: float) -> None:
        """Input and output drift of the sampled batches against the manifest's reference."""
        resident = self.agent.serving.models().get(name)
        sample = resident.take_drift() if resident is not None else None
        if resident is None or sample is None or sample.samples == 0:
            return
        w = Window(model=name, seconds=interval_s, requests=sample.samples,
                   input_counts=sample.input_counts.tolist(),
                   class_counts=sample.class_counts.tolist(),
                   mean_confidence=(sample.confidence_sum / sample.samples
                                    if len(sample.class_counts) else None),
                   score_counts=sample.score_counts.tolist(),
                   over_threshold=sample.over_threshold)
        for a in drift_anomalies(w, resident.manifest.reference, self._settings().thresholds):
            self.report.anomaly(a)

    def _models(self, before: Snapshot, after: Snapshot, settings: LinkSettings
                ) -> dict[str, ModelTelemetry]:
        interval_s, t = settings.interval_s, settings.thresholds
        models: dict[str, ModelTelemetry] = {}
        for name in self.agent.serving.models():
            w = window(name, before, after, interval_s)
            q = {p: window_quantile(before, after, LATENCY, p, model=name)
                 for p in (0.5, 0.95, 0.99)}
            models[name] = ModelTelemetry(
                requests=w.requests, errors=w.errors,
                latency_p50_ms=_ms(q[0.5]), latency_p95_ms=_ms(q[0.95]),
                latency_p99_ms=_ms(q[0.99]), throughput_per_s=w.requests / interval_s)
            if not self._deploying():
                detector = self.latency_detector(name)
                for a in [*rate_anomalies(w, t), *filter(None, [detector.observe(w)])]:
                    self.report.anomaly(a)
            self._drift(name, interval_s)
        return models

    def tick(self, proc: ProcessStats, system: Callable[[], Any] = psutil.virtual_memory
             ) -> None:
        """One interval: the link's own checks (`on_tick`), detectors, then the telemetry
        message into the outbox. `system` tells the machine's memory (`available`,
        `total`): psutil's, or the simulator's device figures."""
        self._ticks += 1
        self._on_tick(self._ticks)
        settings = self._settings()
        before, after = self._snap, Snapshot(self.agent.metrics)
        self._snap = after
        models = self._models(before, after, settings)
        was = before.counters_by("edge_agent_refusals_total", "reason")
        refusals = {k: int(v - was.get(k, 0)) for k, v in
                    after.counters_by("edge_agent_refusals_total", "reason").items()
                    if v - was.get(k, 0) > 0}
        s = self.agent.serving
        loaded = frozenset((n, r.manifest.version) for n, r in s.models().items())
        if loaded != self._loaded:  # a load or unload moves memory by design: new trend
            self._loaded, self._memory = loaded, MemoryTrend(settings.thresholds)
        rss = proc.memory_info().rss
        vm = system()
        for a in filter(None, [self._memory.observe(time.monotonic(), rss),
                               temperature_anomaly(s.reading.temperature_c,
                                                   s.thermal_limits.throttle_c,
                                                   settings.interval_s)]):
            self.report.anomaly(a)
        outbox = self.report.outbox
        dropped = outbox.take_dropped() if self._online() else {}
        if dropped:
            self.report.event("outbox.dropped", "warning",
                              f"the outbox cap dropped {dropped}", evidence=dropped)
        me = self.report.me
        commands_dropped = self.report.take_commands_dropped()

        def build(seq: int, order: Order) -> bytes:
            return self.report.seal(Telemetry(
                seq=seq, order=wire_order(order), device=me.device, at=datetime.now(UTC),
                interval_s=settings.interval_s, uptime_s=time.monotonic() - self._started,
                cpu_percent=proc.cpu_percent(None),
                memory=Memory(process_rss_bytes=rss, system_available_bytes=vm.available,
                              system_total_bytes=vm.total),
                temperature_c=s.reading.temperature_c, throttle=s.thermal.name.lower(),
                queue_depth=int(self.agent.metrics.gauge("edge_agent_queue_depth")),
                refusals=refusals, models=models, dropped=dropped,
                commands_dropped=commands_dropped))
        outbox.enqueue("telemetry", self.report.topic("telemetry"), build)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None or seconds == float("inf") else seconds * 1000
