"""What the operator publishes to every device, retained on fleet-wide topics:

* the newest root (`edge-fleet root publish`): a `RootAnnouncement` on
  `edge/v1/{fleet}/root`, and the chain `roots/N.root.json` copied where the artifact
  server serves it, so a device that missed versions fetches them;
* the heartbeat (`edge-fleet heartbeat`, and the rollout controller while it runs): a
  command-signed counter with an expiry on `edge/v1/{fleet}/heartbeat`
  (`agent.trust.heartbeat`), so a device can tell when the fleet's messages are withheld.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho

from agent.link.trustfeed import announcement
from agent.link.wire import fleet_topic
from agent.trust.heartbeat import Heartbeat
from fleet._mqtt import BrokerAuth, close, connect
from fleet.errors import FleetError
from fleet.trust.keys import KeyDir, SigningKey, sign_envelope

#: How long a heartbeat stays valid, and how often the controller sends one.
HEARTBEAT_TTL = timedelta(minutes=10)
HEARTBEAT_EVERY_S = 120.0


def copy_roots(kd: KeyDir, artifacts: Path) -> int:
    """Copy `roots/N.root.json` into `artifacts/roots/` (served by `serve-artifacts`)."""
    dest = artifacts / "roots"
    dest.mkdir(parents=True, exist_ok=True)
    n = 0
    for f in sorted((kd.path / "roots").glob("*.root.json")):
        shutil.copyfile(f, dest / f.name)
        n += 1
    return n


def heartbeat(fleet: str, keys: Iterable[SigningKey], *, ttl: timedelta = HEARTBEAT_TTL,
              now: datetime | None = None) -> bytes:
    """A signed heartbeat; its counter is the issue time in milliseconds, so it grows
    without any state kept between runs (on one fleet host with a sane clock)."""
    issued = now or datetime.now(UTC)
    hb = Heartbeat(fleet=fleet, counter=int(issued.timestamp() * 1000), issued_at=issued,
                   expires=issued + ttl)
    return sign_envelope(hb.model_dump(mode="json", by_alias=True), keys)


def publish_retained(broker: BrokerAuth | str, topic: str, payload: bytes, *,
                     timeout_s: float = 10.0) -> None:
    """Publish one retained QoS 1 message and wait for the broker's acknowledgement, which
    must say it was taken: an MQTT 5 broker acknowledges a publish its ACL refuses too,
    with a reason code ("Not authorized"), and the message goes nowhere.

    Raises:
        FleetError: cannot connect (see `fleet._mqtt.connect`), no acknowledgement within
            `timeout_s`, or the broker refused the message (naming its reason).
    """
    acks: dict[int, Any] = {}
    acked = threading.Condition()

    def on_publish(c: Any, u: Any, mid: int, reason: Any, p: Any) -> None:
        with acked:
            acks[mid] = reason
            acked.notify_all()

    client, _ = connect(broker, f"edge-fleet-publish-{time.time_ns()}", topics=[],
                        on_message=lambda *a: None)
    client.on_publish = on_publish
    try:
        info = client.publish(topic, payload, qos=1, retain=True)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise FleetError(f"{topic}: not sent ({paho.error_string(info.rc)})")
        with acked:
            if not acked.wait_for(lambda: info.mid in acks, timeout_s):
                raise FleetError(f"{topic}: the broker did not acknowledge it within "
                                 f"{timeout_s:g} s; it may not have been published")
        reason = acks[info.mid]
        if getattr(reason, "is_failure", False):
            raise FleetError(f"{topic}: the broker refused it ({reason}); the fleet-controller "
                             "certificate may publish here, fleet-monitor may not")
    finally:
        close(client)


def publish_root(broker: BrokerAuth | str, kd: KeyDir, chain_urls: list[str]) -> int:
    """Announce the key directory's current root; returns its version."""
    root = kd.root()
    urls = [u.rstrip("/") + "/roots/" for u in chain_urls]
    publish_retained(broker, fleet_topic(root.fleet, "root"),
                     announcement(kd.root_file.read_bytes(), urls))
    return root.version
