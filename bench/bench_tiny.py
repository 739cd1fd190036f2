"""MLPerf Tiny-size models through the converter, the agent and the fleet, side by side in
one run.

The four reference architectures (ResNet-8, DS-CNN, MobileNetV1 0.25, the FC autoencoder;
`converter.tiny`), trained here on generated data of their reference input shapes
(`converter.examples.tiny`; accuracy on it is not the benchmark's) and quantized as
trained (`[model]`, no teacher), for four targets: raspberry-pi-4 (LiteRT, XNNPACK),
arm-ethos-u55-128 (Vela: SRAM, flash, cycles, CPU fallback), coral-edgetpu (the operator
check; the compiler is an external step) and x86_64-generic (ONNX, dynamic batch).

1. per model: parameters, MACs, int8 TFLite size, quality fp32 / int8 ONNX / int8 TFLite,
   Vela on U55-128 and the Coral check, next to a published MLPerf Tiny latency;
2. host latency (1 thread) bare fp32 ONNX / int8 ONNX / int8 TFLite, and what the agent
   adds (agent - null HTTP server - bare LiteRT, lean keep-alive client, binary tensors);
3. throughput at concurrency 8 with micro-batching and without (max_batch 1), ONNX;
4. the daemon's RSS serving each model alone (TFLite);
5. transport for big inputs: the 96x96x3 model and a 224x224x3 float32 input (600 KB),
   JSON against binary tensors against system shared memory;
6. two models within a memory budget that fits only one large model plus the smallest:
   unloads, reloads and refusals as requests move between them;
7. each model rolled out to simulated devices (waves 10/50/100 %) over a real mosquitto.

    .venv/bin/python bench/bench_tiny.py [--cases ic,kws,vww,ad] [--requests 1000]
        [--seconds 4] [--devices 20]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import sys
import tempfile
import time
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import psutil
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_fleet import certify, rollout_run, sim_settings
from bench_fleet import releases as fleet_releases
from fixture_agent import AgentProcess, make_keys, onnx_release, write_config
from fixture_mqtt import SecureBroker
from lean import (
    LeanClient,
    bare_times,
    infer_binary,
    infer_json,
    load,
    null_server,
    p50_us,
    request_bytes,
    timed,
)

from agent.serving.runtime import open_model
from agent.serving.scheduler import planned_bytes
from agent.trust.bundle import read_manifest
from converter import tiny
from converter.cli import main as convert
from converter.examples import tiny as examples
from fleet.sim.processes import SimulatedFleet
from fleet.trust.artifacts import serve_in_process
from fleet.trust.keys import KeyDir
from fleet.trust.release import pack_bundle, sign_bundle

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "build/bench-tiny"
PROFILES = ("raspberry-pi-4", "arm-ethos-u55-128", "coral-edgetpu", "x86_64-generic")
NAMES = {"ic": "ResNet-8 (IC)", "kws": "DS-CNN (KWS)", "vww": "MobileNetV1 0.25 (VWW)",
         "ad": "FC autoencoder (AD)"}
# The published MLPerf Tiny v1.1 closed-division latency of a comparable system, in ms:
# STM32H7A3 (Cortex-M7, 280 MHz) with X-CUBE-AI 8.0, Krai's submission
# (mlcommons/tiny_results_v1.1, closed/Krai/results/README.md: 18.215 / 60.988 / 19.867 /
# 547.234 inferences per second). No Ethos-U55 system is among the closed results of
# v0.7 to v1.3, so this MCU is the nearest published figure to set Vela's estimate beside.
PUBLISHED_MS = {"ic": 1000 / 18.215, "kws": 1000 / 60.988, "vww": 1000 / 19.867,
                "ad": 1000 / 547.234}


def say(msg: str = "") -> None:
    print(msg, flush=True)


# -- conversions ---------------------------------------------------------------------------
def example(case: str) -> Path:
    where = CACHE / case / "example"
    if not (where / "model.pt").exists():
        t0 = time.monotonic()
        figure = examples.write_example(where, case=case)
        say(f"   {case}: trained in {time.monotonic() - t0:.0f} s (test "
            f"{'AUC' if case == 'ad' else 'accuracy'} {figure:.3f})")
    return where


def converted(case: str, profile: str) -> tuple[Path | None, str]:
    """The converter's output for `profile` (cached), or None and the refusal."""
    ex = example(case)
    out = CACHE / case / profile
    failed = out.with_suffix(".refused")
    if (out / "report.json").exists():
        return out, ""
    if failed.exists():
        return None, failed.read_text()
    err = io.StringIO()
    t0 = time.monotonic()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = convert(["run", str(ex / "recipe.toml"), "--out", str(out), "--force",
                      "--target-profile", profile])
    if rc != 0:
        failed.write_text(err.getvalue().strip().splitlines()[-1] if err.getvalue() else
                          f"exit {rc}")
        return None, failed.read_text()
    say(f"   {case} for {profile}: converted in {time.monotonic() - t0:.0f} s")
    return out, ""


