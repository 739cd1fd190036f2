"""The fleet's trust boundary under attack, against a real broker, real agents and the real
ingest path: the controller believes only what a registered device signed about itself.

Each test names the attack it shows failing."""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import paho.mqtt.client as paho
import pytest
from fixture_agent import AgentProcess, command_controller
from fixture_mqtt import Broker, Subscriber
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from polling import wait_until

from agent.link.wire import CommandResult, Event, ReportOrder, StatePayload
from agent.trust.identity import ReportSigner, load_report_signer
from agent.trust.signatures import canonical
from fleet.devices.registry import FleetDB
from fleet.devices.watcher import FleetWatcher
from fleet.rollout.controller import Controller
from fleet.rollout.policy import Criteria
from fleet.rollout.record import Rollouts
from fleet.sim.processes import SimulatedFleet
from fleet.sim.settings import SimSettings
from fleet.trust.artifacts import serve_in_thread as serve

DEVICES = ["dev-1", "dev-2", "dev-3"]


def controller(db: FleetDB, broker: Broker, releases: dict[str, Path]) -> Controller:
    return command_controller(db, broker.url, releases["keys"])


class Rogue:
    """A client with no fleet key: it reads every command id off the cmd topics and
    answers for devices, as an attacker on the broker would."""

    def __init__(self, broker: Broker, forge: Any) -> None:
        self.forge, self.sent = forge, 0
        self.c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="rogue",
                             protocol=paho.MQTTv5)
        self.c.on_message = self._cmd
        self.c.on_connect = lambda c, u, f, r, p: c.subscribe("edge/v1/acme/+/cmd", qos=1)
        self.c.connect("127.0.0.1", broker.port)
        self.c.loop_start()

    def _cmd(self, c: Any, u: Any, msg: Any) -> None:
        cid = json.loads(msg.payload)["signed"]["id"]
        for topic, payload in self.forge(cid):
            c.publish(topic, payload, qos=1)
            self.sent += 1

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


ORDERS = itertools.count(1)  # forged reports each take a new place in a device's order


def order() -> ReportOrder:
    return ReportOrder(epoch=1, seq=next(ORDERS))


def result(device: str, cid: str, ok: bool, check: str | None = None) -> CommandResult:
    return CommandResult(device=device, command_id=cid, kind="deploy", ok=ok, result="forged",
                         check=check, at=datetime.now(UTC), order=order())


def anomaly(device: str, seq: int = 1, **evidence: Any) -> Event:
    return Event(seq=seq, device=device, at=datetime.now(UTC), kind="anomaly",
                 severity="warning", message="latency: z_score 40 above 4",
                 evidence={"detector": "latency", "model": "digits", **evidence},
                 order=order())


def plain(payload: Any) -> bytes:
    return payload.model_dump_json(by_alias=True).encode()


def test_a_keyless_client_cannot_complete_a_release_every_device_refused(
        group: Any, broker: Broker, releases: dict[str, Path], tmp_path: Path) -> None:
    _broker, agents, url = group
    stranger = ReportSigner.generate("dev-1")  # a key, but not the registered one

    def forge(cid: str) -> list[tuple[str, bytes]]:
        out = []
        for dev in [*DEVICES, "dev-9"]:  # dev-9 does not exist
            topic = f"edge/v1/acme/{dev}/cmd/result"
            out += [(topic, plain(result(dev, cid, True))),
                    (topic, stranger.seal(result(dev, cid, True)))]
        return out
    rogue = Rogue(broker, forge)
    db = FleetDB(tmp_path / "fleet.sqlite")
    archive = releases["onnx3_bad"]  # every real device refuses it (self-test)
    rollouts = Rollouts(db)
    rid = rollouts.create(archive=archive, urls=[f"{url}/{archive.name}"], group="lab",
                          devices=DEVICES, fractions=[1.0], criteria=Criteria(),
                          wave_timeout_s=60)
    c = controller(db, broker, releases)
    try:
        assert c.run(rid, timeout_s=90) == "halted"
    finally:
        c.close()
        rogue.close()
    assert rogue.sent >= 8
    assert [d.status.value for d in rollouts.devices(rid)] == ["failed"] * 3
    ignored = db.ignored()
    assert ignored.get("format", 0) >= 3 and ignored.get("threshold", 0) >= 3, ignored
    assert [a.call("GET", "/v1/admin/status")[1]["models"]["digits"]["version"]
            for a in agents] == [1, 1, 1]


