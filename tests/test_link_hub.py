"""Many MQTT links on one `LinkHub` thread (the simulator's devices), against a real
mosquitto with mutual TLS: every link connects with its own certificate, a message stored
in an idle link's outbox goes out because the outbox told the hub (the hub's periodic
sweep is set to an hour here, so nothing else could send it), a broker restart is
survived with nothing lost, a stop says goodbye, and a start after a stop connects once."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fixture_mqtt import SecureBroker
from polling import wait_until

from agent.link.hub import LinkHub
from agent.link.mqtt import Backoff, MqttLink, TlsFiles
from agent.link.outbox import MemoryOutbox
from fleet._mqtt import connect

LINKS = 40


def state(name: str) -> str:
    return f"edge/v1/acme/{name}/state"


@pytest.fixture
def secure(tmp_path: Path) -> Iterator[SecureBroker]:
    """The broker as shipped (mutual TLS, the per-device ACL), a certificate per link."""
    b = SecureBroker(tmp_path / "mosq")
    b.issue_many([f"hub-{i:02d}" for i in range(LINKS)])
    b.start()
    yield b
    b.stop()


class Monitor:
    """The fleet monitor's view: every device's topics."""

    def __init__(self, b: SecureBroker) -> None:
        self.got: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self.client, _ = connect(b.auth("fleet-monitor"), "edge-fleet-test-monitor",
                                 topics=["edge/v1/acme/+/state", "edge/v1/acme/+/telemetry"],
                                 on_message=self._msg, session_expiry_s=3600)

    def _msg(self, _c: Any, _u: Any, m: Any) -> None:
        with self.lock:
            self.got.append((m.topic, bytes(m.payload)))

    def on(self, suffix: str) -> list[bytes]:
        with self.lock:
            return [p for t, p in self.got if t.endswith(suffix)]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def hub_links(b: SecureBroker, hub: LinkHub, n: int) -> list[MqttLink]:
    out = []
    for i in range(n):
        name = f"hub-{i:02d}"
        out.append(MqttLink(
            brokers=[b.url], client_id=f"acme-{name}",  # the guard binds it to the CN
            state_topic=state(name), birth=lambda: b'{"online":true}',
            will=lambda: b'{"online":false}', subscriptions=[f"edge/v1/acme/{name}/cmd"],
            on_message=lambda t, p, props: None, outbox=MemoryOutbox(),
            tls=TlsFiles(ca_file=b.pki / "ca.crt", cert_file=b.pki / f"{name}.crt",
                         key_file=b.pki / f"{name}.key"),
            backoff=Backoff(initial_s=0.1, max_s=0.5), session_expiry_s=600, hub=hub))
    return out


def send(lk: MqttLink, seq: int) -> None:
    name = lk.client_id.removeprefix("acme-")
    lk.outbox.enqueue("telemetry", f"edge/v1/acme/{name}/telemetry",
                      lambda _s, _o: json.dumps({"n": seq}).encode())


def test_one_hub_thread_drives_every_link(secure: SecureBroker) -> None:
    b = secure
    sub = Monitor(b)
    hub = LinkHub(misc_s=3600)
    threads = threading.active_count()
    links = hub_links(b, hub, LINKS)
    try:
        for lk in links:
            lk.start()
        wait_until(lambda: all(lk.connected.is_set() for lk in links), timeout_s=30,
                   what="every link connected")
        assert threading.active_count() <= threads + 4  # the connectors, not one per link
        assert all(lk.connects == 1 for lk in links)
        wait_until(lambda: len({t for t, p in sub.got if p == b'{"online":true}'}) == LINKS,
                   what="every birth")
        for lk in links:  # idle links: only the outbox's word can get these out
            send(lk, 1)
        wait_until(lambda: len(sub.on("/telemetry")) == LINKS, what="one message each")

        b.stop()
        wait_until(lambda: not any(lk.connected.is_set() for lk in links), timeout_s=30,
                   what="every link saw the broker go")
        for lk in links:
            send(lk, 2)  # stored while the broker is down
        b.start()
        wait_until(lambda: all(lk.connected.is_set() for lk in links), timeout_s=60,
                   what="every link reconnected")
        wait_until(lambda: [json.loads(p)["n"] for p in sub.on("/telemetry")].count(2)
                   == LINKS, timeout_s=30, what="what was stored while the broker was down")
        assert all(len(lk.outbox) == 0 for lk in links)  # acknowledged, so forgotten

        first = links[0]
        first.stop()
        assert first._stopped.is_set()
        wait_until(lambda: sub.on(state("hub-00"))[-1:] == [b'{"online":false}'],
                   what="the goodbye")
        first.start()
        first.start()  # a running link ignores start
        wait_until(first.connected.is_set, timeout_s=20, what="hub-00 back")
        assert first.connects == 3  # start, broker restart, start again
        second = links[1]
        second.stop(timeout_s=0)  # and a start right after a stop the hub has not
        second.start()  # reached yet reconnects (it is not taken for a running link)
        wait_until(lambda: second.connects == 3 and second.connected.is_set(),
                   timeout_s=20, what="hub-01 back after a quick stop and start")
    finally:
        for lk in links:
            lk.stop(timeout_s=0)
        for lk in links:
            lk.stop(timeout_s=5)
        hub.close()
        sub.close()
