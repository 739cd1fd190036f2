"""The fleet tools' MQTT 5 client: one way to connect (TLS, client certificates,
username and password), subscribe on every (re)connect and hand messages to a callback,
shared by the watcher, recovery, the rollout controller and the publishers.

`connect` returns only once the broker accepted the connection, or raises `FleetError`
with one line saying why: an `mqtts://` URL is never tried in plain text, and a refused
certificate or password is an error, never an empty fleet.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.errors import ConfigError
from agent.link.mqtt import Broker, TlsFiles, authenticate
from fleet.errors import FleetError

log = logging.getLogger("edge_fleet.mqtt")
#: The environment variable names of each connection option (flags win).
ENV = {"broker": "EDGE_FLEET_BROKER", "ca_file": "EDGE_FLEET_CA_FILE",
       "cert_file": "EDGE_FLEET_CERT_FILE", "key_file": "EDGE_FLEET_KEY_FILE",
       "username": "EDGE_FLEET_USERNAME", "password": "EDGE_FLEET_MQTT_PASSWORD"}


@dataclass(frozen=True, kw_only=True)
class BrokerAuth:
    """Where the broker is and who we are to it."""

    url: str
    ca_file: Path | None = None  # None with mqtts://: the system's CA certificates
    cert_file: Path | None = None  # client certificate (mutual TLS)
    key_file: Path | None = None
    username: str | None = None
    password: str | None = None

    @classmethod
    def of(cls, broker: BrokerAuth | str) -> BrokerAuth:
        return broker if isinstance(broker, BrokerAuth) else cls(url=broker)

    @classmethod
    def from_options(cls, *, broker: str | None, ca_file: Path | None, cert_file: Path | None,
                     key_file: Path | None, username: str | None,
                     environ: dict[str, str] | None = None) -> BrokerAuth:
        """From command-line options, each falling back to its environment variable; the
        password only ever comes from the environment (`EDGE_FLEET_MQTT_PASSWORD`).

        Raises:
            FleetError: no broker, or certificate options with a plain `mqtt://` URL.
        """
        env = dict(os.environ) if environ is None else environ

        def path(value: Path | None, name: str) -> Path | None:
            text = env.get(ENV[name])
            return value or (Path(text) if text else None)
        url = broker or env.get(ENV["broker"])
        if not url:
            raise FleetError(f"no broker: give --broker or set {ENV['broker']}")
        auth = cls(url=url, ca_file=path(ca_file, "ca_file"),
                   cert_file=path(cert_file, "cert_file"), key_file=path(key_file, "key_file"),
                   username=username or env.get(ENV["username"]) or None,
                   password=env.get(ENV["password"]) or None)
        tls_files = [auth.ca_file, auth.cert_file, auth.key_file]
        if not url.startswith("mqtts://") and any(tls_files):
            raise FleetError(f"{url}: certificate options need an mqtts:// broker URL")
        if (auth.cert_file is None) != (auth.key_file is None):
            raise FleetError("a client certificate needs both --cert-file and --key-file")
        for f in filter(None, tls_files):
            if not f.is_file():
                raise FleetError(f"{f}: no such file")
        return auth


def close(client: paho.Client, *, end_session: bool = False) -> None:
    """Disconnect, then stop the network loop: in that order, because `loop_stop` alone
    waits out the loop's 1-s select (every tool took a second longer to exit).

    `end_session`: a session kept past a disconnect (`session_expiry_s`) ends now, so a
    shared subscription's broker stops handing messages to a client that left."""
    props = None
    if end_session:
        props = Properties(PacketTypes.DISCONNECT)  # type: ignore[no-untyped-call]  # paho
        props.SessionExpiryInterval = 0
    client.disconnect(properties=props)
    client.loop_stop()


