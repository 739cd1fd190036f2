"""The README's main command, `scripts/demo.sh --short`, end to end: conversion, signing,
a broker, an artifact server, two real agents, a simulated fleet, a rollout in waves,
inference, and a bad release halted in its first wave and rolled back; then nothing it
started is left running."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(bool(os.environ.get("EDGE_TEST_ARTIFACTS")),
                    reason="the demo converts: host toolchain only")
def test_the_demo_in_short_mode(example: Path, tmp_path: Path) -> None:
    out = tmp_path / "demo"
    shutil.copytree(example, out / "example")  # the trained teacher: step 1 is done
    p = subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh"), "--short"],
                       env={**os.environ, "EDGE_DEMO_OUT": str(out)}, cwd=ROOT,
                       capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
                       check=False)
    log = p.stdout + p.stderr
    (tmp_path / "demo.log").write_text(log)
    assert p.returncode == 0, log[-4000:]
    assert re.search(r"edge-fleet: rejected \(sha256\): .*model", log), log[-4000:]
    assert "(refused, as it must be)" in log
    assert "2 of 2 simulated" not in log
    assert re.search(r"12 of 12 simulated device\(s\) connected", log)
    first, second = re.findall(r"rollout \w+: (completed|halted)\n", log)
    assert (first, second) == ("completed", "halted"), log[-4000:]
    assert "failed its self-test" in log and "rollback ok" in log
    predicted = re.search(r"predicted \[([\d, ]+)\]; the labels are \[([\d, ]+)\]", log)
    assert predicted is not None and predicted.group(1) == predicted.group(2)
    final = log[log.index("== 15."):]
    assert "serving: digits v2 on 14" in final, final
    assert "== 16. cleaning up" in log
    leftovers = [q.info["cmdline"] for q in psutil.process_iter(["cmdline"])
                 if str(out) in " ".join(q.info["cmdline"] or [])]
    assert leftovers == []
