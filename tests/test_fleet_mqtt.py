"""The agent joined to its fleet over a real mosquitto: signed deploys of converter-built
bundles from a local HTTP artifact server with every step an event, rejections reaching
events and results, telemetry with consecutive sequence numbers, birth and Last Will."""

from __future__ import annotations

import functools
import http.server
import json
import sqlite3
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import needs_onnxruntime
from fixture_agent import AgentProcess, infer_body, write_config
from fixture_mqtt import Broker, Subscriber, report
from polling import wait_until

from fleet.trust.commands import build_command, deploy_fields, sign_command
from fleet.trust.keys import KeyDir

X86 = "x86_64-generic"
BASE = "edge/v1/acme/dev-1"



class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def artifacts(releases: dict[str, Path]) -> Iterator[str]:
    """An HTTP server for the release archives."""
    root = releases["onnx1"].parent
    handler = functools.partial(_Quiet, directory=str(root))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


@pytest.fixture
def fleet(tmp_path: Path, broker: Broker, releases: dict[str, Path]) -> Iterator[Any]:
    sub = Subscriber(broker, [f"{BASE}/#"])
    where = tmp_path / "agent"
    where.mkdir()
    cfg = write_config(where, releases["keys"], profile=X86,
                       mqtt={"brokers": [broker.url], "telemetry_interval_s": 0.3,
                             "health_window_s": 1.0})
    agent = AgentProcess(cfg).start()
    try:  # a failed install must not leave the agent running
        status, body = agent.install(releases["onnx1"])
        assert status == 200, body
        yield agent, sub
    finally:
        agent.stop()
        sub.close()


def command(releases: dict[str, Path], kind: str, **fields: Any) -> bytes:
    kd = KeyDir(releases["keys"])
    ttl = fields.pop("ttl", timedelta(minutes=5))
    cmd = build_command(kind, fleet="acme", ttl=ttl, **{"device": "dev-1"} | fields)
    return sign_command(cmd, kd.keys_of(kd.root(), "command", None))


def deploy(releases: dict[str, Path], url: str, name: str, **kw: Any) -> bytes:
    path = releases[name].relative_to(releases["onnx1"].parent)
    fields = deploy_fields(releases[name], [f"{url}/{path}"])
    return command(releases, "deploy", **(fields | kw))


def results(sub: Subscriber) -> list[dict[str, Any]]:
    return [report(p) for p in sub.on("/cmd/result")]


def events(sub: Subscriber) -> list[dict[str, Any]]:
    return [report(p) for p in sub.on("/event")]


@needs_onnxruntime
def test_a_signed_deploy_is_downloaded_verified_activated_and_committed(
        fleet: Any, releases: dict[str, Path], artifacts: str) -> None:
    agent, sub = fleet
    sub.wait_for(lambda: any(report(p)["online"] for p in sub.on("/state")))
    sub.publish(f"{BASE}/cmd", deploy(releases, artifacts, "onnx2"))
    sub.wait_for(lambda: results(sub), timeout=30)
    assert results(sub)[0]["ok"], results(sub)
    kinds = [e["kind"] for e in events(sub)]
    assert kinds.index("deploy.downloading") < kinds.index("deploy.verified") \
        < kinds.index("deploy.self_tested") < kinds.index("deploy.activated") \
        < kinds.index("deploy.committed")
    out = agent.call("POST", "/v2/models/digits/infer", infer_body("input"))[1]
    assert out["model_version"] == "2"
    sub.wait_for(lambda: report(sub.on("/state")[-1])["models"].get("digits", {})
                 .get("version") == 2)
    seqs = [e["seq"] for e in events(sub)]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


