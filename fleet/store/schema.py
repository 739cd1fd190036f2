"""The fleet record's schema, as numbered migrations applied in order on either engine.

One mechanism for both: `MIGRATIONS` is a list of (version, what it does, statements);
`migrate` applies those above the database's version, each in its own transaction with
the row that records it in `schema_migrations`, so a migration is applied entirely or not
at all (DDL is transactional on both engines), and a controller started against a
database a newer version made refuses it instead of writing what it does not understand.
Written here rather than with Alembic (which needs SQLAlchemy, a dependency the fleet
has no other use for) or yoyo-migrations: the migrations are plain SQL in the dialect
both engines share, with three type names translated for PostgreSQL.

A migration is never edited once released: a change is a new one at the end.

SQLite files made before this mechanism (no `schema_migrations`, tables from the first
releases, columns added by later ones) are brought to version 1 first by
`_upgrade_unversioned`, which adds what is missing exactly as those releases did.
"""

from __future__ import annotations

import re
import time

from fleet.errors import FleetError
from fleet.store.engine import Store

#: (version, description, statements in the dialect both engines share).
MIGRATIONS: list[tuple[int, str, str]] = [
    (1, "devices, keys, report marks, rollouts, executions, history, commands", """
CREATE TABLE IF NOT EXISTS devices (
  device TEXT PRIMARY KEY, fleet TEXT NOT NULL, online INTEGER NOT NULL, profile TEXT,
  agent_version TEXT, groups_json TEXT NOT NULL, models_json TEXT NOT NULL,
  state_at TEXT, telemetry_at REAL, telemetry_json TEXT,
  last_anomaly TEXT, last_anomaly_at TEXT, events INTEGER NOT NULL DEFAULT 0,
  trust_json TEXT, state_received REAL, last_seen REAL, offline_at REAL, started_at TEXT,
  anomaly_received REAL, state_epoch INTEGER, state_seq INTEGER);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS anomalies (
  device TEXT NOT NULL, received REAL NOT NULL, model TEXT, detector TEXT, message TEXT);
CREATE INDEX IF NOT EXISTS anomalies_received ON anomalies (received);
CREATE TABLE IF NOT EXISTS device_keys (
  device TEXT PRIMARY KEY, public TEXT NOT NULL, added REAL NOT NULL);
CREATE TABLE IF NOT EXISTS unknown_devices (
  device TEXT PRIMARY KEY, first_seen REAL NOT NULL, last_seen REAL NOT NULL,
  messages INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS report_marks (
  device TEXT NOT NULL, kind TEXT NOT NULL, epoch INTEGER NOT NULL, seq INTEGER NOT NULL,
  connection INTEGER NOT NULL, will INTEGER NOT NULL, "window" INTEGER NOT NULL,
  PRIMARY KEY (device, kind));
CREATE TABLE IF NOT EXISTS rollouts (
  id TEXT PRIMARY KEY, model TEXT, version INTEGER, group_name TEXT, archive TEXT,
  urls_json TEXT, sizes_json TEXT, criteria_json TEXT, status TEXT, wave INTEGER,
  wave_started REAL, wave_timeout_s REAL, reason TEXT, created REAL,
  health_window_s REAL NOT NULL DEFAULT 0, settled_at REAL, retry_json TEXT,
  command_ttl_s REAL, max_per_minute INTEGER NOT NULL DEFAULT 0,
  continuous INTEGER NOT NULL DEFAULT 0, culprits_json TEXT, owner TEXT, owner_beat REAL,
  ended REAL);
CREATE TABLE IF NOT EXISTS rollout_devices (
  rollout TEXT, device TEXT, wave INTEGER, command_id TEXT, outcome TEXT, sent_at REAL,
  rollback_id TEXT, rollback_result TEXT, detail TEXT, status TEXT,
  attempts INTEGER NOT NULL DEFAULT 0, updated REAL, retry_at REAL, failure TEXT,
  report_epoch INTEGER, report_seq INTEGER, PRIMARY KEY (rollout, device));
CREATE INDEX IF NOT EXISTS rollout_devices_device ON rollout_devices (device);
CREATE TABLE IF NOT EXISTS rollout_history (
  {serial} rollout TEXT NOT NULL, device TEXT NOT NULL, at REAL NOT NULL, from_status TEXT,
  to_status TEXT NOT NULL, event TEXT NOT NULL, cause TEXT);
CREATE INDEX IF NOT EXISTS rollout_history_device ON rollout_history (rollout, device);
CREATE TABLE IF NOT EXISTS rollout_commands (
  id TEXT PRIMARY KEY, rollout TEXT NOT NULL, device TEXT NOT NULL, kind TEXT NOT NULL,
  attempt INTEGER NOT NULL, created REAL NOT NULL, expires REAL NOT NULL,
  state TEXT NOT NULL, sent_at REAL, payload BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS rollout_commands_state ON rollout_commands (rollout, state)
"""),
    (2, "rollout leases timed by the database's clock, with a fencing token", """
ALTER TABLE rollouts ADD COLUMN lease_until REAL;
ALTER TABLE rollouts ADD COLUMN lease_token INTEGER NOT NULL DEFAULT 0
"""),
]
LATEST = MIGRATIONS[-1][0]
#: The key of PostgreSQL's advisory lock that orders migrators (two controllers starting
#: at once on an empty database would otherwise race to create the same tables).
_MIGRATION_LOCK = 0x6564676546_4C54

