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
