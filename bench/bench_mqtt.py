"""The fleet link's figures, against a real mosquitto on loopback:

1. deploy latency: from publishing a signed deploy command to the agent serving the new
   model (the `deploy.activated` event) and to its result, for a ~5 MB bundle served over
   HTTP (health window 0, so the result follows activation at once);
2. publish throughput: telemetry-sized messages through the persistent outbox (enqueue
   alone, and enqueue -> broker -> subscriber with QoS 1 and delete-on-PUBACK);
3. a broker outage of `--outage-s` seconds while telemetry keeps coming: messages lost
   (sequence numbers missing at the subscriber) and duplicates.

    .venv/bin/python bench/bench_mqtt.py [--outage-s 60] [--deploys 5]
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import logging
import statistics
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fixture_agent import AgentProcess, make_keys, slow_release, write_config
from fixture_mqtt import Broker, Subscriber

from agent.link.mqtt import Backoff, MqttLink, wait_connected
from agent.link.outbox import Outbox
from fleet.trust.commands import build_command, deploy_fields, sign_command
from fleet.trust.keys import KeyDir

BASE = "edge/v1/acme/dev-1"
WIDTHS = (1024, 1024)  # ~4.5 MB of fp32 weights


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


def deploy_latency(where: Path, n: int) -> list[tuple[float, float, int]]:
    keys = make_keys(where / "keys")
    rel = where / "rel"
    rel.mkdir()
    archives = [slow_release(rel, keys, version=v, widths=WIDTHS) for v in range(1, n + 2)]
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(
        _Quiet, directory=str(rel)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    broker = Broker(where / "mosq").start()
    sub = Subscriber(broker, [f"{BASE}/#"], client_id="bench-deploy")
    d = where / "agent"
    d.mkdir()
    agent = AgentProcess(write_config(d, keys, profile="x86_64-generic", mqtt={
        "brokers": [broker.url], "health_window_s": 0.0, "telemetry_interval_s": 5.0})).start()
    assert agent.install(archives[0])[0] == 200
    kd = KeyDir(keys)
    out = []
    for archive in archives[1:]:
        fields = deploy_fields(archive, [f"{url}/{archive.name}"])
        raw = sign_command(build_command("deploy", fleet="acme", device="dev-1", **fields),
                           kd.keys_of(kd.root(), "command", None))
        seen = len(sub.on("/cmd/result"))
        # Times from the device's own timestamps (`at`, same host clock), not from when
        # this loop noticed them: an event and the result can arrive in one poll.
        t0 = datetime.now(UTC)
        sub.publish(f"{BASE}/cmd", raw)
        while len(sub.on("/cmd/result")) == seen:
            time.sleep(0.002)
        result = json.loads(sub.on("/cmd/result")[-1])
        assert result["ok"], result
        event = next(json.loads(e) for e in sub.on("/event")
                     if json.loads(e)["kind"] == "deploy.activated"
                     and json.loads(e)["version"] == fields["version"])
        out.append((_since(event["at"], t0), _since(result["at"], t0),
                    archive.stat().st_size))
    agent.stop()
    sub.close()
    broker.stop()
    srv.shutdown()
    return out


def _since(at: str, t0: datetime) -> float:
    return (datetime.fromisoformat(at) - t0).total_seconds()


def telemetry(seq: int, _order: object = None) -> bytes:
    return json.dumps({"schema": 1, "seq": seq, "device": "dev-1", "models": {
        "digits": {"requests": 1000, "latency_p50_ms": 0.25}}, "pad": "x" * 400}).encode()


def link(broker: Broker, box: Outbox) -> MqttLink:
    return MqttLink(brokers=[broker.url], client_id="dev-1", state_topic=f"{BASE}/state",
                    birth=lambda: b"{}", will=lambda: b"{}", subscriptions=[],
                    on_message=lambda *a: None,
                    outbox=box, backoff=Backoff(initial_s=0.2, max_s=2.0))


def throughput(where: Path, n: int) -> tuple[float, float]:
    broker = Broker(where / "mosq-t").start()
    sub = Subscriber(broker, [f"{BASE}/telemetry"], client_id="bench-tp")
    box = Outbox(where / "tp.sqlite", cap=n + 1)
    t0 = time.perf_counter()
    for _ in range(n):
        box.enqueue("telemetry", f"{BASE}/telemetry", telemetry)
    enqueue = n / (time.perf_counter() - t0)
    lk = link(broker, box)
    t0 = time.perf_counter()
    lk.start()
    sub.wait_for(lambda: len(sub.on("/telemetry")) >= n and len(box) == 0, timeout=300)
    delivered = n / (time.perf_counter() - t0)
    lk.stop()
    sub.close()
    broker.stop()
    return enqueue, delivered


def outage(where: Path, outage_s: float, rate_hz: float = 20.0) -> dict[str, Any]:
    broker = Broker(where / "mosq-o").start()
    sub = Subscriber(broker, [f"{BASE}/telemetry"], client_id="bench-outage")
    box = Outbox(where / "o.sqlite")
    lk = link(broker, box)
    lk.start()
    assert wait_connected(lk, 10)
    sent = 0
    stop = threading.Event()

    def produce() -> None:
        nonlocal sent
        while not stop.is_set():
            box.enqueue("telemetry", f"{BASE}/telemetry", telemetry)
            sent += 1
            time.sleep(1 / rate_hz)

    producer = threading.Thread(target=produce)
    producer.start()
    time.sleep(5)
    broker.stop()
    down = time.perf_counter()
    time.sleep(outage_s)
    queued = len(box)
    broker.start()
    up = time.perf_counter()
    time.sleep(5)
    stop.set()
    producer.join()
    sub.wait_for(lambda: len(box) == 0, timeout=120)
    time.sleep(1)
    got = [json.loads(p)["seq"] for p in sub.on("/telemetry")]
    lk.stop()
    sub.close()
    broker.stop()
    return {"outage_s": round(up - down, 1), "sent": sent,
            "queued_at_restart": queued, "received_unique": len(set(got)),
            "lost": len(set(range(1, sent + 1)) - set(got)),
            "duplicates": len(got) - len(set(got)), "dropped_by_cap": box.take_dropped()}


def main() -> None:
    logging.getLogger("edge_agent.mqtt").setLevel(logging.ERROR)  # the outage is on purpose
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--outage-s", type=float, default=60.0)
    ap.add_argument("--deploys", type=int, default=5)
    ap.add_argument("--messages", type=int, default=5000)
    ns = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-mqtt-") as tmp:
        where = Path(tmp)
        rows = deploy_latency(where, ns.deploys)
        print(f"1. deploy latency over MQTT + HTTP on loopback, {rows[0][2] / 1e6:.1f} MB "
              f"bundle, {len(rows)} deploys (s)")
        for label, i in (("command published -> new model serving", 0),
                         ("command published -> committed result", 1)):
            xs = [r[i] for r in rows]
            print(f"   {label:42} median {statistics.median(xs):.3f}  max {max(xs):.3f}")
        enq, rate = throughput(where, ns.messages)
        print(f"\n2. publish throughput, {ns.messages} telemetry messages of ~500 B")
        print(f"   enqueue into the SQLite outbox (synchronous=FULL)   {enq:8.0f} msg/s")
        print(f"   outbox -> mosquitto -> subscriber, QoS 1, ack-delete {rate:8.0f} msg/s")
        print(f"\n3. broker outage of {ns.outage_s:.0f} s with telemetry at 20 msg/s")
        print("   " + json.dumps(outage(where, ns.outage_s)))


if __name__ == "__main__":
    main()
