"""What operators point at the agent: its /metrics on the metrics listener pass
`promtool check metrics` and are scraped by Debian's real Prometheus; the shipped alert
rules pass `promtool check rules` and their unit tests; the alert rules and the Grafana
dashboard use only metrics the agent exports."""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from fixture_agent import make_keys, write_config

from agent.serving.metrics import FAMILIES

ROOT = Path(__file__).resolve().parents[1]
MONITORING = ROOT / "monitoring"
METRIC = re.compile(r"\b((?:edge_agent|process)_[a-z_]+)\b")


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} missing: scripts/bootstrap.sh installs Debian's prometheus"
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _family(name: str) -> str:
    for suffix in ("_bucket", "_count", "_sum"):
        base = name.removesuffix(suffix)
        if base != name and FAMILIES.get(base, ("",))[0] == "histogram":
            return base
    return name


def _dashboard_exprs() -> list[str]:
    dash = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    return [t["expr"] for p in dash["panels"] for t in p["targets"]]


def test_alert_rules_check_and_pass_their_unit_tests() -> None:
    promtool = _tool("promtool")
    for args in (["check", "rules", "alerts.yml"], ["test", "rules", "alerts.test.yml"]):
        p = subprocess.run([promtool, *args], cwd=MONITORING, capture_output=True, text=True,
                           check=False)
        assert p.returncode == 0, p.stdout + p.stderr


def test_rules_and_dashboard_use_only_exported_metrics_in_valid_promql(
        tmp_path: Path) -> None:
    exprs = _dashboard_exprs()
    rules = (MONITORING / "alerts.yml").read_text()
    used = {_family(m) for text in [*exprs, rules] for m in METRIC.findall(text)}
    assert used, "no metric found"
    assert used <= set(FAMILIES), sorted(used - set(FAMILIES))
    # Every dashboard query parses: promtool checks them as recording rules.
    body = "groups:\n  - name: dashboard\n    rules:\n" + "".join(
        f"      - record: panel_{i}\n        expr: {json.dumps(e.replace('$instance', '.*'))}\n"
        for i, e in enumerate(exprs))
    (tmp_path / "dashboard.rules.yml").write_text(body)
    p = subprocess.run([_tool("promtool"), "check", "rules", "dashboard.rules.yml"],
                       cwd=tmp_path, capture_output=True, text=True, check=False)
    assert p.returncode == 0, p.stdout + p.stderr


def _get(url: str, timeout: float = 5) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:  # loopback
        return r.read()


def test_a_live_agent_passes_promtool_and_is_scraped_by_prometheus(tmp_path: Path) -> None:
    port = _free_port()
    keys = make_keys(tmp_path / "keys")
    cfg = write_config(tmp_path / "dev", keys, profile="x86_64-generic",
                       api={"metrics_port": port})
    log = tmp_path / "agent.log"
    with log.open("wb") as fh:
        agent = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config",
                                  str(cfg)], stdout=fh, stderr=fh, stdin=subprocess.DEVNULL)
    prom = None
    try:
        end = time.monotonic() + 30
        while True:
            try:
                assert _get(f"http://127.0.0.1:{port}/v2/health/live") == b'{"live":true}'
                break
            except OSError:
                assert agent.poll() is None and time.monotonic() < end, log.read_text()
                time.sleep(0.05)
        # Inference and admin routes are not on this listener; metrics need no token.
        with pytest.raises(urllib.error.HTTPError) as err:
            _get(f"http://127.0.0.1:{port}/v2/models/digits")
        assert err.value.code == 404
        text = _get(f"http://127.0.0.1:{port}/metrics").decode()
        for name, (kind, _) in FAMILIES.items():  # every family, before any request
            assert f"# HELP {name} " in text and f"# TYPE {name} {kind}\n" in text, name
        assert re.search(r'^edge_agent_build_info\{.*version="[0-9.]+".*\} 1$', text, re.M)
        assert re.search(r"^process_resident_memory_bytes \d+$", text, re.M), text
        check = subprocess.run([_tool("promtool"), "check", "metrics"], input=text,
                               capture_output=True, text=True, check=False)
        assert check.returncode == 0 and not check.stdout.strip(), check.stdout + check.stderr

        web = _free_port()
        (tmp_path / "prometheus.yml").write_text(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: edge-agent\n"
            f"    static_configs:\n      - targets: ['127.0.0.1:{port}']\n")
        prom = subprocess.Popen(
            [_tool("prometheus"), f"--config.file={tmp_path / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{web}"],
            stdout=subprocess.DEVNULL, stderr=(tmp_path / "prom.log").open("wb"),
            stdin=subprocess.DEVNULL)
        query = urllib.parse.quote('up{job="edge-agent"} * on(instance) '
                                   'group_left(version) edge_agent_build_info')
        end = time.monotonic() + 60
        while True:
            try:
                res = json.loads(_get(f"http://127.0.0.1:{web}/api/v1/query?query={query}"))
                if res["data"]["result"]:
                    break
            except OSError:
                pass
            assert time.monotonic() < end, (tmp_path / "prom.log").read_text()[-3000:]
            time.sleep(0.2)
        (sample,) = res["data"]["result"]
        assert sample["value"][1] == "1" and sample["metric"]["version"]
    finally:
        if prom is not None:
            prom.send_signal(signal.SIGTERM)
            prom.wait(30)
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(15) == 0, log.read_text()