def report(out: Path) -> dict[str, Any]:
    return dict(json.loads((out / "report.json").read_text()))


def rows(rep: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(m["name"], m["runtime"]): m for m in rep["evaluate"]["models"]}


def quality(m: dict[str, Any]) -> str:
    if m.get("accuracy") is not None:
        return f"{m['accuracy'] * 100:.1f}"
    return f"{m['anomaly_auc']:.3f}" if m.get("anomaly_auc") is not None else "-"


def release(out: Path, keys: Path, where: Path, tag: str) -> Path:
    bundle = Path(shutil.copytree(out / "bundle", where / f"bundle-{tag}"))
    kd = KeyDir(keys)
    sign_bundle(bundle, kd.keys_of(kd.root(), "release", None))
    return pack_bundle(bundle, where / f"{tag}.tar.zst")


# -- 1. models -----------------------------------------------------------------------------
def table_models(cases: list[str]) -> None:
    say("\n1. the models (generated data: quality is not the benchmark's)")
    say(f"   {'model':24} {'params':>8} {'MACs':>11} {'TFLite':>9} {'fp32':>6} "
        f"{'ONNX8':>6} {'TFL8':>6} | {'Vela U55-128: SRAM':>18} {'flash':>9} {'cycles':>10}"
        f" {'ms@NPU':>7} {'CPU ops':>8} | {'Coral check':28} | {'MLPerf ms':>9}")
    for case in cases:
        family, shape, classes, _ = examples.CASES[case]
        model = tiny.build(family, shape, classes)
        pi4, _ = converted(case, "raspberry-pi-4")
        assert pi4 is not None, f"{case}: the raspberry-pi-4 conversion failed"
        rep = report(pi4)
        r = rows(rep)
        tfl = r[("model int8", "tflite")]
        u55, why_u55 = converted(case, "arm-ethos-u55-128")
        if u55 is not None:
            comp = report(u55)["compile"]
            s = comp.get("summary", {})
            vela = (f"{s.get('sram_kib', 0):15.1f} KiB {s.get('flash_kib', 0):6.1f} KiB "
                    f"{s.get('cycles_total', 0):>10} {s.get('inference_time_s', 0) * 1e3:7.3f}"
                    f" {','.join(comp.get('cpu_fallback_ops', [])) or 'none':>8}")
        else:
            vela = f"refused: {why_u55[:60]}"
        coral, why_coral = converted(case, "coral-edgetpu")
        if coral is not None:
            unsupported = report(coral)["quantize"]["tflite"]["unsupported"]
            check = "all ops map" if not unsupported else f"CPU: {','.join(unsupported)}"
        else:
            check = f"refused: {why_coral[:40]}"
        say(f"   {NAMES[case]:24} {tiny_params(model):8,} {tiny.macs(model, shape):11,} "
            f"{tfl['raw_bytes'] / 1024:6.1f} KiB {quality(r[('model fp32', 'onnx')]):>6} "
            f"{quality(r[('model int8', 'onnx')]):>6} {quality(tfl):>6} | {vela} | "
            f"{check[:28]:28} | {PUBLISHED_MS[case]:9.2f}")
    say("   quality: test accuracy %, or anomaly AUC; MLPerf ms: STM32H7A3 + X-CUBE-AI 8.0 "
        "(MLPerf Tiny v1.1, closed; no Ethos-U55 system was submitted)")