@needs_onnxruntime
def test_rejected_commands_reach_an_event_signed_ones_a_result_and_nothing_else_happens(
        fleet: Any, releases: dict[str, Path], artifacts: str) -> None:
    agent, sub = fleet
    good = command(releases, "restart")
    sub.publish(f"{BASE}/cmd", good)
    sub.wait_for(lambda: len(results(sub)) == 1)
    for raw in (good,  # replayed
                command(releases, "restart", device="dev-2"),  # another device
                command(releases, "restart", now=datetime.now(UTC) - timedelta(hours=2),
                        ttl=timedelta(hours=1)),  # expired
                b"{}", b"\xff\x00 not json",
                deploy(releases, artifacts, "onnx1_other")):  # another v1 (v1 committed)
        sub.publish(f"{BASE}/cmd", raw)
    sub.wait_for(lambda: len(results(sub)) == 5, timeout=30)
    # Junk (not signed by the fleet) gets no result: answering would let anyone make the
    # device publish. What the fleet signed gets one.
    checks = [r["check"] for r in results(sub)[1:]]
    assert checks == ["replay", "addressee", "expired",
                      "equal_version"]  # v1 is what is committed
    assert not any(r["ok"] for r in results(sub)[1:])
    sub.wait_for(lambda: len([e for e in events(sub) if e["kind"] in (
        "command.rejected", "deploy.rejected")]) == 6)
    rejected = [e for e in events(sub) if e["kind"] in ("command.rejected", "deploy.rejected")]
    assert sorted(e["evidence"]["check"] for e in rejected) == [
        "addressee", "equal_version", "expired", "format", "format", "replay"]
    sub.wait_for(lambda: sum(sum(report(p).get("commands_dropped", {}).values())
                             for p in sub.on("/telemetry")) == 5)
    assert agent.call("GET", "/v1/admin/status")[1]["models"]["digits"]["version"] == 1


@needs_onnxruntime
def test_a_deploy_of_the_release_already_committed_is_done_not_failed(
        fleet: Any, releases: dict[str, Path], artifacts: str) -> None:
    """A retried deploy (the first result was lost, or the device was late) must not
    count as a failure: a rollout would halt and roll healthy devices back."""
    agent, sub = fleet
    sub.publish(f"{BASE}/cmd", deploy(releases, artifacts, "onnx1"))  # committed at start
    sub.wait_for(lambda: len(results(sub)) == 1, timeout=30)
    r = results(sub)[0]
    assert (r["ok"], r["check"]) == (True, "already")
    assert not [e for e in events(sub) if e["kind"].startswith("deploy.")]  # no download
    assert agent.call("GET", "/v1/admin/status")[1]["models"]["digits"]["version"] == 1


@needs_onnxruntime
def test_a_release_that_fails_its_self_test_or_its_pin_is_not_served(
        fleet: Any, releases: dict[str, Path], artifacts: str) -> None:
    agent, sub = fleet
    sub.publish(f"{BASE}/cmd", deploy(releases, artifacts, "onnx3_bad"))
    sub.wait_for(lambda: len(results(sub)) == 1, timeout=30)
    assert results(sub)[0]["check"] == "selftest" and "self-test" in results(sub)[0]["result"]
    # the pinned archive is onnx2's, but the server hands out onnx1's bytes at that URL
    fields = deploy_fields(releases["onnx2"], [f"{artifacts}/{releases['onnx1'].name}"])
    sub.publish(f"{BASE}/cmd", command(releases, "deploy", **fields))
    sub.wait_for(lambda: len(results(sub)) == 2, timeout=30)
    assert results(sub)[1]["check"] in ("size", "sha256")
    assert agent.call("GET", "/v1/admin/status")[1]["models"]["digits"]["version"] == 1


@needs_onnxruntime
def test_telemetry_counts_requests_with_consecutive_sequence_numbers(fleet: Any) -> None:
    agent, sub = fleet
    for _ in range(20):
        agent.call("POST", "/v2/models/digits/infer", infer_body("input"))
    sub.wait_for(lambda: len(sub.on("/telemetry")) >= 6)
    tel = [report(p) for p in sub.on("/telemetry")]
    seqs = [t["seq"] for t in tel]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    assert sum(t["models"].get("digits", {}).get("requests", 0) for t in tel) == 20
    assert tel[-1]["memory"]["process_rss_bytes"] > 10_000_000
    assert tel[-1]["throttle"] == "normal"


@needs_onnxruntime
def test_the_last_will_says_offline_when_the_agent_dies(fleet: Any) -> None:
    agent, sub = fleet
    sub.wait_for(lambda: any(report(p)["online"] for p in sub.on("/state")))
    agent.kill9()
    sub.wait_for(lambda: not report(sub.on("/state")[-1])["online"], timeout=60)
    agent.start()
    sub.wait_for(lambda: report(sub.on("/state")[-1])["online"])