def test_a_keyless_client_cannot_halt_a_good_release(
        group: Any, broker: Broker, releases: dict[str, Path], tmp_path: Path) -> None:
    _broker, _agents, url = group
    seq = iter(range(1, 10_000))

    def forge(cid: str) -> list[tuple[str, bytes]]:
        dev = "dev-1"
        return [(f"edge/v1/acme/{dev}/cmd/result", plain(result(dev, cid, False, "selftest"))),
                *((f"edge/v1/acme/{dev}/event", plain(anomaly(dev, next(seq))))
                  for _ in range(5))]
    rogue = Rogue(broker, forge)
    db = FleetDB(tmp_path / "fleet.sqlite")
    archive = releases["onnx2"]
    rollouts = Rollouts(db)
    rid = rollouts.create(archive=archive, urls=[f"{url}/{archive.name}"], group="lab",
                          devices=DEVICES, fractions=[0.3, 1.0], criteria=Criteria(),
                          wave_timeout_s=60, health_window_s=1.0)
    c = controller(db, broker, releases)
    try:
        assert c.run(rid, timeout_s=90) == "completed", rollouts.get(rid).reason
    finally:
        c.close()
        rogue.close()
    assert [d.status.value for d in rollouts.devices(rid)] == ["committed"] * 3
    assert not db.anomalies_since(0)
    assert db.ignored().get("format", 0) >= 6


def test_one_devices_key_cannot_report_for_another_and_a_fake_state_hides_no_device(
        group: Any, broker: Broker, tmp_path: Path) -> None:
    db = FleetDB(tmp_path / "fleet.sqlite")
    watcher = FleetWatcher(db, broker.url, "acme").start()
    try:
        wait_until(lambda: len([r for r in db.devices() if r.online]) == 3,
                   what="three devices online")
        dev1 = load_report_signer(tmp_path / "dev-1" / "dev-1.key")  # dev-1's own key
        fake_state = StatePayload(device="dev-2", fleet="acme", online=False,
                                  agent_version="0", profile="x", at=datetime.now(UTC))
        pub = Subscriber(broker, [], client_id="dev-1-gone-rogue")
        pub.publish("edge/v1/acme/dev-2/state", dev1.seal(fake_state), retain=True)
        pub.publish("edge/v1/acme/dev-2/event", dev1.seal(anomaly("dev-2")))
        pub.publish("edge/v1/acme/dev-1/event", dev1.seal(anomaly("dev-2")))
        pub.publish("edge/v1/acme/dev-1/state", dev1.seal(fake_state), retain=True)
        wait_until(lambda: sum(db.ignored().values()) >= 4, what="four reports ignored")
        pub.close()
        ignored = db.ignored()
        assert ignored.get("threshold") == 2 and ignored.get("device") == 2, ignored
        assert [(r.device, r.online) for r in db.devices()] == [
            ("dev-1", True), ("dev-2", True), ("dev-3", True)]
        assert not db.anomalies_since(0)
    finally:
        watcher.stop()
    # A watcher started later gets the same retained messages and the same answer.
    late = FleetDB(tmp_path / "late.sqlite")
    for dev in DEVICES:
        key = db.registered_key(dev)
        assert key is not None
        late.register(dev, key)
    w2 = FleetWatcher(late, broker.url, "acme").start()
    try:
        wait_until(lambda: len([r for r in late.devices() if r.online]) == 3,
                   what="three devices online for a late watcher")
    finally:
        w2.stop()


# -- poison payloads -----------------------------------------------------------------------
JSON = st.recursive(st.none() | st.booleans() | st.integers()
                    | st.floats(allow_nan=False, allow_infinity=False)
                    | st.text(max_size=50), lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=12)
FIELDS = ("device", "seq", "kind", "evidence", "model", "message", "models", "fleet",
          "online", "groups", "command_id", "at", "severity", "order")


