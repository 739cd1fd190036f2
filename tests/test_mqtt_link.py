"""The MQTT link against a real mosquitto: birth and Last Will on the retained state topic,
the outbox delivered in order at QoS 1, nothing lost across a broker outage, failover to
the next broker URL, and the reconnect backoff."""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path

from fixture_mqtt import Broker, Subscriber, free_port, make_pki

from agent.link.mqtt import Backoff, MqttLink, TlsFiles, backoff_delay, wait_connected
from agent.link.outbox import Outbox

STATE = "edge/v1/acme/dev-1/state"



def link(urls: list[str], outbox: Outbox, received: list[tuple[str, bytes]],
         tls: TlsFiles | None = None) -> MqttLink:
    return MqttLink(brokers=urls, client_id="dev-1", state_topic=STATE,
                    birth=lambda: b'{"online":true}', will=lambda: b'{"online":false}',
                    subscriptions=["edge/v1/acme/dev-1/cmd"],
                    on_message=lambda t, p, props: received.append((t, p)), outbox=outbox,
                    backoff=Backoff(initial_s=0.1, max_s=0.5), tls=tls)


def test_backoff_is_capped_jittered_and_grows() -> None:
    b, rng = Backoff(initial_s=1, max_s=30, factor=2, jitter=0.5), random.Random(0)
    delays = [backoff_delay(i, b, rng) for i in range(10)]
    # within the jitter band below a capped exponential: grows, then stays in [15, 30]
    assert all(0.5 * min(30, 2 ** i) <= d <= min(30, 2 ** i) for i, d in enumerate(delays))
    assert delays[0] <= 1 and min(delays[5:]) >= 15
    # jittered: devices that lost the broker together do not come back together; the
    # same attempt spreads over most of its 4 s band (8 s base, jitter 0.5)
    same = [backoff_delay(3, b, rng) for _ in range(50)]
    assert max(same) - min(same) > 3 and len(set(same)) == 50


def test_birth_subscriptions_and_the_outbox_in_order(broker: Broker, tmp_path: Path) -> None:
    sub = Subscriber(broker, ["edge/v1/acme/#"])
    box, got = Outbox(tmp_path / "o.sqlite"), []
    for _ in range(50):
        box.enqueue("telemetry", "edge/v1/acme/dev-1/telemetry",
                    lambda seq, _order: json.dumps({"seq": seq}).encode())
    lk = link([broker.url], box, got)
    lk.start()
    assert wait_connected(lk, 10)
    sub.wait_for(lambda: len(sub.on("/telemetry")) == 50)
    assert [json.loads(p)["seq"] for p in sub.on("/telemetry")] == list(range(1, 51))
    assert sub.on("/state")[0] == b'{"online":true}'
    sub.wait_for(lambda: len(box) == 0)  # deleted once acknowledged
    sub.publish("edge/v1/acme/dev-1/cmd", b"hello")
    sub.wait_for(lambda: got == [("edge/v1/acme/dev-1/cmd", b"hello")])
    lk.stop()
    sub.wait_for(lambda: sub.on("/state")[-1] == b'{"online":false}')
    sub.close()


def test_nothing_is_lost_across_a_broker_outage(broker: Broker, tmp_path: Path) -> None:
    sub = Subscriber(broker, ["edge/v1/acme/+/telemetry"])
    box = Outbox(tmp_path / "o.sqlite")
    lk = link([broker.url], box, [])
    lk.start()
    assert wait_connected(lk, 10)
    sent = 0

    def send(n: int) -> None:
        nonlocal sent
        for _ in range(n):
            box.enqueue("telemetry", "edge/v1/acme/dev-1/telemetry",
                        lambda seq, _order: json.dumps({"seq": seq}).encode())
            sent += 1
            time.sleep(0.005)

    send(100)
    broker.stop()
    send(200)  # the broker is down: these wait in the outbox
    assert len(box) >= 200
    broker.start()
    send(100)
    sub.wait_for(lambda: {json.loads(p)["seq"] for p in sub.on("/telemetry")}
                 == set(range(1, sent + 1)), timeout=30)
    assert box.take_dropped() == {}
    lk.stop()
    sub.close()