@needs_onnxruntime
def test_hostile_payloads_on_every_subscribed_topic_are_dropped_and_the_agent_lives(
        fleet: Any, releases: dict[str, Path]) -> None:
    import random

    agent, sub = fleet
    rng = random.Random(5)
    good = json.loads(command(releases, "restart"))
    hostile = [rng.randbytes(rng.randint(0, 300)) for _ in range(15)]
    hostile += [b"[" * 50_000, b'{"signed": {"x": 1e400}, "signatures": []}',
                json.dumps({"signed": good["signed"], "signatures": good["signatures"] * 70})
                .encode(), b"A" * 70_000, b'{"signed": {"x": "\\ud800"}, "signatures": []}']
    for key in ("kind", "target", "nonce", "expires"):
        forged = json.loads(json.dumps(good))
        forged["signed"][key] = "evil"
        hostile.append(json.dumps(forged).encode())
    for i, raw in enumerate(hostile):
        sub.publish(f"{BASE}/cmd" if i % 2 else "edge/v1/acme/group/lab/cmd", raw)
    checks: dict[str, int] = {}

    def counted() -> int:
        checks.clear()
        for p in sub.on("/telemetry"):
            for k, n in report(p).get("commands_dropped", {}).items():
                checks[k] = checks.get(k, 0) + n
        return sum(checks.values())
    sub.wait_for(lambda: counted() == len(hostile), timeout=30)
    assert set(checks) <= {"format", "threshold", "unsigned"}, checks
    assert not results(sub)  # junk is never answered
    assert agent.call("GET", "/v2/health/live")[0] == 200
    assert agent.proc is not None and agent.proc.poll() is None


@needs_onnxruntime
def test_junk_on_the_command_topic_does_not_hide_a_valid_command(
        fleet: Any, releases: dict[str, Path]) -> None:
    """400 junk messages at QoS 0, then one signed command: it is carried out, and the
    junk costs a few rate-limited events, not one each."""
    import random

    _agent, sub = fleet
    rng = random.Random(7)
    forged = json.loads(command(releases, "restart"))
    forged["signatures"][0]["sig"] = "0" * 128
    junk = [rng.randbytes(200), b"{}", json.dumps(forged).encode()]
    for i in range(400):
        sub.c.publish(f"{BASE}/cmd", junk[i % 3], qos=0)
    sub.publish(f"{BASE}/cmd", command(releases, "restart"))
    sub.wait_for(lambda: len(results(sub)) == 1, timeout=30)
    assert results(sub)[0]["ok"] and results(sub)[0]["kind"] == "restart"
    rejected = [e for e in events(sub) if e["kind"] == "command.rejected"]
    assert len(rejected) <= 3 * 5, len(rejected)  # 5 a minute per check


@needs_onnxruntime
def test_a_latency_regression_in_the_health_window_rolls_back_by_itself(
        fleet: Any, releases: dict[str, Path], artifacts: str) -> None:
    import time

    agent, sub = fleet
    stop, statuses = threading.Event(), []

    def traffic() -> None:
        conn = agent.connection()
        while not stop.is_set():
            statuses.append(__import__("agent.client", fromlist=["call"]).call(
                conn, "POST", "/v2/models/digits/infer", infer_body("input"))[0])
            time.sleep(0.005)
        conn.close()

    t = threading.Thread(target=traffic)
    t.start()
    try:
        # baseline windows of v1's latency: telemetry (every 0.3 s) with traffic in it,
        # past the detector's warm-up
        def busy_windows() -> int:
            return sum(report(p)["models"].get("digits", {}).get("requests", 0) > 0
                       for p in sub.on("/telemetry"))
        sub.wait_for(lambda: busy_windows() >= 8, timeout=20)
        sub.publish(f"{BASE}/cmd", deploy(releases, artifacts, "onnx4_slow"))
        sub.wait_for(lambda: results(sub), timeout=30)
    finally:
        stop.set()
        t.join()
    r = results(sub)[0]
    assert (r["ok"], r["check"]) == (False, "health") and "latency" in r["result"]
    kinds = [e["kind"] for e in events(sub)]
    assert "deploy.activated" in kinds and "deploy.rolled_back" in kinds
    assert "deploy.committed" not in kinds
    anomaly = next(e for e in events(sub)
                   if e["kind"] == "anomaly" and e["command_id"] == r["command_id"])
    assert anomaly["evidence"]["detector"] == "latency"
    assert anomaly["evidence"]["value"] > anomaly["evidence"]["threshold"]
    assert agent.call("GET", "/v1/admin/status")[1]["models"]["digits"]["version"] == 1
    assert set(statuses) == {200}  # no request failed through deploy and rollback