def hostile_payloads(signer: ReportSigner) -> st.SearchStrategy[tuple[str, bytes]]:
    """Arbitrary bytes, and payloads the registered device key signed that are shaped like
    its reports with hostile values (wrong types in evidence, huge strings, bad ids, lone
    surrogates as JSON escapes)."""
    kinds = st.sampled_from(["state", "telemetry", "event", "cmd/result"])
    base = anomaly("dev-1").model_dump(mode="json", by_alias=True)

    def signed(kind: str, changes: dict[str, Any], surrogate: bool) -> tuple[str, bytes]:
        body = {**base, "order": order().model_dump(), **changes}
        raw = canonical(body)
        sig = signer.key.sign(raw).signature.hex()
        env = {"signed": body, "signatures": [{"keyid": signer.public.keyid, "sig": sig}]}
        text = canonical(env)
        if surrogate:
            text = text.replace(b'"latency:', b'"\\ud800latency:')
        return f"edge/v1/acme/dev-1/{kind}", text
    return st.one_of(
        st.tuples(kinds.map(lambda k: f"edge/v1/acme/dev-1/{k}"), st.binary(max_size=300)),
        st.builds(signed, kinds, st.dictionaries(st.sampled_from(FIELDS), JSON
                                                 | st.text(min_size=5000, max_size=6000)
                                                 | st.just({"model": [1]}), max_size=4),
                  st.booleans()))


