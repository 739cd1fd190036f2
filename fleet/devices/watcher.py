"""`FleetWatcher`: a fleet's topics into its `FleetDB`, batched (see the class).

`retained state` is subscribed normally (the broker does not deliver retained messages to
shared subscriptions); the rollout controllers take telemetry, events and command results
on a shared subscription of their own (`CONTROLLER_GROUP`; the broker's guard lets no other
identity join it) so several, on several hosts, split the load, and every monitoring tool
subscribes without one (it sees every message and takes none from them).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

from agent.link.wire import PREFIX
from fleet._mqtt import BrokerAuth, close, connect_patiently
from fleet.devices.gate import Report, ReportGate
from fleet.devices.registry import FleetDB

log = logging.getLogger("edge_fleet.state")
#: The shared-subscription group of the rollout controllers (and only theirs).
CONTROLLER_GROUP = "edge-fleet-controllers"
#: Telemetry reaches the fleet's consumers at QoS 0: the broker forwards each message once
#: and no acknowledgement goes back (devices still publish it at QoS 1 from their outbox).
#: A message lost between broker and controller is replaced by the next within an
#: interval, and the broker keeps none for a controller that is away; states, events and
#: results stay at QoS 1.
TELEMETRY_QOS = 0


class FleetWatcher:
    """Subscribes to a fleet's topics and keeps a `FleetDB` up to date.

    `share_group`: the rollout controllers share telemetry, events and (`on_result`:
    handled as they arrive, on paho's thread) command results (`CONTROLLER_GROUP`); a
    monitoring tool (status, watch, dashboard) passes None and
    subscribes on its own, so it never takes a message from a controller or another tool.
    The client id is unique per instance; paho reconnects after a broker outage and the
    subscriptions are made again (retained states arrive again with them).

    Ingest is batched: paho's thread only queues what arrives (a bounded queue: when it
    is full paho waits, and the broker holds the QoS 1 messages); an ingest thread takes up
    to `BATCH_MAX` messages or what arrived within `BATCH_DELAY_S` of the first, verifies
    each (`fleet.devices.gate`), and stores the batch in one transaction (`FleetDB.apply`). The
    CPU seconds of each stage are in `cpu` (verify, parse, write)."""

    #: At most this many messages per transaction, collected for at most this long.
    BATCH_MAX = 1000
    BATCH_DELAY_S = 0.02
    #: Messages received and not yet stored, at most (then paho's thread waits).
    QUEUE_MAX = 20_000

    def __init__(self, db: FleetDB, broker_url: BrokerAuth | str, fleet: str, *,
                 share_group: str | None = None, client_id: str | None = None,
                 on_report: Callable[[Report], None] | None = None,
                 on_result: Callable[[Any], None] | None = None,
                 session_expiry_s: int | None = None, keepalive_s: int = 60,
                 connect_wait_s: float = 0.0) -> None:
        self.db, self.fleet = db, fleet
        self.ingested: Counter[str] = Counter()  # valid messages stored, per kind
        self.errors = 0  # messages whose handling raised (logged, counted, survived)
        self.stale = 0  # verified reports older than what was applied (`fleet.devices.ordering`)
        self.superseded = 0  # telemetry a later one of its device's in the batch replaced
        self.batches = 0
        self.gate = ReportGate(db, fleet)
        self._write_cpu_s = 0.0
        self.on_report, self.on_result = on_report, on_result
        self._queue: queue.Queue[tuple[str, bytes, float] | None] = queue.Queue(
            self.QUEUE_MAX)
        self._idle = threading.Condition()
        self._unstored = 0  # queued or in a batch being stored
        self._thread = threading.Thread(target=self._ingest, name="ingest", daemon=True)
        self._thread.start()
        base = f"{PREFIX}/{fleet}"
        share = f"$share/{share_group}/" if share_group else ""
        self._last_message = time.monotonic()
        topics: list[str | tuple[str, int]] = [
            f"{base}/+/state", (f"{share}{base}/+/telemetry", TELEMETRY_QOS),
            f"{share}{base}/+/event"]
        if on_result is not None:
            topics.append(f"{share}{base}/+/cmd/result")
        self.client, self.subscribed = connect_patiently(
            broker_url, client_id or f"edge-fleet-{uuid.uuid4().hex[:12]}",
            topics=topics, on_message=self._message, session_expiry_s=session_expiry_s,
            keepalive_s=keepalive_s, wait_s=connect_wait_s)

    @property
    def cpu(self) -> dict[str, float]:
        """CPU seconds by stage: verify, parse (the gate's), write (the batches)."""
        return {**self.gate.cpu, "write": self._write_cpu_s}

    def synced(self, *, quiet_s: float = 0.3, max_s: float = 5.0) -> bool:
        """Wait until the subscriptions are acknowledged and the retained states they
        bring have stopped arriving (nothing for `quiet_s`) and are stored, at most
        `max_s`."""
        end = time.monotonic() + max_s
        if not self.subscribed.wait(max_s):
            return False
        while time.monotonic() < end:
            if time.monotonic() - self._last_message >= quiet_s:
                return self.drained(end - time.monotonic())
            time.sleep(quiet_s / 3)
        return False

    def drained(self, timeout_s: float = 5.0) -> bool:
        """Wait until everything received so far is stored."""
        with self._idle:
            return self._idle.wait_for(lambda: self._unstored == 0, max(0.0, timeout_s))

    def _message(self, client: Any, userdata: Any, msg: Any) -> None:
        self._last_message = time.monotonic()
        if self.on_result is not None and msg.topic.endswith("/cmd/result"):
            self.on_result(msg)  # few, and each moves an execution: at once, in order
            return
        with self._idle:
            self._unstored += 1
        self._queue.put((msg.topic, bytes(msg.payload), time.time()))

    def _ingest(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            end = time.monotonic() + self.BATCH_DELAY_S
            while len(batch) < self.BATCH_MAX:
                try:
                    item = self._queue.get(timeout=max(0.0, end - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)  # stop after this batch
                    break
                batch.append(item)
            try:
                self._store(batch)
            except Exception:  # the ingest thread must outlive any batch
                self._crashed(f"a batch of {len(batch)}")
            finally:
                with self._idle:
                    self._unstored -= len(batch)
                    self._idle.notify_all()

    def _open(self, topic: str, payload: bytes) -> Report | None:
        try:
            return self.gate.open(topic, payload)
        except Exception:  # one bad message must never stop ingest
            self._crashed(topic)
            return None

    def _verified(self, batch: list[tuple[str, bytes, float]]) -> list[tuple[Report, float]]:
        """The batch's reports that pass the gate, with when each arrived.

        Telemetry is folded into one row per device (`FleetDB.apply`), so of a device's
        telemetry in one batch only the last to arrive is verified (the broker keeps one
        publisher's order on a topic); the ones before it are `superseded`, never opened,
        unless it fails its checks (then the one before it is tried, and so on). A backlog
        of N reports per device costs one verification per device and batch, not N."""
        earlier: dict[str, list[int]] = {}  # topic -> its telemetry before the last
        last: dict[str, int] = {}
        for i, (topic, _, _) in enumerate(batch):
            if topic.endswith("/telemetry"):
                if topic in last:
                    earlier.setdefault(topic, []).append(last[topic])
                last[topic] = i
        skip = {i for older in earlier.values() for i in older}
        reports = []
        for i, (topic, payload, received) in enumerate(batch):
            if i in skip:
                continue
            report, at = self._open(topic, payload), received
            older = earlier.get(topic, [])
            while report is None and older:  # it failed its checks: the one before it
                j = older.pop()
                report, at = self._open(topic, batch[j][1]), batch[j][2]
            self.superseded += len(older)
            if report is not None:
                reports.append((report, at))
        return reports

    def _store(self, batch: list[tuple[str, bytes, float]]) -> None:
        """Verify, then store the batch in one transaction; a batch that fails to store
        is stored again message by message, so one bad message costs only itself."""
        reports = self._verified(batch)
        t0 = time.thread_time()
        try:
            applied = self.db.apply(reports)
        except Exception:
            applied = []
            for one in reports:
                try:
                    applied += self.db.apply([one])
                except Exception:
                    self._crashed(f"{PREFIX}/{self.fleet}/{one[0].device}/{one[0].kind}")
        self._write_cpu_s += time.thread_time() - t0
        self.batches += 1
        self.stale += len(reports) - len(applied)
        for report in applied:
            self.ingested[report.kind] += 1
            if self.on_report is not None:
                try:
                    self.on_report(report)
                except Exception:
                    self._crashed(f"{PREFIX}/{self.fleet}/{report.device}/{report.kind}")

    def _crashed(self, topic: str) -> None:
        self.errors += 1
        with contextlib.suppress(Exception):
            self.db.bump("ingest_errors")
        log.exception("ingest.crashed topic=%.200s", topic)

    def start(self) -> FleetWatcher:
        """(The client runs from construction; kept so call sites read as they act.)"""
        return self

    def stop(self) -> None:
        """Disconnect (ending a kept session: the group's messages go to the controllers
        still there), then store what was received before returning."""
        close(self.client, end_session=True)
        self.drained(10.0)
        self._queue.put(None)
        self._thread.join(10.0)
