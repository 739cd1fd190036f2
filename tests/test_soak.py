"""Five minutes of the soak in the suite (the hour is `bench/bench_soak.py`, the same code):
the agent serving a mix (JSON and binary infers to two models, TF Serving predicts, a
metadata read) at a steady rate over three keep-alive connections, a hot swap of digits
every minute, telemetry to a broker configured as the project ships it; sampled every 15 s.
After a minute and a half of warm-up: RSS within 2 MiB, descriptors and threads flat, p99
not climbing, and no request failed."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import psutil
from conftest import needs_onnxruntime

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from bench_soak import SAMPLE, Load, requests_mix, settled, soak, soaking_agent

MINUTES, SAMPLE_EVERY_S, SWAP_EVERY_S, WARMUP_MIN = 5.0, 15.0, 60.0, 1.5
RATE, CLIENTS = 100.0, 3


@needs_onnxruntime  # the x86_64-generic bundles are ONNX
def test_five_minutes_of_mixed_load_and_hot_swaps_leave_no_upward_trend(
        onnx_run: Path, tmp_path: Path) -> None:
    swaps_planned = int(MINUTES * 60 // SWAP_EVERY_S)
    with soaking_agent(tmp_path, onnx_run, swaps_planned + 2) as (agent, versions):
        assert agent.proc is not None
        proc = psutil.Process(agent.proc.pid)
        load = Load(agent.socket, requests_mix(SAMPLE), RATE, CLIENTS)
        rows, swaps = soak(agent, load, proc, versions, minutes=MINUTES,
                           sample_every=SAMPLE_EVERY_S, swap_every=SWAP_EVERY_S)
    table = "\n".join(f"{r['t']:5.0f} s  RSS {r['rss']:6.1f} MiB  fds {r['fds']:3.0f}  "
                      f"threads {r['threads']:3.0f}  p50 {r['p50']:6.0f}  p99 {r['p99']:6.0f} µs"
                      f"  {r['rate']:5.1f}/s  failed {r['fail']:.0f}" for r in rows)
    f = settled(rows, WARMUP_MIN)
    assert swaps >= swaps_planned - 1 and f["samples"] >= 10, table
    assert f["failures"] == 0, table
    # the load ran at its rate: a stalled client would make every figure below flat
    assert min(r["rate"] for r in rows) >= 0.8 * RATE, table
    assert f["rss_range"] <= 2.0, f"RSS moved {f['rss_range']:.1f} MiB after warm-up\n{table}"
    assert f["fds_max"] == f["fds_min"], f"descriptors not flat\n{table}"
    assert f["threads_max"] == f["threads_min"], f"threads not flat\n{table}"
    after = [r["p99"] for r in rows if r["t"] >= WARMUP_MIN * 60]
    first, last = np.median(after[:4]), np.median(after[-4:])
    # a generous bound (the suite runs on both cores beside this): a queue or a leak that
    # grows with every request shows as p99 climbing by multiples within minutes
    assert last <= 3 * first + 2000, f"p99 {first:.0f} -> {last:.0f} µs\n{table}"
