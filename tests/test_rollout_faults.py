"""Rollouts under faults, one named case each, over real agents and a real mosquitto: a
late device, a device away at the start, a command sent while a device is away, a broker
outage across a wave change, commands recorded and never published, two controllers, and
monitoring tools beside a controller; plus the pure execution table."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fixture_agent import command_controller, register, start_group
from fixture_mqtt import Broker, Subscriber
from polling import wait_until
from test_rollout import controller, lab_rollout, rollout_argv, signing, versions

from fleet.devices.registry import FleetDB
from fleet.devices.status import shown_models
from fleet.devices.watcher import CONTROLLER_GROUP, FleetWatcher
from fleet.errors import FleetError
from fleet.rollout.policy import (
    EXEC_TRANSITIONS,
    Criteria,
    Exec,
    Pace,
    RetryPolicy,
    exponential_fractions,
    next_exec,
)
from fleet.rollout.record import Rollouts, printable
from fleet.rollout.rows import Rollout
from fleet.rollout.status import rollout_lines
from fleet.trust.commands import build_command, deploy_fields, sign_command
from fleet.trust.keys import KeyDir


def test_the_execution_table_takes_late_truths_and_refuses_stale_failures() -> None:
    assert next_exec(Exec.TIMED_OUT, "committed") is Exec.COMMITTED  # late success
    assert next_exec(Exec.QUEUED, "committed") is Exec.COMMITTED  # while a retry waits
    assert next_exec(Exec.FAILED, "already") is Exec.ALREADY_CURRENT
    for event in ("failed", "timeout", "send"):
        with pytest.raises(ValueError):
            next_exec(Exec.COMMITTED, event)  # a commit is never undone by a stale report
    assert next_exec(Exec.COMMITTED, "fleet_rollback") is Exec.ROLLED_BACK
    # timing out needs an acknowledged send: an unsent command is no device's fault
    assert (Exec.TO_SEND, "timeout") not in EXEC_TRANSITIONS
    policy = RetryPolicy()
    assert policy.allows("busy", 1) and not policy.allows("selftest", 1)
    assert policy.allows("timeout", 1) and not policy.allows("timeout", 2)
    assert exponential_fractions(1, 2) == [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.0]


def test_the_pace_allows_so_many_sends_in_any_minute() -> None:
    pace = Pace(10)
    assert pace.room(0.0) == 10
    pace.spent(7, 0.0)
    assert pace.room(30.0) == 3
    pace.spent(3, 30.0)
    assert pace.room(59.9) == 0
    assert pace.room(60.0) == 7  # the first seven left the window
    assert Pace(0).room(0.0) > 10**6  # no limit


def test_what_a_device_says_reaches_the_record_without_terminal_escapes() -> None:
    assert printable("rolled back\x1b[2J\x1b]0;owned\x07\nok", 300) == \
        "rolled back?[2J?]0;owned??ok"
    assert printable("x" * 500, 300) == "x" * 300


def test_status_shows_the_version_a_rolled_back_device_runs() -> None:
    assert shown_models({"digits": {"version": 1, "committed": 2}}) == \
        "digits v1 (rolled back from v2)"
    assert shown_models({"digits": {"version": 2, "committed": 1}}) == "digits v2*"
    assert shown_models({"digits": {"version": 2, "committed": 2}}) == "digits v2"


def test_a_running_rollout_without_a_live_controller_shows_as_stalled(
        releases: dict[str, Path], tmp_path: Path, fleet_db: str) -> None:
    rollouts = Rollouts(FleetDB(fleet_db))
    rid = rollouts.create(archive=releases["onnx2"], urls=["http://127.0.0.1:9/a"],
                          group="lab", devices=["dev-1"], fractions=[1.0],
                          criteria=Criteria(), wave_timeout_s=60)
    assert rollouts.get(rid).shown_status() == "stalled"  # nobody drives it
    rollouts.leases.acquire(rid, "host:1:a")
    ro: Rollout = rollouts.get(rid)
    assert ro.shown_status() == "running"
    assert ro.shown_status(now=time.time() + 60) == "stalled"


def test_a_late_device_commits_late_and_the_rollout_completes_without_a_rollback(
        group: Any, releases: dict[str, Path], tmp_path: Path, fleet_db: str) -> None:
    """dev-1 is stopped (SIGSTOP) past its execution timeout: it times out (not a
    failure), is retried, then commits when it resumes. That late success is recorded as
    committed, nothing is rolled back, and the rollout completes."""
    broker, agents, url = group
    db = FleetDB(fleet_db)
    rollouts = Rollouts(db)
    archive = releases["onnx2"]
    rid = rollouts.create(archive=archive, urls=[f"{url}/{archive.name}"], group="lab",
                          devices=["dev-1", "dev-2", "dev-3"], fractions=[0.6, 1.0],
                          criteria=Criteria(), wave_timeout_s=2.0, health_window_s=0.5,
                          retry=RetryPolicy(backoff_s=0.5))
    assert agents[0].proc is not None
    agents[0].proc.send_signal(signal.SIGSTOP)
    c = controller(db, broker, releases)
    try:
        try:
            wait_until(lambda: c.step(rid) and rollouts.device(rid, "dev-1").attempts == 2,  # type: ignore[union-attr]
                       timeout_s=30, every_s=0.2, what="dev-1 timed out and retried")
        finally:
            agents[0].proc.send_signal(signal.SIGCONT)
        assert c.run(rid, timeout_s=90) == "completed"
    finally:
        c.close()
    assert versions(agents) == [2, 2, 2]
    dev1 = rollouts.device(rid, "dev-1")
    assert dev1 is not None and dev1.status is Exec.COMMITTED and dev1.rollback_id is None
    events = [h.event for h in rollouts.history(rid, "dev-1")]
    assert "timeout" in events and "retry" in events and events[-1] == "committed", events
    assert all(d.status is Exec.COMMITTED and d.rollback_id is None
               for d in rollouts.devices(rid))


def test_a_device_away_at_the_start_is_deployed_when_it_comes_back(
        group: Any, releases: dict[str, Path], tmp_path: Path, fleet_db: str) -> None:
    broker, agents, url = group
    agents[2].stop()  # dev-3 leaves: its retained state says offline
    db = FleetDB(fleet_db)
    rollouts = Rollouts(db)
    rid = lab_rollout(rollouts, releases, url, wave_timeout_s=30, health_window_s=0.5,
                      continuous=True)
    c = controller(db, broker, releases)
    try:
        wait_until(lambda: c.step(rid) and all(
            d.status is Exec.COMMITTED for d in rollouts.devices(rid)[:2]),
            timeout_s=60, every_s=0.2, what="dev-1 and dev-2 committed")
        assert rollouts.device(rid, "dev-3").status is Exec.QUEUED  # type: ignore[union-attr]
        assert any("dev-3" in ln and "offline" in ln for ln in rollout_lines(rollouts, rid))
        agents[2].start()
        wait_until(lambda: c.step(rid) and rollouts.device(rid, "dev-3").status  # type: ignore[union-attr]
                   is Exec.COMMITTED, timeout_s=60, every_s=0.2, what="dev-3 committed")
    finally:
        c.close()
    assert versions(agents) == [2, 2, 2]


def test_a_command_sent_while_the_agent_is_away_is_delivered_when_it_returns(
        group: Any, releases: dict[str, Path], tmp_path: Path) -> None:
    """The agent's persistent session: a QoS 1 deploy published while it is stopped waits
    at the broker and is carried out when it starts again."""
    broker, agents, url = group
    agents[0].stop()
    archive = releases["onnx2"]
    kd = KeyDir(releases["keys"])
    cmd = build_command("deploy", fleet="acme", device="dev-1",
                        **deploy_fields(archive, [f"{url}/{archive.name}"]))
    operator = Subscriber(broker, [], client_id="operator")
    try:
        operator.publish("edge/v1/acme/dev-1/cmd",
                         sign_command(cmd, kd.keys_of(kd.root(), "command", None)))
    finally:
        operator.close()
    assert versions(agents[1:]) == [1, 1]
    agents[0].start()
    wait_until(lambda: versions(agents)[0] == 2, timeout_s=60, what="dev-1 on v2")


@contextmanager
def background_run(db_path: Path, releases: dict[str, Path], group: Any, **kw: Any
                   ) -> Iterator[tuple[Rollouts, str, subprocess.Popen[str]]]:
    """A lab rollout, and `edge-fleet rollout run` driving it in a subprocess (killed on
    the way out if it is still running)."""
    broker, _, url = group
    rollouts = Rollouts(FleetDB(db_path))
    rid = lab_rollout(rollouts, releases, url, **kw)
    run = subprocess.Popen(rollout_argv(db_path, "run", rid, *signing(broker, releases)),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield rollouts, rid, run
    finally:
        if run.poll() is None:
            run.kill()


def test_the_controller_outlives_a_broker_outage_across_a_wave_change(
        group: Any, releases: dict[str, Path], tmp_path: Path, fleet_db: str) -> None:
    broker, agents, _ = group
    db_path = fleet_db
    with background_run(db_path, releases, group, wave_timeout_s=30,
                        health_window_s=1.0) as (rollouts, rid, run):
        wait_until(lambda: rollouts.get(rid).settled_at is not None, timeout_s=60,
                   what="wave 1 settled, in its health window")
        assert broker.proc is not None
        broker.proc.kill()  # across the wave change
        broker.proc.wait(10)
        time.sleep(3)  # the outage's length (a fault's duration, not a wait for state)
        broker.start()
        out, err = run.communicate(timeout=120)
    assert run.returncode == 0, err
    assert f"rollout {rid}: completed" in out
    assert "Traceback" not in err
    assert versions(agents) == [2, 2, 2]
    assert [d.status for d in rollouts.devices(rid)] == [Exec.COMMITTED] * 3


def test_commands_recorded_but_never_published_are_sent_by_the_next_controller(
        group: Any, releases: dict[str, Path], tmp_path: Path, fleet_db: str) -> None:
    """As after a controller killed between recording a wave's commands and publishing
    them: they are in the database as to_send; the next controller publishes exactly
    those (same ids), and the devices carry them out once."""
    broker, agents, url = group
    db = FleetDB(fleet_db)
    rollouts = Rollouts(db)
    rid = lab_rollout(rollouts, releases, url, fractions=(1.0,), wave_timeout_s=30,
                      health_window_s=0.5)
    archive = releases["onnx2"]
    first = controller(db, broker, releases)
    first.sender.record(rid, "deploy", rollouts.devices(rid), 3600,
                  **deploy_fields(archive, [f"{url}/{archive.name}"]))
    first.close()
    recorded = {d.device: d.command_id for d in rollouts.devices(rid)}
    assert all(d.status is Exec.TO_SEND for d in rollouts.devices(rid))
    assert len(rollouts.unsent(rid)) == 3
    assert versions(agents) == [1, 1, 1]  # nothing was published
    second = controller(db, broker, releases)
    try:
        assert second.run(rid, timeout_s=90) == "completed"
    finally:
        second.close()
    assert {d.device: d.command_id for d in rollouts.devices(rid)} == recorded
    assert all(d.attempts == 1 for d in rollouts.devices(rid))
    assert rollouts.unsent(rid) == []
    assert versions(agents) == [2, 2, 2]


def test_two_controllers_never_drive_one_rollout(
        group: Any, releases: dict[str, Path], tmp_path: Path, fleet_db: str) -> None:
    broker, _, url = group
    db = FleetDB(fleet_db)
    rollouts = Rollouts(db)
    rid = lab_rollout(rollouts, releases, url, fractions=(1.0,), wave_timeout_s=30,
                      health_window_s=30)
    a = controller(db, broker, releases)
    b = command_controller(FleetDB(fleet_db), broker.url, releases["keys"])
    try:
        a.step(rid)
        with pytest.raises(FleetError, match="driven by controller"):
            b.step(rid)
        assert a.owner != b.owner
        a.close()  # releases the lock
        b.step(rid)
        assert rollouts.get(rid).owner == b.owner
    finally:
        a.close()
        b.close()


def test_monitoring_tools_see_every_message_and_take_none_from_the_controller(
        group: Any, broker: Broker, tmp_path: Path) -> None:
    """A controller's watcher (the controllers' shared group) and two monitoring
    watchers (no group) each receive every telemetry message the agents publish."""
    topic = "edge/v1/acme/+/telemetry"
    raw = Subscriber(broker, [topic], client_id="raw")

    def db(name: str) -> FleetDB:
        d = FleetDB(tmp_path / f"{name}.sqlite")
        register(d, *(tmp_path / f"dev-{i}" for i in (1, 2, 3)))
        return d
    ctl = FleetWatcher(db("a"), broker.url, "acme", share_group=CONTROLLER_GROUP)
    tools = [FleetWatcher(db(n), broker.url, "acme") for n in ("b", "c")]
    watchers = [ctl, *tools]
    try:
        for w in watchers:
            assert w.subscribed.wait(10)
        raw.wait_for(lambda: len(raw.on("/telemetry")) >= 3, timeout=30)
        start = [w.ingested["telemetry"] + w.superseded for w in watchers]
        base = len(raw.on("/telemetry"))
        raw.wait_for(lambda: len(raw.on("/telemetry")) >= base + 30, timeout=60)
        for w in watchers:
            w.stop()
        seen = len(raw.on("/telemetry")) - base
        got = [w.ingested["telemetry"] + w.superseded - s
               for w, s in zip(watchers, start, strict=True)]
        # each saw all of them (give or take the messages in flight at the two edges)
        assert all(abs(g - seen) <= 6 for g in got), (got, seen)
    finally:
        raw.close()
        for w in watchers:
            w.stop()


def test_a_device_that_joins_the_group_during_a_continuous_rollout_is_deployed(
        group: Any, releases: dict[str, Path], tmp_path: Path, fleet_db: str) -> None:
    """dev-3 is not among the devices the rollout started with; it is a registered member
    of the group, so the running rollout takes it into its last wave and deploys it."""
    broker, agents, url = group
    db = FleetDB(fleet_db)
    rollouts = Rollouts(db)
    rid = lab_rollout(rollouts, releases, url, devices=("dev-1", "dev-2"),
                      fractions=(0.5, 1.0), wave_timeout_s=30, health_window_s=0.5,
                      continuous=True)
    c = controller(db, broker, releases)
    try:
        wait_until(lambda: c.step(rid) and len(rollouts.devices(rid)) == 3
                   and all(d.status is Exec.COMMITTED for d in rollouts.devices(rid)),
                   timeout_s=60, every_s=0.2, what="all three committed")
    finally:
        c.close()
    joined = rollouts.device(rid, "dev-3")
    assert joined is not None and joined.wave == 1
    assert rollouts.history(rid, "dev-3")[0].cause == "joined the group"
    assert rollouts.get(rid).status == "running"  # continuous: it goes on until aborted
    assert versions(agents) == [2, 2, 2]


def test_an_abort_from_a_second_shell_is_carried_out_by_the_running_controller(
        group: Any, releases: dict[str, Path], tmp_path: Path, fleet_db: str) -> None:
    """`rollout abort` while `rollout run` drives the rollout: the abort records itself
    and leaves the broker alone (no second controller, no session takeover); the running
    controller sends the rollbacks and exits 5 (aborted)."""
    broker, agents, _ = group
    db_path = fleet_db
    with background_run(db_path, releases, group, wave_timeout_s=60,
                        health_window_s=60) as (rollouts, rid, run):
        wait_until(lambda: versions(agents) == [2, 1, 1], timeout_s=60, what="dev-1 on v2")
        abort = subprocess.run(rollout_argv(db_path, "abort", rid), capture_output=True,
                               text=True, timeout=60, check=False)
        assert abort.returncode == 5, abort.stderr
        assert "its controller" in abort.stdout and "sends the rollbacks" in abort.stdout
        out, err = run.communicate(timeout=120)
    assert run.returncode == 5, err
    assert f"rollout {rid}: aborted" in out
    assert versions(agents) == [1, 1, 1]
    dev1 = rollouts.device(rid, "dev-1")
    assert dev1 is not None and dev1.status is Exec.ROLLED_BACK
    assert (dev1.rollback_result or "").startswith("ok")
    log = (broker.dir / "mosquitto.log").read_text()
    assert "already connected, closing old connection" not in log  # no takeover


def test_the_last_will_says_when_the_device_was_last_known_alive(
        tmp_path: Path, broker: Broker, releases: dict[str, Path], fleet_db: str) -> None:
    """An agent that goes silent with its connection open (SIGSTOP, as a device whose
    network drops): after 1.5 keepalives the broker publishes its Will, which carries when
    the agent started and when its connection was made; the fleet database records when
    the Will arrived and when the device was last heard from, well before that."""
    agents = start_group(tmp_path, releases["keys"], broker.url, ["dev-1"],
                         [releases["onnx1"]], keepalive_s=5, telemetry_interval_s=0.5,
                         db=fleet_db)
    db = FleetDB(fleet_db)
    watcher = FleetWatcher(db, broker.url, "acme")
    proc = agents[0].proc
    assert proc is not None
    try:
        wait_until(lambda: db.online() == {"dev-1"}, timeout_s=30, what="dev-1 online")
        wait_until(lambda: db.devices()[0].telemetry_age_s is not None, timeout_s=30,
                   what="dev-1's telemetry")
        stopped = time.time()
        proc.send_signal(signal.SIGSTOP)
        wait_until(lambda: db.online() == set(), timeout_s=30, what="the Will")
        with db.store.lock:
            state_at, started_at, last_seen, offline_at = db.store.execute(
                "SELECT state_at, started_at, last_seen, offline_at FROM devices").fetchone()
        assert started_at is not None and state_at >= started_at  # the Will: connect time
        assert last_seen <= stopped + 1.0  # its last telemetry, around the stop
        assert offline_at >= stopped + 5  # the broker waited out the keepalive first
        seen = db.devices()[0].last_seen_age_s
        assert seen is not None and seen >= 5
    finally:
        proc.send_signal(signal.SIGCONT)
        watcher.stop()
        for a in agents:
            a.stop()
