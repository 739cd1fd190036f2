"""The test harness cleans up after itself: a process a fixture started and that never
became ready is killed before the failure is raised (a failed setup leaves nothing
running to hold ports, mounts or the next test's machine)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from fixture_agent import AgentProcess
from fixture_mqtt import Broker, free_port


def test_an_agent_that_never_answers_live_is_killed_by_its_failed_start(
        tmp_path: Path) -> None:
    (tmp_path / "agent.toml").write_text("")
    silent = AgentProcess(tmp_path / "agent.toml", command=[
        sys.executable, "-c", "import time; time.sleep(120)"])
    with pytest.raises(AssertionError, match="not live"):
        silent.start(timeout=0.5)
    assert silent.proc is not None and silent.proc.poll() is not None


def test_a_broker_that_never_listens_on_its_port_is_killed_by_its_failed_start(
        tmp_path: Path) -> None:
    broker = Broker(tmp_path / "mosq")
    elsewhere = free_port()  # it runs, but listens on another port than the fixture's
    broker.conf.write_text(broker.conf.read_text().replace(f"listener {broker.port} ",
                                                           f"listener {elsewhere} "))
    with pytest.raises(AssertionError, match="did not start"):
        broker.start(timeout=1.0)
    assert broker.proc is not None and broker.proc.poll() is not None
