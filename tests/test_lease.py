"""Which controller drives a rollout (`fleet.rollout.lease`), on both engines: a lease timed
by the database's clock, a fencing token every controller write checks, and a standby
that takes over a stopped controller's rollout while the stopped one, resumed, writes
nothing and exits with its own code."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from polling import wait_until
from test_rollout import lab_rollout, rollout_argv, signing, versions

from fleet.cli.rollout import LEASE_LOST_EXIT
from fleet.devices.registry import FleetDB
from fleet.errors import LeaseHeld, LeaseLost
from fleet.rollout.policy import Exec, Status
from fleet.rollout.record import Rollouts


def _history(rollouts: Rollouts, rid: str) -> int:
    return int(rollouts.store.one("SELECT COUNT(*) FROM rollout_history WHERE rollout = ?",
                                  (rid,))[0])


def test_a_lease_runs_by_the_database_clock_and_fences_the_controller_that_lost_it(
        releases: dict[str, Path], fleet_db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = Rollouts(FleetDB(fleet_db)), Rollouts(FleetDB(fleet_db))  # two connections
    operator = Rollouts(FleetDB(fleet_db))
    rid = lab_rollout(operator, releases, "http://127.0.0.1:9")
    assert a.leases.acquire(rid, "host-a:1", lease_s=1.0) == 1
    a.set(rid, reason="a drives it")
    assert a.leases.acquire(rid, "host-a:1", lease_s=1.0) == 1  # renewed: the same token
    with pytest.raises(LeaseHeld, match="driven by controller host-a:1"):
        b.leases.acquire(rid, "host-b:1")
    # the controllers' own clocks mean nothing: an hour ahead, the lease still runs
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 3600)
    with pytest.raises(LeaseHeld):
        b.leases.acquire(rid, "host-b:1")
    assert b.leases.holder(rid) == "host-a:1"
    monkeypatch.undo()

    wait_until(lambda: b.leases.holder(rid) is None, timeout_s=10, what="a's lease to run out")
    assert operator.get(rid).shown_status() == "stalled"
    # a stopped past its lease, the write it was making when it stopped is refused...
    before = _history(operator, rid)
    with pytest.raises(LeaseLost, match="ran out"):
        a.transition(rid, "dev-1", "send", "a's late send", command_id="x", attempts=1)
    assert _history(operator, rid) == before
    assert b.leases.acquire(rid, "host-b:1") == 2  # ...and b takes it over: a new token
    assert operator.get(rid).shown_status() == "running"
    # ...and so is every write of a's after that, whatever it is
    for write in (lambda: a.set(rid, reason="a is back"),
                  lambda: a.set_device(rid, "dev-1", detail="a"),
                  lambda: a.transition(rid, "dev-1", "send", "a", command_id="y", attempts=1),
                  lambda: a.record_command(rid, "dev-1", "deploy", "y", 1, real() + 60, b"{}"),
                  lambda: a.mark_sent(rid, "x"), lambda: a.drop_unsent(rid, "x"),
                  lambda: a.add_member(rid, "dev-9"), lambda: a.move(rid, "halt", "a"),
                  lambda: a.leases.acquire(rid, "host-a:1")):
        with pytest.raises(LeaseLost, match="taken by host-b:1"):
            write()
    ro = operator.get(rid)
    assert (ro.reason, ro.status, ro.owner, ro.lease_token) == ("a drives it", Status.RUNNING,
                                                                "host-b:1", 2)
    assert _history(operator, rid) == before and operator.unsent(rid) == []
    assert [d.device for d in operator.devices(rid)] == ["dev-1", "dev-2", "dev-3"]
    b.transition(rid, "dev-1", "send", "b's send", command_id="z", attempts=1)
    assert operator.device(rid, "dev-1").status is Exec.TO_SEND  # type: ignore[union-attr]
    # the operator holds no lease: pausing from the command line needs none
    assert operator.move(rid, "pause") is Status.PAUSED
    b.leases.release(rid, "host-b:1")  # a controller that stops hands it over at once
    assert b.leases.holder(rid) is None
    assert a.leases.acquire(rid, "host-a:1") == 3


def test_claims_spread_rollouts_and_a_token_moves_only_when_the_lease_changes_hands(
        releases: dict[str, Path], fleet_db: str) -> None:
    """`Leases.claim`, as the controller service calls it, written out step by step: the
    oldest unleased rollouts first, never one whose lease runs; a controller whose own
    lease ran out (a slow step) and that claims it back before anyone else keeps its token
    (a CI run where the survivor re-claimed its own rollout counted it as a third
    controller); another controller that claims it gets the next token and fences the
    first off."""
    a, b = Rollouts(FleetDB(fleet_db)), Rollouts(FleetDB(fleet_db))
    operator = Rollouts(FleetDB(fleet_db))
    r1 = lab_rollout(operator, releases, "http://127.0.0.1:9")
    r2 = lab_rollout(operator, releases, "http://127.0.0.1:9")
    assert a.leases.claim("host-a:1", lease_s=1.0) == [r1]  # the oldest first
    assert b.leases.claim("host-b:1", lease_s=1.0, limit=5) == [r2]  # not a's running one
    assert a.leases.claim("host-a:1", lease_s=1.0, limit=5) == []  # both leases run
    assert (operator.get(r1).lease_token, operator.get(r2).lease_token) == (1, 1)
    # a standby with room wakes when the first lease runs out, not at its next poll
    ends = operator.leases.next_expiry_s()
    assert ends is not None and 0.0 < ends <= 1.0
    wait_until(lambda: a.leases.holder(r1) is None, timeout_s=10, what="a's lease to run out")
    assert a.leases.claim("host-a:1", lease_s=1.0) == [r1]  # back before anyone took it
    assert (operator.get(r1).owner, operator.get(r1).lease_token) == ("host-a:1", 1)
    a.set(r1, reason="a drives it still")  # its writes pass: its lease never changed hands
    assert a.leases.acquire(r1, "host-a:1", lease_s=1.0) == 1
    wait_until(lambda: a.leases.holder(r1) is None and b.leases.holder(r2) is None,
               timeout_s=10, what="both leases to run out")
    assert operator.leases.next_expiry_s() is None  # no lease runs: nothing to wait for
    assert b.leases.claim("host-b:1", lease_s=30.0, limit=5) == [r1, r2]
    assert (operator.get(r1).lease_token, operator.get(r2).lease_token) == (2, 1)
    assert 29.0 < (operator.leases.next_expiry_s() or 0.0) <= 30.0
    with pytest.raises(LeaseLost, match="taken by host-b:1"):
        a.set(r1, reason="a is back")
    assert operator.get(r1).reason == "a drives it still"


def test_a_standby_takes_over_a_stopped_controller_which_then_writes_nothing(
        group: Any, releases: dict[str, Path], tmp_path: Path, fleet_db: str) -> None:
    """Two `edge-fleet rollout run` processes on one rollout. The first drives it; it is
    stopped (SIGSTOP, as a host that hangs or is cut off) once dev-1 serves v2; the
    standby waits for its lease to run out and takes the rollout over; the first, resumed
    while the standby drives, finds its lease taken at its first write or renewal and
    exits 8; the standby completes the rollout from the record. The lease's token stays
    the standby's: the first never wrote again (every controller write checks it)."""
    broker, agents, url = group
    db = FleetDB(fleet_db)
    rollouts = Rollouts(db)
    rid = lab_rollout(rollouts, releases, url, health_window_s=0.5)
    argv = [*signing(broker, releases), "--lease", "2", "--timeout", "120"]
    logs = [(tmp_path / f"{n}.log").open("w") for n in ("first", "standby")]
    first = subprocess.Popen(rollout_argv(fleet_db, "run", rid, *argv), stdout=logs[0],
                             stderr=subprocess.STDOUT)
    standby = None
    try:
        wait_until(lambda: rollouts.get(rid).owner is not None, timeout_s=60,
                   what="the first controller's lease")
        owner = rollouts.get(rid).owner
        wait_until(lambda: agents[0].call("GET", "/v1/admin/status")[1]["models"]["digits"]
                   ["version"] == 2, timeout_s=60, every_s=0.01, what="dev-1 on v2")
        first.send_signal(signal.SIGSTOP)
        standby = subprocess.Popen(rollout_argv(fleet_db, "run", rid, *argv), stdout=logs[1],
                                   stderr=subprocess.STDOUT)
        wait_until(lambda: rollouts.get(rid).owner not in (None, owner), timeout_s=30,
                   what="the standby's lease")
        token = rollouts.get(rid).lease_token
        first.send_signal(signal.SIGCONT)  # back while the standby drives the rollout
        assert first.wait(60) == LEASE_LOST_EXIT
        assert standby.wait(120) == 0  # completed
        ro = rollouts.get(rid)
        assert ro.status is Status.COMPLETED and ro.lease_token == token
        assert [d.status for d in rollouts.devices(rid)] == [Exec.COMMITTED] * 3
        assert versions(agents) == [2, 2, 2]
        assert not any(d.rollback_id for d in rollouts.devices(rid))
    finally:
        for p in (first, standby):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
                p.wait(10)
        for f in logs:
            f.close()
    assert "lease was taken by" in (tmp_path / "first.log").read_text()


