"""The README's main command, `scripts/demo.sh --short`, end to end: conversion, signing,
a broker, an artifact server, two real agents, a simulated fleet, a rollout in waves,
inference, and a bad release halted in its first wave and rolled back; then nothing it
started is left running."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import psutil
import pytest
from jsonschema import Draft202012Validator

from agent.link.wire import json_schemas

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(bool(os.environ.get("EDGE_TEST_ARTIFACTS")),
                    reason="the demo converts: host toolchain only")
def test_the_demo_in_short_mode(example: Path, tmp_path: Path) -> None:
    out = tmp_path / "demo"
    shutil.copytree(example, out / "example")  # the trained teacher: step 1 is done
    p = subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh"), "--short"],
                       env={**os.environ, "EDGE_DEMO_OUT": str(out),
                            "EDGE_DEMO_CAPTURE": str(tmp_path / "traffic.txt")}, cwd=ROOT,
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
    _every_message_validates(tmp_path / "traffic.txt")


def _every_message_validates(capture: Path) -> None:
    """Every message the demo's broker carried on the fleet's topics (captured by
    mosquitto_sub -V mqttv5) validates against the schema `edge-agent schema` exports
    for its topic."""
    schemas = json_schemas()
    validators = {t: Draft202012Validator(s) for t, s in schemas.items()}
    seen: Counter[str] = Counter()
    errors: list[str] = []
    for line in capture.read_text().splitlines():
        topic, _, hex_payload = line.partition(" ")
        if not hex_payload:
            continue  # a retained message cleared
        rest = topic.removeprefix("edge/v1/demo/")
        kind = (rest if rest in ("root", "heartbeat") else "cmd"
                if rest.startswith("group/") else rest.partition("/")[2])
        if kind not in validators:
            seen[f"(no schema) {kind}"] += 1
            continue
        seen[kind] += 1
        message = json.loads(bytes.fromhex(hex_payload))
        errors += [f"{topic}: {e.message} at {list(e.absolute_path)}"
                   for e in validators[kind].iter_errors(message)]
    assert errors == [], errors[:20]
    assert set(schemas) <= set(seen), seen  # every schema met real traffic