def test_poison_payloads_do_not_stop_ingest_and_a_real_anomaly_still_halts(
        broker: Broker, releases: dict[str, Path], tmp_path: Path) -> None:
    db = FleetDB(tmp_path / "fleet.sqlite")
    dev1 = ReportSigner.generate("dev-1")
    db.register("dev-1", dev1.public)
    server, url = serve(releases["onnx1"].parent)
    sims = SimulatedFleet(SimSettings(
        broker=broker.url, root_file=releases["keys"] / "root.json", groups=("lab",),
        profile="x86_64-generic", initial=releases["onnx1"], telemetry_interval_s=0.5,
        health_window_s=1.0), 10, faulty_percent=30, fault_kinds=("drift",))
    for name, key in sims.inventory().items():
        db.register(name, key)
    c = controller(db, broker, releases)
    fed = threading.Event()

    @settings(max_examples=300, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(hostile_payloads(dev1))
    def feed(message: tuple[str, bytes]) -> None:
        topic, payload = message
        # paho's callback on the controller's own watcher: the live ingest path.
        c.watcher._message(None, None, SimpleNamespace(topic=topic, payload=payload))
        fed.set()

    known = [  # the cases found by hand: each once killed the watcher thread
        {"evidence": {"model": [1]}}, {"evidence": {"detector": {"a": 1}}},
        {"model": None, "evidence": {"model": {"x": [1, 2]}, "detector": 5}}]
    try:
        for changes in known:
            raw = dev1.seal(anomaly("dev-1").model_copy(update=changes))
            c.watcher._message(None, None, SimpleNamespace(
                topic="edge/v1/acme/dev-1/event", payload=raw))
        feed()
        assert fed.is_set()
        junk = Subscriber(broker, [], client_id="junk")  # and the same over the broker
        for i, raw in enumerate([b"\x00" * 10, b'{"signed": {"evidence": {"model": [1]}}}',
                                 b"[" * 5000, json.dumps({"device": "x" * 5000}).encode()]):
            junk.publish(f"edge/v1/acme/sim-000{i}/event", raw, retain=i % 2 == 0)
            junk.publish("edge/v1/acme/../state", raw, retain=True)
        junk.close()
        assert c.watcher.client.is_connected()
        # A real anomaly from a registered device is still recorded ...
        pub = Subscriber(broker, [], client_id="dev-1-real")
        pub.publish("edge/v1/acme/dev-1/event", dev1.seal(anomaly("dev-1", 99)))
        pub.close()
        wait_until(lambda: "dev-1" in db.anomalies_since(0), what="the real anomaly")
        # ... and drifting devices still halt a rollout.
        assert sims.start() == 10
        archive = releases["onnx2"]
        rid = Rollouts(db).create(archive=archive, urls=[f"{url}/{archive.name}"],
                                  group="lab", devices=sims.names, fractions=[0.5, 1.0],
                                  criteria=Criteria(), wave_timeout_s=60,
                                  health_window_s=5.0)
        assert c.run(rid, poll_s=0.2, timeout_s=120) == "halted"
        assert "of updated devices reported anomalies" in Rollouts(db).get(rid).reason
    finally:
        c.close()
        sims.stop()
        server.shutdown()
    assert db.counter("ingest_errors") == 0  # every poison was refused before storing


def test_an_unregistered_agent_is_unknown_and_never_counts(
        broker: Broker, releases: dict[str, Path], tmp_path: Path) -> None:
    from fixture_agent import write_config

    where = tmp_path / "newcomer"
    where.mkdir()
    agent = AgentProcess(write_config(where, releases["keys"], profile="x86_64-generic",
                                      device={"id": "dev-7"},
                                      mqtt={"brokers": [broker.url]})).start()
    db = FleetDB(tmp_path / "fleet.sqlite")
    watcher = FleetWatcher(db, broker.url, "acme").start()
    try:
        wait_until(db.unknown, what="dev-7 listed as unknown")
        assert db.devices() == [] and db.unknown()[0][0] == "dev-7"
    finally:
        watcher.stop()
        agent.stop()


# -- the shipped broker configuration ------------------------------------------------------
@pytest.fixture
def secure(tmp_path: Path) -> Iterator[Any]:
    from fixture_mqtt import SecureBroker

    b = SecureBroker(tmp_path / "secure")
    for name in ("dev-1", "dev-2"):
        b.issue(name)
    b.start()
    yield b
    b.stop()


class Client:
    """A connected client of the secured broker, collecting what it receives."""

    def __init__(self, auth: Any, client_id: str, topics: list[str]) -> None:
        from fleet._mqtt import connect

        self.got: list[tuple[str, bytes]] = []
        self.c, subscribed = connect(auth, client_id, topics=topics,
                                     on_message=lambda c, u, m: self.got.append(
                                         (m.topic, bytes(m.payload))))
        if topics:
            assert subscribed.wait(5)

    def send(self, topic: str, payload: bytes) -> None:
        self.c.publish(topic, payload, qos=1).wait_for_publish(5)

    def topics(self) -> list[str]:
        return [t for t, _ in self.got]

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def test_the_shipped_broker_config_confines_each_device_to_its_own_topics(secure: Any) -> None:
    from fleet.errors import FleetError

    monitor = Client(secure.auth("fleet-monitor"), "edge-fleet-test-monitor",
                     ["edge/v1/acme/#"])
    dev1 = Client(secure.auth("dev-1"), "acme-dev-1", ["edge/v1/acme/dev-1/cmd",
                                                  "edge/v1/acme/dev-2/cmd"])
    controller_ = Client(secure.auth("fleet-controller"), "edge-fleet-test-controller", [])
    try:
        # dev-1 may not speak for dev-2, nor publish commands; what it may do arrives after.
        for topic in ("edge/v1/acme/dev-2/state", "edge/v1/acme/dev-2/event",
                      "edge/v1/acme/dev-1/cmd", "edge/v1/acme/heartbeat",
                      "edge/v1/acme/dev-1/event"):
            dev1.send(topic, b"x")
        wait_until(lambda: "edge/v1/acme/dev-1/event" in monitor.topics(),
                   what="dev-1's own event")
        assert monitor.topics() == ["edge/v1/acme/dev-1/event"]
        # The monitor may not command anyone; the controller may.
        monitor.send("edge/v1/acme/dev-1/cmd", b"from-monitor")
        controller_.send("edge/v1/acme/dev-2/cmd", b"for-dev-2")
        controller_.send("edge/v1/acme/dev-1/cmd", b"for-dev-1")
        wait_until(lambda: dev1.got, what="dev-1's command")
        assert dev1.got == [("edge/v1/acme/dev-1/cmd", b"for-dev-1")]
    finally:
        for c in (monitor, dev1, controller_):
            c.close()
    # Nothing anonymous, nothing in plain text, no certificate of another CA.
    from fleet._mqtt import BrokerAuth, connect

    other = foreign_pki(secure)
    for auth in (BrokerAuth(url=secure.url, ca_file=secure.pki / "ca.crt"),  # anonymous
                 BrokerAuth(url=f"mqtt://127.0.0.1:{secure.port}"),  # plain text
                 BrokerAuth(url=secure.url, ca_file=secure.pki / "ca.crt",  # another CA's
                            cert_file=other / "dev-1.crt", key_file=other / "dev-1.key")):
        with pytest.raises(FleetError, match="cannot connect"):
            connect(auth, "anon", topics=[], on_message=lambda *a: None, timeout_s=5)


class Raw:
    """A paho client with `name`'s certificate and any client id, as an attacker runs
    one: what the broker answered to the CONNECT and each SUBSCRIBE, and how often this
    connection was closed by the broker."""

    def __init__(self, secure: Any, name: str, client_id: str) -> None:
        from agent.link.mqtt import Broker as Url
        from agent.link.mqtt import TlsFiles, authenticate

        self.connack: list[str] = []
        self.suback: list[list[str]] = []
        self.dropped = 0
        self.got: list[tuple[str, bytes, bool]] = []
        self.c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=paho.MQTTv5)
        a = secure.auth(name)
        authenticate(self.c, Url.parse(a.url), TlsFiles(ca_file=a.ca_file,
                                                        cert_file=a.cert_file,
                                                        key_file=a.key_file), None, None)
        self.c.on_connect = lambda c, u, f, rc, p: self.connack.append(str(rc))
        self.c.on_subscribe = lambda c, u, mid, rcs, p: self.suback.append(
            [str(r) for r in rcs])
        self.c.on_disconnect = self._gone
        self.c.on_message = lambda c, u, m: self.got.append((m.topic, bytes(m.payload),
                                                             bool(m.retain)))
        self.c.reconnect_delay_set(min_delay=1, max_delay=1)
        self.c.connect("127.0.0.1", secure.port)
        self.c.loop_start()

    def _gone(self, c: Any, u: Any, f: Any, reason: Any, p: Any) -> None:
        self.dropped += 1

    def subscribe(self, topic: str) -> list[str]:
        n = len(self.suback)
        self.c.subscribe(topic, qos=1)
        wait_until(lambda: len(self.suback) > n, what=f"the SUBACK for {topic}")
        return self.suback[n]

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def test_a_device_certificate_cannot_join_the_controllers_shared_subscription(
        secure: Any) -> None:
    """dev-1 joining the controllers' group (or any `$share/` group) is refused at the
    SUBSCRIBE, and so is the read-only monitor: every one of dev-2's reports reaches the
    controller. Before the guard, dev-1's sessions in the group took their turn of the
    round robin and the broker dropped what they could not read: a controller received
    2 of 12."""
    from fleet.devices.watcher import CONTROLLER_GROUP

    base = "edge/v1/acme"
    controller_ = Client(secure.auth("fleet-controller"), "edge-fleet-test-controller",
                         [f"$share/{CONTROLLER_GROUP}/{base}/+/telemetry"])
    dev1 = Raw(secure, "dev-1", "acme-dev-1")
    monitor = Raw(secure, "fleet-monitor", "edge-fleet-test-monitor")
    dev2 = Client(secure.auth("dev-2"), "acme-dev-2", [])
    try:
        wait_until(lambda: dev1.connack == ["Success"] and monitor.connack == ["Success"],
                   what="both connected")
        for who in (dev1, monitor):
            for group in (CONTROLLER_GROUP, "anything"):
                assert who.subscribe(f"$share/{group}/{base}/+/telemetry") == [
                    "Not authorized"], group
        for i in range(12):
            dev2.send(f"{base}/dev-2/telemetry", f"t{i}".encode())
        wait_until(lambda: len(controller_.got) == 12, what="all 12 at the controller")
        assert dev1.got == [] and monitor.got == []
    finally:
        for c in (controller_, dev1, monitor, dev2):
            c.close()


