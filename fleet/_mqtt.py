"""The fleet tools' MQTT 5 client: one way to connect, subscribe on every (re)connect and
hand messages to a callback, shared by the watcher, recovery and the rollout controller."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.link.mqtt import Broker


def connect(broker_url: str, client_id: str, *, topics: list[str],
            on_message: Callable[[Any, Any, Any], None],
            session_expiry_s: int | None = None) -> tuple[paho.Client, threading.Event]:
    """A connected client (network loop not started) that subscribes to `topics` at QoS 1
    on each connect, and an event set once the broker acknowledged the subscriptions.

    Args:
        session_expiry_s: keep the session (and messages queued for it) this long while
            disconnected, so a restarted tool receives what arrived meanwhile.
    """
    b = Broker.parse(broker_url)
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=paho.MQTTv5)
    subscribed = threading.Event()
    client.on_connect = lambda c, u, f, r, p: c.subscribe([(t, 1) for t in topics])
    client.on_subscribe = lambda *a: subscribed.set()
    client.on_message = on_message
    if session_expiry_s is None:
        client.connect(b.host, b.port)
    else:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho
        props.SessionExpiryInterval = session_expiry_s
        client.connect(b.host, b.port, clean_start=False, properties=props)
    return client, subscribed
