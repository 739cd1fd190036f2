"""The fleet's figures at scale, against a real mosquitto on loopback configured as the
project ships it (`edge-fleet broker-config`: mutual TLS, a certificate per device, the
per-device ACL), every report signed by its device and verified by the controller, with
simulated
devices (`fleet.sim`: the agent's fleet link and model store over a stand-in runtime,
one MQTT connection each, in worker processes):

1. rollout time: a release to all N devices in waves 1/10/50/100 %, with short health
   windows (device and controller), from `rollout start` to `completed`;
2. controller ingest: telemetry messages per second the controller's consumer (the
   `FleetWatcher` on the controllers' shared subscription, updating each device's row in
   the fleet database) takes in, fed by two publisher processes as fast as they go (their
   own rate printed beside it); and the same with two controllers sharing the
   subscription; then both again on a backlog: the publishers first, the consumers
   stopped meanwhile, timed from when they resume (the controller's host without the
   devices' load, as in a fleet);
3. scale: N devices connected (time, memory per device, CPU of simulator, broker and
   controller), then a steady period: CPU per second and how fresh each device's
   telemetry row in the controller's database is;
4. halts: with 5 % faulty devices (the first device of the first wave is one), for each
   fault kind alone: the time from `rollout start` to the halt, against one health window,
   and the share of touched devices that serve the previous release afterwards.

    .venv/bin/python bench/bench_fleet.py [--devices 1000] [--messages 100000]
        [--only rollout|ingest|scale|halts] [--interval 10]
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import os
import signal
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import nacl.signing
import psutil
from fixture_agent import make_keys, slow_release
from fixture_mqtt import SecureBroker

from agent.link.wire import Memory, ModelTelemetry, ReportOrder, StatePayload, Telemetry
from agent.trust.identity import ReportSigner
from fleet._mqtt import connect
from fleet.devices.registry import FleetDB
from fleet.devices.watcher import CONTROLLER_GROUP, FleetWatcher
from fleet.rollout.controller import Controller
from fleet.rollout.policy import DONE, Criteria
from fleet.rollout.record import Rollouts, pause_after
from fleet.rollout.status import rollout_lines
from fleet.sim.processes import SimulatedFleet
from fleet.sim.settings import SimSettings, device_names
from fleet.trust.artifacts import serve_in_process
from fleet.trust.keys import KeyDir

WAVES = [0.01, 0.1, 0.5, 1.0]


def releases(where: Path) -> tuple[Path, Path, Path]:
    where.mkdir(parents=True, exist_ok=True)
    keys = make_keys(where / "keys")
    rel = where / "rel"
    rel.mkdir()
    v1, v2 = (slow_release(rel, keys, version=v, widths=(64,)) for v in (1, 2))
    return keys, v1, v2


def controller(db: FleetDB, broker: SecureBroker, keys: Path) -> Controller:
    kd = KeyDir(keys)
    return Controller(db, broker.auth("fleet-controller"), "acme",
                      kd.keys_of(kd.root(), "command", None))


def sim_settings(broker: SecureBroker, keys: Path, **kw: Any) -> SimSettings:
    return SimSettings(broker=broker.url, root_file=keys / "root.json",
                       profile="x86_64-generic", ca_file=broker.pki / "ca.crt",
                       certs_dir=broker.pki, **kw)


def certify(broker: SecureBroker, n: int) -> None:
    """A certificate for each simulated device (kept across the runs of this bench)."""
    t0 = time.monotonic()
    names = device_names(n)
    made = sum(not (broker.pki / f"{name}.crt").exists() for name in names)
    broker.issue_many(names)
    if made:
        print(f"({made} device certificates made in {time.monotonic() - t0:.1f} s)")


def registered(db: FleetDB, sims: SimulatedFleet) -> FleetDB:
    for name, key in sims.inventory().items():
        db.register(name, key)
    return db


def new_rollout(db: FleetDB, broker: SecureBroker, keys: Path, url: str, archive: Path,
                sims: SimulatedFleet, window_s: float) -> tuple[Controller, str]:
    c = controller(registered(db, sims), broker, keys)
    rid = Rollouts(db).create(archive=archive, urls=[f"{url}/{archive.name}"], group="sim",
                              devices=sims.names, fractions=WAVES, criteria=Criteria(),
                              wave_timeout_s=60, health_window_s=window_s)
    return c, rid


def rollout_run(where: Path, broker: SecureBroker, keys: Path, url: str, archive: Path,
                sims: SimulatedFleet, window_s: float) -> tuple[str, float, str, str]:
    db = FleetDB(where / f"fleet-{time.time_ns()}.sqlite")
    c, rid = new_rollout(db, broker, keys, url, archive, sims, window_s)
    t0 = time.monotonic()
    status, wave, marks = "running", 0, []
    while status == "running" and time.monotonic() - t0 < 300:
        started = time.monotonic()
        status = c.step(rid)
        now = Rollouts(db).get(rid).wave
        if now != wave or status != "running":
            marks.append(f"{time.monotonic() - t0:.1f}")
            wave = now
        time.sleep(pause_after(time.monotonic() - started, 0.1))  # as Controller.run
    took = time.monotonic() - t0
    print(f"    waves ended at {', '.join(marks)} s")
    ro = Rollouts(db).get(rid)
    for line in rollout_lines(Rollouts(db), rid)[1:]:
        if " committed " not in line:
            print("   ", line)
    runs = sims.versions()  # asked of the devices themselves
    wrong = [d.device for d in Rollouts(db).devices(rid)
             if (d.status in DONE) != (runs.get(d.device, {}).get("digits") == ro.version)]
    print(f"    record != device: {len(wrong)}" + (f" ({', '.join(wrong[:10])})"
                                                    if wrong else "")
          + f"; ignored as stale: {db.counter('ignored_stale')}; load average "
          + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    c.close()
    return status, took, ro.reason, rid


def bench_rollout(where: Path, broker: SecureBroker, n: int, window_s: float,
                  interval_s: float = 2.0) -> None:
    keys, v1, v2 = releases(where)
    server, url = serve_in_process(v1.parent)
    certify(broker, n)
    settings = sim_settings(broker, keys, initial=v1, telemetry_interval_s=interval_s,
                            health_window_s=window_s)
    t0 = time.monotonic()
    with SimulatedFleet(settings, n) as sims:
        connected = sims.start()
        print(f"{connected} of {n} simulated devices up (v1 installed, connected) in "
              f"{time.monotonic() - t0:.1f} s")
        mosq, me = psutil.Process(broker.proc.pid), psutil.Process()  # type: ignore[union-attr]
        b0, c0, (_, s0) = _cpu(mosq), _cpu(me), sims.usage()
        status, took, reason, _ = rollout_run(where, broker, keys, url, v2, sims, window_s)
        served = sum(v == {"digits": 2} for v in sims.versions().values())
        rss, s1 = sims.usage()
        print(f"    during the rollout: CPU-s simulator {s1 - s0:.0f}, broker "
              f"{_cpu(mosq) - b0:.0f}, controller (this process) {_cpu(me) - c0:.0f}; RSS "
              f"simulator {rss / 2**20:,.0f} MiB, broker {mosq.memory_info().rss / 2**20:,.0f}"
              f" MiB, controller {me.memory_info().rss / 2**20:,.0f} MiB")
    server.terminate()
    print(f"rollout to {n} devices, waves {'/'.join(f'{w:.0%}' for w in WAVES)}, health "
          f"window {window_s:g} s per wave (device and controller), telemetry every "
          f"{interval_s:g} s: "
          f"{status} in "
          f"{took:.1f} s (targets: 1,000 devices <= 45 s, 10,000 <= 180 s); {served} of {n} "
          f"serve v2; {reason}")


def _cpu(p: psutil.Process) -> float:
    t = p.cpu_times()
    return float(t.user + t.system)


def _load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def poll(predicate: object, timeout_s: float, what: str, every_s: float = 0.05) -> None:
    """Until `predicate()` holds; a bench that waits longer than `timeout_s` stops."""
    end = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > end:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(every_s)


def takeover_setup(where: Path, broker: SecureBroker, devices: int) -> tuple[
        Path, Path, Any, str, SimSettings]:
    """What the takeover and host benches share: keys and releases v1 and v2, an artifact
    server for them, a certificate per simulated device, and the devices' settings (on
    v1, telemetry every 2 s, 3-s health windows). Returns (keys, v2, server process, its
    URL, settings)."""
    keys, v1, v2 = releases(where / "r")
    server, url = serve_in_process(v1.parent)
    certify(broker, devices)
    settings = sim_settings(broker, keys, initial=v1, telemetry_interval_s=2.0,
                            health_window_s=3.0)
    return keys, v2, server, url, settings


def bench_scale(where: Path, broker: SecureBroker, n: int, interval_s: float) -> None:
    """N secured devices connected, then a steady period: memory and CPU of simulator,
    broker and controller, and how fresh the controller's telemetry row of each device
    is (target: every one no older than two intervals)."""
    keys, v1, _ = releases(where)
    t0 = time.monotonic()
    certify(broker, n)
    settings = sim_settings(broker, keys, initial=v1, telemetry_interval_s=interval_s,
                            health_window_s=3.0)
    db = FleetDB(where / "scale.sqlite")
    watcher = FleetWatcher(db, broker.auth("fleet-controller"), "acme",
                           share_group=CONTROLLER_GROUP, client_id="edge-fleet-scale-controller")
    mosq = psutil.Process(broker.proc.pid)  # type: ignore[union-attr]
    me = psutil.Process()
    cpu = _cpu

    with SimulatedFleet(settings, n) as sims:
        registered(db, sims)
        watcher.start()
        b0, c0 = cpu(mosq), cpu(me)
        connected = sims.start()
        took = time.monotonic() - t0
        rss, sim_cpu = sims.usage()
        print(f"{connected} of {n} secured simulated devices up (keys, certificates, v1 "
              f"installed, TLS connected) in {took:.1f} s (target for 10,000: <= 120 s); "
              f"simulator RSS {rss / 2**20:,.0f} MiB, {(rss - sims.base_rss) / 1024 / n:.1f} "
              f"KiB per device beyond its workers' base (target <= 100); CPU-s to get there: "
              f"simulator {sim_cpu:.0f}, broker {cpu(mosq) - b0:.0f}, controller "
              f"{cpu(me) - c0:.0f}; {_load()}")
        steady = 4 * interval_s
        b0, c0, s0, i0 = cpu(mosq), cpu(me), sim_cpu, watcher.ingested["telemetry"]
        time.sleep(steady)
        _, s1 = sims.usage()
        got = watcher.ingested["telemetry"] - i0
        now = datetime.now(UTC)
        ages = sorted((now - Telemetry.model_validate_json(t).at).total_seconds()
                      for (t,) in db.store.all("SELECT telemetry_json FROM devices "
                                                 "WHERE telemetry_json IS NOT NULL"))
        fresh = sum(a <= 2 * interval_s for a in ages)
        print(f"  steady, telemetry every {interval_s:g} s, over {steady:g} s: CPU per second "
              f"simulator {(s1 - s0) / steady:.2f}, broker {(cpu(mosq) - b0) / steady:.2f}, "
              f"controller {(cpu(me) - c0) / steady:.2f}; the controller stored "
              f"{got / steady:,.0f} telemetry msg/s; its row of {fresh} of {n} devices is at "
              f"most two intervals old (oldest {ages[-1] if ages else float('nan'):.1f} s, "
              f"{n - len(ages)} without one); broker RSS {mosq.memory_info().rss / 2**20:,.0f} "
              f"MiB; {_load()}")
    watcher.stop()


def bench_halts(where: Path, broker: SecureBroker, n: int, window_s: float) -> None:
    keys, v1, v2 = releases(where)
    server, url = serve_in_process(v1.parent)
    print(f"\nhalts, {n} devices, 5 % faulty, device health window {window_s:g} s, controller "
          f"wave window {window_s:g} s, telemetry every 1 s:")
    print(f"  {'fault':9} {'status':8} {'to halt':>9} {'windows':>8} {'touched':>8} "
          f"{'back on v1':>11}  reason")
    for kind in ("selftest", "latency", "drift"):
        certify(broker, n)
        settings = sim_settings(broker, keys, initial=v1, telemetry_interval_s=1.0,
                                health_window_s=window_s)
        with SimulatedFleet(settings, n, faulty_percent=5, fault_kinds=(kind,)) as sims:
            sims.start()
            time.sleep(7)  # the latency detectors warm up (5 windows)
            db = FleetDB(where / f"halt-{kind}.sqlite")
            c, rid = new_rollout(db, broker, keys, url, v2, sims, window_s)
            t0 = time.monotonic()
            status = "running"
            while status == "running" and time.monotonic() - t0 < 120:
                status = c.step(rid)
                time.sleep(0.05)
            took = time.monotonic() - t0
            c.run(rid, poll_s=0.2)  # halted: waits for the rollbacks' results
            rollouts = Rollouts(db)
            touched = [d.device for d in rollouts.devices(rid) if d.command_id]
            versions = sims.versions()
            back = sum(versions[d] == {"digits": 1} for d in touched)
            reason = rollouts.get(rid).reason
            c.close()
        print(f"  {kind:9} {status:8} {took:8.2f}s {took / window_s:8.2f} {len(touched):8} "
              f"{back / max(1, len(touched)):10.0%}  {reason[:70]}")
    server.terminate()


def _signer(dev: str) -> ReportSigner:
    """The same key for `dev` in every process (the bench registers it)."""
    seed = hashlib.sha256(f"bench-{dev}".encode()).digest()
    return ReportSigner(dev, nacl.signing.SigningKey(seed))


def _publish(auth: Any, count: int, offset: int, armed: Any, ready: Any, took: Any) -> None:
    """`count` telemetry messages of 200 devices, each a new report in its device's order
    (the fleet counts a copy as stale, not as stored), signed before the clock starts."""
    signers = [_signer(f"pub-{offset + i:04d}") for i in range(200)]
    payloads = []
    for i in range(count):
        dev, seq = f"pub-{offset + i % 200:04d}", i // 200 + 1
        payloads.append((f"edge/v1/acme/{dev}/telemetry", signers[i % 200].seal(Telemetry(
            seq=seq, order=ReportOrder(epoch=1, seq=seq), device=dev, at=datetime.now(UTC),
            interval_s=1.0, uptime_s=10.0,
            cpu_percent=12.0, memory=Memory(process_rss_bytes=1 << 26,
                                            system_available_bytes=1 << 30,
                                            system_total_bytes=1 << 32),
            temperature_c=50.0, throttle="normal", queue_depth=0, refusals={},
            models={"digits": ModelTelemetry(requests=40, errors=0, latency_p50_ms=4.0,
                                             latency_p95_ms=6.0, latency_p99_ms=8.0,
                                             throughput_per_s=40.0)}, dropped={}))))
    # paho walks every message in flight on each acknowledgement (`_update_inflight`): at
    # 1,000 in flight that walk was the publishers' largest cost (py-spy), 100 keep
    # loopback busy as well
    c, _ = connect(auth, f"edge-fleet-pub-{offset}", topics=[], on_message=lambda *a: None,
                   max_inflight=100)
    armed.set()
    ready.wait()
    t0 = time.monotonic()
    last = None
    for topic, body in payloads:
        while (last := c.publish(topic, body, qos=1)).rc != 0:
            time.sleep(0.001)
    if last is not None:
        last.wait_for_publish(120)  # the broker acknowledged them all
    took.value = time.monotonic() - t0
    time.sleep(1)
    c.loop_stop()
    c.disconnect()


STAGES = ("verify", "parse", "write")


def _consume(auth: Any, db_path: Path, count: Any, cpu: Any, stop: Any) -> None:
    """One controller's consumer in its own process (as two controllers would run)."""
    db = FleetDB(db_path)
    for k in (0, 1000):
        for i in range(200):
            dev = f"pub-{k + i:04d}"
            db.register(dev, _signer(dev).public)
            # its row, as its retained state makes it: every telemetry updates a real row
            db.put_state(StatePayload(device=dev, fleet="acme", online=True,
                                      agent_version="0.1.0", profile="x86_64-generic",
                                      groups=["sim"], at=datetime.now(UTC)))
    # the controllers' shared subscription: two consumers split the messages
    watcher = FleetWatcher(db, auth, "acme", share_group=CONTROLLER_GROUP,
                           client_id=f"edge-fleet-ingest-{db_path.stem}").start()
    t0 = time.process_time()
    while not stop.wait(0.01):  # handled: stored, or superseded by a later one in its batch
        count.value = watcher.ingested["telemetry"] + watcher.superseded
    watcher.stop()
    count.value = watcher.ingested["telemetry"] + watcher.superseded
    for i, stage in enumerate(STAGES):
        cpu[i] = watcher.cpu[stage]
    cpu[3] = time.process_time() - t0  # the whole process: paho's thread, TLS, queueing
    cpu[4] = watcher.superseded