# Columns the releases before versioned migrations added to their first tables, and the
# statuses of execution rows written before the execution record (`outcome`).
_ADDED = {
    "devices": [("trust_json", "TEXT"), ("state_received", "REAL"), ("last_seen", "REAL"),
                ("offline_at", "REAL"), ("started_at", "TEXT"), ("anomaly_received", "REAL"),
                ("state_epoch", "INTEGER"), ("state_seq", "INTEGER")],
    "rollouts": [("health_window_s", "REAL NOT NULL DEFAULT 0"), ("settled_at", "REAL"),
                 ("retry_json", "TEXT"), ("command_ttl_s", "REAL"),
                 ("max_per_minute", "INTEGER NOT NULL DEFAULT 0"),
                 ("continuous", "INTEGER NOT NULL DEFAULT 0"), ("culprits_json", "TEXT"),
                 ("owner", "TEXT"), ("owner_beat", "REAL"), ("ended", "REAL")],
    "rollout_devices": [("detail", "TEXT"), ("status", "TEXT"),
                        ("attempts", "INTEGER NOT NULL DEFAULT 0"), ("updated", "REAL"),
                        ("retry_at", "REAL"), ("failure", "TEXT"),
                        ("report_epoch", "INTEGER"), ("report_seq", "INTEGER")],
}
_LEGACY = {"pending": "CASE WHEN command_id IS NULL THEN 'queued' ELSE 'sent' END",
           "committed": "'committed'", "rolled_back": "'rolled_back'", "failed": "'failed'",
           "offline": "'timed_out'"}


def for_engine(store: Store, ddl: str) -> str:
    """The shared DDL in `store`'s dialect: PostgreSQL's names for 64-bit integers,
    doubles and bytes, text ordered by its bytes as SQLite orders it, and an identity
    column where SQLite has its rowid."""
    if store.kind == "postgresql":
        for ours, theirs in (("INTEGER", "BIGINT"), ("REAL", "DOUBLE PRECISION"),
                             ("BLOB", "BYTEA"), ("TEXT", 'TEXT COLLATE "C"')):
            ddl = re.sub(rf"\b{ours}\b", theirs, ddl)
        return ddl.replace("{serial}", "id BIGSERIAL PRIMARY KEY,")
    return ddl.replace("{serial}", "")


def version(store: Store) -> int:
    """The schema version of the database (0: nothing, or made before migrations)."""
    if "schema_migrations" not in store.tables():
        return 0
    row = store.one("SELECT MAX(version) FROM schema_migrations")
    return int(row[0]) if row and row[0] is not None else 0


def migrate(store: Store) -> int:
    """Bring the database to `LATEST`; returns how many migrations were applied.

    Raises:
        FleetError: a newer release made this database (its version is above ours).
    """
    with store.tx():  # one migrator at a time: SQLite's write lock, or PostgreSQL's
        if store.kind == "postgresql":  # lock taken before any table exists
            store.execute("SELECT pg_advisory_xact_lock(?)", (_MIGRATION_LOCK,))
        store.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER "
                      "PRIMARY KEY, applied REAL NOT NULL, description TEXT NOT NULL)")
        have = version(store)
        if have > LATEST:
            raise FleetError(f"the fleet database is at schema version {have}; this "
                             f"edge-fleet knows up to {LATEST}: upgrade edge-fleet")
        if have == 0 and store.kind == "sqlite":
            _upgrade_unversioned(store)
        applied = 0
        for v, description, ddl in MIGRATIONS:
            if v > have:
                store.script(for_engine(store, ddl))
                store.execute("INSERT INTO schema_migrations VALUES (?, ?, ?)",
                              (v, time.time(), description))
                applied += 1
    return applied


def _upgrade_unversioned(store: Store) -> None:
    """A file an earlier release made: the columns it lacks, and execution statuses from
    the outcome column it kept before the execution record."""
    tables = store.tables()
    for table, added in _ADDED.items():
        if table not in tables:
            continue
        have = store.columns(table)
        for column, decl in added:
            if column not in have:
                store.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
    if "rollout_devices" in tables:
        cases = " ".join(f"WHEN '{k}' THEN {v}" for k, v in _LEGACY.items())
        store.execute(f"UPDATE rollout_devices SET status = CASE outcome {cases} "
                      "ELSE 'queued' END, attempts = (command_id IS NOT NULL) "
                      "WHERE status IS NULL")