@needs_onnxruntime
def test_inputs_unlike_the_calibration_data_raise_a_drift_anomaly(fleet: Any) -> None:
    agent, sub = fleet
    body = {"inputs": [{"name": "input", "shape": [4, 1, 8, 8], "datatype": "FP32",
                        "data": [-50.0] * 256}]}  # far outside the reference histogram
    conn = agent.connection()
    from agent.client import call

    for _ in range(200):
        assert call(conn, "POST", "/v2/models/digits/infer", body)[0] == 200
    conn.close()
    sub.wait_for(lambda: any(e["kind"] == "anomaly"
                             and e["evidence"]["detector"] == "input_drift"
                             for e in events(sub)), timeout=15)
    drift = next(e for e in events(sub) if e["kind"] == "anomaly"
                 and e["evidence"]["detector"] == "input_drift")
    assert drift["evidence"]["statistic"] == "psi"
    assert drift["evidence"]["value"] > drift["evidence"]["threshold"]


def ask(client: Any, payload: bytes, reply_to: str, correlation: str) -> None:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = reply_to
    props.CorrelationData = correlation.encode()
    client.publish(f"{BASE}/infer", payload, qos=1, properties=props).wait_for_publish(5)


REPLIES = "edge/v1/acme/infer-replies/asker/r"


@needs_onnxruntime
def test_remote_inference_over_mqtt5_request_response(fleet: Any, broker: Broker) -> None:
    agent, _ = fleet
    replies = Subscriber(broker, [REPLIES], client_id="asker")
    for i, payload in enumerate((
            json.dumps({"model": "digits", **infer_body("input", 2)}).encode(),
            json.dumps({"model": "nope", **infer_body("input")}).encode(),
            b"not json", b"{}", b"[1]", json.dumps({"model": ["digits"]}).encode(),
            json.dumps({"model": "digits", **infer_body("input", 1)}).encode())):
        ask(replies.c, payload, REPLIES, f"req-{i}")
    replies.wait_for(lambda: len(replies.messages) == 7)
    by_id = {m[2].CorrelationData.decode(): json.loads(m[1]) for m in replies.messages}
    assert by_id["req-0"]["status"] == 200
    assert by_id["req-0"]["outputs"][0]["shape"] == [2, 10]
    # Malformed requests get an error reply each, and the next request is served.
    assert [by_id[f"req-{i}"]["status"] for i in range(1, 6)] == [404, 400, 400, 400, 400]
    assert by_id["req-6"]["status"] == 200
    assert 'edge_agent_inferences_total{model="digits"} 3' in agent.call("GET", "/metrics")[1]
    replies.close()


@needs_onnxruntime
def test_a_reply_topic_outside_the_replies_prefix_is_refused(fleet: Any,
                                                             broker: Broker) -> None:
    spy = Subscriber(broker, ["edge/v1/acme/#"], client_id="spy")
    body = json.dumps({"model": "digits", **infer_body("input", 1)}).encode()
    for i, topic in enumerate((f"{BASE}/state", "edge/v1/acme/dev-2/cmd", "other/topic")):
        ask(spy.c, body, topic, f"bad-{i}")
    ask(spy.c, body, REPLIES, "good")  # served after the refused ones: order is kept
    spy.wait_for(lambda: any(t == REPLIES for t, _, _ in spy.messages))
    published = [(t, json.loads(p).get("status")) for t, p, _ in spy.messages
                 if not t.endswith("/infer") and b'"status"' in p]
    assert published == [(REPLIES, 200)], published
    spy.close()


