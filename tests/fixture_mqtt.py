"""A real mosquitto on a free loopback port (Debian's package, installed by bootstrap),
with persistence so sessions and queued QoS 1 messages survive a broker restart."""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_pki(where: Path) -> dict[str, Path]:
    """A CA with a server certificate for 127.0.0.1 and a client certificate for device
    dev-1 (`fleet.trust.pki`), and another CA with its own dev-1 certificate (the wrong one)."""
    from fleet.trust import pki

    pki.init_ca(where / "ca", server_hosts=["127.0.0.1"], days=2)
    pki.issue(where / "ca", "dev-1", days=2)
    pki.init_ca(where / "other", server_hosts=["127.0.0.1"], days=2)
    pki.issue(where / "other", "dev-1", days=2)
    return {"ca.crt": where / "ca" / "ca.crt", "other.crt": where / "other" / "ca.crt",
            "server.crt": where / "ca" / "server.crt",
            "server.key": where / "ca" / "server.key",
            "dev.crt": where / "ca" / "dev-1.crt", "dev.key": where / "ca" / "dev-1.key",
            "rogue.crt": where / "other" / "dev-1.crt",
            "rogue.key": where / "other" / "dev-1.key"}


def report(payload: bytes) -> Any:
    """The payload of a device's signed report (the envelope's `signed` part)."""
    return json.loads(payload)["signed"]


class Broker:
    def __init__(self, where: Path, *, tls: dict[str, Path] | None = None) -> None:
        self.dir = where
        self.port = free_port()
        self.tls_port = free_port() if tls else None
        where.mkdir(parents=True, exist_ok=True)
        self.conf = where / "mosquitto.conf"
        acl = where / "acl"
        # Anonymous clients (the plain listener: tests and dashboards) may do anything;
        # a device on the TLS listener, named by its certificate, only its own subtree.
        acl.write_text("topic readwrite #\n\nuser dev-1\ntopic readwrite edge/v1/acme/dev-1/#\n"
                       "topic read edge/v1/acme/group/#\n")
        lines = [
            # Started as root, mosquitto would drop to its own user, which cannot write
            # the database into a private test directory.
            f"user {getpass.getuser()}",
            f"persistence true\npersistence_location {where}/\nautosave_interval 1",
            "max_queued_messages 100000", "per_listener_settings false",
            *([f"acl_file {acl}"] if tls else []), "allow_anonymous true", "log_dest stderr",
            f"listener {self.port} 127.0.0.1"]
        if tls:
            lines += [f"listener {self.tls_port} 127.0.0.1", f"cafile {tls['ca.crt']}",
                      f"certfile {tls['server.crt']}", f"keyfile {tls['server.key']}",
                      "require_certificate true", "use_identity_as_username true"]
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> Broker:
        """Start it and wait until it listens; one that does not is killed first."""
        with (self.dir / "mosquitto.log").open("ab") as log:  # the broker keeps its own copy
            self.proc = subprocess.Popen(["mosquitto", "-c", str(self.conf)],
                                         stdout=subprocess.DEVNULL, stderr=log)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1",
                                                                         self.port), 0.2):
                return self
            if self.proc.poll() is not None:
                break  # it exited: its log says why
            time.sleep(0.05)
        self.proc.kill()  # a broker that never listened must not outlive the test
        self.proc.wait(10)
        raise AssertionError("mosquitto did not start: "
                             + (self.dir / "mosquitto.log").read_text(errors="replace")[-2000:])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: mosquitto saves its persistence file
            self.proc.wait(10)


