"""A rollout under injected faults, for `tests/test_chaos.py` (one seed) and
`bench/bench_chaos.py` (several seeds, more devices).

What runs: mosquitto as the project ships it (`edge-fleet broker-config`: mutual TLS, the
per-device ACL, persistence saved every 5 s, nothing anonymous; every device, agent or
simulated, with its own certificate), simulated devices (`fleet.sim`) and real agents
of group "lab", an artifact server, and the rollout controller as a real `edge-fleet
rollout run` subprocess with the fleet-controller certificate. While the rollout runs, a
seeded schedule injects every kind once (in a seeded order), then a few more:

    broker            SIGKILL mosquitto, start it again 1-4 s later
    broker_wave       the same, at the moment the rollout moves to its next wave
    controller        SIGKILL the controller, start it again 0.2-2 s later
    controller_send   SIGKILL it just after it recorded new commands (during a send)
    stall_agent       SIGSTOP a real agent past the execution timeout, then SIGCONT
    stall_sims        stall simulated devices past the timeout (commands wait)
    offline_sims      take simulated devices off the broker for 2-8 s (sessions kept)

Then everything is brought back, the controller finishes, and once the devices are
quiet one more `rollout run` lets the record settle. The invariants are checked against
the devices themselves (the simulator's serving versions, each agent's local API), not
against what the fleet was told.
"""

from __future__ import annotations

import contextlib
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fixture_agent import start_group
from fixture_mqtt import SecureBroker
from polling import wait_until

from fleet.cli.rollout import ROLLOUT_EXIT
from fleet.devices.registry import FleetDB
from fleet.devices.watcher import FleetWatcher
from fleet.rollout.policy import DONE, FINAL, Criteria, RetryPolicy
from fleet.rollout.record import Rollouts
from fleet.sim.processes import SimulatedFleet
from fleet.sim.settings import SimSettings, device_names
from fleet.trust.artifacts import serve_in_thread

KINDS = ("broker", "broker_wave", "controller", "controller_send", "stall_agent",
         "stall_sims", "offline_sims")
EXEC_TIMEOUT_S = 6.0
#: Each controller's lease (the next one takes over at most this long after a kill).
CONTROLLER_LEASE_S = 3.0


@dataclass
class ChaosResult:
    seed: int
    devices: int
    status: str = "?"
    exit_code: int | None = None
    faults: Counter[str] = field(default_factory=Counter)
    controller_runs: int = 0
    controller_errors: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)
    rollbacks_sent: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    expected: str = "completed"  # "halted" with faulty devices

    def problems(self) -> list[str]:
        """Every broken invariant, in words."""
        out = [f"record != device: {m}" for m in self.mismatches]
        if missing := [k for k in KINDS if not self.faults[k]]:
            out.append(f"fault kinds never injected (the rollout ended first): {missing}")
        if in_flight := sum(self.statuses[s] for s in ("to_send", "sent", "in_progress")):
            out.append(f"{in_flight} execution(s) still in flight at the end")
        if self.status != self.expected:
            out.append(f"the rollout ended {self.status}, not {self.expected}")
        if self.rollbacks_sent and self.expected == "completed":
            out.append(f"{self.rollbacks_sent} rollback(s) sent to healthy devices")
        if self.exit_code != ROLLOUT_EXIT.get(self.status):
            out.append(f"exit code {self.exit_code} for a {self.status} rollout")
        out += [f"controller error: {e}" for e in self.controller_errors]
        return out