def test_an_agent_restart_with_a_full_outbox_loses_nothing(
        tmp_path: Path, broker: Broker, releases: dict[str, Path]) -> None:

    where = tmp_path / "offline-agent"
    where.mkdir()
    cfg = write_config(where, releases["keys"], profile=X86,
                       mqtt={"brokers": [broker.url], "telemetry_interval_s": 0.2})
    broker.stop()  # the agent starts while the broker is down
    agent = AgentProcess(cfg).start()

    def kept() -> int:
        with sqlite3.connect(where / "state" / "outbox.sqlite") as db:
            return int(db.execute("SELECT COUNT(*) FROM outbox WHERE stream = 'telemetry'"
                                  ).fetchone()[0])
    wait_until(lambda: kept() >= 5, what="telemetry kept in the outbox while offline")
    agent.stop()  # telemetry so far waits in the outbox on disk
    broker.start()
    sub = Subscriber(broker, [f"{BASE}/telemetry"], client_id="restart-sub")
    sub.wait_subscribed()  # else the outbox's first reports can beat the subscription
    agent.start()
    sub.wait_for(lambda: len(sub.on("/telemetry")) >= 15)
    agent.stop()
    seqs = sorted({report(p)["seq"] for p in sub.on("/telemetry")})
    assert seqs[0] == 1 and seqs == list(range(1, seqs[-1] + 1))
    sub.close()


@needs_onnxruntime
def test_config_and_reload_commands(fleet: Any, releases: dict[str, Path]) -> None:
    agent, sub = fleet
    for raw in (command(releases, "config", settings={"latency_z": 6, "telemetry_interval_s": 1}),
                command(releases, "config", settings={"no_such_setting": 1}),
                command(releases, "reload"),
                command(releases, "rollback", model="digits")):  # no previous version
        sub.publish(f"{BASE}/cmd", raw)
    sub.wait_for(lambda: len(results(sub)) == 4, timeout=20)
    r = results(sub)
    assert r[0]["ok"] and "latency_z" in r[0]["result"]
    assert (r[1]["ok"], r[1]["check"]) == (False, "settings")
    assert r[2]["ok"] and "telemetry interval" in r[2]["result"]
    assert (r[3]["ok"], r[3]["check"]) == (False, "no_previous")
    assert agent.call("GET", "/v1/admin/status")[1]["models"]["digits"]["version"] == 1

    def interval_after(n: int) -> float:
        """The interval of the first telemetry message after the n-th seen so far."""
        sub.wait_for(lambda: len(sub.on("/telemetry")) > n + 1, timeout=20)
        return float(report(sub.on("/telemetry")[n + 1])["interval_s"])

    # applied (the fixture's interval was 0.3 s), and still so after a restart and the
    # reload above: the command's settings are kept in the state directory
    assert interval_after(len(sub.on("/telemetry"))) == 1.0
    stored = json.loads((agent.dir / "state" / "settings.json").read_text())
    assert stored == {"latency_z": 6, "telemetry_interval_s": 1}
    agent.stop()
    seen = len(sub.on("/telemetry"))
    agent.start()
    assert interval_after(seen) == 1.0
    bad = command(releases, "config", settings={"latency_z": "high", "min_requests": 0})
    sub.publish(f"{BASE}/cmd", bad)
    sub.wait_for(lambda: len(results(sub)) == 5, timeout=20)
    refused = results(sub)[4]
    assert (refused["ok"], refused["check"]) == (False, "settings")
    assert "latency_z" in refused["result"] and "min_requests" in refused["result"]
    assert json.loads((agent.dir / "state" / "settings.json").read_text()) == stored