def tiny_params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


# -- 2, 4. latency, overhead, memory --------------------------------------------------------
def sample(case: str, n: int = 1) -> np.ndarray:
    with np.load(CACHE / case / "example" / "data.npz") as npz:
        return np.asarray(npz["x"][:n], dtype=np.float32)


def bare_us(path: Path, runtime: str, x: np.ndarray, n: int) -> float:
    return p50_us(bare_times(path, runtime, x, n, warmup=20))


def agent_us(sock: Path, raw: bytes, n: int) -> float:
    c = LeanClient(sock)
    try:
        return p50_us(timed(c, raw, n, warmup=min(100, n)))
    finally:
        c.close()


def table_latency(cases: list[str], where: Path, keys: Path, null: Path, n: int) -> None:
    say("\n2. host latency, batch 1, 1 thread (ms, p50, from the converter's report) and what"
        " the agent adds (µs, p50: agent - null server - bare LiteRT; binary tensors)")
    say(f"   {'model':24} {'fp32 ONNX':>9} {'int8 ONNX':>9} {'int8 TFL':>9} | {'bare':>7} "
        f"{'null':>6} {'agent':>7} {'added':>6} | {'RSS MiB':>7}")
    null_us = agent_us(null, request_bytes("POST", "/x", b"{}"), n)
    for case in cases:
        pi4, _ = converted(case, "raspberry-pi-4")
        assert pi4 is not None
        r = rows(report(pi4))
        lat = [r[k]["latency"]["p50_ms"] for k in (("model fp32", "onnx"), ("model int8", "onnx"),
                                                  ("model int8", "tflite"))]
        d = where / f"rss-{case}"
        d.mkdir()
        agent = AgentProcess(write_config(d, keys, profile="raspberry-pi-4")).start()
        try:
            assert agent.install(release(pi4, keys, where, f"{case}-pi4"))[0] == 200
            m = read_manifest(pi4 / "bundle")
            x = sample(case)
            bare = bare_us(pi4 / "model_int8.tflite", "tflite", x, n)
            through = agent_us(agent.socket, infer_binary(m.name, m.inputs[0].name, x), n)
            assert agent.proc is not None
            rss = psutil.Process(agent.proc.pid).memory_info().rss / 2**20
        finally:
            agent.stop()
        say(f"   {NAMES[case]:24} {lat[0]:9.3f} {lat[1]:9.3f} {lat[2]:9.3f} | {bare:7.0f} "
            f"{null_us:6.0f} {through:7.0f} {through - null_us - bare:6.0f} | {rss:7.1f}")
    say("   RSS: the daemon serving that model alone (TFLite), after its install")


# -- 3. micro-batching ----------------------------------------------------------------------
def table_batching(cases: list[str], where: Path, keys: Path, seconds: float) -> None:
    say(f"\n3. throughput at concurrency 8 (8 keep-alive connections, one selector thread), "
        f"single-sample requests, ONNX int8 (req/s, {seconds:g} s each): micro-batching "
        "(max_batch 4 and 8, max_wait 2 ms) against none (max_batch 1)")
    say(f"   {'model':24} {'bare loop':>9} {'max_batch 1':>11} {'max_batch 4':>11} "
        f"{'max_batch 8':>11} {'best speed-up':>13}")
    for case in cases:
        out, _ = converted(case, "x86_64-generic")
        assert out is not None
        m = read_manifest(out / "bundle")
        archive = release(out, keys, where, f"{case}-x86")
        x = sample(case)
        model = open_model(out / "bundle" / m.model_file, m.runtime)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < min(seconds, 2):
            model.run(x)
            n += 1
        bare = n / (time.perf_counter() - t0)
        rates = []
        for batch in (1, 4, 8):
            d = where / f"batch-{case}-{batch}"
            d.mkdir()
            agent = AgentProcess(write_config(d, keys, profile="x86_64-generic",
                                              scheduler={"max_batch": batch})).start()
            try:
                assert agent.install(archive)[0] == 200
                rate, failed = load(agent.socket,
                                    infer_binary(m.name, m.inputs[0].name, x),
                                    clients=8, seconds=seconds)
                assert failed == 0, f"{failed} refused"
                rates.append(rate)
            finally:
                agent.stop()
        say(f"   {NAMES[case]:24} {bare:9.0f} {rates[0]:11.0f} {rates[1]:11.0f} "
            f"{rates[2]:11.0f} {max(rates[1:]) / rates[0]:12.2f}x")
    say("   bare loop: onnxruntime batch 1 in this process, the CPU's bound for one stream. "
        "Closed loop: with max_batch equal to the concurrency every client waits on the same "
        "batch and the event loop idles while it runs; a smaller batch pipelines parsing with "
        "running")


