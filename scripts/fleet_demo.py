"""The fleet half of the README's demo (scripts/demo.sh runs it after converting and signing).

It starts everything it needs on this machine, says what happens at each step, and stops
everything it started, also when interrupted:

  a broker (mosquitto on a free loopback port, with the configuration the project ships:
  mutual TLS, certificates it makes for every device and tool, a per-device ACL, nothing
  anonymous), an artifact server (`edge-fleet
  serve-artifacts`), two real agents (`edge-agent run`, TFLite on the CPU), a simulated
  fleet (`edge-fleet simulate`), then: release v2 rolled out in waves, inference on a real
  agent, fleet status, and a bad v3 that halts in its first wave and is rolled back.

    .venv/bin/python scripts/fleet_demo.py --out build/demo --profile raspberry-pi-4 [--short]
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np

from agent.client import unix_call
from agent.trust.bundle import read_manifest
from fleet.trust.artifacts import serve_in_process
from fleet.trust.release import break_golden_outputs

BIN = Path(sys.executable).parent


def say(title: str, text: str = "") -> None:
    print(f"\n== {title}", flush=True)
    if text:
        print(textwrap.fill(" ".join(text.split()), 92), flush=True)


def run(*args: object, check: bool = True) -> str:
    """Run a project command, show its output, return it."""
    p = subprocess.run([str(a) for a in args], capture_output=True, text=True, check=False)
    out = "\n".join(ln for ln in (p.stdout + p.stderr).rstrip().splitlines()
                    if not ln.startswith("INFO: Created TensorFlow Lite"))
    if out:
        print(textwrap.indent(out, "   "), flush=True)
    if check and p.returncode != 0:
        raise SystemExit(f"demo: {Path(str(args[0])).name} failed (exit {p.returncode})")
    return p.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Demo:
    def __init__(self, out: Path, profile: str, short: bool) -> None:
        self.out, self.profile, self.short = out, profile, short
        self.work = out / "fleet"
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)
        self.keys = out / "keys"
        self.root = self.keys / "root.json"
        self.command_key = self.keys / "keys" / "command-1.key"
        self.procs: list[subprocess.Popen[str]] = []
        self.db = self.work / "fleet.sqlite"
        self.pki = self.work / "pki"
        # Every edge-fleet command below finds the broker's CA and the controller's
        # certificate here (flags override them; `status` uses the read-only monitor's).
        os.environ["EDGE_FLEET_CA_FILE"] = str(self.pki / "ca.crt")
        os.environ["EDGE_FLEET_CERT_FILE"] = str(self.pki / "fleet-controller.crt")
        os.environ["EDGE_FLEET_KEY_FILE"] = str(self.pki / "fleet-controller.key")
        self.sims = 12 if short else 40
        self.window = 1.0 if short else 3.0

    # -- processes ------------------------------------------------------------------------
    def start(self, args: list[object], **kw: Any) -> subprocess.Popen[str]:
        p = subprocess.Popen([str(a) for a in args], text=True, **kw)
        self.procs.append(p)
        return p

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for p in reversed(self.procs):
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        self.procs.clear()

    def broker(self) -> str:
        """The fleet's PKI and the shipped broker configuration, then mosquitto."""
        port = free_port()
        run(BIN / "edge-fleet", "pki", "init", "--dir", self.pki, "--server-host",
            "127.0.0.1")
        names = ["fleet-controller", "fleet-monitor", "agent-1", "agent-2",
                 *(f"sim-{i:04d}" for i in range(self.sims))]
        subprocess.run([BIN / "edge-fleet", "pki", "issue", "--dir", self.pki, *names],
                       check=True, capture_output=True)
        print(f"   certificates for {', '.join(names[:4])} and {self.sims} simulated devices")
        user = ["--user", getpass.getuser()] if os.geteuid() == 0 else []
        run(BIN / "edge-fleet", "broker-config", "--fleet", "demo", "--pki", self.pki,
            "--out", self.work / "broker", "--port", port, "--bind", "127.0.0.1",
            "--data-dir", self.work / "broker", "--log-dest", "stderr", *user)
        conf = self.work / "broker" / "mosquitto.conf"
        with (self.work / "mosquitto.log").open("w") as log:
            self.start(["mosquitto", "-c", conf], stdout=log, stderr=log)
        end = time.monotonic() + 10
        while time.monotonic() < end:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port),
                                                                         0.2):
                self.capture(port)
                return f"mqtts://127.0.0.1:{port}"
            time.sleep(0.05)
        raise SystemExit("demo: mosquitto did not start (see build/demo/fleet/mosquitto.log)")

    def capture(self, port: int) -> None:
        """With EDGE_DEMO_CAPTURE=FILE, every message of the fleet's topics as mosquitto_sub
        (MQTT 5, the read-only fleet-monitor identity) sees it: one line per message,
        the topic and the payload in hex (the schema test validates them)."""
        if not (out := os.environ.get("EDGE_DEMO_CAPTURE")):
            return
        with Path(out).open("wb") as f:  # handed to the child
            self.start(["stdbuf", "-oL", "mosquitto_sub", "-V", "mqttv5", "-h", "127.0.0.1",
                        "-p", port, "--cafile", self.pki / "ca.crt",
                        "--cert", self.pki / "fleet-monitor.crt",
                        "--key", self.pki / "fleet-monitor.key", "-q", "1",
                        "-i", "edge-fleet-demo-capture",  # an operator's id (the guard)
                        "-t", "edge/v1/demo/#", "-F", "%t %x"], stdout=f)

    def artifacts(self) -> str:
        p, url = serve_in_process(self.work / "releases")
        self.procs.append(p)
        print(f"   edge-fleet serve-artifacts {self.work / 'releases'} on {url}/")
        return url

    def agent(self, name: str, broker: str) -> Path:
        d = self.work / name
        d.mkdir()
        # Provisioning: the device makes its keys, the operator registers the public half.
        run(BIN / "edge-agent", "device-key", name, "--out", d)
        run(BIN / "edge-fleet", "devices", "add", name, "--key", d / f"{name}.pub", "--db",
            self.db)
        cfg = d / "agent.toml"
        cfg.write_text(textwrap.dedent(f"""\
            [device]
            id = "{name}"
            fleet = "demo"
            groups = ["demo"]
            profile = "{self.profile}"
            [paths]
            state_dir = "{d / 'state'}"
            root_file = "{self.root}"
            device_key = "{d / (name + '.key')}"
            [api]
            socket = "{d / 'api.sock'}"
            admin_socket = "{d / 'admin.sock'}"
            [mqtt]
            brokers = ["{broker}"]
            ca_file = "{self.pki / 'ca.crt'}"
            cert_file = "{self.pki / (name + '.crt')}"
            key_file = "{self.pki / (name + '.key')}"
            telemetry_interval_s = 1.0
            health_window_s = {self.window}
            """))
        with (d / "agent.log").open("w") as log:
            self.start([BIN / "edge-agent", "run", "--config", cfg], stdout=log, stderr=log)
        end = time.monotonic() + 60
        while time.monotonic() < end:
            with contextlib.suppress(OSError):
                if unix_call(d / "api.sock", "GET", "/v2/health/live", timeout=2)[0] == 200:
                    return cfg
            time.sleep(0.2)
        raise SystemExit(f"demo: {name} did not start (see {d / 'agent.log'})")

    # -- releases -------------------------------------------------------------------------
    def release(self, version: int, *, broken: bool = False) -> Path:
        """Re-bundle the converted model at `version`, sign with 2 of 3 release keys, pack."""
        work = Path(tempfile.mkdtemp(dir=self.work))
        shutil.copytree(self.out / self.profile, work / "w", ignore=shutil.ignore_patterns(
            "tampered"))
        w = work / "w"
        run(BIN / "edge-convert", "bundle", "--work", w, "--target-profile", self.profile,
            "--bundle-version", version)
        if broken:
            break_golden_outputs(w / "bundle")
        for k in (1, 2):
            subprocess.run([BIN / "edge-fleet", "sign", w / "bundle", "--key",
                            self.keys / "keys" / f"release-{k}.key", "--root", self.root],
                           check=True, capture_output=True)
        dest = self.work / "releases" / f"digits-v{version}{'-bad' if broken else ''}.tar.zst"
        dest.parent.mkdir(exist_ok=True)
        run(BIN / "edge-fleet", "pack", w / "bundle", "--out", dest)
        shutil.rmtree(work)
        return dest

    def rollout(self, archive: Path, broker: str, url: str) -> str:
        return run(BIN / "edge-fleet", "rollout", "start", "--db", self.db,
                   "--bundle", archive, "--url-base", url, "--group", "demo",
                   "--broker", broker, "--key", self.command_key, "--root", self.root,
                   "--waves", "20,50,100", "--health-window", self.window,
                   "--wave-timeout", 60, "--timeout", 300, check=False)

    def status(self, broker: str) -> None:
        out = subprocess.run([BIN / "edge-fleet", "status", "--broker", broker, "--fleet",
                              "demo", "--db", self.db, "--wait", "2",
                              "--cert-file", self.pki / "fleet-monitor.crt",
                              "--key-file", self.pki / "fleet-monitor.key"],
                             capture_output=True, text=True, check=True).stdout.splitlines()
        shown = out[:2] + [ln for ln in out[2:-1] if not ln.startswith("sim-")][:4]
        sims = [ln for ln in out[2:-1] if ln.startswith("sim-")]
        print(textwrap.indent("\n".join(shown + sims[:3] + [f"... {len(sims) - 3} more "
                                                              "simulated devices", out[-1]]),
                              "   "), flush=True)
        versions: dict[str, int] = {}
        for ln in out[2:-1]:
            v = ln.split()[3:5]
            key = " ".join(v)
            versions[key] = versions.get(key, 0) + 1
        print("   serving: " + ", ".join(f"{k} on {n}" for k, n in sorted(versions.items())))

    # -- the story ------------------------------------------------------------------------
    def main(self) -> None:
        say("7. a broker", "MQTT carries commands to devices and their state, telemetry and "
            "events back. The demo makes a CA and a certificate for every device and tool, "
            "renders the broker configuration the project ships (mutual TLS, nothing "
            "anonymous, an ACL that confines each device to its own topics) and starts "
            "mosquitto with it on a free loopback port.")
        broker = self.broker()
        print(f"   mosquitto on {broker}")

        say("8. releases and an artifact server", "v1 is the bundle converted above; v2 is "
            "the same model re-released; devices download releases over HTTP with Range "
            "(resumable) from `edge-fleet serve-artifacts`.")
        v1, v2 = self.release(1), self.release(2)
        url = self.artifacts()
        run(BIN / "edge-fleet", "root", "publish", "--dir", self.keys, "--artifacts",
            self.work / "releases", "--url-base", url, "--broker", broker)

        say("9. two real agents", "Each `edge-agent run` is the device daemon: it verifies a "
            "bundle's signatures and hashes, loads it with the TFLite runtime, checks it "
            "against its golden outputs (self-test), serves it, and talks to the fleet "
            "over MQTT with its own certificate, signing everything it reports with its "
            "device key (registered with `edge-fleet devices add`). Both get v1.")
        agents = [self.agent(f"agent-{i}", broker) for i in (1, 2)]
        for cfg in agents:
            p = subprocess.run([BIN / "edge-agent", "install", v1, "--config", cfg],
                               capture_output=True, text=True, check=True)
            r = json.loads(p.stdout)
            print(f"   {cfg.parent.name}: {r['model']} v{r['version']} installed; self-test "
                  f"{r['selftest']}", flush=True)

        say(f"10. a simulated fleet of {self.sims} devices", "`edge-fleet simulate` runs "
            "devices that use the agent's own protocol code (command verification, "
            "download, signed-bundle checks, the update state machine, health window, "
            "telemetry) with a stand-in for the model runtime, one MQTT connection each.")
        sim_keys = self.work / "sim-keys"
        sim = self.start([BIN / "edge-fleet", "simulate", "--broker", broker, "--root",
                          self.root, "--devices", self.sims, "--initial", v1, "--group",
                          "demo", "--profile", self.profile, "--telemetry-interval", 1,
                          "--health-window", self.window, "--keys-dir", sim_keys,
                          "--ca-file", self.pki / "ca.crt", "--certs-dir", self.pki],
                         stdout=subprocess.PIPE)
        assert sim.stdout is not None
        print(f"   {sim.stdout.readline().strip()}")
        run(BIN / "edge-fleet", "devices", "import", sim_keys, "--db", self.db)

        say("11. fleet status", "`edge-fleet status` reads what every device says about "
            "itself (retained state and telemetry).")
        self.status(broker)

        say("12. roll out v2 in waves", "A signed deploy goes to 20 % of the group, then "
            "50 %, then everyone. Each device downloads, verifies, self-tests and watches "
            "the new model for a health window before it commits; the controller waits "
            "for every device of a wave, compares the updated devices' anomalies and "
            "latency with the devices not updated yet, and only then goes on.")
        self.rollout(v2, broker, url)

        say("13. inference on a real agent", "The last five handwritten digits of "
            "scikit-learn's set, sent to agent-1's local API (KServe v2 / Open Inference "
            "Protocol) on its Unix socket.")
        self.infer(agents[0].parent / "api.sock")

        say("14. a bad release", "v3 is built wrong: its model no longer reproduces the "
            "outputs it was validated with. The real agents run its self-test and refuse "
            "it; the simulated devices, whose runtime is a stand-in, take it. The "
            "controller sees failures in the first wave, halts, and sends signed rollbacks "
            "to every device it touched; no device outside the first wave ever gets v3.")
        v3 = self.release(3, broken=True)
        self.rollout(v3, broker, url)
        time.sleep(2 * self.window)

        say("15. fleet status after the halt", "Every device serves v2 again.")
        self.status(broker)

    def infer(self, sock: Path) -> None:
        with np.load(self.out / "example" / "digits.npz") as npz:
            x, y = npz["x"][-5:], npz["y"][-5:]
        m = read_manifest(self.out / self.profile / "bundle")
        predicted = []
        for sample in x:  # one request each: this model's batch dimension is fixed at 1
            status, body = unix_call(sock, "POST", f"/v2/models/{m.name}/infer", {"inputs": [{
                "name": m.inputs[0].name, "shape": [1, *sample.shape], "datatype": "FP32",
                "data": sample.astype(np.float32).ravel().tolist()}]})
            if status != 200:
                raise SystemExit(f"demo: inference failed ({status}): {body}")
            predicted.append(int(np.argmax(body["outputs"][0]["data"])))
        print(f"   POST /v2/models/{m.name}/infer -> {m.name} v{body['model_version']} "
              f"predicted {predicted}; the labels are {y.tolist()}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("build/demo"))
    ap.add_argument("--profile", default="raspberry-pi-4")
    ap.add_argument("--short", action="store_true")
    ns = ap.parse_args()
    demo = Demo(ns.out, ns.profile, ns.short)

    def stop(_sig: int, _frame: Any) -> None:
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, stop)
    try:
        demo.main()
    finally:
        say("16. cleaning up", "Stopping the simulated fleet, the agents, the artifact "
            "server and the broker.")
        demo.stop_all()
        print("   done; logs and state are in " + str(demo.work), flush=True)


if __name__ == "__main__":
    main()