class Subscriber:
    """A persistent-session test client collecting (topic, payload, properties)."""

    def __init__(self, broker: Broker, topics: list[str], client_id: str = "test-sub") -> None:
        self.messages: list[tuple[str, bytes, Any]] = []
        self.lock = threading.Lock()
        self.c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=paho.MQTTv5)
        self.topics = topics
        self.subacks = 0
        self.c.on_message = self._msg
        self.c.on_connect = lambda c, u, f, r, p: [c.subscribe(t, qos=1) for t in topics]
        self.c.on_subscribe = self._subscribed
        self.c.reconnect_delay_set(min_delay=1, max_delay=2)  # back soon after a restart
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.c.connect("127.0.0.1", broker.port, clean_start=False, properties=props)
        self.c.loop_start()

    def _msg(self, c: Any, u: Any, m: Any) -> None:
        with self.lock:
            self.messages.append((m.topic, bytes(m.payload), m.properties))

    def _subscribed(self, c: Any, u: Any, mid: Any, codes: Any, p: Any) -> None:
        with self.lock:
            self.subacks += 1

    def wait_subscribed(self, timeout: float = 15.0) -> None:
        """Until the broker has acknowledged every topic of the first connection (so the
        persistent session holds the subscriptions)."""
        end = time.monotonic() + timeout
        while self.subacks < len(self.topics):
            if time.monotonic() > end:
                raise AssertionError(f"{self.subacks} of {len(self.topics)} SUBACKs")
            time.sleep(0.02)

    def on(self, suffix: str) -> list[bytes]:
        with self.lock:
            return [p for t, p, _ in self.messages if t.endswith(suffix)]

    def wait_for(self, predicate: Any, timeout: float = 15.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                if predicate():
                    return
            except IndexError:  # it read the last of messages that have not come yet
                pass
            time.sleep(0.05)
        raise AssertionError(f"timed out; got {len(self.messages)} messages")

    def publish(self, topic: str, payload: bytes, **kw: Any) -> None:
        self.c.publish(topic, payload, qos=1, **kw).wait_for_publish(5)

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


#: The broker's guard plugin, built once for every test broker of this user.
GUARD_BUILD = Path(tempfile.gettempdir()) / f"edge-fleet-guard-{os.getuid()}"


class SecureBroker(Broker):
    """mosquitto with the configuration the project ships (`edge-fleet broker-config`:
    mutual TLS, nothing anonymous, the per-device ACL), certificates from `fleet.trust.pki`."""

    def __init__(self, where: Path, *, fleet: str = "acme",
                 clients: tuple[str, ...] = ("fleet-controller", "fleet-monitor"),
                 hosts: tuple[str, ...] = ("127.0.0.1",),
                 bridge_to: SecureBroker | None = None, site: str = "site") -> None:
        """`hosts`: the addresses clients reach it at (its certificate names them all;
        beyond loopback it listens on every address). `bridge_to`: a site broker, with
        the core broker's PKI, bridged to it as `fleet-bridge`."""
        from fleet.broker import Bridge, BrokerConfig, build_guard, render
        from fleet.trust import pki

        self.dir = where
        bridge = None
        if bridge_to is None:
            self.pki = where / "pki"
            pki.init_ca(self.pki, server_hosts=list(hosts), days=2)
            for name in (*clients, "fleet-bridge"):
                pki.issue(self.pki, name, days=2)
        else:
            self.pki = bridge_to.pki
            bridge = Bridge(name=site, address=f"127.0.0.1:{bridge_to.port}",
                            ca_file=self.pki / "ca.crt",
                            cert_file=self.pki / "fleet-bridge.crt",
                            key_file=self.pki / "fleet-bridge.key")
        self.port = free_port()
        self.tls_port = self.port
        self.conf, _ = render(BrokerConfig(fleet=fleet, pki=self.pki, port=self.port,
                                           bind="127.0.0.1" if hosts == ("127.0.0.1",)
                                           else "0.0.0.0", data_dir=where, bridge=bridge,
                                           log_dest="stderr", user=getpass.getuser()),
                              where, plugin=build_guard(GUARD_BUILD))
        self.proc = None

    def issue(self, name: str) -> tuple[Path, Path]:
        from fleet.trust import pki

        return pki.issue(self.pki, name, days=2)

    def issue_many(self, names: list[str]) -> None:
        """A certificate for each name that has none yet, the CA key loaded once."""
        from fleet.trust import pki

        pki.issue_many(self.pki, [n for n in names if not (self.pki / f"{n}.crt").exists()],
                       days=2)

    @property
    def url(self) -> str:
        return f"mqtts://127.0.0.1:{self.port}"

    def auth(self, name: str, host: str = "127.0.0.1") -> Any:
        """Connection options of client `name` (a certificate issued by `issue`)
        reaching it at `host`."""
        from fleet._mqtt import BrokerAuth

        return BrokerAuth(url=f"mqtts://{host}:{self.port}", ca_file=self.pki / "ca.crt",
                          cert_file=self.pki / f"{name}.crt",
                          key_file=self.pki / f"{name}.key")

    def agent_mqtt(self, name: str) -> dict[str, Any]:
        """The `[mqtt]` section of an agent whose certificate is `name`'s."""
        if not (self.pki / f"{name}.crt").exists():
            self.issue(name)
        return {"brokers": [self.url], "ca_file": str(self.pki / "ca.crt"),
                "cert_file": str(self.pki / f"{name}.crt"),
                "key_file": str(self.pki / f"{name}.key")}
