"""Who may report: each device's registered report key, the devices that published
without one (listed, never stored as devices), and the counters of what ingest ignored."""

from __future__ import annotations

import time

from agent.trust.signatures import PublicKey
from fleet.store.engine import Store

#: Unknown devices listed at most (their ids come from whoever publishes).
MAX_UNKNOWN = 1000


class Keyring:
    """The keys and counters part of the fleet record (`FleetDB` is one)."""

    store: Store

    def bump(self, name: str) -> None:
        self.store.execute("INSERT INTO counters VALUES (?, 1) ON CONFLICT(name) DO UPDATE "
                           "SET value = counters.value + 1", (name,))

    def counter(self, name: str) -> int:
        row = self.store.one("SELECT value FROM counters WHERE name = ?", (name,))
        return int(row[0]) if row else 0

    def register(self, device: str, key: PublicKey) -> bool:
        """Register (or replace) a device's report key; True when it was new or changed."""
        with self.store.tx():
            old = self.store.one("SELECT public FROM device_keys WHERE device = ?", (device,))
            self.store.execute("INSERT INTO device_keys VALUES (?, ?, ?) ON CONFLICT(device) "
                               "DO UPDATE SET public = excluded.public, added = excluded.added",
                               (device, key.public, time.time()))
            self.store.execute("DELETE FROM unknown_devices WHERE device = ?", (device,))
            # registered again (a new key, or a reset device whose clock went back): its
            # next reports start its order afresh
            self.store.execute("DELETE FROM report_marks WHERE device = ?", (device,))
        return old is None or old[0] != key.public

    def registered_key(self, device: str) -> PublicKey | None:
        row = self.store.one("SELECT public FROM device_keys WHERE device = ?", (device,))
        return None if row is None else PublicKey(public=row[0])

    def registered(self) -> dict[str, PublicKey]:
        return {d: PublicKey(public=p) for d, p in self.store.all(
            "SELECT device, public FROM device_keys ORDER BY device")}

    def note_unknown(self, device: str) -> None:
        now = time.time()
        with self.store.tx():
            cur = self.store.execute("UPDATE unknown_devices SET last_seen = ?, messages = "
                                     "messages + 1 WHERE device = ?", (now, device))
            if cur.rowcount == 0 and self.store.one(
                    "SELECT COUNT(*) FROM unknown_devices")[0] < MAX_UNKNOWN:
                self.store.execute("INSERT INTO unknown_devices VALUES (?, ?, ?, 1) "
                                   "ON CONFLICT(device) DO NOTHING", (device, now, now))

    def unknown(self) -> list[tuple[str, int]]:
        """Devices that published without a registered key, with their message counts."""
        return [(d, int(n)) for d, n in self.store.all(
            "SELECT device, messages FROM unknown_devices ORDER BY device")]

    def ignored(self) -> dict[str, int]:
        """Messages the ingest gate ignored, by reason."""
        return {n.removeprefix("ignored_"): int(v) for n, v in self.store.all(
            "SELECT name, value FROM counters WHERE name LIKE 'ignored\\_%' ESCAPE '\\' "
            "ORDER BY name")}