def bench_ingest(where: Path, broker: SecureBroker, messages: int, consumers: int, *,
                 drain: bool = False) -> None:
    """With `drain`, the consumers are stopped (SIGSTOP) while the publishers run, and the
    clock starts when they resume on the backlog the broker queued for them: what the
    controller's host does when the devices are other machines, as they are in a fleet."""
    ctx = multiprocessing.get_context("spawn")
    stop, ready = ctx.Event(), ctx.Event()
    counts = [ctx.Value("q", 0) for _ in range(consumers)]
    cpus = [ctx.Array("d", 5) for _ in range(consumers)]
    pub_took = [ctx.Value("d", 0.0) for _ in range(2)]
    auth = broker.auth("fleet-controller")
    cons = [ctx.Process(target=_consume, args=(auth, where / f"ingest-{consumers}-{i}"
                                               ".sqlite", counts[i], cpus[i], stop))
            for i in range(consumers)]
    armed = [ctx.Event() for _ in range(2)]
    pubs = [ctx.Process(target=_publish, args=(auth, messages // 2, k * 1000, armed[k],
                                               ready, pub_took[k]))
            for k in range(2)]
    for p in (*cons, *pubs):
        p.start()
    for a in armed:  # the publishers signed their messages and connected
        a.wait(600)
    time.sleep(2)  # the consumers import, connect and subscribe (they started first)
    if drain:
        for p in cons:
            os.kill(p.pid, signal.SIGSTOP)  # type: ignore[arg-type]
    ready.set()
    if drain:
        while not all(v.value for v in pub_took):  # every message acknowledged, queued
            time.sleep(0.01)
        for p in cons:
            os.kill(p.pid, signal.SIGCONT)  # type: ignore[arg-type]
    t0 = time.monotonic()
    while time.monotonic() - t0 < 300 and sum(c.value for c in counts) < messages:
        time.sleep(0.01)
    took = time.monotonic() - t0
    got = sum(c.value for c in counts)
    stop.set()
    for p in (*cons, *pubs):
        p.join(30)
    split = "/".join(str(c.value) for c in counts)
    superseded = int(sum(c[4] for c in cpus))
    split += f"; {got - superseded} stored, {superseded} superseded unopened"
    offered = messages / max(v.value for v in pub_took) if all(v.value for v in pub_took) \
        else float("nan")
    # End to end: two publisher processes -> mosquitto -> the consumers (validate, write to
    # SQLite), all on this machine's two cores; the figure bounds the consumers from below.
    if drain:
        print(f"  backlog drained by {consumers} consumer process(es) (the publishers done "
              f"first, at {offered:,.0f} msg/s): {got} of {messages} signed telemetry "
              f"messages verified (topic, key, signature, schema) and written in "
              f"{took:.2f} s = {got / took:,.0f} msg/s (split {split}); broker and "
              "consumers alone on the 2 cores")
    else:
        print(f"  end to end with {consumers} consumer process(es): {got} of {messages} "
              f"signed telemetry messages published, brokered over TLS, verified (topic, "
              f"key, signature, schema) and written in {took:.2f} s "
              f"= {got / took:,.0f} msg/s (split {split}); the publishers offered "
              f"{offered:,.0f} msg/s (all acknowledged by the broker), on the same 2 "
              "cores")
    per = {stage: sum(c[i] for c in cpus) / max(got, 1) * 1e6 for i, stage in
           enumerate(STAGES)}
    whole = sum(c[3] for c in cpus) / max(got, 1) * 1e6
    print("    consumer CPU per message: " + ", ".join(f"{k} {v:.0f} µs" for k, v in
                                                      per.items())
          + f"; the whole consumer process {whole:.0f} µs; load average "
          + " ".join(f"{x:.2f}" for x in os.getloadavg()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--window", type=float, default=3.0)
    ap.add_argument("--only", choices=["rollout", "ingest", "halts", "scale"])
    ap.add_argument("--interval", type=float,
                    help="telemetry interval (s); default 2 in the rollout, 10 at scale")
    ns = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        where = Path(tmp)
        broker = SecureBroker(where / "mosq").start()
        try:
            if ns.only in (None, "rollout"):
                bench_rollout(where / "r", broker, ns.devices, ns.window, ns.interval or 2.0)
            if ns.only in (None, "scale"):
                bench_scale(where / "s", broker, ns.devices, ns.interval or 10.0)
            if ns.only in (None, "ingest"):
                print("\ncontroller ingest (publishers: 2 processes, QoS 1):")
                for drain in (False, True):
                    for consumers in (1, 2):
                        bench_ingest(where, broker, ns.messages, consumers, drain=drain)
            if ns.only in (None, "halts"):
                bench_halts(where / "h", broker, ns.devices, ns.window)
        finally:
            broker.stop()


if __name__ == "__main__":
    main()
