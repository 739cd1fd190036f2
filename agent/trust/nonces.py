"""The persisted store of seen command nonces (replay protection across restarts).

SQLite with `synchronous=FULL`: a nonce recorded before a command is carried out survives a
power cut, so a replay after reboot is still refused. Entries older than the replay window
are pruned: `agent.trust.command` refuses commands issued before the window anyway.
"""

from __future__ import annotations

import sqlite3
import threading
from datetime import datetime
from pathlib import Path

from agent.durable import sqlite_synchronous
from agent.errors import CommandError
from agent.trust.command import DEFAULT_REPLAY, Addressee, Command, ReplayPolicy, verify_command
from agent.trust.root import Root


class NonceStore:
    """Seen nonces with the time each command was issued. Supports `nonce in store`."""

    def __init__(self, path: Path | str) -> None:
        # Asked from the MQTT thread (screening) while the command thread records.
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={sqlite_synchronous()}")
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


def accept_command(root: Root, raw: bytes, *, me: Addressee, now: datetime,
                   store: NonceStore, policy: ReplayPolicy = DEFAULT_REPLAY) -> Command:
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
