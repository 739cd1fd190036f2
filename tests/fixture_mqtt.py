"""A real mosquitto on a free loopback port (Debian's package, installed by bootstrap),
with persistence so sessions and queued QoS 1 messages survive a broker restart."""

from __future__ import annotations

import contextlib
import getpass
import socket
import subprocess
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


class Broker:
    def __init__(self, where: Path) -> None:
        self.dir = where
        self.port = free_port()
        where.mkdir(parents=True, exist_ok=True)
        self.conf = where / "mosquitto.conf"
        self.conf.write_text(
            # Started as root, mosquitto would drop to its own user, which cannot write
            # the database into a private test directory.
            f"user {getpass.getuser()}\n"
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
            f"persistence true\npersistence_location {where}/\nautosave_interval 1\n"
            "max_queued_messages 100000\n")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> Broker:
        self.proc = subprocess.Popen(["mosquitto", "-c", str(self.conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        end = time.monotonic() + 10
        while time.monotonic() < end:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1",
                                                                         self.port), 0.2):
                return self
            time.sleep(0.05)
        raise AssertionError("mosquitto did not start")

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
        self.c.on_message = self._msg
        self.c.on_connect = lambda c, u, f, r, p: [c.subscribe(t, qos=1) for t in topics]
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.c.connect("127.0.0.1", broker.port, clean_start=False, properties=props)
        self.c.loop_start()

    def _msg(self, c: Any, u: Any, m: Any) -> None:
        with self.lock:
            self.messages.append((m.topic, bytes(m.payload), m.properties))

    def on(self, suffix: str) -> list[bytes]:
        with self.lock:
            return [p for t, p, _ in self.messages if t.endswith(suffix)]

    def wait_for(self, predicate: Any, timeout: float = 15.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate():
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out; got {len(self.messages)} messages")

    def publish(self, topic: str, payload: bytes, **kw: Any) -> None:
        self.c.publish(topic, payload, qos=1, **kw).wait_for_publish(5)

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()
