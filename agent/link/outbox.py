"""The persistent outbox: telemetry and events wait here until the broker acknowledges them.

SQLite (WAL, `synchronous=FULL`): a message enqueued survives an agent restart or a power
cut; the MQTT link takes messages in order, publishes at QoS 1 and deletes each one only
when its PUBACK arrives (`ack`). Each message stream ("telemetry", "event") has its own
sequence number, persisted, so a dashboard can tell a gap from a duplicate.

Every report also takes the device's *report order* (`Order`): one sequence for all
streams (state, telemetry, event, result, and the birth and Last Will the link publishes
outside the outbox, `reserve`), persisted in the same synced transaction as the message,
under an epoch fixed when this file's sequence began (microseconds since the Unix epoch).
The fleet believes a report only when it is newer in this order than what it applied
last, so late, duplicated and replayed messages change nothing; a device whose state was
wiped starts a new, later epoch and is recognised as reset, not believed backwards.

`MemoryOutbox` has the same contract without the durability, for the fleet simulator (ten
thousand devices in one machine: an SQLite outbox in use holds ~80 KiB of memory, a
memory one ~1 KiB, and a simulated device keeps nothing across runs anyway); the tests
of the contract run against both. Both call `on_enqueue` (when set) after a message is
stored, so a link waiting on its socket can be told there is something to send.

The outbox is bounded (`cap` messages). When full, the oldest telemetry goes first, then
the oldest event; every drop is counted per stream, persisted, and handed to the link with
`take_dropped()` so it can report the loss once it is connected again.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent.durable import open_sqlite

STREAMS = ("telemetry", "event", "result", "state")


@dataclass(frozen=True, order=True)
class Order:
    """Where a report stands among everything its device signed: (epoch, seq)."""

    epoch: int
    seq: int


@dataclass(frozen=True)
class Message:
    id: int
    stream: str
    seq: int
    topic: str
    payload: bytes
    retain: bool


class Outbox:
    def __init__(self, path: Path | str, *, cap: int = 10_000) -> None:
        if cap < 1:
            raise ValueError("cap must be at least 1")
        self.cap = cap
        self.dropped_total = 0  # since this process started (the metric; reports use
        # the per-stream counters, kept across restarts until reported)
        self._lock = threading.Lock()
        self._db = open_sqlite(path)
        for sql in ("CREATE TABLE IF NOT EXISTS outbox (id INTEGER PRIMARY KEY AUTOINCREMENT,"
                    " stream TEXT NOT NULL, seq INTEGER NOT NULL, topic TEXT NOT NULL,"
                    " payload BLOB NOT NULL, retain INTEGER NOT NULL)",
                    "CREATE TABLE IF NOT EXISTS counters (stream TEXT PRIMARY KEY,"
                    " next_seq INTEGER NOT NULL DEFAULT 1, dropped INTEGER NOT NULL DEFAULT 0)",
                    "CREATE TABLE IF NOT EXISTS report_order (one INTEGER PRIMARY KEY CHECK"
                    " (one = 1), epoch INTEGER NOT NULL, next_seq INTEGER NOT NULL)"):
            self._db.execute(sql)
        self._db.execute("INSERT OR IGNORE INTO report_order VALUES (1, ?, 1)",
                         (time.time_ns() // 1000,))
        self.epoch = int(self._db.execute("SELECT epoch FROM report_order").fetchone()[0])
        self._in_flight: set[int] = set()
        self.on_enqueue: Callable[[], None] | None = None
        # Something may be waiting that was not handed out yet: set by enqueue and
        # requeue, cleared when `pending` hands out everything, so an idle link's poll
        # does not query the database (a thousand simulated links poll in one machine).
        self._maybe_waiting = True

    def _next_order(self) -> Order:
        """The next report order (inside the caller's transaction)."""
        seq = self._db.execute("SELECT next_seq FROM report_order").fetchone()[0]
        self._db.execute("UPDATE report_order SET next_seq = next_seq + 1")
        return Order(self.epoch, int(seq))

    def reserve(self) -> Order:
        """A report order for a message published outside the outbox (the birth and the
        Last Will), persisted before it is handed out."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                order = self._next_order()
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return order

    def enqueue(self, stream: str, topic: str, build: Callable[[int, Order], bytes], *,
                retain: bool = False) -> int:
        """Add a message whose payload `build(seq, order)` makes from its stream's
        sequence number and its report order; returns the sequence number. Drops the
        oldest (telemetry first) when at the cap."""
        if stream not in STREAMS:
            raise ValueError(f"unknown stream {stream!r}")
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("INSERT OR IGNORE INTO counters (stream) VALUES (?)",
                                 (stream,))
                seq = self._db.execute("SELECT next_seq FROM counters WHERE stream = ?",
                                       (stream,)).fetchone()[0]
                self._db.execute("UPDATE counters SET next_seq = next_seq + 1 WHERE "
                                 "stream = ?", (stream,))
                order = self._next_order()
                self._make_room()
                self._db.execute("INSERT INTO outbox (stream, seq, topic, payload, retain) "
                                 "VALUES (?, ?, ?, ?, ?)",
                                 (stream, seq, topic, build(seq, order), int(retain)))
                self._db.execute("COMMIT")
                self._maybe_waiting = True
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        if (told := self.on_enqueue) is not None:
            told()
        return int(seq)

    def _make_room(self) -> None:
        count = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        while count >= self.cap:
            row = self._db.execute(
                "SELECT id, stream FROM outbox ORDER BY stream != 'telemetry', id LIMIT 1"
            ).fetchone()
            self._db.execute("DELETE FROM outbox WHERE id = ?", (row[0],))
            self._db.execute("UPDATE counters SET dropped = dropped + 1 WHERE stream = ?",
                             (row[1],))
            self.dropped_total += 1
            self._in_flight.discard(row[0])
            count -= 1

    def pending(self, limit: int = 100) -> list[Message]:
        """The oldest messages not yet handed out, marked in flight."""
        with self._lock:
            if not self._maybe_waiting:
                return []
            rows = self._db.execute(
                "SELECT id, stream, seq, topic, payload, retain FROM outbox ORDER BY id "
                "LIMIT ?", (limit + len(self._in_flight),)).fetchall()
            out = [Message(r[0], r[1], r[2], r[3], bytes(r[4]), bool(r[5])) for r in rows
                   if r[0] not in self._in_flight][:limit]
            self._in_flight.update(m.id for m in out)
            if len(out) < limit:  # everything there was is handed out now
                self._maybe_waiting = False
            return out

    def ack(self, message_id: int) -> None:
        """The broker acknowledged it: forget it."""
        with self._lock:
            self._db.execute("DELETE FROM outbox WHERE id = ?", (message_id,))
            self._in_flight.discard(message_id)

    def requeue_in_flight(self) -> None:
        """After a disconnect: unacknowledged messages go out again (QoS 1 may duplicate;
        sequence numbers let consumers drop duplicates)."""
        with self._lock:
            self._in_flight.clear()
            self._maybe_waiting = True

    def take_dropped(self) -> dict[str, int]:
        """Drops per stream since the last call (then reset)."""
        with self._lock:
            rows = self._db.execute("SELECT stream, dropped FROM counters WHERE dropped > 0"
                                    ).fetchall()
            self._db.execute("UPDATE counters SET dropped = 0")
            return {r[0]: int(r[1]) for r in rows}

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    def close(self) -> None:
        self._db.close()


class MemoryOutbox:
    """`Outbox`'s contract in memory: nothing survives the process (the simulator's)."""

    def __init__(self, *, cap: int = 10_000) -> None:
        if cap < 1:
            raise ValueError("cap must be at least 1")
        self.cap = cap
        self.dropped_total = 0
        self.epoch = time.time_ns() // 1000
        self.on_enqueue: Callable[[], None] | None = None
        self._lock = threading.Lock()
        self._next_order = 1
        self._next_id = 1
        self._next_seq: dict[str, int] = {}
        self._dropped: dict[str, int] = {}
        self._queued: deque[Message] = deque()  # in id order
        self._in_flight: set[int] = set()

    def _order(self) -> Order:
        order = Order(self.epoch, self._next_order)
        self._next_order += 1
        return order

    def reserve(self) -> Order:
        with self._lock:
            return self._order()

    def enqueue(self, stream: str, topic: str, build: Callable[[int, Order], bytes], *,
                retain: bool = False) -> int:
        if stream not in STREAMS:
            raise ValueError(f"unknown stream {stream!r}")
        with self._lock:
            seq = self._next_seq.get(stream, 1)
            payload = build(seq, self._order())
            self._next_seq[stream] = seq + 1
            while len(self._queued) >= self.cap:
                victim = next((m for m in self._queued if m.stream == "telemetry"),
                              self._queued[0])
                self._queued.remove(victim)
                self._in_flight.discard(victim.id)
                self._dropped[victim.stream] = self._dropped.get(victim.stream, 0) + 1
                self.dropped_total += 1
            self._queued.append(Message(self._next_id, stream, seq, topic, payload, retain))
            self._next_id += 1
        if (told := self.on_enqueue) is not None:
            told()
        return seq

    def pending(self, limit: int = 100) -> list[Message]:
        with self._lock:
            out: list[Message] = []
            for m in self._queued:
                if len(out) >= limit:
                    break
                if m.id not in self._in_flight:
                    out.append(m)
            self._in_flight.update(m.id for m in out)
            return out

    def ack(self, message_id: int) -> None:
        with self._lock:
            self._in_flight.discard(message_id)
            for m in self._queued:  # acknowledgements come mostly in order: the first
                if m.id == message_id:
                    self._queued.remove(m)
                    break

    def requeue_in_flight(self) -> None:
        with self._lock:
            self._in_flight.clear()

    def take_dropped(self) -> dict[str, int]:
        with self._lock:
            out, self._dropped = self._dropped, {}
            return out

    def __len__(self) -> int:
        return len(self._queued)

    def close(self) -> None:
        pass


#: Either outbox: the device's (durable) or the simulator's.
AnyOutbox = Outbox | MemoryOutbox