def test_controllers_as_a_service_claim_a_rollout_once_and_carry_on_a_killed_ones(
        group: Any, releases: dict[str, Path], tmp_path: Path, fleet_db: str) -> None:
    """Two `edge-fleet controller` services on one record (one host; the same on several
    is `test_hosts.py`): one claims the rollout; it is killed (SIGKILL) once dev-1 serves
    v2; the other claims it once the lease ran out and completes it. The lease's token
    counts the two claims: no controller took it twice, none took it while it ran."""
    broker, agents, url = group
    rollouts = Rollouts(FleetDB(fleet_db))
    rid = lab_rollout(rollouts, releases, url, health_window_s=0.5)
    argv = [sys.executable, "-m", "fleet.cli", "controller", "--db", fleet_db,
            *map(str, signing(broker, releases)), "--lease", "2"]
    logs = [(tmp_path / f"c{i}.log").open("w") for i in range(2)]
    procs = [subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT) for f in logs]
    try:
        wait_until(lambda: rollouts.get(rid).owner is not None, timeout_s=60,
                   what="a controller's claim")
        assert rollouts.get(rid).lease_token == 1
        owner = rollouts.get(rid).owner
        wait_until(lambda: versions(agents)[0] == 2, timeout_s=60, every_s=0.01,
                   what="dev-1 on v2")
        first = next(p for p in procs if f":{p.pid}:" in str(owner))
        first.kill()
        first.wait(10)
        wait_until(lambda: rollouts.get(rid).status is Status.COMPLETED, timeout_s=120,
                   what="the rollout's completion by the other controller")
        # given up right after the step that completed it
        wait_until(lambda: rollouts.get(rid).owner is None, timeout_s=30,
                   what="the lease given up")
        assert rollouts.get(rid).lease_token == 2  # claimed twice: once by each
        assert [d.status for d in rollouts.devices(rid)] == [Exec.COMMITTED] * 3
        assert versions(agents) == [2, 2, 2]
        assert not any(d.rollback_id for d in rollouts.devices(rid))
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(30)
        for f in logs:
            f.close()
    survivor = next(p for p in procs if f":{p.pid}:" not in str(owner))
    assert survivor.returncode == 0
    assert f"rollout {rid}: completed" in (tmp_path / f"c{procs.index(survivor)}.log").read_text()
