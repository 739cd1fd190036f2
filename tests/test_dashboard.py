"""The dashboard in headless Chromium (Debian's package): the page renders the fleet from
live data, a rollout's progress shows up and changes, and a screenshot is saved."""

from __future__ import annotations

import http.client
import re
import shutil
import subprocess
import threading
from pathlib import Path

from fixture_agent import AgentProcess, start_group
from fixture_mqtt import Broker
from polling import wait_until

from fleet.artifacts import serve_in_thread
from fleet.dashboard import Dashboard, make_server
from fleet.keys import KeyDir
from fleet.policy import Criteria
from fleet.rollout import Controller, Rollouts
from fleet.state import FleetDB, FleetWatcher

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def browse(url: str, *extra: str) -> str:
    assert CHROMIUM, "chromium missing: scripts/bootstrap.sh installs Debian's chromium"
    p = subprocess.run([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu",
                        "--disable-dev-shm-usage", "--timeout=5000",
                        "--window-size=1200,700", *extra, url],
                       capture_output=True, text=True, timeout=90, check=False)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout


def test_the_dashboard_shows_devices_and_rollout_progress(
        tmp_path: Path, broker: Broker, releases: dict[str, Path]) -> None:
    agents: list[AgentProcess] = []
    try:
        agents = start_group(tmp_path, releases["keys"], broker.url, ["dev-1", "dev-2"],
                             [releases["onnx1"]], health_window_s=0.5,
                             telemetry_interval_s=0.25)
        db = FleetDB(tmp_path / "fleet.sqlite")
        watcher = FleetWatcher(db, broker.url, "acme").start()
        server = make_server(Dashboard(db, "acme"))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        wait_until(lambda: len(db.devices()) == 2, timeout_s=20, what="both devices seen")
        before = browse(url, "--dump-dom")
        assert re.search(r'<tr data-device="dev-1"', before)
        assert "digits v1" in before and "<p>none</p>" in before

        artifacts, art_url = serve_in_thread(releases["onnx2"].parent)
        archive = releases["onnx2"]
        rid = Rollouts(db).create(archive=archive, urls=[f"{art_url}/{archive.name}"],
                                  group="lab", devices=["dev-1", "dev-2"],
                                  fractions=[0.5, 1.0], criteria=Criteria(),
                                  wave_timeout_s=60)
        kd = KeyDir(releases["keys"])
        c = Controller(db, broker.url, "acme", kd.keys_of(kd.root(), "command", None))
        assert c.step(rid) == "running"
        during = browse(url, "--dump-dom")
        assert f'data-id="{rid}"' in during
        assert c.run(rid, timeout_s=60) == "completed"
        c.close()
        wait_until(lambda: all(r.models.get("digits", {}).get("version") == 2  # state
                               for r in db.devices()), what="both devices' state at v2")
        after = browse(url, "--dump-dom")
        assert 'data-progress="2/2"' in after and "digits v2" in after
        host, port = server.server_address[:2]
        conn = http.client.HTTPConnection(str(host), int(port), timeout=10)
        conn.request("GET", "/events")
        first = conn.getresponse().readline()  # the live stream the page subscribes to
        assert first.startswith(b"data: {") and b'"committed": 2' in first
        conn.close()
        shot = tmp_path / "dashboard.png"
        browse(url, f"--screenshot={shot}")
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 5000
        artifacts.shutdown()
        server.shutdown()
        watcher.stop()
    finally:
        for a in agents:
            a.stop()
