"""agent.toml: sources in order (overrides, environment, file), every problem named, and
the `[detectors]` section reaching the thresholds."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import Thresholds, load_config
from agent.errors import ConfigError

FILE = """
[device]
id = "dev-1"
fleet = "acme"
profile = "raspberry-pi-4"
[api]
tcp_port = 8080
[detectors]
latency_z = 3.5
"""


@pytest.fixture
def path(tmp_path: Path) -> Path:
    p = tmp_path / "agent.toml"
    p.write_text(FILE)
    return p


def test_the_file_alone(path: Path) -> None:
    cfg = load_config(path, environ={})
    assert (cfg.device.id, cfg.api.tcp_port) == ("dev-1", 8080)
    assert cfg.detectors == Thresholds(latency_z=3.5)  # the rest keep their defaults


def test_the_environment_overrides_the_file_and_arguments_override_both(path: Path) -> None:
    env = {"EDGE_AGENT__API__TCP_PORT": "9090", "EDGE_AGENT__DEVICE__ID": "pi-0007",
           "EDGE_AGENT__DETECTORS__ERROR_RATE": "0.2", "UNRELATED": "x"}
    cfg = load_config(path, environ=env)
    assert (cfg.device.id, cfg.api.tcp_port, cfg.detectors.error_rate) == ("pi-0007", 9090,
                                                                            0.2)
    assert cfg.detectors.latency_z == 3.5  # the file's, untouched by the environment
    cfg = load_config(path, environ=env, overrides={"api": {"tcp_port": 7070}})
    assert cfg.api.tcp_port == 7070


def test_every_problem_is_named_with_its_source(path: Path) -> None:
    env = {"EDGE_AGENT__API__TCP_PORT": "99999", "EDGE_AGENT__DETECTORS__LATENCY_Z": "-1",
           "EDGE_AGENT__DETECTORS__NO_SUCH": "1"}
    with pytest.raises(ConfigError) as err:
        load_config(path, environ=env)
    for field in ("api.tcp_port", "detectors.latency_z", "detectors.no_such"):
        assert field in str(err.value)
    assert str(path) in str(err.value)


def _agent_cli(*args: str) -> tuple[int, str]:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "agent.cli", *args], capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL, check=False)
    return proc.returncode, proc.stdout + proc.stderr


def test_check_config_makes_every_check_run_makes_and_names_every_problem(
        tmp_path: Path) -> None:
    """check-config said "valid" for a missing root.json, tcp_port without a token file, a
    tcp:// broker, a missing CA file and a fleet other than root.json's; `run` refused some
    of these and ran with the last. Now both stop on each, naming all of them at once."""
    from fixture_agent import make_keys, write_config

    keys = make_keys(tmp_path / "keys")
    good = write_config(tmp_path / "good", keys, profile="x86_64-generic")
    rc, out = _agent_cli("check-config", "--config", str(good))
    assert rc == 0, out
    assert "ok: trusted root" in out and "(fleet acme, v1)" in out and "valid" in out

    bad = write_config(
        tmp_path / "bad", keys, profile="x86_64-generic",
        device={"fleet": "other"}, paths={"root_file": str(keys / "root.json")},
        api={"tcp_port": 18080, "token_file": str(tmp_path / "no-token")},
        mqtt={"brokers": ["tcp://broker:1883"], "ca_file": str(tmp_path / "no-ca.pem")})
    rc, out = _agent_cli("check-config", "--config", str(bad))
    assert rc == 2, out
    for problem in ("device.fleet is 'other' but the trusted root",
                    "token file", "no-token",
                    "broker URL 'tcp://broker:1883' must be mqtt://",
                    "mqtt.ca_file", "no-ca.pem does not exist"):
        assert problem in out, (problem, out)

    no_root = write_config(tmp_path / "no-root", keys, profile="x86_64-generic",
                           paths={"root_file": str(tmp_path / "missing-root.json")})
    for command in ("check-config", "run"):
        rc, out = _agent_cli(command, "--config", str(no_root))
        assert rc == 2 and "missing-root.json does not exist" in out, (command, out)
    mismatch = write_config(tmp_path / "mismatch", keys, profile="x86_64-generic",
                            device={"fleet": "other"})
    rc, out = _agent_cli("run", "--config", str(mismatch))  # used to run
    assert rc == 2 and "fleet 'acme''s" in out, out