def test_a_device_certificate_cannot_take_over_another_devices_session(secure: Any) -> None:
    """dev-1's certificate connecting as `acme-dev-2`, again and again, is refused at
    CONNECT and dev-2 stays connected (before: kicked every time, its Will flipping it
    offline and online); a device cannot take an operator tool's id either, and an
    operator's tools connect only under ids beginning `edge-fleet-`."""
    dev2 = Raw(secure, "dev-2", "acme-dev-2")
    try:
        wait_until(lambda: dev2.connack == ["Success"], what="dev-2 connected")
        for cert, client_id in (("dev-1", "acme-dev-2"), ("dev-1", "acme-dev-2"),
                                ("dev-1", "dev-2"), ("dev-1", "edge-fleet-rollout-x"),
                                ("dev-1", "dev-1"), ("fleet-controller", "acme-dev-2"),
                                ("fleet-monitor", "controller")):
            attacker = Raw(secure, cert, client_id)
            try:
                wait_until(lambda a=attacker: a.connack, what=f"{cert} as {client_id}")
                assert attacker.connack[0] == "Not authorized", (cert, client_id)
            finally:
                attacker.close()
        dev2.c.publish("edge/v1/acme/dev-2/event", b"still here", qos=1).wait_for_publish(5)
        assert dev2.connack == ["Success"] and dev2.dropped == 0
    finally:
        dev2.close()


