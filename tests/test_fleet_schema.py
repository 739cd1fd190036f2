"""The fleet record's schema (`fleet.store.schema`): numbered migrations on both engines,
applied once, refused from a newer release, and SQLite files from the releases before
migrations brought up to date."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from fleet.devices.registry import FleetDB
from fleet.errors import FleetError
from fleet.rollout.record import Rollouts
from fleet.store.engine import open_store
from fleet.store.schema import LATEST, MIGRATIONS, migrate, version


def test_the_migrations_are_numbered_one_by_one_and_applied_once(fleet_db: str) -> None:
    assert [v for v, _, _ in MIGRATIONS] == list(range(1, LATEST + 1))
    store = open_store(fleet_db)
    assert version(store) == 0
    assert migrate(store) == LATEST
    assert migrate(store) == 0  # a second controller opening the record changes nothing
    assert version(store) == LATEST
    assert {"devices", "device_keys", "report_marks", "rollouts", "rollout_devices",
            "rollout_history", "rollout_commands", "schema_migrations"} <= store.tables()
    assert {"lease_until", "lease_token", "owner"} <= store.columns("rollouts")


def test_a_record_a_newer_release_made_is_refused(fleet_db: str) -> None:
    store = open_store(fleet_db)
    migrate(store)
    store.execute("INSERT INTO schema_migrations VALUES (?, 0, 'from the future')",
                  (LATEST + 1,))
    with pytest.raises(FleetError, match=f"schema version {LATEST + 1}.*upgrade edge-fleet"):
        FleetDB(fleet_db)


def test_an_sqlite_file_from_before_migrations_is_brought_up_to_date(tmp_path: Path) -> None:
    """A file as the first releases made it: their first tables, the execution's outcome
    column, and a rollout in progress."""
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as old:
        old.executescript("""
CREATE TABLE devices (device TEXT PRIMARY KEY, fleet TEXT NOT NULL, online INTEGER NOT NULL,
  profile TEXT, agent_version TEXT, groups_json TEXT NOT NULL, models_json TEXT NOT NULL,
  state_at TEXT, telemetry_at REAL, telemetry_json TEXT, last_anomaly TEXT,
  last_anomaly_at TEXT, events INTEGER NOT NULL DEFAULT 0);
CREATE TABLE rollouts (id TEXT PRIMARY KEY, model TEXT, version INTEGER, group_name TEXT,
  archive TEXT, urls_json TEXT, sizes_json TEXT, criteria_json TEXT, status TEXT,
  wave INTEGER, wave_started REAL, wave_timeout_s REAL, reason TEXT, created REAL);
CREATE TABLE rollout_devices (rollout TEXT, device TEXT, wave INTEGER, command_id TEXT,
  outcome TEXT, sent_at REAL, rollback_id TEXT, rollback_result TEXT,
  PRIMARY KEY (rollout, device));
INSERT INTO devices VALUES ('dev-1', 'acme', 1, 'p', '0.1', '["lab"]', '{}', NULL, NULL,
  NULL, NULL, NULL, 0);
INSERT INTO rollouts VALUES ('r1', 'digits', 2, 'lab', '/a.tar.zst', '["http://x/a"]',
  '[1, 3]', '{}', 'running', 0, NULL, 60, '', 1.0);
INSERT INTO rollout_devices VALUES ('r1', 'dev-1', 0, 'c1', 'committed', 1.0, NULL, NULL);
INSERT INTO rollout_devices VALUES ('r1', 'dev-2', 1, 'c2', 'pending', 1.0, NULL, NULL);
INSERT INTO rollout_devices VALUES ('r1', 'dev-3', 1, NULL, 'pending', NULL, NULL, NULL);
INSERT INTO rollout_devices VALUES ('r1', 'dev-4', 1, 'c4', 'offline', 1.0, NULL, NULL);
""")
    db = FleetDB(path)
    assert version(db.store) == LATEST
    rollouts = Rollouts(db)
    assert [(d.device, d.status.value, d.attempts) for d in rollouts.devices("r1")] == [
        ("dev-1", "committed", 1), ("dev-2", "sent", 1), ("dev-3", "queued", 0),
        ("dev-4", "timed_out", 1)]
    ro = rollouts.get("r1")
    assert (ro.status.value, ro.lease_token, ro.owner, ro.shown_status()) == (
        "running", 0, None, "stalled")
    assert [r.device for r in db.devices()] == ["dev-1"]
    assert {"state_epoch", "state_seq", "last_seen"} <= db.store.columns("devices")


def test_controllers_starting_at_once_on_an_empty_database_migrate_it_once(
        fleet_db: str) -> None:
    import threading

    errors: list[BaseException] = []

    def start() -> None:
        try:
            FleetDB(fleet_db)
        except BaseException as exc:  # collected for the assertion
            errors.append(exc)
    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert [int(r[0]) for r in open_store(fleet_db).all(
        "SELECT version FROM schema_migrations ORDER BY version")] == list(
        range(1, LATEST + 1))


def test_a_postgresql_record_reconnects_once_its_connection_was_ended(postgres: Any) -> None:
    """The server ends a session (a restart, its idle-transaction timeout, an operator's
    pg_terminate_backend): the statement under way fails, naming it; the transaction it
    was part of is rolled back with it; the next statement runs on a new connection."""
    import uuid

    import psycopg

    url = postgres.create_database(f"t_{uuid.uuid4().hex}")
    db, other = FleetDB(url), FleetDB(url)
    st = db.store
    pid = st.one("SELECT pg_backend_pid()")[0]
    with pytest.raises(psycopg.OperationalError), st.tx():
        st.execute("INSERT INTO counters VALUES ('lost', 1)")
        other.store.execute("SELECT pg_terminate_backend(?)", (pid,))
        st.execute("INSERT INTO counters VALUES ('lost', 2)")
    assert st.one("SELECT pg_backend_pid()")[0] != pid  # a new connection
    assert st.one("SELECT COUNT(*) FROM counters WHERE name = 'lost'")[0] == 0
    db.bump("after")
    assert other.store.one("SELECT value FROM counters WHERE name = 'after'")[0] == 1
