"""Watching and recovering a fleet of real agents over a real mosquitto: the fleet state
learned from retained `state`, telemetry and events; `edge-fleet status`; and
`edge-fleet recover --group` rolling back every member with the results summarised."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fixture_agent import start_group
from fixture_mqtt import Broker, Subscriber
from polling import wait_until

from fleet.devices.registry import FleetDB
from fleet.devices.watcher import FleetWatcher


@pytest.fixture
def fleet(tmp_path: Path, broker: Broker, releases: dict[str, Path]
          ) -> Iterator[tuple[Broker, list[Any]]]:
    agents = start_group(tmp_path, releases["keys"], broker.url, ["dev-1", "dev-2"],
                         [releases["onnx1"], releases["onnx2"]], telemetry_interval_s=0.3)
    yield broker, agents
    for a in agents:
        a.stop()


def fleet_cli(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fleet.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=120, check=False)


def test_the_fleet_state_follows_the_devices(fleet: Any, tmp_path: Path) -> None:
    broker, agents = fleet
    db = FleetDB(tmp_path / "fleet.sqlite")
    watcher = FleetWatcher(db, broker.url, "acme").start()
    sub = Subscriber(broker, [], client_id="poker")
    sub.publish("edge/v1/acme/dev-9/state", b'{"schema": 1, "device": "dev-9"}', retain=True)
    rows = wait_until(lambda: (r := db.devices()) and len(r) == 2 and all(
        d.telemetry_age_s is not None for d in r) and r, what="both devices with telemetry")
    assert [(r.device, r.online, r.models["digits"]["version"], r.health) for r in rows] == [
        ("dev-1", True, 2, "ok"), ("dev-2", True, 2, "ok")]
    # An unsigned state from a device nobody registered: counted, listed as unknown, never
    # stored as a device.
    assert db.counter("ignored_unregistered") >= 1 and db.unknown() == [("dev-9", 1)]
    agents[1].kill9()
    wait_until(lambda: not db.devices()[1].online, what="dev-2's Last Will")
    assert db.devices()[1].health == "offline"
    watcher.stop()
    sub.close()


def test_status_and_recover_a_group(fleet: Any, tmp_path: Path,
                                    releases: dict[str, Path]) -> None:
    broker, agents = fleet
    imported = fleet_cli("devices", "import", tmp_path / "dev-1", tmp_path / "dev-2", "--db",
                         tmp_path / "s.sqlite")
    assert "2 device key(s) registered" in imported.stdout, imported.stderr
    status = fleet_cli("status", "--broker", broker.url, "--fleet", "acme", "--db",
                       tmp_path / "s.sqlite")
    assert status.returncode == 0, status.stderr
    assert "dev-1" in status.stdout and "digits v2" in status.stdout
    assert "2 device(s), 2 online" in status.stdout
    keys = releases["keys"]
    command_key = next((keys / "keys").glob("command-*.key"))
    rec = fleet_cli("recover", "--broker", broker.url, "--group", "lab", "--action",
                    "rollback", "--model", "digits", "--reason", "bad release", "--key",
                    command_key, "--root", keys / "root.json", "--db", tmp_path / "s.sqlite")
    assert rec.returncode == 0, rec.stdout + rec.stderr
    assert "2 ok, 0 failed, 0 silent of 2" in rec.stdout
    for a in agents:
        assert a.call("GET", "/v1/admin/status")[1]["models"]["digits"]["version"] == 1
    again = fleet_cli("recover", "--broker", broker.url, "--device", "dev-1", "--action",
                      "rollback", "--model", "digits", "--key", command_key, "--root",
                      keys / "root.json", "--timeout", "10", "--db", tmp_path / "s.sqlite")
    assert again.returncode == 2 and "no previous version" in again.stdout


def test_status_prints_device_text_as_text_not_terminal_controls(
        broker: Broker, tmp_path: Path) -> None:
    """A device's own strings (its profile here) carrying a clear-screen, a title-setting
    OSC and a bidi override reach `edge-fleet status` as visible escapes, not as controls
    for the operator's terminal; the table around them is untouched."""
    from datetime import UTC, datetime

    from agent.link.wire import StatePayload

    db = FleetDB(tmp_path / "s.sqlite")
    hostile = "\x1b[2J\x1b]0;pwned\x07pi\u202eevil"
    db.put_state(StatePayload(device="dev-9", fleet="acme", online=True,
                              agent_version="0.1.0", profile=hostile, groups=["lab"],
                              at=datetime.now(UTC)))
    status = fleet_cli("status", "--broker", broker.url, "--fleet", "acme", "--db",
                       tmp_path / "s.sqlite", "--wait", "0")
    assert status.returncode == 0, status.stderr
    assert "\x1b" not in status.stdout and "\x07" not in status.stdout
    assert "\u202e" not in status.stdout
    assert "\\x1b[2J\\x1b]0;pwned\\x07pi\\u202eevil" in status.stdout, status.stdout
    assert "1 device(s), 1 online" in status.stdout