def test_a_device_certificate_retains_nothing_but_its_own_state(secure: Any) -> None:
    """dev-1 may not leave a retained reply under another requester's `infer-replies/`
    (nor anywhere else but its own state): a later subscriber finds dev-1's retained
    state and nothing else. Before, a retained forged reply was delivered to dev-2."""
    base = "edge/v1/acme"
    dev1 = Raw(secure, "dev-1", "acme-dev-1")
    try:
        wait_until(lambda: dev1.connack == ["Success"], what="dev-1 connected")
        for topic in (f"{base}/infer-replies/dev-2/forged", f"{base}/dev-1/event",
                      f"{base}/dev-1/state"):
            dev1.c.publish(topic, b"retained by dev-1", qos=1,
                           retain=True).wait_for_publish(5)
    finally:
        dev1.close()
    reader = Raw(secure, "fleet-controller", "edge-fleet-test-reader")
    try:
        wait_until(lambda: reader.connack == ["Success"], what="the reader connected")
        # one SUBSCRIBE: the broker sends each filter's retained messages in this order
        reader.c.subscribe([(f"{base}/infer-replies/#", 1), (f"{base}/dev-1/event", 1),
                            (f"{base}/dev-1/state", 1)])
        wait_until(lambda: any(t.endswith("/state") for t, _, _ in reader.got),
                   what="dev-1's retained state")
        assert reader.got == [(f"{base}/dev-1/state", b"retained by dev-1", True)]
    finally:
        reader.close()


def test_a_publish_the_broker_refuses_is_an_error_not_a_success(secure: Any) -> None:
    """`root publish` or `heartbeat` with a certificate the ACL does not let publish there
    (the monitor's): mosquitto acknowledges the publish with "Not authorized" and drops
    it; the tool now says so and fails, where it used to exit 0 with nothing retained. The
    controller's certificate publishes."""
    from fleet.errors import FleetError
    from fleet.trust.publish import publish_retained

    with pytest.raises(FleetError, match=r"refused it .*Not authorized"):
        publish_retained(secure.auth("fleet-monitor"), "edge/v1/acme/root", b"{}")
    publish_retained(secure.auth("fleet-controller"), "edge/v1/acme/heartbeat", b"{}")


def foreign_pki(secure: Any) -> Path:
    """A certificate for dev-1 from a CA the broker does not know."""
    from fleet.trust import pki

    other = secure.dir / "other-pki"
    pki.init_ca(other, server_hosts=["127.0.0.1"], days=2)
    pki.issue(other, "dev-1", days=2)
    return other


def fleet_cli(*args: object, env: dict[str, str] | None = None) -> Any:
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "fleet.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, **(env or {})})


