"""Shared fixtures: one small digits example (data + trained teacher) per test session."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Set by scripts/test-device.sh: prebuilt converter outputs for the lean device
# environments, which have no torch and no converter tooling.
ARTIFACTS = os.environ.get("EDGE_TEST_ARTIFACTS")

try:
    import onnxruntime  # noqa: F401
    HAVE_ONNXRUNTIME = True
except ImportError:  # a TFLite-only device install (scripts/test-device.sh, .venv-tflite)
    HAVE_ONNXRUNTIME = False
needs_onnxruntime = pytest.mark.skipif(
    not HAVE_ONNXRUNTIME, reason="serves an ONNX model; this is a TFLite-only install")

FAST = [
    "--distill-epochs", "12", "--distill-progress", "false", "--evaluate-latency-runs", "10",
    "--data-calibration-samples", "64",
    # 12 epochs are a fast run, not a good student: the distillation gate gets room.
    "--distill-max-gap-points", "25",
]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The 5-minute soak (tests/test_soak.py) first: on two workers (pytest-xdist) it then
    runs beside the rest of the suite instead of after it."""
    items.sort(key=lambda item: item.path.name != "test_soak.py")


@pytest.fixture(scope="session")
def example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """digits.npz, teacher.pt, teacher.onnx and recipe.toml, with a quickly trained teacher."""
    if ARTIFACTS:
        return Path(ARTIFACTS) / "example"
    from converter.examples.digits import write_example

    out = tmp_path_factory.mktemp("example")
    write_example(out, profile="raspberry-pi-4", epochs=8)
    return out


@pytest.fixture(scope="session")
def onnx_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A full `edge-convert run` of the example for raspberry-pi-4 (ONNX teacher)."""
    if ARTIFACTS:
        return Path(ARTIFACTS) / "run"
    from converter.cli import main as convert

    example: Path = request.getfixturevalue("example")

    out = tmp_path_factory.mktemp("run") / "pi4"
    rc = convert(["run", str(example / "recipe.toml"), "--out", str(out),
                  "--distill-tensorboard", "true", *FAST])
    assert rc == 0
    return out


@pytest.fixture(scope="session")
def releases(onnx_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`fixture_agent.make_releases` of the converted digits model (or the prebuilt ones
    of tests/artifacts.py in the device environments)."""
    if ARTIFACTS:
        index = json.loads((Path(ARTIFACTS) / "releases.json").read_text())
        return {k: Path(ARTIFACTS) / v for k, v in index.items()}
    from fixture_agent import make_releases

    return make_releases(onnx_run, tmp_path_factory.mktemp("releases"))


@pytest.fixture
def group(request: pytest.FixtureRequest, tmp_path: Path, broker: Any,
          releases: dict[str, Path]) -> Iterator[Any]:
    """Three real agents of group "lab" (dev-1..3) serving v1 on `broker`, and an artifact
    server for the releases: (broker, agents, url). Their keys are registered in the
    test's `fleet_db` when it takes one, else in tmp_path/fleet.sqlite."""
    from fixture_agent import start_group

    from fleet.trust.artifacts import serve_in_thread

    db = request.getfixturevalue("fleet_db") if "fleet_db" in request.fixturenames else None
    agents = start_group(tmp_path, releases["keys"], broker.url, ["dev-1", "dev-2", "dev-3"],
                         [releases["onnx1"]], health_window_s=0.5, telemetry_interval_s=0.25,
                         db=db)
    server, url = serve_in_thread(releases["onnx1"].parent)
    yield broker, agents, url
    server.shutdown()
    for a in agents:
        a.stop()


@pytest.fixture(scope="session")
def postgres() -> Iterator[Any]:
    """A PostgreSQL cluster of the session's own (`fleet.postgres`: Debian's binaries, the
    postgres user, a password, a free loopback port), removed at the end."""
    import tempfile

    from fleet.postgres import LocalPostgres

    with LocalPostgres(Path(tempfile.mkdtemp(prefix="edge-pg-", dir="/var/tmp"))) as pg:
        yield pg


@pytest.fixture(params=["sqlite", "postgresql"])
def fleet_db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new, empty fleet record on each engine: an SQLite file's path, or the URL of a
    new database on the session's PostgreSQL. A test that takes it runs on both."""
    if request.param == "sqlite":
        return str(tmp_path / "fleet.sqlite")
    import uuid

    return str(request.getfixturevalue("postgres").create_database(f"t_{uuid.uuid4().hex}"))


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Any]:
    """A real mosquitto on a free loopback port, stopped after the test."""
    from fixture_mqtt import Broker

    b = Broker(tmp_path / "mosquitto").start()
    yield b
    b.stop()


@pytest.fixture(scope="session")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Debian package, built once per session by scripts/build-deb.sh (its lintian
    report beside it)."""
    import subprocess

    out = tmp_path_factory.mktemp("deb")
    proc = subprocess.run(["bash", str(Path(__file__).resolve().parents[1]
                                       / "scripts/build-deb.sh"), str(out)],
                          capture_output=True, text=True, timeout=1800, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return Path(proc.stdout.strip().splitlines()[-1])
