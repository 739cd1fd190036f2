"""Five minutes of the soak in the suite (the hour is `bench/bench_soak.py`, the same code):
the agent serving a mix (JSON and binary infers to two models, TF Serving predicts, a
metadata read) at a steady rate over three keep-alive connections, a hot swap of digits
every minute, telemetry to a broker configured as the project ships it; sampled every 15 s.
After a minute and a half of warm-up: RSS within 2 MiB, descriptors and threads flat, p99
not climbing, and no request failed."""

from __future__ import annotations

import sys
from pathlib import Path

import psutil
from conftest import needs_onnxruntime

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from bench_soak import SAMPLE, Load, releases_needed, requests_mix, settled, soak, soaking_agent

MINUTES, SAMPLE_EVERY_S, SWAP_EVERY_S, WARMUP_MIN = 5.0, 15.0, 60.0, 1.5
RATE, CLIENTS = 100.0, 3


@needs_onnxruntime  # the x86_64-generic bundles are ONNX
def test_five_minutes_of_mixed_load_and_hot_swaps_leave_no_upward_trend(
        onnx_run: Path, tmp_path: Path) -> None:
    """The samples' table is printed as they are taken (captured stdout, shown on failure)."""
    with soaking_agent(tmp_path, onnx_run,
                       releases_needed(MINUTES, SWAP_EVERY_S)) as (agent, versions):
        assert agent.proc is not None
        proc = psutil.Process(agent.proc.pid)
        load = Load(agent.socket, requests_mix(SAMPLE), RATE, CLIENTS)
        rows, swaps = soak(agent, load, proc, versions, minutes=MINUTES,
                           sample_every=SAMPLE_EVERY_S, swap_every=SWAP_EVERY_S)
    f = settled(rows, WARMUP_MIN)
    # a swap a minute for five minutes (the last may fall past the end)
    assert swaps >= 4 and f["samples"] >= 10, (swaps, f)
    assert f["failures"] == 0, f
    # the load ran at its rate: a stalled client would make every figure below flat
    assert min(r["rate"] for r in rows) >= 0.8 * RATE, f
    assert f["rss_range"] <= 2.0, f"RSS moved {f['rss_range']:.1f} MiB after warm-up"
    assert f["fds_max"] == f["fds_min"], f"descriptors not flat: {f}"
    assert f["threads_max"] == f["threads_min"], f"threads not flat: {f}"
    # a generous bound (the suite runs on both cores beside this): a queue or a leak that
    # grows with every request shows as p99 climbing by multiples within minutes
    assert f["p99_last"] <= 3 * f["p99_first"] + 2000, \
        f"p99 {f['p99_first']:.0f} -> {f['p99_last']:.0f} µs"