# -- 5. transport -----------------------------------------------------------------------------
def synthetic_224(where: Path, keys: Path) -> Path:
    """A 224x224x3 float32 input reduced at once (global average pool, one dense layer):
    the runtime costs little, so the table shows the transport."""
    rng = np.random.default_rng(0)
    w = onnx.numpy_helper.from_array(rng.normal(0, 1, (3, 10)).astype(np.float32), "w")
    nodes = [helper.make_node("GlobalAveragePool", ["input"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("MatMul", ["f", "w"], ["output"])]
    graph = helper.make_graph(
        nodes, "big-input", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                           ["N", 3, 224, 224])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 10])], [w])
    bundle = where / "big-bundle"
    bundle.mkdir()
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
              bundle / "model.onnx")
    archive: Path = onnx_release(bundle, keys, where / "big.tar.zst", name="big", version=1,
                                 sample_shape=(3, 224, 224), arena_bytes=3 * 224 * 224 * 4)
    return archive


def shm_request(name: str, input_name: str, x: np.ndarray, region: str) -> bytes:
    body = json.dumps({"inputs": [{"name": input_name, "shape": list(x.shape),
                                   "datatype": "FP32",
                                   "parameters": {"shared_memory_region": region,
                                                  "shared_memory_byte_size": x.nbytes}}],
                       "outputs": [{"name": "y", "parameters": {"binary_data": True}}]}
                      ).encode()
    return request_bytes("POST", f"/v2/models/{name}/infer", body,
                         {"Content-Type": "application/json"})


def table_transport(cases: list[str], where: Path, keys: Path, null: Path, n: int) -> None:
    say("\n5. big inputs: what the agent adds (µs, p50) with JSON, binary tensors and system "
        "shared memory (agent - null server - bare runtime)")
    say(f"   {'input':36} {'bytes':>8} {'bare':>6} | {'JSON':>7} {'binary':>7} {'shm':>7} | "
        f"{'shm/binary':>10}")
    null_us = agent_us(null, request_bytes("POST", "/x", b"{}"), n)
    targets: list[tuple[str, Path, str]] = []
    if "vww" in cases:
        out, _ = converted("vww", "raspberry-pi-4")
        assert out is not None
        targets.append(("96x96x3 (MobileNetV1 0.25, TFLite)",
                        release(out, keys, where, "vww-shm"), "raspberry-pi-4"))
    targets.append(("224x224x3 float32 (synthetic, ONNX)", synthetic_224(where, keys),
                    "x86_64-generic"))
    for label, archive, profile in targets:
        d = where / f"shm-{profile}"
        d.mkdir(exist_ok=True)
        agent = AgentProcess(write_config(d, keys, profile=profile,
                                          api={"shared_memory": True})).start()
        seg = None
        try:
            assert agent.install(archive)[0] == 200
            _, index = agent.call("POST", "/v2/repository/index", {})
            name = index[0]["name"]
            _, meta = agent.call("GET", f"/v2/models/{name}")
            input_name, shape = meta["inputs"][0]["name"], meta["inputs"][0]["shape"]
            x = (sample("vww") if name.startswith("tiny") else
                 np.random.default_rng(0).uniform(0, 1, (1, *shape[1:])).astype(np.float32))
            seg = shared_memory.SharedMemory(create=True, size=x.nbytes)
            np.ndarray(x.shape, np.float32, buffer=seg.buf)[:] = x
            assert agent.call("POST", "/v2/systemsharedmemory/region/frame/register",
                              {"key": f"/{seg.name}", "offset": 0,
                               "byte_size": x.nbytes})[0] == 200
            model_file = next(agent.dir.rglob("model.tflite" if profile != "x86_64-generic"
                                              else "model.onnx"))
            bare = bare_us(model_file, "tflite" if profile != "x86_64-generic" else "onnx",
                           x, n)
            got = {kind: agent_us(agent.socket, raw, n) - null_us - bare for kind, raw in (
                ("json", infer_json(name, input_name, x)),
                ("binary", infer_binary(name, input_name, x)),
                ("shm", shm_request(name, input_name, x, "frame")))}
            say(f"   {label:36} {x.nbytes:8,} {bare:6.0f} | {got['json']:7.0f} "
                f"{got['binary']:7.0f} {got['shm']:7.0f} | {got['shm'] / got['binary']:9.2f}x")
        finally:
            agent.stop()
            if seg is not None:
                seg.close()
                seg.unlink()


