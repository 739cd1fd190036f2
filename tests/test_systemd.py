"""The systemd integration: the unit in the repository is the rendered default, it passes
`systemd-analyze verify`, its exposure is rated 2.0 or lower, MemoryMax follows the budgets,
and the sysusers.d/tmpfiles.d files create what the unit expects (in a scratch root)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from agent.config import load_config
from agent.unit import RUNTIME_OVERHEAD_BYTES, render_unit

REPO = Path(__file__).resolve().parents[1]
SYSTEMD = REPO / "systemd"
EDGE_AGENT = str(REPO / ".venv/bin/edge-agent")


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze missing: scripts/bootstrap.sh installs Debian's systemd"
    return subprocess.run([tool, *args], capture_output=True, text=True, check=False)


def rendered(tmp_path: Path) -> Path:
    unit = tmp_path / "edge-agent.service"
    unit.write_text(render_unit(exec_start=EDGE_AGENT))
    return unit


def test_the_repository_unit_is_the_rendered_default() -> None:
    assert (SYSTEMD / "edge-agent.service").read_text() == render_unit()


def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    p = analyze("verify", str(rendered(tmp_path)))
    assert p.returncode == 0, p.stderr
    assert "edge-agent.service" not in p.stderr, p.stderr


def test_the_units_exposure_is_at_most_2(tmp_path: Path) -> None:
    p = analyze("security", "--offline=true", str(rendered(tmp_path)))
    m = re.search(r"Overall exposure level for edge-agent\.service: (\d+\.\d+)", p.stdout)
    assert m, p.stdout + p.stderr
    assert float(m.group(1)) <= 2.0, p.stdout


def test_the_unit_forbids_core_dumps() -> None:
    """The watchdog kills with SIGABRT: a core would hold decrypted models and keys."""
    assert "\nLimitCORE=0\n" in render_unit()


def test_memory_max_follows_the_profile_budgets() -> None:
    cfg = load_config(SYSTEMD / "agent.toml")
    unit = render_unit(cfg)
    budget = (256 + 64) * 1024 * 1024  # raspberry-pi-4: model + arena budgets
    assert f"MemoryMax={(budget + RUNTIME_OVERHEAD_BYTES) // 2**20}M" in unit
    assert "Type=notify" in unit and "WatchdogSec=30s" in unit


def test_sysusers_and_tmpfiles_create_the_user_and_directories(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    for tool, args in (("systemd-sysusers", [str(SYSTEMD / "edge-agent.sysusers")]),
                       ("systemd-tmpfiles", ["--create", str(SYSTEMD / "edge-agent.tmpfiles")])):
        exe = shutil.which(tool)
        assert exe, f"{tool} missing"
        p = subprocess.run([exe, f"--root={tmp_path}", *args], capture_output=True, text=True,
                           check=False)
        assert p.returncode == 0, p.stderr
    assert re.search(r"^edge-agent:x:\d+:\d+:.*:/var/lib/edge-agent:/usr/sbin/nologin$",
                     (tmp_path / "etc/passwd").read_text(), re.M)
    for d in ("etc/edge-agent", "var/lib/edge-agent"):
        assert (tmp_path / d).stat().st_mode & 0o777 == 0o750


def test_edge_agent_unit_points_at_this_installation_and_an_absolute_config(
        tmp_path: Path) -> None:
    """`edge-agent unit` took ExecStart from PATH (or /usr/local/bin) and copied a relative
    --config: systemd-analyze reported the binary as not executable."""
    import sys

    proc = subprocess.run([sys.executable, "-m", "agent.cli", "unit", "--config",
                           "conf/agent.toml"], cwd=tmp_path, capture_output=True, text=True,
                          check=True, env={"PATH": "/nonexistent"})
    line = next(x for x in proc.stdout.splitlines() if x.startswith("ExecStart="))
    binary, *rest = line.removeprefix("ExecStart=").split()
    assert Path(binary).is_absolute() and Path(binary).is_file(), line
    assert Path(binary).parent == Path(sys.executable).parent, line
    assert rest[-2:] == ["--config", str(tmp_path / "conf/agent.toml")], line
    unit = tmp_path / "edge-agent.service"
    unit.write_text(proc.stdout)
    p = analyze("verify", str(unit))
    assert p.returncode == 0 and "edge-agent.service" not in p.stderr, p.stderr