def test_fleet_tools_fail_with_one_line_when_they_cannot_connect(secure: Any,
                                                                 tmp_path: Path) -> None:
    db = tmp_path / "fleet.sqlite"
    ca = secure.pki / "ca.crt"
    cases = [
        ["--broker", secure.url, "--ca-file", ca],  # no client certificate
        ["--broker", f"mqtt://127.0.0.1:{secure.port}"],  # plain text to the TLS port
        ["--broker", f"mqtt://127.0.0.1:{secure.port}", "--ca-file", ca],  # TLS file, no TLS
        ["--broker", secure.url, "--ca-file", ca, "--cert-file",
         secure.pki / "fleet-monitor.crt"],  # a certificate without its key
    ]
    for extra in cases:
        p = fleet_cli("status", "--fleet", "acme", "--db", db, "--wait", "0.5", *extra)
        assert p.returncode == 2, (extra, p.stdout, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1 and "0 device" not in p.stdout, (
            extra, p.stderr)
    # The same from the environment, with the monitor's certificate: it works.
    ok = fleet_cli("status", "--fleet", "acme", "--db", db, "--wait", "0.5", env={
        "EDGE_FLEET_BROKER": secure.url, "EDGE_FLEET_CA_FILE": str(ca),
        "EDGE_FLEET_CERT_FILE": str(secure.pki / "fleet-monitor.crt"),
        "EDGE_FLEET_KEY_FILE": str(secure.pki / "fleet-monitor.key")})
    assert ok.returncode == 0, ok.stderr
    assert "0 device(s)" in ok.stdout


def test_an_agent_with_its_certificate_reports_through_the_secured_broker(
        secure: Any, releases: dict[str, Path], tmp_path: Path) -> None:
    from fixture_agent import register, write_config

    where = tmp_path / "dev-1"
    where.mkdir()
    agent = AgentProcess(write_config(where, releases["keys"], profile="x86_64-generic",
                                      mqtt={**secure.agent_mqtt("dev-1"),
                                            "telemetry_interval_s": 0.2})).start()
    db = FleetDB(tmp_path / "fleet.sqlite")
    register(db, where)
    watcher = FleetWatcher(db, secure.auth("fleet-monitor"), "acme").start()
    try:
        rows = wait_until(lambda: [r for r in db.devices() if r.online
                                   and r.telemetry_age_s is not None],
                          what="dev-1 online with telemetry")
        assert rows[0].device == "dev-1" and rows[0].root.startswith("v1 to ")
    finally:
        watcher.stop()
        agent.stop()


def test_the_example_broker_config_in_deploy_is_what_broker_config_renders(
        tmp_path: Path) -> None:
    from fleet.broker import BrokerConfig, render

    conf, acl = render(BrokerConfig(fleet="acme", pki=Path("/etc/mosquitto/edge-fleet"),
                                    user="mosquitto"), tmp_path)
    shipped = Path(__file__).parent.parent / "deploy" / "mosquitto"
    assert (shipped / "acl").read_text() == acl.read_text()
    assert (shipped / "mosquitto.conf").read_text() == conf.read_text().replace(
        f"acl_file {acl}", "acl_file /etc/mosquitto/edge-fleet/acl").replace(
        f"plugin {tmp_path}/", "plugin /etc/mosquitto/edge-fleet/")
    assert (tmp_path / "edge_fleet_guard.so").is_file()  # built beside them


def test_the_guard_plugin_is_built_once_and_a_missing_compiler_names_the_packages(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fleet import broker
    from fleet.errors import FleetError

    lib = broker.build_guard(tmp_path)
    built = lib.stat().st_mtime_ns
    assert broker.build_guard(tmp_path).stat().st_mtime_ns == built  # unchanged source
    monkeypatch.setattr(broker.shutil, "which", lambda name: None)
    assert broker.build_guard(tmp_path) == lib  # built already: no compiler needed
    with pytest.raises(FleetError, match="libmosquitto-dev mosquitto-dev"):
        broker.build_guard(tmp_path / "elsewhere")


def test_a_bridge_with_a_malformed_name_or_address_is_refused(tmp_path: Path) -> None:
    """`broker-config --bridge-to/--bridge-name` write into mosquitto.conf: a line break
    or a space in either would add configuration lines of its own."""
    from fleet.broker import Bridge
    from fleet.errors import FleetError

    pki = tmp_path / "pki"
    ok = Bridge(name="site-1", address="core.example.com:8883", ca_file=pki / "ca.crt",
                cert_file=pki / "b.crt", key_file=pki / "b.key")
    assert "address core.example.com:8883\n" in ok.render("acme")
    for name, address, what in (
            ("site-1", "core:8883\nlistener 1883 0.0.0.0", "bridge address"),
            ("site-1", "core 8883", "bridge address"), ("site-1", "core", "bridge address"),
            ("site 1", "core:8883", "bridge name"), ("a\nallow_anonymous true", "core:1",
                                                     "bridge name")):
        bad = Bridge(name=name, address=address, ca_file=ok.ca_file,
                     cert_file=ok.cert_file, key_file=ok.key_file)
        with pytest.raises(FleetError, match=what):
            bad.render("acme")