# -- 6. two models in one budget ------------------------------------------------------------
def section_budget(cases: list[str], where: Path, keys: Path) -> None:
    if len(cases) < 3:
        return
    say("\n6. memory budget: room for the largest model, the smallest and one request, not "
        "for the two largest")
    outs = {c: converted(c, "raspberry-pi-4")[0] for c in cases}
    manifests = {f"tiny-{c}": read_manifest(out / "bundle") for c, out in outs.items()
                 if out is not None}
    probe_dir = where / "budget-probe"
    probe_dir.mkdir()
    probe = AgentProcess(write_config(probe_dir, keys, profile="raspberry-pi-4")).start()
    try:  # each model's resident bytes as the agent measures them at a first load
        for c, out in outs.items():
            assert out is not None
            assert probe.install(release(out, keys, where, f"{c}-probe"))[0] == 200
        resident = {ln.split(chr(34))[1]: int(float(ln.rsplit(" ", 1)[1]))
                    for ln in probe.call("GET", "/metrics")[1].splitlines()
                    if ln.startswith("edge_agent_resident_model_bytes{")}
    finally:
        probe.stop()
    order = sorted(resident, key=lambda n: resident[n], reverse=True)
    big, second, small = order[0], order[1], order[-1]
    request = max(planned_bytes(m, [1, *[d or 1 for d in m.inputs[0].shape[1:]]])
                  for m in manifests.values())
    budget = resident[big] + resident[small] + request + 64 * 1024
    say(f"   resident at first load (KiB): "
        f"{', '.join(f'{n} {b / 1024:.0f}' for n, b in resident.items())} (weights "
        f"{', '.join(f'{n} {m.resources.model_bytes / 1024:.0f}' for n, m in manifests.items())}"
        f"); largest one-sample request {request / 1024:.0f} KiB; budget {budget / 1024:.0f} "
        f"KiB: {big} + {second} = {(resident[big] + resident[second]) / 1024:.0f} KiB do not "
        "fit with a request")
    d = where / "budget"
    d.mkdir()
    agent = AgentProcess(write_config(d, keys, profile="raspberry-pi-4", scheduler={
        "memory_budget_bytes": budget})).start()
    try:
        for c, out in outs.items():
            assert out is not None
            assert agent.install(release(out, keys, where, f"{c}-budget"))[0] == 200
        for name in [big, small, second, big, small, second]:
            m = manifests[name]
            x = sample(name.removeprefix("tiny-"))
            status, _ = agent.call("POST", f"/v2/models/{name}/infer", {"inputs": [{
                "name": m.inputs[0].name, "shape": list(x.shape), "datatype": "FP32",
                "data": x.ravel().tolist()}]})
            say(f"   request {name:9} -> {status}; loaded now (KiB, as the agent counts them):"
                f" {resident_kib(agent)}")
        m = manifests[big]
        one = planned_bytes(m, [1, *[d or 1 for d in m.inputs[0].shape[1:]]])
        x = np.repeat(sample(big.removeprefix("tiny-")), budget // one + 1, axis=0)
        client = LeanClient(agent.socket)
        status, body = client.request(infer_binary(big, m.inputs[0].name, x))
        client.close()
        reason = json.loads(body).get("reason", "") if status != 200 else ""
        say(f"   a batch of {len(x)} to {big} ({x.nbytes / 1024:.0f} KiB of input, "
            f"{len(x) * one / 1024:.0f} KiB with outputs and arena) -> {status} {reason}")
        counters = [ln for ln in agent.call("GET", "/metrics")[1].splitlines()
                    if ln.startswith(("edge_agent_model_unloads_total",
                                      "edge_agent_model_reloads_total",
                                      "edge_agent_refusals_total"))]
        say("   " + "; ".join(counters))
    finally:
        agent.stop()


def resident_kib(agent: AgentProcess) -> str:
    return ", ".join(
        f"{ln.split(chr(34))[1]} {float(ln.rsplit(' ', 1)[1]) / 1024:.0f}"
        for ln in agent.call("GET", "/metrics")[1].splitlines()
        if ln.startswith("edge_agent_resident_model_bytes{"))


# -- 7. rollouts ----------------------------------------------------------------------------
def section_rollout(cases: list[str], where: Path, devices: int) -> None:
    say(f"\n7. each model rolled out to {devices} simulated devices (x86_64-generic bundles, "
        "mutual-TLS mosquitto, waves 1/10/50/100 %, 2 s health windows)")
    broker = SecureBroker(where / "mosq").start()
    try:
        keys, v1, _ = fleet_releases(where / "fleet")
        rel = where / "fleet" / "tiny"
        rel.mkdir()
        archives = {}
        for case in cases:
            out, _ = converted(case, "x86_64-generic")
            assert out is not None
            archives[case] = release(out, keys, rel, f"tiny-{case}-x86")
        server, url = serve_in_process(rel)
        certify(broker, devices)
        settings = sim_settings(broker, keys, initial=v1, telemetry_interval_s=1.0,
                                health_window_s=2.0)
        with SimulatedFleet(settings, devices) as sims:
            sims.start()
            for case in cases:
                status, took, reason, _ = rollout_run(where, broker, keys, url,
                                                      archives[case], sims, 2.0)
                name = f"tiny-{case}"
                serving = sum(v.get(name) == 1 for v in sims.versions().values())
                say(f"   {NAMES[case]:24} {status} in {took:.1f} s; {serving} of {devices} "
                    f"serve {name} v1 {reason}")
        server.terminate()
    finally:
        broker.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="ic,kws,vww,ad")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--devices", type=int, default=20)
    ap.add_argument("--only", default="1,2,3,5,6,7")
    ns = ap.parse_args()
    cases = [c for c in ns.cases.split(",") if c]
    only = set(ns.only.split(","))
    say(f"bench_tiny on {psutil.cpu_count()} CPU(s); cases {', '.join(cases)}")
    say("conversions (cached in build/bench-tiny):")
    for case in cases:
        for profile in PROFILES:
            converted(case, profile)
    with tempfile.TemporaryDirectory(prefix="bench-tiny-") as tmp:
        where = Path(tmp)
        keys = make_keys(where / "keys")
        if "1" in only:
            table_models(cases)
        with null_server(where / "null.sock") as null:
            if "2" in only:
                table_latency(cases, where, keys, null, ns.requests)
            if "3" in only:
                table_batching(cases, where, keys, ns.seconds)
            if "5" in only:
                table_transport(cases, where, keys, null, ns.requests)
        if "6" in only:
            section_budget(cases, where, keys)
        if "7" in only:
            section_rollout(cases, where, ns.devices)
    say("\nall figures from one run on this host; device figures differ")


if __name__ == "__main__":
    main()
