"""Real releases (converter-built, signed, packed) and a real agent subprocess for tests."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from agent.client import UnixHTTPConnection, call, unix_call, upload
from agent.trust.bundle import file_entry
from agent.trust.identity import generate_device_key
from agent.trust.manifest import canonical_json
from fleet.trust.keys import KeyDir, init_keys
from fleet.trust.release import break_golden_outputs, pack_bundle, sign_bundle

ONE_OF_ONE: Any = {"root": (1, 1), "release": (1, 1), "command": (1, 1)}


def make_keys(where: Path) -> Path:
    init_keys(where, fleet="acme", counts=ONE_OF_ONE)
    return where


def release(work: Path, out: Path, keys: Path, *, version: int, profile: str,
            break_selftest: bool = False) -> Path:
    """Re-bundle a converter work dir for `profile` at `version`, sign, pack; the archive."""
    from converter.cli import main as convert  # host toolchain only
    w = Path(shutil.copytree(work, out / f"work-{profile}-{version}"))
    assert convert(["bundle", "--work", str(w), "--target-profile", profile,
                    "--bundle-version", str(version)]) == 0
    bundle = w / "bundle"
    if break_selftest:
        break_golden_outputs(bundle)
    kd = KeyDir(keys)
    sign_bundle(bundle, kd.keys_of(kd.root(), "release", None))
    return pack_bundle(bundle, out / f"digits-{profile}-v{version}"
                       f"{'-bad' if break_selftest else ''}.tar.zst")


def write_config(where: Path, keys: Path, *, profile: str, **sections: dict[str, Any]) -> Path:
    cfg = {
        "device": {"id": "dev-1", "fleet": "acme", "groups": ["lab"], "profile": profile},
        "paths": {"state_dir": str(where / "state"), "root_file": str(keys / "root.json")},
        "api": {"socket": str(where / "api.sock"), "admin_socket": str(where / "admin.sock")},
        "thermal": {"sensor": str(where / "temp"), "poll_s": 0.05},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    if "mqtt" in cfg and "device_key" not in cfg["paths"]:  # reports are signed
        device = cfg["device"]["id"]
        if not (where / f"{device}.key").exists():
            generate_device_key(device, where)
        cfg["paths"]["device_key"] = str(where / f"{device}.key")
    where.mkdir(parents=True, exist_ok=True)
    if not (where / "temp").exists():
        (where / "temp").write_text("45000\n")
    lines = []
    for name, values in cfg.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {_toml(v)}" for k, v in values.items()]
    path = where / "agent.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return str(v)


class AgentProcess:
    """`edge-agent run` as a subprocess, with its stderr kept for assertions."""

    def __init__(self, config: Path, env: dict[str, str] | None = None,
                 command: list[str] | None = None) -> None:
        self.config = config
        self.command = command or [sys.executable, "-m", "agent.cli"]
        self.dir = config.parent
        self.socket = self.dir / "api.sock"
        self.admin_socket = self.dir / "admin.sock"
        self.log_path = self.dir / "agent.log"
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True, timeout: float = 30.0) -> AgentProcess:
        """Start it; with `wait`, until it answers live. A start that fails kills the
        process first (a test that fails in its setup leaves nothing running)."""
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen([*self.command, "run", "--config",
                                          str(self.config)], stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL, env=self.env)
        if wait:
            try:
                self.wait_live(timeout)
            except BaseException:
                self.kill9()
                raise
        return self

    def wait_live(self, timeout: float = 30.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited {self.proc.returncode}: {self.log}")
            try:
                if unix_call(self.socket, "GET", "/v2/health/live", timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"agent not live after {timeout}s: {self.log}")

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def call(self, method: str, url: str, body: Any = None) -> tuple[int, Any]:
        """A request on the inference socket, or the admin socket for `/v1/admin/`."""
        sock = self.admin_socket if url.startswith("/v1/admin/") else self.socket
        return unix_call(sock, method, url, body)

    def connection(self) -> UnixHTTPConnection:
        return UnixHTTPConnection(self.socket, timeout=30)

    def install(self, archive: Path) -> tuple[int, Any]:
        return upload(self.admin_socket, archive)

    def kill9(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def start_group(where: Path, keys: Path, broker_url: str, devices: list[str],
                installs: list[Path], *, mqtt_for: Any = None, db: str | Path | None = None,
                **mqtt: Any) -> list[AgentProcess]:
    """Agents of group "lab" on one broker, each with `installs` installed in order; their
    report keys are registered in the fleet record `db` (default `where/fleet.sqlite`).
    `mqtt_for`: device -> its own `[mqtt]` settings (its certificate on a broker with
    mutual TLS)."""
    from fleet.devices.registry import FleetDB

    agents: list[AgentProcess] = []
    try:
        for dev in devices:
            d = where / dev
            d.mkdir()
            cfg = write_config(d, keys, profile="x86_64-generic",
                               device={"id": dev, "groups": ["lab"]},
                               mqtt={"brokers": [broker_url], **mqtt,
                                     **(mqtt_for(dev) if mqtt_for else {})})
            register(FleetDB(db or where / "fleet.sqlite"), d)
            agents.append(AgentProcess(cfg))
            agents[-1].start()
            for archive in installs:
                status, body = agents[-1].install(archive)
                assert status == 200, body
    except BaseException:  # a failed setup must not leave agents running
        for a in agents:
            if a.proc is not None:
                a.stop()
        raise
    return agents


def command_controller(db: Any, broker: Any, keys: Path, **kw: Any) -> Any:
    """A rollout controller for fleet "acme" with the command keys of the key dir `keys`;
    `broker` a URL or `BrokerAuth`."""
    from fleet.rollout.controller import Controller
    from fleet.trust.keys import KeyDir

    kd = KeyDir(keys)
    return Controller(db, broker, "acme", kd.keys_of(kd.root(), "command", None), **kw)


def register(db: Any, *dirs: Path) -> int:
    """Register every device key (`DEVICE.pub`) in `dirs` with a fleet database, as
    `edge-fleet devices import` does; returns how many."""
    from agent.trust.identity import read_device_public

    n = 0
    for d in dirs:
        for pub in sorted(d.glob("*.pub")):
            key = read_device_public(pub.read_bytes(), what=str(pub)).report_key
            assert key is not None
            db.register(pub.stem, key)
            n += 1
    return n


def digits_input(n: int = 1, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 1, size=(n, 1, 8, 8)).astype(np.float32).ravel().tolist()


def infer_body(name: str, n: int = 1, **params: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"inputs": [{"name": name, "shape": [n, 1, 8, 8], "datatype": "FP32",
                                        "data": digits_input(n)}]}
    if params:
        body["parameters"] = params
    return body


__all__ = ["AgentProcess", "call", "infer_body", "make_keys", "release", "write_config"]


def onnx_release(bundle: Path, keys: Path, archive: Path, *, name: str, version: int,
                 sample_shape: tuple[int, ...], profile: str = "x86_64-generic",
                 arena_bytes: int = 1 << 20, output_name: str = "output",
                 model_bytes: int | None = None, task: str = "classify",
                 outputs: int = 10) -> Path:
    """Self-test, manifest, release signatures and archive for `bundle/model.onnx` (input
    "input" [N, *sample_shape], output `output_name` [N, outputs]); returns the archive.
    `model_bytes`: the resident size the manifest declares (default: the file's); `task`
    classify (labels "0".."9") or regress (no labels, no class statistics)."""
    from datetime import UTC, datetime, timedelta

    from fixture_trust import reference

    from agent.serving.runtime import open_model
    from agent.trust.manifest import (
        Manifest,
        OutputReference,
        Preprocessing,
        ResourceEstimate,
        SelfTest,
        TensorSpec,
    )

    x = np.random.default_rng(1).uniform(0, 1, (8, *sample_shape)).astype(np.float32)
    np.savez(bundle / "selftest.npz", inputs=x,
             outputs=open_model(bundle / "model.onnx", "onnx").run(x))
    now = datetime.now(UTC)
    ref = reference(classes=outputs, samples=len(x))
    if task == "regress":
        ref = ref.model_copy(update={"output": OutputReference()})
    m = Manifest(
        name=name, version=version, created=now, expires=now + timedelta(days=30),
        min_agent_version="0.1.0", profiles=[profile], runtime="onnx", model_file="model.onnx",
        files={f: file_entry(bundle / f) for f in ("model.onnx", "selftest.npz")},
        inputs=[TensorSpec(name="input", dtype="float32", shape=[None, *sample_shape])],
        outputs=[TensorSpec(name=output_name, dtype="float32", shape=[None, outputs])],
        labels=[str(i) for i in range(outputs)] if task == "classify" else [],
        preprocessing=Preprocessing(layout="NCHW"), task=task,
        reference=ref,
        resources=ResourceEstimate(model_bytes=model_bytes
                                   or (bundle / "model.onnx").stat().st_size,
                                   arena_bytes=arena_bytes, peak_memory_bytes=1 << 26),
        selftest=SelfTest(atol=1e-4, min_top1_agreement=1.0))
    (bundle / "manifest.json").write_bytes(canonical_json(m))
    (bundle / "signatures.json").unlink(missing_ok=True)
    kd = KeyDir(keys)
    sign_bundle(bundle, kd.keys_of(kd.root(), "release", None))
    return pack_bundle(bundle, archive)


def slow_release(out: Path, keys: Path, *, version: int, profile: str = "x86_64-generic",
                 widths: tuple[int, ...] = (2048, 2048, 2048)) -> Path:
    """A signed release with the digits model's I/O names but a slow body (wide fully
    connected layers, milliseconds per sample): a latency regression to inject."""
    import onnx  # host toolchain only
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Flatten", ["input"], ["f"])]
    inits, prev, width = [], "f", 64
    for i, w in enumerate((*widths, 10)):
        inits.append(onnx.numpy_helper.from_array(
            (rng.normal(0, 1, (width, w)) / np.sqrt(width)).astype(np.float32), f"m{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"m{i}"], [f"h{i}"]))
        prev, width = f"h{i}", w
    nodes.append(helper.make_node("Identity", [prev], ["output"]))
    graph = helper.make_graph(
        nodes, "slow", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                      ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 10])], inits)
    bundle = out / f"slow-{version}"
    bundle.mkdir()
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
              bundle / "model.onnx")
    archive = onnx_release(bundle, keys, out / f"digits-slow-v{version}.tar.zst",
                           name="digits", version=version, sample_shape=(1, 8, 8),
                           profile=profile)
    shutil.rmtree(bundle)
    return archive


def make_releases(run: Path, out: Path) -> dict[str, Path]:
    """Signed, packed releases of a converted digits run: TFLite for raspberry-pi-4 and
    ONNX (dynamic batch) for x86_64-generic; one whose self-test cannot pass; a second,
    different v1 (its golden outputs broken: another manifest at the same version); a
    slow v4."""
    keys = make_keys(out / "keys")
    pi4, x86 = "raspberry-pi-4", "x86_64-generic"
    other = out / "other"
    other.mkdir()
    return {
        "keys": keys,
        "tflite1": release(run, out, keys, version=1, profile=pi4),
        "tflite2": release(run, out, keys, version=2, profile=pi4),
        "onnx1": release(run, out, keys, version=1, profile=x86),
        "onnx1_other": release(run, other, keys, version=1, profile=x86,
                               break_selftest=True),
        "onnx2": release(run, out, keys, version=2, profile=x86),
        "onnx3_bad": release(run, out, keys, version=3, profile=x86, break_selftest=True),
        "onnx4_slow": slow_release(out, keys, version=4),
        "model_b": other_model(run, out, keys, "digits-b"),
        "model_c": other_model(run, out, keys, "digits-c"),
    }


def other_model(run: Path, out: Path, keys: Path, name: str) -> Path:
    """Another model, `name` v1 (the converted ONNX under another name), declaring 40 MiB
    resident: two of them overflow a 64 MiB budget, deterministically."""
    bundle = out / name
    bundle.mkdir()
    shutil.copyfile(run / "model_int8.onnx", bundle / "model.onnx")
    archive = onnx_release(bundle, keys, out / f"{name}-v1.tar.zst", name=name,
                           version=1, sample_shape=(1, 8, 8), output_name="logits",
                           model_bytes=40 << 20)
    shutil.rmtree(bundle)
    return archive
