"""The persisted store of seen command nonces (replay protection across restarts).

SQLite with `synchronous=FULL`: a nonce recorded before a command is carried out survives a
power cut, so a replay after reboot is still refused. Entries older than the replay window
are pruned: `agent.trust.command` refuses commands issued before the window anyway.
"""

from __future__ import annotations

import threading
from datetime import datetime
from pathlib import Path

from agent.durable import open_sqlite
from agent.errors import CommandError
from agent.trust.command import DEFAULT_REPLAY, Addressee, Command, ReplayPolicy, verify_command
from agent.trust.root import Root


class NonceStore:
    """Seen nonces with the time each command was issued. Supports `nonce in store`."""

    def __init__(self, path: Path | str) -> None:
        # Asked from the MQTT thread (screening) while the command thread records.
        self._lock = threading.Lock()
        self._db = open_sqlite(path)
        self._db.execute("CREATE TABLE IF NOT EXISTS nonces "
                         "(nonce TEXT PRIMARY KEY, issued_at REAL NOT NULL)")

    def __contains__(self, nonce: object) -> bool:
        with self._lock:
            row = self._db.execute("SELECT 1 FROM nonces WHERE nonce = ?",
                                   (nonce,)).fetchone()
        return row is not None

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM nonces").fetchone()[0])

    def record(self, nonce: str, issued_at: datetime) -> bool:
        """Remember a nonce; False when it was already there (a racing replay)."""
        with self._lock:
            cur = self._db.execute("INSERT OR IGNORE INTO nonces VALUES (?, ?)",
                                   (nonce, issued_at.timestamp()))
        return cur.rowcount == 1

    def prune(self, before: datetime) -> int:
        """Forget nonces of commands issued before `before`; returns how many."""
        with self._lock:
            cur = self._db.execute("DELETE FROM nonces WHERE issued_at < ?",
                                   (before.timestamp(),))
        return cur.rowcount

    def close(self) -> None:
        self._db.close()


class MemoryNonces:
    """`NonceStore`'s contract in memory: nothing survives the process (the fleet
    simulator's devices; an SQLite store in use holds ~25 KiB, ten thousand of them in one
    machine)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[str, float] = {}

    def __contains__(self, nonce: object) -> bool:
        return nonce in self._seen

    def __len__(self) -> int:
        return len(self._seen)

    def record(self, nonce: str, issued_at: datetime) -> bool:
        with self._lock:
            if nonce in self._seen:
                return False
            self._seen[nonce] = issued_at.timestamp()
            return True

    def prune(self, before: datetime) -> int:
        cut = before.timestamp()
        with self._lock:
            old = [n for n, t in self._seen.items() if t < cut]
            for n in old:
                del self._seen[n]
            return len(old)

    def close(self) -> None:
        pass


def accept_command(root: Root, raw: bytes, *, me: Addressee, now: datetime,
                   store: NonceStore | MemoryNonces,
                   policy: ReplayPolicy = DEFAULT_REPLAY) -> Command:
    """Verify a command and record its nonce, so the same bytes are refused next time.

    Raises:
        RootError, SignatureError, CommandError: as `verify_command`.
    """
    store.prune(now - policy.window)
    cmd = verify_command(root, raw, me=me, now=now, seen=store, policy=policy)
    if not store.record(cmd.nonce, cmd.issued_at):
        raise CommandError(f"command {cmd.id} was already received (nonce {cmd.nonce})",
                           check="replay", id=cmd.id, nonce=cmd.nonce)
    return cmd
