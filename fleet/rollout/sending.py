"""Commands of a rollout on their way to devices: signed and recorded *to send* first
(`Rollouts.record_command`), published at QoS 1 with the command's expiry, and marked
*sent* only when the broker acknowledged them. A controller killed between any two of
these steps publishes again what was never acknowledged (the device's nonce store refuses
a second copy; that refusal is recognised and ignored).

Each controller instance publishes on a client of its own (`edge-fleet-ctl-<instance>-send`:
two controllers never take a session from each other); results come back on the
controllers' shared subscription (`fleet.devices.watcher`), to whichever controller the
broker picks."""

from __future__ import annotations

import contextlib
import time
from datetime import timedelta
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.link.wire import device_topic
from fleet._mqtt import BrokerAuth, close, connect_patiently
from fleet.rollout.lease import LEASE_S, session_s
from fleet.rollout.policy import Exec
from fleet.rollout.record import Rollouts
from fleet.rollout.rows import RolloutDevice
from fleet.trust.commands import build_command, sign_command
from fleet.trust.keys import SigningKey

#: A command handed to paho and not acknowledged for this long is published again (a
#: copy that arrives twice is refused by the device as a replay, and that is ignored).
UNACKED_S = 60.0


class Sender:
    """The MQTT side of one controller: the leases of the rollouts it drives, its
    publishing client, and the commands handed to paho and not yet acknowledged."""

    def __init__(self, rollouts: Rollouts, broker: BrokerAuth | str, fleet: str,
                 keys: list[SigningKey], *, owner: str, instance: str,
                 connect_wait_s: float, lease_s: float = LEASE_S) -> None:
        self.rollouts, self.broker, self.fleet, self.keys = rollouts, broker, fleet, keys
        self.lease_s, self.owner, self.instance = lease_s, owner, instance
        self.connect_wait_s = connect_wait_s
        self._client: paho.Client | None = None
        # command id -> (rollout, paho's message info, when handed): not acknowledged
        self._publishing: dict[str, tuple[str, paho.MQTTMessageInfo, float]] = {}

    def close(self) -> None:
        for rid in list(self.rollouts.leases.held):
            self.release(rid)
        if self._client is not None:
            close(self._client, end_session=True)
            self._client = None

    def release(self, rid: str) -> None:
        """Give up rollout `rid`'s lease (it ended, or this controller stops)."""
        self.rollouts.leases.release(rid, self.owner)
        for cmd_id, (r, _, _) in list(self._publishing.items()):
            if r == rid:
                del self._publishing[cmd_id]

    @property
    def client(self) -> paho.Client:
        """This controller's publishing client, connected at first use (an outage then is
        paho's to wait out)."""
        if self._client is None:
            self._client, _ = connect_patiently(
                self.broker, f"edge-fleet-ctl-{self.instance}-send", topics=[],
                on_message=lambda *a: None, session_expiry_s=session_s(self.lease_s),
                max_inflight=1000, wait_s=self.connect_wait_s)
        return self._client

    def session(self, rid: str) -> paho.Client:
        """The publishing client, once this controller holds rollout `rid`'s lease (taken
        or renewed here: `LeaseHeld` while another controller's runs)."""
        self.rollouts.leases.acquire(rid, self.owner, self.lease_s)
        return self.client

    def collect_acks(self, rid: str) -> None:
        """Commands the broker acknowledged since the last step: marked sent, and their
        executions moved from to_send to sent. (paho keeps what was in flight across a
        reconnect and sends it again itself.)"""
        now = time.monotonic()
        acked = []
        for cmd_id, (r, info, handed) in list(self._publishing.items()):
            if r != rid:
                continue
            if not info.is_published():
                if now - handed > UNACKED_S:  # paho lost it (a reconnect): publish again
                    del self._publishing[cmd_id]
                continue
            acked.append(cmd_id)
        if acked:
            with self.rollouts.batch(rid):
                for cmd_id in acked:
                    self._acked(rid, cmd_id)

    def _acked(self, rid: str, cmd_id: str) -> None:
        del self._publishing[cmd_id]
        self.rollouts.mark_sent(rid, cmd_id)
        sent = self.rollouts.command(cmd_id)
        if sent is None or sent[2] != "deploy":
            return
        d = self.rollouts.device(rid, sent[1])
        if d is None or d.command_id != cmd_id:
            return
        if d.status is Exec.TO_SEND:
            self.rollouts.transition(rid, sent[1], "acked", "the broker acknowledged "
                                     f"deploy {cmd_id[:8]}", sent_at=time.time())
        elif d.sent_at is None:  # the device answered before the ack was collected
            self.rollouts.set_device(rid, sent[1], sent_at=time.time())

    def record(self, rid: str, kind: str, devices: list[RolloutDevice], ttl_s: float,
               **fields: Any) -> None:
        """Signed commands recorded *to send* (with the execution's transition for a
        deploy); `flush` publishes them. One transaction for them all."""
        with self.rollouts.batch(rid):
            for d in devices:
                self._record_one(rid, kind, d, ttl_s, **fields)

    def _record_one(self, rid: str, kind: str, d: RolloutDevice, ttl_s: float,
                    **fields: Any) -> None:
        cmd = build_command(kind, fleet=self.fleet, device=d.device,
                            ttl=timedelta(seconds=ttl_s), **fields)
        raw = sign_command(cmd, self.keys)
        expires = cmd.expires.timestamp()
        if kind == "deploy":
            self.rollouts.record_command(rid, d.device, kind, cmd.id, d.attempts + 1,
                                         expires, raw)
            self.rollouts.transition(rid, d.device, "send", f"deploy {cmd.id[:8]}, "
                                     f"attempt {d.attempts + 1}", command_id=cmd.id,
                                     attempts=d.attempts + 1, retry_at=None,
                                     sent_at=None)
        else:
            self.rollouts.record_command(rid, d.device, kind, cmd.id, 1, expires, raw)
            self.rollouts.set_device(rid, d.device, rollback_id=cmd.id,
                                     rollback_result=None)

    def flush(self, rid: str, *, deploys: bool) -> int:
        """Publish what is recorded and not acknowledged (QoS 1, expiring with the command)
        while connected; returns how many were handed to the broker. (The lease is not
        renewed here: what is published was recorded under it, and a copy that arrives
        twice is refused by the device.)"""
        client = self.client
        if not client.is_connected():
            return 0
        n, now = 0, time.time()
        for cmd_id, device, kind, expires, payload in self.rollouts.unsent(rid):
            if cmd_id in self._publishing or (kind == "deploy" and not deploys):
                continue
            if expires <= now + 1:
                self.rollouts.drop_unsent(rid, cmd_id)
                if kind == "deploy":
                    self.rollouts.transition(rid, device, "unsent_expired",
                                             f"command {cmd_id[:8]} expired unsent")
                continue
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]  # paho
            props.MessageExpiryInterval = int(expires - now)
            info = client.publish(device_topic(self.fleet, device, "cmd"), payload, qos=1,
                                  properties=props)
            if info.rc != paho.MQTT_ERR_SUCCESS:
                break  # disconnected meanwhile: the next step tries again
            self._publishing[cmd_id] = (rid, info, time.monotonic())
            n += 1
        deadline = time.monotonic() + 2.0  # most acks come at once: record them now
        for r, info, _ in list(self._publishing.values()):
            if r == rid and (left := deadline - time.monotonic()) > 0:
                with contextlib.suppress(RuntimeError, ValueError):  # disconnected: later
                    info.wait_for_publish(left)
        self.collect_acks(rid)
        return n
