"""The MQTT link: paho-mqtt 2.x (MQTT 5) in one thread that owns the connection.

* brokers: several `mqtt://host:port` / `mqtts://host:port` URLs, tried in turn (failover);
  after a failure or disconnect the next attempt waits a capped, jittered exponential
  backoff (`backoff_delay`, pure);
* TLS and mutual TLS (CA, client certificate and key), optional username/password;
* birth and Last Will: the retained `state` topic says online on connect, and the broker
  publishes the Will (offline, built at each connect) if the agent vanishes;
* a persistent session (`session_expiry_s` > 0, clean start off): commands sent at QoS 1
  while the device is away wait at the broker and arrive when it returns;
* subscriptions are made again on every connect;
* the outbox (`agent.link.outbox`) is pumped while connected: QoS 1, a bounded number in
  flight, each message deleted only when its PUBACK arrives; after a disconnect the
  unacknowledged ones go out again.

Incoming messages are handed to `on_message(topic, payload, properties)` on this thread;
the daemon queues them for its own workers. paho's exceptions stay in this module.
"""

from __future__ import annotations

import functools
import logging
import random
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.errors import ConfigError
from agent.link.outbox import AnyOutbox
from agent.logs import RateLimited

log = logging.getLogger("edge_agent.mqtt")
MAX_IN_FLIGHT = 100


class LinkHub(Protocol):
    """What a link needs of the loop that drives it instead of its own thread
    (`agent.link.hub.LinkHub`; a protocol here so the hub imports the link, never back)."""

    def start(self, link: MqttLink) -> None: ...
    def stop(self, link: MqttLink) -> None: ...
    def kick(self, link: MqttLink) -> None: ...
    def running(self, link: MqttLink) -> bool: ...


@dataclass(frozen=True)
class Broker:
    host: str
    port: int
    tls: bool

    @classmethod
    def parse(cls, url: str) -> Broker:
        u = urlparse(url)
        if u.scheme not in ("mqtt", "mqtts") or not u.hostname:
            raise ConfigError(f"broker URL {url!r} must be mqtt://host[:port] or mqtts://…")
        return cls(u.hostname, u.port or (8883 if u.scheme == "mqtts" else 1883),
                   u.scheme == "mqtts")


@dataclass(frozen=True, kw_only=True)
class TlsFiles:
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None


@dataclass(frozen=True, kw_only=True)
class Backoff:
    initial_s: float = 0.5
    max_s: float = 30.0
    factor: float = 2.0
    jitter: float = 0.5  # up to this fraction is taken off at random


#: Reconnect jitter for every link of the process (a Random of its own is 2.5 KiB per link:
#: the simulator runs thousands).
_JITTER = random.Random()


def backoff_delay(attempt: int, b: Backoff, rng: random.Random) -> float:
    """Delay before reconnect attempt `attempt` (0-based): capped exponential, jittered."""
    base = min(b.max_s, b.initial_s * b.factor ** attempt)
    return base * (1 - b.jitter * rng.random())


def authenticate(client: paho.Client, broker: Broker, tls: TlsFiles | None,
                 username: str | None, password: str | None) -> None:
    """Credentials and, for an `mqtts://` broker, TLS verifying the broker's certificate
    (with the client certificate when given); shared with the fleet tools.

    Raises:
        OSError, ssl.SSLError, ValueError: the TLS files cannot be used.
    """
    if username:
        client.username_pw_set(username, password)
    if broker.tls:
        t = tls or TlsFiles()
        client.tls_set(ca_certs=str(t.ca_file) if t.ca_file else None,
                       certfile=str(t.cert_file) if t.cert_file else None,
                       keyfile=str(t.key_file) if t.key_file else None,
                       cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)


MessageHandler = Callable[[str, bytes, Any], None]


@functools.lru_cache(maxsize=8)
def _session(expiry_s: int) -> Properties:
    """The CONNECT properties of a persistent session, one object for every link of a
    process (paho only reads them; each holds ~5 KiB of tables, and a client keeps
    its own: ten thousand simulated devices paid that each)."""
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = expiry_s
    return props


