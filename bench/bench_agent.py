"""The agent against the bare runtime, side by side in one run:

1. latency at concurrency 1 on the digits int8 model (TFLite and ONNX): bare `model.run`,
   then the agent over its Unix socket with JSON and with the binary tensor extension;
   the difference is what the daemon adds (HTTP parsing, validation, admission, thread
   hand-off, (de)serialisation);
2. throughput at concurrency 8 on a synthetic CNN of ~5 ms per sample: a bare batch-1 loop
   against the agent micro-batching 8 clients' single-sample requests;
3. the daemon's RSS idle and serving (TFLite, ONNX) and its idle CPU;
4. crash: kill -9 at a random moment of an install, restart, check that it serves a
   verified model (old or new), that an answered install survived and that nothing was
   left half-written; N times. A kill leaves the page cache to the kernel, so this is
   not a power cut: bench/bench_powercut.py cuts power for real.

    .venv/bin/python bench/bench_agent.py [--kills 200] [--seconds 5]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import psutil
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fixture_agent import AgentProcess, make_keys, onnx_release, release, write_config

from agent.client import call
from agent.serving.admission import Budget, ThermalLimits
from agent.serving.oip import infer_response, parse_infer
from agent.serving.runtime import open_model
from agent.serving.scheduler import Resident, Scheduler
from agent.testing import FakeSensors
from agent.trust.bundle import read_manifest
from agent.updates.store import ModelStore
from converter.cli import main as convert
from converter.examples.digits import write_example

ROOT = Path(__file__).resolve().parents[1]


def converted(work: Path) -> Path:
    """A converted digits run (cached in build/bench-agent)."""
    out = ROOT / "build/bench-agent/run"
    if not (out / "bundle/manifest.json").exists():
        ex = ROOT / "build/bench-agent/example"
        if not (ex / "recipe.toml").exists():
            write_example(ex, profile="raspberry-pi-4", epochs=8)
        assert convert(["run", str(ex / "recipe.toml"), "--out", str(out), "--force",
                        "--distill-progress", "false"]) == 0
    return Path(shutil.copytree(out, work / "run"))


def digits_releases(where: Path, *versions: int,
                    profile: str = "x86_64-generic") -> tuple[Path, list[Path]]:
    """The converted digits model signed and packed at each of `versions` for `profile`:
    (key directory, archives)."""
    run = converted(where)
    keys = make_keys(where / "keys")
    return keys, [release(run, where, keys, version=v, profile=profile) for v in versions]


def percentiles(samples: list[float]) -> tuple[float, float]:
    a = np.asarray(samples) * 1e6
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def bench_latency(agent: AgentProcess, model_path: Path, runtime: str, input_name: str,
                  n: int) -> list[tuple[str, float, float]]:
    x = np.random.default_rng(0).uniform(0, 1, (1, 1, 8, 8)).astype(np.float32)
    model = open_model(model_path, runtime)  # type: ignore[arg-type]
    bare = []
    for _ in range(n):
        t = time.perf_counter()
        model.run(x)
        bare.append(time.perf_counter() - t)
    body_json = json.dumps({"inputs": [{"name": input_name, "shape": [1, 1, 8, 8],
                                        "datatype": "FP32", "data": x.ravel().tolist()}]}).encode()
    head = json.dumps({"inputs": [{"name": input_name, "shape": [1, 1, 8, 8],
                                   "datatype": "FP32",
                                   "parameters": {"binary_data_size": x.nbytes}}],
                       "outputs": [{"name": "y", "parameters": {"binary_data": True}}]}).encode()
    rows = [("bare " + runtime, *percentiles(bare))]
    conn = agent.connection()
    floor = []
    for _ in range(n):
        t = time.perf_counter()
        call(conn, "GET", "/v2/health/live")
        floor.append(time.perf_counter() - t)
    conn.close()
    rows.append(("HTTP round trip floor (GET /v2/health/live)", *percentiles(floor)))
    for label, body, headers in (
            ("agent, unix socket, JSON", body_json, {"Content-Type": "application/json"}),
            ("agent, unix socket, binary tensors", head + x.tobytes(),
             {"Inference-Header-Content-Length": str(len(head))})):
        conn = agent.connection()
        for _ in range(50):
            call(conn, "POST", "/v2/models/digits/infer", body, headers)
        times = []
        for _ in range(n):
            t = time.perf_counter()
            status, _, _ = call(conn, "POST", "/v2/models/digits/infer", body, headers)
            times.append(time.perf_counter() - t)
            assert status == 200
        conn.close()
        rows.append((label, *percentiles(times)))
    return rows


def layers(run: Path, n: int) -> list[tuple[str, float]]:
    """What each layer of the request path costs in-process (no sockets): parsing and
    validation, admission + scheduling (inline fast path and via the worker thread), the
    runtime itself, and serialising the response."""
    manifest = read_manifest(run / "bundle")
    model = open_model(run / "model_int8.tflite", "tflite")
    budget = Budget(memory_budget_bytes=10**9, min_available_bytes=0, queue_max=64,
                    max_batch=8)
    limits = ThermalLimits(throttle_c=80, critical_c=90, hysteresis_c=5)
    inline = Scheduler(budget=budget, thermal_limits=limits, sensors=FakeSensors())
    handoff = Scheduler(budget=budget, thermal_limits=limits, sensors=FakeSensors(),
                        inline_max_s=0)
    for s in (inline, handoff):
        s.load(Resident("digits", manifest, model, 1, batchable=False))
        s.submit("digits", np.zeros((1, 1, 8, 8), np.float32)).result()
    body = json.dumps({"inputs": [{"name": manifest.inputs[0].name, "shape": [1, 1, 8, 8],
                                   "datatype": "FP32", "data": [0.5] * 64}]}).encode()
    req = parse_infer(body, manifest, None)
    y = model.run(req.x)

    def p50(fn: Any) -> float:
        times = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return float(np.percentile(np.asarray(times) * 1e6, 50))

    rows = [("parse + validate the v2 JSON body", p50(lambda: parse_infer(body, manifest, None))),
            ("runtime alone (TFLite, int8 quantize/dequantize)", p50(lambda: model.run(req.x))),
            ("admission + inline run", p50(lambda: inline.submit("digits", req.x).result())),
            ("admission + queue + worker thread hand-off + run",
             p50(lambda: handoff.submit("digits", req.x).result())),
            ("serialise the v2 JSON response",
             p50(lambda: infer_response(manifest, y, request_id=None, binary=False)))]
    inline.stop()
    handoff.stop()
    return rows


def synthetic_cnn(where: Path, keys: Path) -> tuple[Path, Path, Path]:
    """A ~5 ms/sample CNN with a dynamic batch, as a signed, packed bundle: a small conv
    front end and a classifier of wide fully connected layers (as in VGG-style heads).
    Its batch-1 time is bound by reading the FC weights from memory, which a batch shares;
    that is where micro-batching pays on a CPU (pure conv stacks gain little, see note)."""
    rng = np.random.default_rng(0)
    inits = [onnx.numpy_helper.from_array(rng.normal(0, 0.1, (32, 3, 3, 3)).astype(np.float32),
                                          "w0"),
             onnx.numpy_helper.from_array(rng.normal(0, 0.1, (32, 32, 3, 3)).astype(np.float32),
                                          "w1")]
    nodes = [helper.make_node("Conv", ["input", "w0"], ["c0"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c0"], ["r0"]),
             helper.make_node("Conv", ["r0", "w1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("GlobalAveragePool", ["r1"], ["gap"]),
             helper.make_node("Flatten", ["gap"], ["f"])]
    prev, width = "f", 32
    for i, out in enumerate((4096, 4096, 4096, 10)):
        w = (rng.normal(0, 1, (width, out)) / np.sqrt(width)).astype(np.float32)
        inits.append(onnx.numpy_helper.from_array(w, f"m{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"m{i}"], [f"h{i}"]))
        prev, width = f"h{i}", out
        if out != 10:
            nodes.append(helper.make_node("Relu", [prev], [f"a{i}"]))
            prev = f"a{i}"
    nodes.append(helper.make_node("Identity", [prev], ["output"]))
    graph = helper.make_graph(
        nodes, "synthetic", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                           ["N", 3, 64, 64])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    bundle = where / "cnn-bundle"
    bundle.mkdir()
    onnx.save(model, bundle / "model.onnx")
    return bundle, *(onnx_release(bundle, keys, where / f"cnn-v{v}.tar.zst", name="cnn",
                                  version=v, sample_shape=(3, 64, 64),
                                  arena_bytes=4 * 3 * 64 * 64 * 32 * 2) for v in (1, 2))


def bench_throughput(agent: AgentProcess, model_path: Path, seconds: float,
                     clients: int = 8) -> list[tuple[str, float, float]]:
    x = np.random.default_rng(0).uniform(0, 1, (1, 3, 64, 64)).astype(np.float32)
    model = open_model(model_path, "onnx", threads=2)
    for _ in range(10):
        model.run(x)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        model.run(x)
        n += 1
    bare = n / (time.perf_counter() - t0)
    head = json.dumps({"inputs": [{"name": "input", "shape": [1, 3, 64, 64],
                                   "datatype": "FP32",
                                   "parameters": {"binary_data_size": x.nbytes}}]}).encode()
    body, headers = head + x.tobytes(), {"Inference-Header-Content-Length": str(len(head))}
    done = [0] * clients
    failed = [0] * clients
    stop = threading.Event()

    def client(i: int) -> None:
        conn = agent.connection()
        while not stop.is_set():
            status, _, _ = call(conn, "POST", "/v2/models/cnn/infer", body, headers)
            if status == 200:
                done[i] += 1
            else:
                failed[i] += 1
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    agent_rate = sum(done) / (time.perf_counter() - t0)
    return [("bare onnxruntime, batch-1 loop (2 threads)", bare, 1000 / bare),
            (f"agent, {clients} clients, micro-batching (refused: {sum(failed)})",
             agent_rate, 1000 / agent_rate * clients)]


def rss_mib(agent: AgentProcess) -> float:
    assert agent.proc is not None
    return psutil.Process(agent.proc.pid).memory_info().rss / 2**20


def idle_cpu(agent: AgentProcess, seconds: float) -> float:
    assert agent.proc is not None
    p = psutil.Process(agent.proc.pid)
    before = p.cpu_times()
    time.sleep(seconds)
    after = p.cpu_times()
    return 100 * ((after.user - before.user) + (after.system - before.system)) / seconds


def _reset(agent: AgentProcess, v1: Path) -> None:
    agent.stop()
    shutil.rmtree(agent.dir / "state")
    agent.start()
    agent.install(v1)


def crashes(agent: AgentProcess, v1: Path, v2: Path, kills: int) -> dict[str, Any]:
    """Kill at a moment drawn uniformly over 1.2 x the install's own duration (measured
    first), so every step of the update gets hit; kills after the answer are counted
    apart, and there the new version must serve."""
    rng = random.Random(1)
    window = []
    for _ in range(3):
        t = time.perf_counter()
        agent.install(v2)
        window.append(time.perf_counter() - t)
        _reset(agent, v1)
    span = 1.2 * sorted(window)[1]
    outcome: dict[str, Any] = {"install_s": round(span / 1.2, 3), "inside_install": 0,
                               "after_answer": 0, "old": 0, "new": 0, "broken": 0,
                               "failed_restart": 0}
    t0 = time.perf_counter()
    for _ in range(kills):
        answers: list[int] = []
        th = threading.Thread(target=_quiet, args=(_install_into, agent, v2, answers))
        start = time.perf_counter()
        th.start()
        time.sleep(max(0.0, rng.uniform(0, span) - (time.perf_counter() - start)))
        agent.kill9()
        th.join()
        outcome["after_answer" if answers else "inside_install"] += 1
        try:
            agent.start()
        except AssertionError:
            outcome["failed_restart"] += 1
            break
        st = agent.call("GET", "/v1/admin/status")[1]
        version = st["models"].get("cnn", {}).get("version")
        out = agent.call("POST", "/v2/models/cnn/infer", _cnn_body())
        staging = list((agent.dir / "state/store/staging").iterdir())
        store = ModelStore(agent.dir / "state")
        dirs = {p.name for p in (agent.dir / "state/store/bundles/cnn").iterdir()}
        slots = store.slots("cnn")
        if (out[0] != 200 or staging or version not in (1, 2)
                or not {slots.active} <= dirs or (answers == [200] and version != 2)):
            outcome["broken"] += 1
        elif version == 1:
            outcome["old"] += 1
        else:
            outcome["new"] += 1
        if version == 2:
            _reset(agent, v1)
    outcome["seconds"] = round(time.perf_counter() - t0, 1)
    return outcome


def _install_into(agent: AgentProcess, archive: Path, answers: list[int]) -> None:
    answers.append(agent.install(archive)[0])


def _quiet(fn: Any, *args: Any) -> None:
    with contextlib.suppress(OSError):  # killed mid-request: no answer
        fn(*args)


def _cnn_body() -> dict[str, Any]:
    return {"inputs": [{"name": "input", "shape": [1, 3, 64, 64], "datatype": "FP32",
                        "data": [0.5] * (3 * 64 * 64)}]}


def kill_section(where: Path, keys: Path, v1: Path, v2: Path, kills: int) -> None:
    d = where / "agent-kill"
    d.mkdir()
    a = AgentProcess(write_config(d, keys, profile="x86_64-generic")).start()
    assert a.install(v1)[0] == 200
    print(f"\n4. crash: kill -9 at a random moment of an install of the "
          f"{v2.stat().st_size / 1e6:.0f} MB CNN bundle, {kills} times (power cuts: "
          "bench_powercut.py)")
    print("   " + json.dumps(crashes(a, v1, v2, kills)))
    a.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--requests", type=int, default=2000)
    ns = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-agent-") as tmp:
        where = Path(tmp)
        run = converted(where)
        keys = make_keys(where / "keys")
        rel = {"tflite": release(run, where, keys, version=1, profile="raspberry-pi-4"),
               "onnx": release(run, where, keys, version=1, profile="x86_64-generic")}
        print(f"bench_agent on {psutil.cpu_count()} CPU(s); {ns.requests} requests per row")

        agents = {}
        for runtime, profile in (("tflite", "raspberry-pi-4"), ("onnx", "x86_64-generic")):
            d = where / f"agent-{runtime}"
            d.mkdir()
            a = AgentProcess(write_config(d, keys, profile=profile)).start()
            time.sleep(1)
            agents[runtime] = (a, rss_mib(a), idle_cpu(a, ns.seconds))
            assert a.install(rel[runtime])[0] == 200

        print("\n1. latency, concurrency 1, digits int8 (µs)")
        print(f"   {'path':44} {'p50':>8} {'p99':>8} {'added p50':>10}")
        for runtime, name in (("tflite", "serving_default_args_0"), ("onnx", "input")):
            a = agents[runtime][0]
            model = run / ("model_int8.tflite" if runtime == "tflite" else "model_int8.onnx")
            rows = bench_latency(a, model, runtime, name, ns.requests)
            for label, p50, p99 in rows:
                added = "" if label.startswith(("bare", "HTTP")) else f"{p50 - rows[0][1]:10.0f}"
                print(f"   {label + ' (' + runtime + ')':44} {p50:8.0f} {p99:8.0f} {added}")

        print("\n1b. the request path layer by layer, in-process (µs, p50)")
        for label, us in layers(run, ns.requests):
            print(f"   {label:56} {us:8.1f}")

        print("\n3. memory and idle CPU of the daemon (RSS MiB)")
        print(f"   {'runtime':8} {'idle, no model':>15} {'serving':>9} {'idle CPU %':>11}")
        for runtime, (a, idle_rss, cpu) in agents.items():
            print(f"   {runtime:8} {idle_rss:15.1f} {rss_mib(a):9.1f} {cpu:11.2f}")

        cnn_dir, cnn, cnn2 = synthetic_cnn(where, keys)
        a = agents["onnx"][0]
        assert a.install(cnn)[0] == 200, "cnn install"
        print(f"\n2. throughput, concurrency 8, synthetic CNN ({ns.seconds:.0f} s each)")
        print(f"   {'path':56} {'req/s':>8} {'ms/req':>8}")
        rows = bench_throughput(a, cnn_dir / "model.onnx", ns.seconds)
        for label, rate, ms in rows:
            print(f"   {label:56} {rate:8.1f} {ms:8.2f}")
        print(f"   speed-up {rows[1][1] / rows[0][1]:.2f}x")
        metrics = a.call("GET", "/metrics")[1]
        batches = [ln for ln in metrics.splitlines() if ln.startswith(
            ('edge_agent_batches_total{model="cnn"}', 'edge_agent_inferences_total{model="cnn"}'))]
        print("   " + "; ".join(batches))
        for a, _, _ in agents.values():
            a.stop()

        if ns.kills:
            kill_section(where, keys, cnn, cnn2, ns.kills)
    print("\nall figures from one run; medians of stable runs vary by about 10 %")


if __name__ == "__main__":
    main()
