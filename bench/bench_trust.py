"""What signing every report costs the device, and verifying it the controller, side by
side with the unsigned payloads of before, in one run (no broker: the CPU cost alone; the
end-to-end figures over TLS are in bench_fleet.py's ingest).

1. device: build one telemetry message (two models) and put it in the outbox (SQLite,
   as the agent does), unsigned against signed by the device's Ed25519 report key; the
   CPU share of one core at the default 10 s interval, and messages/s one agent can sign;
2. controller: take one telemetry message in: parse and validate (unsigned) against the
   ingest gate (`fleet.devices.gate.ReportGate`: topic, registered key, signature, payload
   device, schema), messages/s on one core.

    .venv/bin/python bench/bench_trust.py [--n 20000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from agent.link.outbox import Outbox
from agent.link.wire import Memory, ModelTelemetry, ReportOrder, Telemetry, dump
from agent.trust.identity import ReportSigner
from fleet.devices.gate import ReportGate
from fleet.devices.registry import FleetDB


def telemetry(seq: int) -> Telemetry:
    m = ModelTelemetry(requests=400, errors=0, latency_p50_ms=3.1, latency_p95_ms=4.8,
                       latency_p99_ms=6.0, throughput_per_s=40.0)
    return Telemetry(seq=seq, order=ReportOrder(epoch=1, seq=seq), device="pi-0001",
                     at=datetime.now(UTC), interval_s=10.0,
                     uptime_s=3600.0, cpu_percent=12.5,
                     memory=Memory(process_rss_bytes=96 << 20, system_available_bytes=1 << 30,
                                   system_total_bytes=4 << 30),
                     temperature_c=51.2, throttle="normal", queue_depth=0,
                     refusals={"queue_full": 2}, models={"digits": m, "kws": m},
                     dropped={}, commands_dropped={})


def per_call_s(fn: Callable[[int], object], n: int) -> float:
    t0 = time.process_time()
    for i in range(1, n + 1):
        fn(i)
    return (time.process_time() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20_000)
    ns = ap.parse_args()
    signer = ReportSigner.generate("pi-0001")
    with tempfile.TemporaryDirectory() as tmp:
        where = Path(tmp)
        plain_box, signed_box = Outbox(where / "a.sqlite"), Outbox(where / "b.sqlite")
        topic = "edge/v1/acme/pi-0001/telemetry"
        plain = per_call_s(lambda i: plain_box.enqueue(
            "telemetry", topic, lambda seq, _o: dump(telemetry(seq))), ns.n)
        signed = per_call_s(lambda i: signed_box.enqueue(
            "telemetry", topic, lambda seq, _o: signer.seal(telemetry(seq))), ns.n)
        sign_only = per_call_s(lambda i: signer.seal(telemetry(i)), ns.n)
        print(f"device, one telemetry message built and queued in the outbox (CPU time, "
              f"{ns.n} messages):")
        print(f"  {'unsigned':10} {plain * 1e6:8.1f} µs  ({1 / plain:,.0f} msg/s)")
        print(f"  {'signed':10} {signed * 1e6:8.1f} µs  ({1 / signed:,.0f} msg/s); "
              f"signing alone (model dump, canonical JSON, Ed25519) {sign_only * 1e6:.1f} µs")
        print(f"  at the default interval (10 s): {signed / 10 * 100:.4f} % of one core "
              f"(target < 0.1 %), of which signing {sign_only / 10 * 100:.5f} %")

        db = FleetDB(where / "fleet.sqlite")
        db.register("pi-0001", signer.public)
        gate = ReportGate(db, "acme")
        raw_plain = dump(telemetry(1))
        raw_signed = signer.seal(telemetry(1))
        unsigned_in = per_call_s(lambda i: Telemetry.model_validate_json(raw_plain), ns.n)
        gated_in = per_call_s(lambda i: gate.open(topic, raw_signed), ns.n)
        assert gate.open(topic, raw_signed) is not None
        print(f"\ncontroller, one telemetry message taken in (CPU time, {ns.n} messages; "
              "storing it in SQLite comes on top, see bench_fleet.py):")
        print(f"  {'unsigned':10} {unsigned_in * 1e6:8.1f} µs  ({1 / unsigned_in:,.0f} msg/s): "
              "parse and validate")
        print(f"  {'signed':10} {gated_in * 1e6:8.1f} µs  ({1 / gated_in:,.0f} msg/s): "
              "topic, registered key (cached), Ed25519 verify, device, schema")
        plain_box.close()
        signed_box.close()


if __name__ == "__main__":
    main()
