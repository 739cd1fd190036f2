"""Durable writes: temp file in the same directory, fsync, `os.replace`, fsync the directory.

After a power cut the path holds either the old bytes or the new ones, never a mix.

Every fsync of the agent goes through `fsync` here, and both SQLite stores (outbox, nonces)
take their `synchronous` level from `sqlite_synchronous()`. `_UNSAFE_NO_SYNC` turns all of
them off at once. No config, option or environment variable reaches it: only the power-cut
harness sets it (tests/powercut_child.py --no-sync), to show that its cuts find what a missing
fsync breaks.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from agent.errors import ConfigError

_UNSAFE_NO_SYNC = False


def fsync(fd: int) -> None:
    """`os.fsync`, the one the agent calls."""
    if not _UNSAFE_NO_SYNC:
        os.fsync(fd)


def sqlite_synchronous() -> str:
    """The `PRAGMA synchronous` level for the agent's SQLite stores."""
    return "OFF" if _UNSAFE_NO_SYNC else "FULL"


def open_sqlite(path: Path | str) -> sqlite3.Connection:
    """One of the agent's SQLite stores (autocommit: callers open their transactions),
    WAL, synchronous as `sqlite_synchronous()` says."""
    db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={sqlite_synchronous()}")
    return db


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        fsync(fd)
    finally:
        os.close(fd)


def check_private(path: Path, what: str) -> None:
    """A secret file must be readable by its owner only (as ssh insists for its keys).

    Raises:
        ConfigError: group or others may read or write it.
    """
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise ConfigError(f"{what} {path} has mode {mode:o}: others could read it; "
                          f"chmod 600 {path} (owned by the agent's user)")


def write_synced(path: Path, data: bytes) -> None:
    """Create `path` (it must not exist) with `data`, on disk before this returns; for a file
    in a directory that is itself renamed into place afterwards."""
    with path.open("xb") as fh:
        fh.write(data)
        fh.flush()
        fsync(fh.fileno())


def write_atomic(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Replace `path` with `data` atomically; the file has `mode` from its first byte
    (0o600 for secrets)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