def test_failover_to_the_second_broker(broker: Broker, tmp_path: Path) -> None:
    dead = f"mqtt://127.0.0.1:{free_port()}"
    lk = link([dead, broker.url], Outbox(tmp_path / "o.sqlite"), [])
    lk.start()
    assert wait_connected(lk, 10)
    assert "127.0.0.1" in lk.last_error  # the first one was tried and failed
    lk.stop()


def test_mutual_tls_with_the_fleet_ca_connects_and_a_foreign_certificate_is_refused(
        tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    b = Broker(tmp_path / "tls-broker", tls=pki).start()
    try:
        sub = Subscriber(b, [STATE])
        for cert, key, ok in ((pki["dev.crt"], pki["dev.key"], True),
                              (pki["rogue.crt"], pki["rogue.key"], False)):
            lk = link([f"mqtts://127.0.0.1:{b.tls_port}"], Outbox(tmp_path / f"{ok}.sqlite"),
                      [], TlsFiles(ca_file=pki["ca.crt"], cert_file=cert, key_file=key))
            lk.start()
            assert wait_connected(lk, 5) is ok, lk.last_error
            if ok:
                sub.wait_for(lambda: b'{"online":true}' in sub.on("/state"))
            else:
                assert lk.last_error  # the handshake failed and says so
            lk.stop()
        sub.close()
    finally:
        b.stop()


def test_a_plain_client_cannot_reach_the_tls_listener_without_a_certificate(
        tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    b = Broker(tmp_path / "tls-broker", tls=pki).start()
    try:
        lk = link([f"mqtts://127.0.0.1:{b.tls_port}"], Outbox(tmp_path / "o.sqlite"), [],
                  TlsFiles(ca_file=pki["ca.crt"]))
        lk.start()
        assert not wait_connected(lk, 3)
        lk.stop()
    finally:
        b.stop()


def test_a_broker_whose_certificate_another_ca_signed_is_refused(tmp_path: Path) -> None:
    """The device trusts only its fleet's CA: a broker presenting a certificate from any
    other CA (a man in the middle, a misconfigured broker) gets no connection, even with
    the device's valid client certificate."""
    pki = make_pki(tmp_path / "pki")
    b = Broker(tmp_path / "tls-broker", tls=pki).start()  # its certificate: signed by "ca"
    try:
        lk = link([f"mqtts://127.0.0.1:{b.tls_port}"], Outbox(tmp_path / "o.sqlite"), [],
                  TlsFiles(ca_file=pki["other.crt"], cert_file=pki["dev.crt"],
                           key_file=pki["dev.key"]))
        lk.start()
        assert not wait_connected(lk, 3)
        assert "CERTIFICATE_VERIFY_FAILED" in lk.last_error or "certificate" in \
            lk.last_error.lower(), lk.last_error
        lk.stop()
    finally:
        b.stop()


def test_a_link_runs_one_connection_however_often_it_is_started(
        broker: Broker, tmp_path: Path) -> None:
    """start() on a running link changes nothing, and a start after a stop runs one new
    thread; the simulator started every device again at the end of a chaos run, and two
    connections of one client id took the session from each other until the broker
    dropped the device (its deploy's result never arrived)."""
    def mqtt_threads() -> int:
        return sum(t.name == "mqtt" and t.is_alive() for t in threading.enumerate())
    before = mqtt_threads()
    lk = link([broker.url], Outbox(tmp_path / "o.sqlite"), [])
    lk.start()
    assert wait_connected(lk, 10)
    lk.start()
    assert mqtt_threads() == before + 1 and lk.connects == 1
    lk.stop()
    lk.start()
    assert wait_connected(lk, 10)
    assert mqtt_threads() == before + 1 and lk.connects == 2
    lk.stop()