class _Held(http.server.BaseHTTPRequestHandler):
    """Serves the first 64 KiB of an archive (the first half of a smaller one: the test
    archives are about 9 KiB, and a download held after its last byte is no download held
    half way), then holds the rest until `gate` is set."""

    archive: Path
    gate: threading.Event
    asked: threading.Event

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:  # the stdlib's name
        data = self.archive.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        cut = min(65536, len(data) // 2)
        self.wfile.write(data[:cut])
        self.wfile.flush()
        self.asked.set()
        self.gate.wait(20)
        self.wfile.write(data[cut:])


def held(archive: Path) -> tuple[type[_Held], http.server.ThreadingHTTPServer, str]:
    """A server holding `archive`'s download after 64 KiB: its handler, itself, the URL."""
    handler = type("H", (_Held,), {"archive": archive, "gate": threading.Event(),
                                   "asked": threading.Event()})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return handler, srv, f"http://127.0.0.1:{srv.server_address[1]}/{archive.name}"


@needs_onnxruntime
def test_a_second_deploy_while_one_runs_is_refused_as_busy(
        fleet: Any, releases: dict[str, Path]) -> None:
    agent, sub = fleet
    archive = releases["onnx2"]
    handler, srv, url = held(archive)
    try:
        first = command(releases, "deploy", **deploy_fields(archive, [url]))
        sub.publish(f"{BASE}/cmd", first)
        assert handler.asked.wait(20)  # the first deploy is downloading, held
        sub.publish(f"{BASE}/cmd", command(releases, "deploy",
                                           **deploy_fields(releases["onnx3_bad"], [url])))
        sub.wait_for(lambda: len(results(sub)) == 1, timeout=20)
        busy = results(sub)[0]
        assert (busy["ok"], busy["check"]) == (False, "busy"), busy
        assert "deploy.refused" in [e["kind"] for e in events(sub)]
        handler.gate.set()
        sub.wait_for(lambda: len(results(sub)) == 2, timeout=30)
    finally:
        handler.gate.set()
        srv.shutdown()
    done = results(sub)[1]
    assert done["ok"] and done["command_id"] == json.loads(first)["signed"]["id"], done
    assert agent.call("GET", "/v1/admin/status")[1]["models"]["digits"]["version"] == 2


def test_what_the_outbox_cap_drops_is_counted_and_reported(
        tmp_path: Path, broker: Broker, releases: dict[str, Path]) -> None:
    where = tmp_path / "capped"
    where.mkdir()
    cfg = write_config(where, releases["keys"], profile=X86,
                       mqtt={"brokers": [broker.url], "telemetry_interval_s": 0.05,
                             "outbox_cap": 10})
    # The test's session is made before the broker goes down (persistence keeps it): a
    # subscriber that connected only after the restart raced the agent's reconnect and,
    # on a loaded CI machine, lost the event published before it had subscribed.
    sub = Subscriber(broker, [f"{BASE}/event"], client_id="cap-sub")
    sub.wait_subscribed()
    broker.stop()  # offline: telemetry piles up against the cap of 10
    agent = AgentProcess(cfg).start()
    try:
        def dropped() -> int:
            with sqlite3.connect(where / "state" / "outbox.sqlite") as db:
                return int(db.execute("SELECT COALESCE(SUM(dropped), 0) FROM counters"
                                      ).fetchone()[0])
        wait_until(lambda: dropped() >= 5, what="the cap dropping telemetry")
        broker.start()
        sub.wait_for(lambda: any(report(p)["kind"] == "outbox.dropped"
                                 for p in sub.on("/event")), timeout=30)
        event = next(report(p) for p in sub.on("/event")
                     if report(p)["kind"] == "outbox.dropped")
        assert event["evidence"]["telemetry"] >= 5, event
    finally:
        sub.close()
        agent.stop()


@needs_onnxruntime
def test_a_deploy_cut_short_by_a_crash_mid_download_is_answered_after_the_restart(
        fleet: Any, releases: dict[str, Path]) -> None:
    """kill -9 while the download is held half way: the agent started again publishes
    the interrupted command's result (failed, check "interrupted": the fleet retries it),
    leaves no partial download behind and still serves v1. (Before, no result ever came
    and a `.part` stayed.)"""
    agent, sub = fleet
    archive = releases["onnx2"]
    handler, srv, url = held(archive)
    downloads = agent.dir / "state" / "downloads"
    try:
        deploy = command(releases, "deploy", **deploy_fields(archive, [url]))
        sub.publish(f"{BASE}/cmd", deploy)
        assert handler.asked.wait(20)  # downloading, held half way
        wait_until(lambda: any(p.stat().st_size for p in downloads.glob("*.part")),
                   what="a partial download")
        agent.kill9()
        assert list(downloads.glob("*.part"))  # what the crash left
        agent.start()
        sub.wait_for(lambda: len(results(sub)) == 1, timeout=30)
    finally:
        handler.gate.set()
        srv.shutdown()
    answer = results(sub)[0]
    assert answer["command_id"] == json.loads(deploy)["signed"]["id"]
    assert (answer["ok"], answer["check"]) == (False, "interrupted"), answer
    assert "v1 serves" in answer["result"]
    assert "deploy.interrupted" in [e["kind"] for e in events(sub)]
    assert not list(downloads.glob("*.part"))
    assert agent.call("GET", "/v1/admin/status")[1]["models"]["digits"]["version"] == 1
