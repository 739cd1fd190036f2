"""The fleet's record behind one interface, on two engines:

* **SQLite** (a path, the default): one file, no setup, for one operator's host. WAL
  journal; durable against a killed process (`synchronous=NORMAL`: a power cut may lose
  the last transactions, which the devices' retained states and results bring back).
* **PostgreSQL** (`postgresql://…`, through psycopg 3): the record several controller
  hosts share.

Every statement is written once, in the SQL both engines speak (`?` placeholders,
`INSERT … ON CONFLICT … DO UPDATE`, `COALESCE`, `CASE`); where they differ, the store
says how (`json_at`, `greatest`, `for_update`, `insertion_order`). One connection per
store, used under one re-entrant lock: a transaction (`tx`) holds it from `BEGIN` to
`COMMIT`, and a statement outside one holds it for itself, so no thread's statement
lands inside another thread's transaction.
"""

from __future__ import annotations

import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, cast

from fleet.errors import FleetError

#: What `open_store` takes for PostgreSQL.
PG_SCHEMES = ("postgresql://", "postgres://")
#: How long an SQLite statement waits for another connection's write lock.
BUSY_S = 10.0


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    @property
    def description(self) -> Any: ...

    def __iter__(self) -> Iterator[Any]: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Store:
    """One connection to the fleet's record (see the module)."""

    kind = ""
    #: The scalar maximum of two values.
    greatest = "MAX"
    #: Appended to a SELECT that reads a row to change it in the same transaction.
    for_update = ""
    #: Rows another transaction holds locked are passed over, not waited for (one writer
    #: at a time in SQLite: no row is ever locked by another transaction there).
    skip_locked = ""
    #: A column that orders a table's rows as they were inserted.
    insertion_order = "rowid"
    #: The database's clock, in seconds since the epoch (leases are timed by it, never by
    #: a controller's own clock).
    now = "((julianday('now') - 2440587.5) * 86400.0)"
    #: Whether two connections' write transactions can run at once (SQLite's one writer
    #: at a time orders whole transactions; PostgreSQL's writers lock rows).
    concurrent_writers = False

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._in_tx = False

    # -- what each engine provides ---------------------------------------------------------
    def _execute(self, sql: str, params: Sequence[Any]) -> Cursor:
        raise NotImplementedError

    def _executemany(self, sql: str, rows: list[Sequence[Any]]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def json_at(self, column: str) -> str:
        """SQL for the JSON value in `column` at the path given as the next parameter
        (`json_path`), as text or a number."""
        raise NotImplementedError

    def json_path(self, *keys: str) -> Any:
        """The parameter `json_at` takes for a path of object keys."""
        raise NotImplementedError

    def columns(self, table: str) -> set[str]:
        raise NotImplementedError

    def tables(self) -> set[str]:
        raise NotImplementedError

    # -- shared ------------------------------------------------------------------------------
    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        with self.lock:
            return self._execute(sql, params)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        rows = list(rows)
        if rows:
            with self.lock:
                self._executemany(sql, rows)

    def one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        with self.lock:
            return self._execute(sql, params).fetchone()

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        with self.lock:
            return self._execute(sql, params).fetchall()

    @property
    def in_transaction(self) -> bool:
        return self._in_tx

    @contextmanager
    def tx(self) -> Iterator[None]:
        """One write transaction; inside one already open on this thread, part of it (the
        outer one commits or rolls back everything)."""
        with self.lock:
            if self._in_tx:
                yield
                return
            self._begin()
            self._in_tx = True
            try:
                yield
            except BaseException:
                self._in_tx = False
                self._execute("ROLLBACK", ())
                raise
            self._in_tx = False
            self._execute("COMMIT", ())

    def _begin(self) -> None:
        self._execute("BEGIN", ())

    def script(self, ddl: str) -> None:
        """Statements separated by `;` (no `;` inside one), in the caller's transaction."""
        for statement in ddl.split(";"):
            if statement.strip():
                self.execute(statement)


class SQLiteStore(Store):
    kind = "sqlite"

    def __init__(self, path: Path | str) -> None:
        super().__init__()
        self.path = Path(path)
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False,
                                   timeout=BUSY_S)  # another process's write: wait
        for attempt in range(1, 51):
            try:  # needs the file to itself a moment: a lock that may not wait, so retry
                self._db.execute("PRAGMA journal_mode=WAL")
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or attempt == 50:
                    raise
                time.sleep(0.01 * attempt)  # another connection is opening it too
        self._db.execute("PRAGMA synchronous=NORMAL")

    def _execute(self, sql: str, params: Sequence[Any]) -> Cursor:
        return self._db.execute(sql, params)

    def _executemany(self, sql: str, rows: list[Sequence[Any]]) -> None:
        self._db.executemany(sql, rows)

    def _begin(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")  # the write lock now, not at the first write

    def close(self) -> None:
        self._db.close()

    def json_at(self, column: str) -> str:
        return f"json_extract({column}, ?)"

    def json_path(self, *keys: str) -> Any:
        return "$" + "".join(f'."{k}"' for k in keys)  # keys are checked names: no quote

    def columns(self, table: str) -> set[str]:
        return {r[1] for r in self.all(f"PRAGMA table_info({table})")}

    def tables(self) -> set[str]:
        return {r[0] for r in self.all("SELECT name FROM sqlite_master WHERE type = 'table'")}

    def __str__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"SQLiteStore({str(self.path)!r})"


_PLACEHOLDER = re.compile(r"\?")


#: PostgreSQL ends a transaction whose client said nothing inside it for this long.
IDLE_IN_TX_S = 10.0
#: TCP keepalives, both ways: a peer silent for 5 s is probed every 2 s, and given up
#: after 3 unanswered probes.
KEEPALIVE: dict[str, Any] = {"keepalives_idle": 5, "keepalives_interval": 2,
                             "keepalives_count": 3}
#: Data sent and not acknowledged for this long ends the connection (TCP_USER_TIMEOUT,
#: both ways: with data in flight, keepalives never start and the kernel retransmits for
#: about 15 minutes).
USER_TIMEOUT_MS = 10_000


class PostgresStore(Store):
    kind = "postgresql"
    greatest = "GREATEST"
    for_update = " FOR UPDATE"
    skip_locked = " FOR UPDATE SKIP LOCKED"
    insertion_order = "id"
    concurrent_writers = True
    now = "CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION)"

    def __init__(self, url: str) -> None:
        super().__init__()
        try:
            import psycopg  # noqa: PLC0415  # only for PostgreSQL: the [fleet] extra
        except ImportError as exc:
            raise FleetError("a PostgreSQL fleet database needs psycopg: pip install "
                             "'edge-agent[fleet]'") from exc
        self._psycopg = psycopg
        self.url = url
        self._db = self._connect()
        self._sql: dict[str, str] = {}

    def _connect(self) -> Any:
        """A connection whose server gives up on this client when it goes silent: a
        transaction idle for `IDLE_IN_TX_S`, and a client that stopped answering TCP
        (keepalives, `KEEPALIVE`: about 11 s; data unacknowledged, `USER_TIMEOUT_MS`),
        are ended with their row locks. A controller's host that died mid-statement (a
        pipeline or a COPY waiting for its next message: "active", never "idle in
        transaction") otherwise kept its locks until the kernel's two-hour keepalive, and
        every controller waiting on them with it. TCP keepalives on this side notice a
        server that vanished."""
        server = " ".join(f"-c {k}={v}" for k, v in (
            ("idle_in_transaction_session_timeout", int(IDLE_IN_TX_S * 1000)),
            ("tcp_user_timeout", USER_TIMEOUT_MS),
            *((f"tcp_{k}", v) for k, v in KEEPALIVE.items())))
        try:
            return self._psycopg.connect(self.url, autocommit=True, connect_timeout=10,
                                         options=server, **KEEPALIVE, keepalives=1,
                                         tcp_user_timeout=USER_TIMEOUT_MS)
        except self._psycopg.Error as exc:
            raise FleetError(f"cannot open the fleet database {_safe(self.url)}: "
                             f"{str(exc).strip().splitlines()[0]}") from exc

    def _live(self) -> Any:
        if self._db.closed or self._db.broken:  # lost (a server restart, a timeout)
            self._db = self._connect()
        return self._db

    def _pg(self, sql: str) -> str:
        """`?` placeholders as psycopg's `%s` (a literal `%` doubled)."""
        got = self._sql.get(sql)
        if got is None:
            got = self._sql[sql] = _PLACEHOLDER.sub("%s", sql.replace("%", "%%"))
        return got

    def _execute(self, sql: str, params: Sequence[Any]) -> Cursor:
        # a statement that failed with its connection is not tried again here (it may
        # have been applied): the caller's error, and the next statement reconnects
        return cast(Cursor, self._live().execute(self._pg(sql), params or None))

    def _executemany(self, sql: str, rows: list[Sequence[Any]]) -> None:
        with self._live().cursor() as cur:
            cur.executemany(self._pg(sql), rows)

    def close(self) -> None:
        self._db.close()

    def json_at(self, column: str) -> str:
        return f"({column}::jsonb #>> ?)"

    def json_path(self, *keys: str) -> Any:
        return list(keys)

    def columns(self, table: str) -> set[str]:
        return {r[0] for r in self.all(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = "
            "current_schema() AND table_name = ?", (table,))}

    def tables(self) -> set[str]:
        return {r[0] for r in self.all(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = "
            "current_schema()")}

    def __str__(self) -> str:
        return _safe(self.url)  # never the password

    def __repr__(self) -> str:
        return f"PostgresStore({_safe(self.url)!r})"


def _safe(url: str) -> str:
    """A database URL without its password."""
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


def open_store(target: Path | str) -> Store:
    """A PostgreSQL URL (`postgresql://user@host:port/db`) or an SQLite file's path."""
    text = str(target)
    if text.startswith(PG_SCHEMES):
        return PostgresStore(text)
    if "://" in text:
        raise FleetError(f"not a fleet database: {_safe(text)[:200]} (a file path, or "
                         "postgresql://…)")
    return SQLiteStore(text)
