"""The dashboard in headless Chromium (Debian's package): the page renders the fleet from
live data, a rollout's progress shows up and changes, and a screenshot is saved."""

from __future__ import annotations

import http.client
import json
import re
import shutil
import subprocess
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from fixture_agent import AgentProcess, start_group
from fixture_mqtt import Broker
from polling import wait_until

from agent.link.wire import Event, Memory, ModelState, ModelTelemetry, StatePayload, Telemetry
from fleet.dashboard import Dashboard, make_server
from fleet.devices.registry import FleetDB
from fleet.devices.watcher import FleetWatcher
from fleet.rollout.controller import Controller
from fleet.rollout.policy import Criteria
from fleet.rollout.record import Rollouts
from fleet.trust.artifacts import serve_in_thread
from fleet.trust.keys import KeyDir

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


def table_rows(page: str) -> list[str]:
    """The device ids of the table's rendered rows."""
    body = page[page.index('<tbody id="devices">'):]
    return re.findall(r'<tr data-device="([^"]+)"', body[:body.index("</tbody>")])


def test_the_dashboard_of_a_thousand_devices_pages_sorts_filters_and_shows_a_halt(
        tmp_path: Path, releases: dict[str, Path]) -> None:
    """1,000 devices in the fleet database (stored by the same calls the watcher makes),
    a halted rollout over them; the page renders one page of the table, the version
    distribution, the per-wave breakdown and the devices that caused the halt, and the
    URL's sort, filter and health choices apply."""
    db = FleetDB(tmp_path / "fleet.sqlite")
    now = datetime.now(UTC)
    names = [f"dev-{i:04d}" for i in range(1000)]
    dash = Dashboard(db, "acme")
    for i, n in enumerate(names):
        version, committed = (2, 2) if i < 600 else (1, 2) if i < 620 else (1, 1)
        db.put_state(StatePayload(device=n, fleet="acme", online=i % 50 != 7,
                                  agent_version="0.1.0", profile="x86_64-generic",
                                  groups=["lab"], at=now, models={"digits": ModelState(
                                      version=version, runtime="onnx", committed=committed)}))
    for k in range(3):  # three telemetry rounds, each seen by the dashboard
        for i, n in enumerate(names):
            db.put_telemetry(Telemetry(
                seq=k + 1, device=n, at=now, interval_s=10, uptime_s=100, cpu_percent=5,
                memory=Memory(process_rss_bytes=1, system_available_bytes=1,
                              system_total_bytes=2),
                temperature_c=None, throttle="normal", queue_depth=0,
                models={"digits": ModelTelemetry(requests=10, errors=0,
                                                 latency_p50_ms=0.5 + k * 0.1 + i / 1e4,
                                                 throughput_per_s=1)}), time.time())
        dash.snapshot()
    for n in names[:5]:
        db.put_event(Event(seq=1, device=n, at=now, kind="anomaly", severity="warning",
                           message="output_drift psi 0.4 > 0.25"), time.time())
    rollouts = Rollouts(db)
    rid = rollouts.create(archive=releases["onnx2"], urls=["http://127.0.0.1:9/a"],
                          group="lab", devices=names, fractions=[0.1, 1.0],
                          criteria=Criteria(), wave_timeout_s=60)
    for n in names[:100]:
        rollouts.transition(rid, n, "send", "test")
        rollouts.transition(rid, n, "acked", "test")
        rollouts.transition(rid, n, "failed" if n in names[:3] else "committed", "test")
    rollouts.set(rid, culprits_json=json.dumps(names[:3]))
    rollouts.move(rid, "halt", "3 of 100 device(s) failed or rolled back")
    t0 = time.perf_counter()
    dash.snapshot()
    snapshot_ms = (time.perf_counter() - t0) * 1000
    server = make_server(dash)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        t0 = time.perf_counter()
        page = browse(url, "--dump-dom")
        load_s = time.perf_counter() - t0
        assert len(table_rows(page)) == 50  # one page, not a thousand rows
        assert "page 1 of 20" in page and "1000 of 1000" in page
        assert 'data-version="digits v2"' in page and "digits v2: 600" in page
        assert "digits v1 (rolled back from v2): 20" in page
        assert "halted" in page and "caused by: dev-0000, dev-0001, dev-0002" in page
        assert re.search(r"wave 1</td><td>100 device\(s\)</td>\s*<td>97 committed, 3 failed",
                         page), page[page.index('class="waves"'):][:400]
        assert "980 online" in page and "5 anomalous" in page
        assert re.search(r"\(0\.5\d–0\.7\d\)", page)  # the sparkline's scale
        render_ms = float(re.search(r'data-render-ms="([\d.]+)"', page).group(1))  # type: ignore[union-attr]
        desc = browse(url + "?sort=device&dir=desc", "--dump-dom")
        assert table_rows(desc)[:2] == ["dev-0999", "dev-0998"]
        found = browse(url + "?q=dev-012", "--dump-dom")
        assert table_rows(found) == [f"dev-012{i}" for i in range(10)]
        assert "10 of 1000" in found
        bad = browse(url + "?health=anomalous", "--dump-dom")
        assert table_rows(bad) == names[:5] and "output_drift" in bad
        print(f"1,000 devices: snapshot {snapshot_ms:.0f} ms, page load (headless Chromium, "
              f"process included) {load_s:.2f} s, first render {render_ms:.0f} ms")
    finally:
        server.shutdown()


def test_device_text_cannot_script_the_dashboard(tmp_path: Path) -> None:
    """A device's own strings (its profile, a model name, an anomaly's message) holding
    markup and a `</script>` meant to end the page's initial data: Chromium renders them
    as text, no element they name exists, and the page's title is its own."""
    db = FleetDB(tmp_path / "fleet.sqlite")
    now = datetime.now(UTC)
    attack = '<img src=x onerror="document.title=\'pwned\'">'
    db.put_state(StatePayload(device="dev-1", fleet="acme", online=True,
                              agent_version="0.1.0", profile=attack, groups=["lab"], at=now,
                              models={"digits": ModelState(version=1, runtime="onnx",
                                                           committed=1)}))
    db.put_event(Event(seq=1, device="dev-1", at=now, kind="anomaly", severity="warning",
                       message="</script><script>document.title='pwned'</script>" + attack,
                       evidence={}), time.time())
    server = make_server(Dashboard(db, "acme"))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        page = browse(f"http://127.0.0.1:{server.server_address[1]}/", "--dump-dom")
    finally:
        server.shutdown()
    assert "<title>edge-fleet</title>" in page and "pwned</title>" not in page
    markup = re.sub(r"<script>.*?</script>", "", page, flags=re.S)  # the data, as JS text
    assert page.count("</script>") == 1 and "<img" not in markup  # the page's own script
    assert "&lt;img src=x onerror=" in markup  # shown, as text
    assert table_rows(page) == ["dev-1"]
