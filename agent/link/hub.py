"""Many MQTT links on one thread: the fleet simulator's devices, thousands per process.

A device runs its `MqttLink` on a thread of its own (`agent.link.mqtt`). Ten thousand
simulated devices cannot: a thread per device, each waking every poll interval to pump
its outbox, topped out below 3,000 devices on this project's 2-core machine. A `LinkHub`
drives many links with paho's external-loop API instead (`socket()`, `loop_read()`,
`loop_write()`, `want_write()`, `loop_misc()`), over one `selectors` (epoll) loop:

* nothing polls: a socket is watched for reading always and for writing only while paho
  has bytes queued; an outbox tells its link when a message is stored
  (`Outbox.on_enqueue`) and the hub pumps that link's outbox on its next turn;
* connecting blocks (TCP, the TLS handshake with the device's certificate, CONNECT), so
  it runs on a few connector threads and hands the connected client to the hub thread,
  which alone touches a client from then on; a failed attempt is retried after the
  link's own backoff (a timer on the hub, no thread waits);
* keepalive: every `misc_s` each connected client's `loop_misc()` (pings, and a broker
  that stopped answering is a lost connection);
* a TLS record may leave decrypted bytes inside the SSL object that epoll cannot see:
  after a read the hub reads again while `pending()` says there are some.

paho's asyncio-style alternative would mean another client library for the simulator
than the one the agent runs; this keeps the agent's own `MqttLink` (birth, Last Will,
session, outbox, backoff) and only replaces who turns its wheel.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import selectors
import socket
import ssl
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import paho.mqtt.client as paho

from agent.link.mqtt import Broker, backoff_delay

if TYPE_CHECKING:
    from agent.link.mqtt import MqttLink

log = logging.getLogger("edge_agent.hub")


@dataclass(eq=False)
class _Conn:
    """What the hub knows of one link."""

    link: MqttLink
    attempt: int = 0
    client: paho.Client | None = None
    broker: Broker | None = None
    before: int = 0  # the link's connects when this connection began
    fd: int = -1  # the socket's descriptor while the selector watches it
    mask: int = 0  # the events the selector watches for
    dialing: bool = False  # a connector thread has it
    stopping: bool = False
    timer: int = 0  # the generation of the reconnect timer that counts


class LinkHub:
    """Drives `MqttLink`s made with `hub=` this hub (`start`/`stop` go through it)."""

    def __init__(self, *, connectors: int = 4, misc_s: float = 1.0,
                 name: str = "mqtt-hub") -> None:
        self.misc_s = misc_s
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._todo: deque[tuple[str, MqttLink, object]] = deque()  # starts, stops, dials
        self._kicked: set[MqttLink] = set()  # at most one entry per link
        self._woken = False
        self._conns: dict[MqttLink, _Conn] = {}
        self._timers: list[tuple[float, int, int, _Conn]] = []  # (when, n, generation, conn)
        self._n = 0
        self._closed = False
        self._connectors = ThreadPoolExecutor(connectors, thread_name_prefix=f"{name}-dial")
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # -- any thread -----------------------------------------------------------------------
    def start(self, link: MqttLink) -> None:
        self._post("start", link)

    def stop(self, link: MqttLink) -> None:
        self._post("stop", link)

    def kick(self, link: MqttLink) -> None:
        """`link`'s outbox has something new: pump it on the hub's next turn (a link
        told many times before that turn is pumped once)."""
        with self._lock:
            if link in self._kicked:
                return
            self._kicked.add(link)
        self._wake()

    def running(self, link: MqttLink) -> bool:
        c = self._conns.get(link)
        return c is not None and not c.stopping

    def _post(self, what: str, link: MqttLink, arg: object = None) -> None:
        with self._lock:
            self._todo.append((what, link, arg))
        self._wake()

    def _wake(self) -> None:
        with self._lock:
            if self._woken:
                return
            self._woken = True
        with contextlib.suppress(BlockingIOError):  # full of wake-ups already
            self._wake_w.send(b"\0")

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the hub (links still running are dropped without a goodbye)."""
        self._closed = True
        self._wake()
        self._thread.join(timeout_s)
        self._connectors.shutdown(wait=False, cancel_futures=True)

    # -- the hub thread -------------------------------------------------------------------
    def _run(self) -> None:
        next_misc = time.monotonic() + self.misc_s
        while not self._closed:
            now = time.monotonic()
            wait = next_misc - now
            if self._timers:
                wait = min(wait, self._timers[0][0] - now)
            for key, mask in self._sel.select(max(0.0, wait)):
                if key.data is None:
                    continue  # the wake-up socket: the queue is read below
                try:
                    self._ready(key.data, mask)
                except Exception:  # one device's bad turn must not stop the others
                    log.exception("hub.turn_failed %s", key.data.link.client_id)
            self._drain()
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now:
                _, _, generation, conn = heapq.heappop(self._timers)
                if generation == conn.timer and self._conns.get(conn.link) is conn:
                    self._dial(conn)
            if now >= next_misc:
                next_misc = now + self.misc_s
                self._misc()
        for conn in list(self._conns.values()):
            if conn.client is not None and (sock := conn.client.socket()) is not None:
                sock.close()  # dropped: the broker publishes its Will
            self._forget(conn)
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    def _drain(self) -> None:
        with self._lock:
            todo, self._todo = self._todo, deque()
            kicked, self._kicked = self._kicked, set()
            self._woken = False
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass
        for what, link, arg in todo:
            try:
                self._handle(what, link, arg)
            except Exception:
                log.exception("hub.%s_failed", what)
        for link in kicked:
            conn = self._conns.get(link)
            if conn is not None and conn.client is not None:
                try:
                    self._turn(conn)
                except Exception:
                    log.exception("hub.pump_failed %s", link.client_id)

    def _handle(self, what: str, link: MqttLink, arg: object) -> None:
        conn = self._conns.get(link)
        if what == "start":
            if conn is not None and not conn.stopping:
                return  # a running link ignores start
            if conn is not None:  # stopping: let it go first
                self._forget(conn)
            conn = self._conns[link] = _Conn(link)
            self._dial(conn)
        elif what == "stop" and conn is not None:
            conn.stopping = True
            if not conn.dialing:  # else the connector's "dialed" finishes it
                self._goodbye(conn)
        elif what == "dialed":
            dialer, client = cast(tuple[_Conn, "paho.Client | None"], arg)
            if dialer is conn:
                self._dialed(conn, client)
            elif isinstance(client, paho.Client) and (sock := client.socket()) is not None:
                sock.close()  # a stop and a start overtook it: its Will is an old one

    def _dial(self, conn: _Conn) -> None:
        link = conn.link
        conn.broker = broker = link.brokers[conn.attempt % len(link.brokers)]
        conn.before = link.connects
        conn.dialing = True

        def dial() -> None:
            client = link._client(broker)
            try:
                link._connect(client, broker)
            except (OSError, ssl.SSLError, ValueError) as exc:
                link._failed(broker, exc)
                self._post("dialed", link, (conn, None))
                return
            self._post("dialed", link, (conn, client))

        self._connectors.submit(dial)

    def _dialed(self, conn: _Conn, client: object) -> None:
        conn.dialing = False
        if not isinstance(client, paho.Client):
            if conn.stopping:
                self._forget(conn)
            else:
                self._retry(conn)
            return
        conn.client = client
        sock = client.socket()
        if sock is None:
            self._lost(conn)
            return
        conn.mask = selectors.EVENT_READ
        conn.fd = sock.fileno()
        self._sel.register(conn.fd, conn.mask, conn)
        if conn.stopping:
            self._goodbye(conn)
            return
        self._turn(conn)

    def _ready(self, conn: _Conn, mask: int) -> None:
        client = conn.client
        if client is None:
            return
        rc = paho.MQTT_ERR_SUCCESS
        if mask & selectors.EVENT_READ:
            rc = client.loop_read()
            while rc == paho.MQTT_ERR_SUCCESS and isinstance(s := client.socket(),
                                                            ssl.SSLSocket) and s.pending():
                rc = client.loop_read()
        if rc == paho.MQTT_ERR_SUCCESS and mask & selectors.EVENT_WRITE:
            rc = client.loop_write()
        if rc != paho.MQTT_ERR_SUCCESS or client.socket() is None:
            self._lost(conn)
            return
        self._turn(conn)

    def _turn(self, conn: _Conn) -> None:
        """Pump the outbox when connected, then watch for writing while paho has bytes."""
        client = conn.client
        if client is None or conn.stopping:
            return
        if conn.link.connected.is_set():
            conn.link._pump(client)
        sock = client.socket()
        if sock is None:
            self._lost(conn)
            return
        mask = selectors.EVENT_READ | (selectors.EVENT_WRITE if client.want_write() else 0)
        if mask != conn.mask:
            conn.mask = mask
            self._sel.modify(conn.fd, mask, conn)

    def _misc(self) -> None:
        for conn in list(self._conns.values()):
            client = conn.client
            if client is None or conn.stopping:
                continue
            try:
                if client.loop_misc() != paho.MQTT_ERR_SUCCESS or client.socket() is None:
                    self._lost(conn)
                else:
                    self._turn(conn)
            except Exception:
                log.exception("hub.misc_failed %s", conn.link.client_id)

    def _unwatch(self, conn: _Conn) -> None:
        conn.client = None
        fd, conn.fd = conn.fd, -1
        if fd >= 0:  # by number: paho may have closed the socket already
            self._sel.unregister(fd)

    def _lost(self, conn: _Conn) -> None:
        """The connection ended without a stop: reconnect after the backoff."""
        self._unwatch(conn)
        link = conn.link
        link._disconnected()
        if conn.broker is not None:
            link._ended(conn.broker, conn.before)
        self._retry(conn)

    def _retry(self, conn: _Conn) -> None:
        link = conn.link
        conn.attempt = link._next_attempt(conn.attempt, conn.before)
        conn.timer += 1
        self._n += 1
        heapq.heappush(self._timers, (time.monotonic() + backoff_delay(
            conn.attempt, link.backoff, link._rng), self._n, conn.timer, conn))

    def _goodbye(self, conn: _Conn) -> None:
        client = conn.client
        if client is not None:
            sock = client.socket()
            self._unwatch(conn)
            if isinstance(sock, socket.socket):  # ssl.SSLSocket is one too
                sock.settimeout(1.0)  # blocking: the last two packets go out whole
                conn.link._goodbye(client, flush_s=0)
        self._forget(conn)

    def _forget(self, conn: _Conn) -> None:
        self._unwatch(conn)
        conn.timer += 1
        conn.link._disconnected()
        if self._conns.get(conn.link) is conn:
            del self._conns[conn.link]
        conn.link._stopped.set()