class Chaos:
    def __init__(self, where: Path, releases: dict[str, Path], *, devices: int, seed: int,
                 agents: int = 1, extra_faults: int = 4, say: Any = print,
                 run_timeout_s: float = 240.0, faulty_percent: float = 0.0) -> None:
        self.where, self.releases, self.seed = where, releases, seed
        self.run_timeout_s = run_timeout_s  # each controller's --timeout
        self.rng = random.Random(seed)
        self.say = say
        self.result = ChaosResult(seed=seed, devices=devices + agents,
                                  expected="halted" if faulty_percent else "completed")
        self.broker = SecureBroker(where / "mosquitto").start()
        self.server, self.url = serve_in_thread(releases["onnx1"].parent)
        self.agents = start_group(where, releases["keys"], self.broker.url,
                                  [f"dev-{i + 1}" for i in range(agents)],
                                  [releases["onnx1"]], mqtt_for=self.broker.agent_mqtt,
                                  health_window_s=0.5, telemetry_interval_s=1.0)
        self.db_path = where / "fleet.sqlite"
        self.db = FleetDB(self.db_path)
        settings = SimSettings(broker=self.broker.url,
                               root_file=releases["keys"] / "root.json", groups=("lab",),
                               profile="x86_64-generic", initial=releases["onnx1"],
                               telemetry_interval_s=1.0, health_window_s=1.0,
                               requests_per_s=20,
                               ca_file=self.broker.pki / "ca.crt", certs_dir=self.broker.pki)
        self.broker.issue_many(device_names(devices))
        # Faulty devices fail the new release's self-test: the rollout must halt, and every
        # device it touched must end on the old release, whatever else happens.
        self.sims = SimulatedFleet(settings, devices, faulty_percent=faulty_percent,
                                   fault_kinds=("selftest",))
        for name, key in self.sims.inventory().items():
            self.db.register(name, key)
        assert self.sims.start() == devices
        self.names = [*self.sims.names, *(f"dev-{i + 1}" for i in range(agents))]
        # Every kind first (in a seeded order), then the extra ones: a rollout that ends
        # early must not leave a kind out (seed 2 once never stalled the agent).
        first = list(KINDS)
        self.rng.shuffle(first)
        self.schedule = [*first, *self.rng.choices(KINDS, k=extra_faults)]
        self.controller: subprocess.Popen[bytes] | None = None
        self.rollouts = Rollouts(self.db)
        self._timers: list[threading.Thread] = []
        self._stalls_end = 0.0  # monotonic: when the last stall of simulated devices ends

    # -- the controller ---------------------------------------------------------------------
    def _argv(self, rid: str, timeout_s: float) -> list[str]:
        keys = self.releases["keys"]
        auth = self.broker.auth("fleet-controller")
        return [sys.executable, "-m", "fleet.cli", "rollout", "run", rid, "--db",
                str(self.db_path), "--broker", auth.url, "--ca-file", str(auth.ca_file),
                "--cert-file", str(auth.cert_file), "--key-file", str(auth.key_file),
                "--key", str(next((keys / "keys").glob("command-*.key"))), "--root",
                str(keys / "root.json"), "--timeout", str(timeout_s),
                # a controller started after a kill waits out the killed one's lease
                "--lease", str(CONTROLLER_LEASE_S)]

    def _start_controller(self, rid: str) -> None:
        self.result.controller_runs += 1
        log = (self.where / f"controller-{self.result.controller_runs}.log").open("wb")
        self.controller = subprocess.Popen(self._argv(rid, self.run_timeout_s), stdout=log,
                                           stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL)

    def _controller_ended(self) -> int | None:
        """The controller's exit code once it ended by itself (an error is noted and it
        is started again)."""
        assert self.controller is not None
        rc = self.controller.poll()
        if rc == 2:
            log = (self.where / f"controller-{self.result.controller_runs}.log").read_text()
            self.result.controller_errors.append(log.strip().splitlines()[-1][:300])
        return rc

    def _kill_controller(self) -> None:
        assert self.controller is not None
        if self.controller.poll() is None:
            self.controller.send_signal(signal.SIGKILL)
            self.controller.wait(10)

    # -- faults -----------------------------------------------------------------------------
    def _later(self, delay_s: float, fn: Any) -> None:
        def run() -> None:
            time.sleep(delay_s)  # the fault's length, chosen by the schedule
            fn()
        t = threading.Thread(target=run, daemon=True)
        t.start()
        self._timers.append(t)

    def _restart_broker(self) -> None:
        assert self.broker.proc is not None
        self.broker.proc.kill()
        self.broker.proc.wait(10)
        time.sleep(self.rng.uniform(1, 4))  # the outage
        self.broker.start()

    def _inject(self, kind: str, rid: str) -> None:
        rng = self.rng
        if kind in ("broker", "broker_wave"):
            if kind == "broker_wave":
                wave = self.rollouts.get(rid).wave
                with contextlib.suppress(AssertionError):
                    wait_until(lambda: self.rollouts.get(rid).wave != wave
                               or self.rollouts.get(rid).status != "running",
                               timeout_s=20, every_s=0.05, what="a wave change")
            self._restart_broker()
        elif kind in ("controller", "controller_send"):
            if kind == "controller_send":
                before = self._commands(rid)
                with contextlib.suppress(AssertionError):
                    wait_until(lambda: self._commands(rid) > before, timeout_s=20,
                               every_s=0.005, what="the controller recording commands")
            self._kill_controller()
            time.sleep(rng.uniform(0.2, 2.0))  # the controller's downtime
            self._start_controller(rid)
        elif kind == "stall_agent":
            agent = rng.choice(self.agents)
            assert agent.proc is not None
            agent.proc.send_signal(signal.SIGSTOP)
            self._later(EXEC_TIMEOUT_S + rng.uniform(2, 5),
                        lambda: agent.proc.send_signal(signal.SIGCONT))  # type: ignore[union-attr]
        elif kind == "stall_sims":
            names = rng.sample(self.sims.names, min(5, len(self.sims.names)))
            seconds = EXEC_TIMEOUT_S + rng.uniform(2, 5)
            self.sims.inject("stall", names, seconds)
            self._stalls_end = max(self._stalls_end, time.monotonic() + seconds)
        elif kind == "offline_sims":
            names = rng.sample(self.sims.names, min(10, len(self.sims.names)))
            self.sims.inject("offline", names)
            self._later(rng.uniform(2, 8), lambda: self.sims.inject("online", names))
        self.result.faults[kind] += 1
        self.say(f"  fault {kind}")

    def _commands(self, rid: str) -> int:
        return int(self.db.store.execute(
            "SELECT COUNT(*) FROM rollout_commands WHERE rollout = ?", (rid,)).fetchone()[0])

    # -- the run ----------------------------------------------------------------------------
    def run(self) -> ChaosResult:
        t0 = time.monotonic()
        watcher = FleetWatcher(self.db, self.broker.auth("fleet-monitor"), "acme")
        wait_until(lambda: len(self.db.online()) == len(self.names), timeout_s=120,
                   every_s=0.2, what="every device online")
        watcher.stop()
        archive = self.releases["onnx2"]
        rid = self.rollouts.create(
            archive=archive, urls=[f"{self.url}/{archive.name}"], group="lab",
            devices=sorted(self.names), fractions=[0.1, 0.5, 1.0], criteria=Criteria(),
            wave_timeout_s=EXEC_TIMEOUT_S, health_window_s=1.5,
            retry=RetryPolicy(backoff_s=0.5))
        self._start_controller(rid)
        for kind in self.schedule:
            time.sleep(self.rng.uniform(0.3, 1.5))  # the pause between faults
            if self._controller_ended() is not None:
                if self.rollouts.get(rid).status in FINAL:
                    break  # it finished under the faults so far
                self._start_controller(rid)
            self._inject(kind, rid)
        for t in self._timers:  # every stall and absence over
            t.join()
        time.sleep(max(0.0, self._stalls_end - time.monotonic()))  # the simulated stalls too
        self.sims.inject("online", self.sims.names)
        for a in self.agents:
            if a.proc is not None:
                a.proc.send_signal(signal.SIGCONT)
        assert self.controller is not None
        while True:
            try:
                rc = self.controller.wait(self.run_timeout_s + 30)
            except subprocess.TimeoutExpired:
                self._kill_controller()
                break
            if rc != 2:
                break
            self._controller_ended()
            self._start_controller(rid)
        self._settle(rid)
        self.result.seconds = time.monotonic() - t0
        return self.result

    def _settle(self, rid: str) -> None:
        """Once the devices are quiet, one more controller pass (as the operator's next
        `rollout run`), then compare the record with each device."""
        release = self.rollouts.get(rid).version
        last: list[dict[str, int]] = []

        def quiet() -> bool:
            now = self.running()
            last.append(now)
            return len(last) >= 8 and all(v == now for v in last[-8:])
        wait_until(quiet, timeout_s=120, every_s=0.5, what="the devices to stop changing")
        final = subprocess.run(self._argv(rid, 60), capture_output=True, text=True,
                               timeout=180, check=False)
        self.result.exit_code = final.returncode
        if final.returncode == 2:
            self.result.controller_errors.append(final.stderr.strip()[-300:])
        ro = self.rollouts.get(rid)
        self.result.status = ro.status.value
        running = self.running()
        for d in self.rollouts.devices(rid):
            self.result.statuses[d.status.value] += 1
            on_release = running.get(d.device) == release
            if (d.status in DONE) != on_release:
                self.result.mismatches.append(f"{d.device}: record {d.status.value}, runs "
                                              f"v{running.get(d.device)}")
        self.result.rollbacks_sent = int(self.db.store.execute(
            "SELECT COUNT(*) FROM rollout_commands WHERE rollout = ? AND kind = 'rollback'",
            (rid,)).fetchone()[0])

    def running(self) -> dict[str, int]:
        """What each device serves, asked of the device itself."""
        out = {n: v.get("digits", 0) for n, v in self.sims.versions().items()}
        for i, a in enumerate(self.agents):
            status, body = a.call("GET", "/v1/admin/status")
            out[f"dev-{i + 1}"] = body["models"]["digits"]["version"] if status == 200 else 0
        return out

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._kill_controller()
        for a in self.agents:
            if a.proc is not None:
                a.proc.send_signal(signal.SIGCONT)
                a.stop()
        self.sims.stop()
        self.server.shutdown()
        self.broker.stop()
