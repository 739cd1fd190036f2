"""The watcher's batch: of a device's telemetry in one batch only the last is verified
and stored (the row is folded to it anyway); the ones before it are superseded, and tried
only when the last one fails its checks."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import nacl.signing
from test_fleet_queries import state, telemetry

from agent.trust.identity import ReportSigner
from fleet.devices.registry import FleetDB
from fleet.devices.watcher import FleetWatcher


def signer(dev: str) -> ReportSigner:
    return ReportSigner(dev, nacl.signing.SigningKey(hashlib.sha256(dev.encode()).digest()))


def sealed(dev: str, seq: int, p95: float, *, forged: bool = False) -> tuple[str, bytes]:
    body = signer(dev).seal(telemetry(dev, seq, {"digits": p95}).payload)
    if forged:  # a valid envelope whose signature no longer matches
        body = body.replace(b'"latency_p95_ms":' + str(p95).encode(),
                            b'"latency_p95_ms":' + str(p95 + 1).encode())
    return f"edge/v1/acme/{dev}/telemetry", body


def test_only_the_last_telemetry_of_a_device_in_a_batch_is_verified_unless_it_fails(
        tmp_path: Path, broker: Any, fleet_db: str) -> None:
    db = FleetDB(fleet_db)
    for dev in ("a", "b", "c"):
        db.register(dev, signer(dev).public)
        db.put_state(state(dev, {}, (1, 1)))
    w = FleetWatcher(db, broker.url, "acme")
    try:
        batch = [(*sealed("a", 1, 10.0), 1.0), (*sealed("b", 1, 20.0), 1.0),
                 (*sealed("a", 2, 11.0), 2.0), (*sealed("a", 3, 12.0), 3.0),
                 (*sealed("c", 1, 30.0), 1.0), (*sealed("c", 2, 31.0, forged=True), 2.0)]
        assert b'"latency_p95_ms":32.0' in batch[-1][1]  # the forgery changed signed bytes
        w._store(batch)
        # a: 3 is the newest and valid: 1 and 2 never opened; c: 2 fails, so 1 is stored
        assert db.latency_p95_since("digits", 0) == {"a": 12.0, "b": 20.0, "c": 30.0}
        assert w.superseded == 2 and w.ingested["telemetry"] == 3
        assert w.gate.cpu["verify"] > 0
    finally:
        w.stop()
