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
import time
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from agent.link.trustfeed import announcement
from agent.link.wire import fleet_topic
from agent.trust.heartbeat import Heartbeat
from fleet._mqtt import BrokerAuth, connect
from fleet.keys import KeyDir, SigningKey, sign_envelope

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


def publish_retained(broker: BrokerAuth | str, topic: str, payload: bytes) -> None:
    """Publish one retained QoS 1 message and wait for the broker's acknowledgement.

    Raises:
        FleetError: cannot connect (see `fleet._mqtt.connect`).
    """
    client, _ = connect(broker, f"edge-fleet-publish-{time.time_ns()}", topics=[],
                        on_message=lambda *a: None)
    try:
        client.publish(topic, payload, qos=1, retain=True).wait_for_publish(10)
    finally:
        client.loop_stop()
        client.disconnect()


def publish_root(broker: BrokerAuth | str, kd: KeyDir, chain_urls: list[str]) -> int:
    """Announce the key directory's current root; returns its version."""
    root = kd.root()
    urls = [u.rstrip("/") + "/roots/" for u in chain_urls]
    publish_retained(broker, fleet_topic(root.fleet, "root"),
                     announcement(kd.root_file.read_bytes(), urls))
    return root.version