class MqttLink:
    def __init__(self, *, brokers: list[str], client_id: str, state_topic: str,
                 birth: Callable[[], bytes], will: Callable[[], bytes], subscriptions: list[str],
                 on_message: MessageHandler, outbox: AnyOutbox, tls: TlsFiles | None = None,
                 username: str | None = None, password: str | None = None,
                 keepalive_s: int = 30, backoff: Backoff = Backoff(),
                 poll_s: float = 0.05, session_expiry_s: int = 0,
                 hub: LinkHub | None = None) -> None:
        self.brokers = [Broker.parse(u) for u in brokers]
        if not self.brokers:
            raise ConfigError("mqtt.brokers is empty")
        self.client_id, self.state_topic = client_id, state_topic
        self.birth, self.will, self.subscriptions = birth, will, subscriptions
        self.on_message, self.outbox = on_message, outbox
        self.tls, self.username, self.password = tls, username, password
        self.keepalive_s, self.backoff = keepalive_s, backoff
        # > 0: a persistent session (clean start off): the broker keeps the subscriptions
        # and queues QoS 1 commands while the device is away, for this long.
        self.session_expiry_s = session_expiry_s
        # How long the loop waits on the socket before pumping the outbox again: the
        # delay of a message enqueued while the link is idle (the simulator, running a
        # thousand links in one process, trades latency for wake-ups).
        self.poll_s = poll_s
        self.connected = threading.Event()
        self.connects = 0
        self.last_error = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mids: dict[int, int] = {}  # paho mid -> outbox id
        self._client_now: paho.Client | None = None
        self._rng = _JITTER
        # A broker that stays down: the first failure is a warning, then one a minute
        # saying how many were held back, not one per retry.
        self._outage = RateLimited(log, interval_s=60.0)
        # Driven by a hub (`agent.link.hub`, the simulator's thousands of links) instead
        # of a thread of its own: told when the outbox has something new, no polling.
        self.hub = hub
        self._stopped = threading.Event()  # a hub let go of this link (or never had it)
        self._stopped.set()
        if hub is not None:
            outbox.on_enqueue = lambda: hub.kick(self)

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Connect (again, after a `stop`) on a thread of its own. Each start has its own
        stop event: a thread a `stop` could not join in time (blocked in a connect) ends
        when it wakes, instead of running on beside the new one with the same client id
        (the two took the session from each other in a loop). A link already running is
        left alone."""
        if self.hub is not None:  # a start after a stop the hub has not reached yet
            if self._stop.is_set() or not self.hub.running(self):  # goes after that stop
                self._stop = threading.Event()
                self._stopped.clear()
                self.hub.start(self)
            return
        if self._thread is not None and self._thread.is_alive() and not self._stop.is_set():
            return
        self._stop = stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(stop,), name="mqtt",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the thread; wait for it up to `timeout_s` (0: only tell it)."""
        self._stop.set()
        if self.hub is not None:
            self.hub.stop(self)
            if timeout_s > 0:
                self._stopped.wait(timeout_s)
        elif self._thread is not None and timeout_s > 0:
            self._thread.join(timeout_s)

    def _client(self, broker: Broker) -> paho.Client:
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                        protocol=paho.MQTTv5)
        authenticate(c, broker, self.tls, self.username, self.password)
        c.will_set(self.state_topic, self.will(), qos=1, retain=True)  # stamped now
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        c.on_message = self._on_message
        return c

    def _run(self, stop: threading.Event) -> None:
        attempt = 0
        while not stop.is_set():
            broker = self.brokers[attempt % len(self.brokers)]
            client = self._client(broker)
            before = self.connects
            try:
                self._connect(client, broker)
                self._serve(client, stop)
                if not stop.is_set():
                    self._ended(broker, before)
            except (OSError, ssl.SSLError, ValueError) as exc:
                self._failed(broker, exc)
            finally:
                self._disconnected()
                if stop.is_set() and stop is self._stop:  # not when a newer start runs
                    self._goodbye(client)
            attempt = self._next_attempt(attempt, before)
            if not stop.is_set():
                stop.wait(backoff_delay(attempt, self.backoff, self._rng))

    # -- one connection, whoever drives it (this link's thread or a `LinkHub`) ------------
    def _connect(self, client: paho.Client, broker: Broker) -> None:
        """TCP, TLS and the CONNECT packet (blocking up to paho's connect timeout).

        Raises:
            OSError, ssl.SSLError, ValueError: no connection.
        """
        self._client_now = client
        props = _session(self.session_expiry_s) if self.session_expiry_s > 0 else None
        client.connect(broker.host, broker.port, keepalive=self.keepalive_s,
                       clean_start=self.session_expiry_s <= 0, properties=props)

    def _failed(self, broker: Broker, exc: Exception) -> None:
        self.last_error = f"{broker.host}:{broker.port}: {exc}"
        self._outage.log(logging.WARNING, "connect", "mqtt.connect_failed %s", self.last_error)

    def _ended(self, broker: Broker, before: int) -> None:
        """A connection ended that was not stopped: if the broker never accepted it, say
        why that may be (with TLS 1.3 a refused client certificate shows up only now)."""
        if self.connects == before:
            self.last_error = (f"{broker.host}:{broker.port}: closed before the broker "
                               "accepted the connection (client certificate or "
                               "credentials refused?)")
            self._outage.log(logging.WARNING, "connect", "mqtt.connect_failed %s",
                             self.last_error)

    def _next_attempt(self, attempt: int, before: int) -> int:
        """The attempt counter after a connection ended: back to 0 once it was accepted."""
        return 0 if self.connects > before else attempt + 1

    def _serve(self, client: paho.Client, stop: threading.Event) -> None:
        while not stop.is_set():
            rc = client.loop(timeout=self.poll_s)
            if rc != paho.MQTT_ERR_SUCCESS:
                return
            if self.connected.is_set():
                self._pump(client)

    def _goodbye(self, client: paho.Client, *, flush_s: float = 0.2) -> None:
        """A clean stop: say offline ourselves (the broker sends the Will only if we
        vanish), then disconnect. Outside a callback paho writes at once; `flush_s`
        lets this thread's loop read the acknowledgement."""
        try:
            client.publish(self.state_topic, self.will(), qos=1, retain=True)
            if flush_s > 0:
                client.loop(timeout=flush_s)
            client.disconnect()
        except (OSError, ValueError):
            pass

    # -- paho callbacks (this thread) -----------------------------------------------------
    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        if reason.is_failure:
            self.last_error = f"refused: {reason}"
            self._outage.log(logging.WARNING, "connect", "mqtt.refused %s", reason)
            return
        self.connects += 1
        if held := self._outage.forget("connect"):
            log.info("mqtt.reconnected after %d more failed attempts (not logged one by one)",
                     held)
        client.publish(self.state_topic, self.birth(), qos=1, retain=True)
        for topic in self.subscriptions:
            client.subscribe(topic, qos=1)
        self.connected.set()
        log.info("mqtt.connected connects=%d", self.connects)

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any,
                       properties: Any) -> None:
        self._disconnected()

    def _disconnected(self) -> None:
        if self.connected.is_set():
            log.info("mqtt.disconnected")
        self.connected.clear()
        self._mids.clear()
        self.outbox.requeue_in_flight()

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason: Any,
                    properties: Any) -> None:
        box_id = self._mids.pop(mid, None)
        if box_id is not None and not reason.is_failure:
            self.outbox.ack(box_id)

    def _on_message(self, client: paho.Client, userdata: Any, msg: Any) -> None:
        self.on_message(msg.topic, bytes(msg.payload), msg.properties)

    def reply(self, topic: str, payload: bytes, correlation: bytes | None) -> bool:
        """Publish a reply (MQTT 5 request/response) outside the outbox: a reply nobody
        waits for any more is not worth keeping. False when not connected."""
        client = self._client_now
        if client is None or not self.connected.is_set():
            return False
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]  # paho
        if correlation is not None:
            props.CorrelationData = correlation
        info = client.publish(topic, payload, qos=1, properties=props)
        return bool(info.rc == paho.MQTT_ERR_SUCCESS)

    # -- outbox ---------------------------------------------------------------------------
    def _pump(self, client: paho.Client) -> None:
        room = MAX_IN_FLIGHT - len(self._mids)
        if room <= 0:
            return
        for m in self.outbox.pending(room):
            info = client.publish(m.topic, m.payload, qos=1, retain=m.retain)
            if info.rc != paho.MQTT_ERR_SUCCESS:
                self.outbox.requeue_in_flight()
                return
            self._mids[info.mid] = m.id


def wait_connected(link: MqttLink, timeout_s: float) -> bool:
    return link.connected.wait(timeout_s)