def connect(broker: BrokerAuth | str, client_id: str, *, topics: Sequence[str | tuple[str, int]],
            on_message: Callable[[Any, Any, Any], None],
            session_expiry_s: int | None = None, timeout_s: float = 10.0,
            max_inflight: int = 20, keepalive_s: int = 60) -> tuple[paho.Client, threading.Event]:
    """A client whose network loop runs and whom the broker accepted; it subscribes to
    `topics` on each connect (at QoS 1, or a `(topic, qos)` pair's own). Also returns an
    event set once the broker acknowledged the subscriptions.

    Args:
        session_expiry_s: keep the session (and messages queued for it) this long while
            disconnected, so a restarted tool receives what arrived meanwhile.
        max_inflight: QoS 1 messages published and not yet acknowledged (paho's 20 by
            default; a bulk publisher wants more).
        keepalive_s: the MQTT keepalive; the broker drops a client it heard nothing from
            for 1.5 times this (a dead host's session, and its share of a shared
            subscription, last that long before its expiry starts).

    Raises:
        FleetError: the broker cannot be reached, the TLS handshake fails, or it refuses
            the client (one line naming the broker and why).
    """
    auth = BrokerAuth.of(broker)
    try:
        b = Broker.parse(auth.url)
    except ConfigError as exc:
        raise FleetError(str(exc)) from exc
    where = auth.url
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=paho.MQTTv5)
    try:
        authenticate(client, b, TlsFiles(ca_file=auth.ca_file, cert_file=auth.cert_file,
                                         key_file=auth.key_file),
                     auth.username, auth.password)
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise FleetError(f"{where}: TLS files unusable: {exc}") from exc
    subscribed, answered = threading.Event(), threading.Event()
    outcome: list[str] = []

    def on_connect(c: Any, u: Any, f: Any, reason: Any, p: Any) -> None:
        outcome.append(f"refused: {reason}" if reason.is_failure else "ok")
        answered.set()
        if topics and not reason.is_failure:
            c.subscribe([t if isinstance(t, tuple) else (t, 1) for t in topics])

    def on_disconnect(c: Any, u: Any, f: Any, reason: Any, p: Any) -> None:
        if not answered.is_set():
            outcome.append(f"closed before the broker accepted the connection ({reason}): "
                           "client certificate or credentials refused?")
            answered.set()
    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    client.on_subscribe = lambda *a: subscribed.set()
    client.on_message = on_message
    client.max_inflight_messages_set(max_inflight)
    props = None
    if session_expiry_s is not None:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho
        props.SessionExpiryInterval = session_expiry_s
    try:
        client.connect(b.host, b.port, keepalive=keepalive_s,
                       clean_start=session_expiry_s is None, properties=props)
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise FleetError(f"cannot connect to {where}: {exc}") from exc
    client.reconnect_delay_set(min_delay=1, max_delay=10)  # after an outage: soon, capped
    client.loop_start()
    if not answered.wait(timeout_s) or outcome[:1] != ["ok"]:
        close(client)
        why = outcome[0] if outcome else f"no answer within {timeout_s:g} s"
        raise FleetError(f"cannot connect to {where}: {why}")
    return client, subscribed


def connect_patiently(broker: BrokerAuth | str, client_id: str, *, wait_s: float,
                      **kw: Any) -> tuple[paho.Client, threading.Event]:
    """`connect`, tried again with a capped backoff for up to `wait_s` while the broker
    cannot be reached (a controller started during a broker outage waits it out; a
    refused certificate or password is not retried).

    Raises:
        FleetError: as `connect`, once `wait_s` has passed.
    """
    end = time.monotonic() + wait_s
    delay = 0.5
    while True:
        try:
            return connect(broker, client_id, **kw)
        except FleetError as exc:
            said_no = any(m in str(exc) for m in (": refused: ", "closed before the broker",
                                                  "TLS files unusable"))
            if said_no or time.monotonic() + delay > end:
                raise
            log.warning("fleet.connect_retry %s (again in %.1f s)", exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
