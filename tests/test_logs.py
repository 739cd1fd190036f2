"""The daemon's log lines: parseable in every format, at the level asked for, and carrying
syslog priorities exactly when stderr is journald's stream."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fixture_agent import make_keys, write_config

from agent.client import unix_call
from agent.logs import LineFormatter

LOGFMT_PAIR = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|[^ "]+)')


def _record(msg: str, level: int = logging.WARNING) -> logging.LogRecord:
    return logging.LogRecord("edge_agent.link", level, __file__, 1, msg, None, None)


def _logfmt(line: str) -> dict[str, str]:
    pairs = LOGFMT_PAIR.findall(line)
    assert " ".join(f"{k}={v}" for k, v in pairs) == line, line  # nothing left unparsed
    return {k: json.loads(v) if v.startswith('"') else v for k, v in pairs}


@pytest.mark.parametrize("msg", ["models=no model yet", 'a "quoted" word', "tab\there",
                                 "two\nlines", "plain"])
def test_logfmt_and_json_lines_parse_back_to_the_message(msg: str) -> None:
    fields = _logfmt(LineFormatter("logfmt", journald=False).format(_record(msg)))
    assert fields == {"level": "warning", "logger": "edge_agent.link", "msg": msg}
    obj = json.loads(LineFormatter("json", journald=False).format(_record(msg)))
    assert (obj["level"], obj["logger"], obj["msg"]) == ("warning", "edge_agent.link", msg)


def _line(fmt: str, msg: str, *args: object, **extra: object) -> dict[str, object]:
    rec = logging.LogRecord("edge_agent.api", logging.WARNING, __file__, 1, msg, args, None)
    for k, v in extra.items():
        setattr(rec, k, v)
    line = LineFormatter(fmt, journald=False).format(rec)  # type: ignore[arg-type]
    return json.loads(line) if fmt == "json" else _logfmt(line)


def test_an_events_key_value_pairs_are_fields_of_their_own() -> None:
    """`event key=%s …`: the event and each pair become fields, typed as the argument
    was (JSON) or as logfmt pairs; values with spaces and `=` stay whole; the message is
    still there in full."""
    template = "http.error status=%d method=%s path=%s reason=%s error=%s"
    args = (404, "GET", "/v2/a b=c", "-", '"no such model"')
    obj = _line("json", template, *args)
    want = {"event": "http.error", "status": 404, "method": "GET", "path": "/v2/a b=c",
            "reason": "-", "error": '"no such model"'}
    assert {k: obj[k] for k in want} == want, obj
    assert obj["msg"] == template % args
    pairs = _line("logfmt", template, *args)
    assert {k: pairs[k] for k in want} == {k: str(v) for k, v in want.items()}, pairs
    assert pairs["msg"] == template % args
    # the event from its argument; no event for free text; no clash with the line's keys
    assert _line("json", "trust.%s_failed", "root")["event"] == "trust.root_failed"
    free = _line("json", "%d connections on all listeners", 3)
    assert set(free) == {"ts", "level", "logger", "msg"}, free
    clash = _line("json", "x.y level=%s msg=%s ts=%d", "high", "m", 3)
    assert (clash["level"], clash["level_"], clash["msg_"], clash["ts_"]) == (
        "warning", "high", "m", 3), clash
    floats = _line("json", "mqtt.retry after=%.1f ok=%s", 2.25, True)
    assert (floats["after"], floats["ok"]) == (2.25, True), floats
    held = _line("json", "http.error status=%d", 429, fields={"suppressed": 7})
    assert (held["status"], held["suppressed"]) == (429, 7), held


def test_journald_lines_carry_their_priority_on_every_line() -> None:
    fmt = LineFormatter("text", journald=True)
    assert fmt.format(_record("hot", logging.WARNING)).startswith("<4>WARNING ")
    assert fmt.format(_record("ok", logging.INFO)).startswith("<6>INFO ")
    try:
        raise ValueError("boom")
    except ValueError:
        rec = _record("failed", logging.ERROR)
        rec.exc_info = sys.exc_info()
    lines = fmt.format(rec).split("\n")
    assert len(lines) > 2 and all(line.startswith("<3>") for line in lines), lines


@pytest.mark.parametrize(("fmt", "journald"), [("json", True), ("logfmt", False)])
def test_the_daemon_logs_in_the_format_asked_and_knows_journald_from_a_file(
        tmp_path: Path, fmt: str, journald: bool) -> None:
    """stderr is a file; JOURNAL_STREAM names it (as systemd does for its stream) or names
    another stream (a child that inherited the variable): prefixes only for the first."""
    keys = make_keys(tmp_path / "keys")
    cfg = write_config(tmp_path / "dev", keys, profile="x86_64-generic")
    err = tmp_path / "stderr.log"
    with err.open("wb") as fh:
        st = os.fstat(fh.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}" if journald
               else f"{st.st_dev}:{st.st_ino + 1}"}
        proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(cfg),
                                 "--log-format", fmt, "--log-level", "info"], stderr=fh,
                                stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL, env=env)
    try:
        end = time.monotonic() + 30
        while time.monotonic() < end:
            try:
                if unix_call(tmp_path / "dev/api.sock", "GET", "/v2/health/live")[0] == 200:
                    break
            except OSError:
                time.sleep(0.05)
        else:
            raise AssertionError(err.read_text())
        assert unix_call(tmp_path / "dev/api.sock", "GET", "/v2/models/nope")[0] == 404
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0, err.read_text()
    lines = [line for line in err.read_text().splitlines() if line]
    assert len(lines) >= 3, lines
    errors: list[dict[str, object]] = []
    for line in lines:
        body = line
        if journald:
            m = re.match(r"<([0-7])>(.*)", line)
            assert m, line
            body = m.group(2)
        else:
            assert not line.startswith("<"), line
        fields = json.loads(body) if fmt == "json" else _logfmt(body)
        assert fields["level"] in ("info", "warning", "error"), line
        if fields.get("event") == "http.error":  # the client error, its pairs as fields
            errors.append(fields)
        if journald:
            want = {"info": "6", "warning": "4", "error": "3"}[fields["level"]]
            assert m.group(1) == want, line
    assert [(e["status"], e["path"]) for e in errors] == [
        (404 if fmt == "json" else "404", "/v2/models/nope")], errors


def test_sigterm_with_an_idle_keep_alive_client_stops_at_once_without_a_traceback(
        tmp_path: Path) -> None:
    """A client holding a keep-alive connection used to keep the drain waiting its full 10 s
    (11.7 s to stop) and end in an asyncio traceback. The idle connection is closed at
    once; a 300 s idle timeout shows the stop does not wait for it, nor for the drain."""
    from agent.client import UnixHTTPConnection

    keys = make_keys(tmp_path / "keys")
    cfg = write_config(tmp_path / "dev", keys, profile="x86_64-generic",
                       api={"idle_timeout_s": 300})
    err = tmp_path / "stderr.log"
    with err.open("wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(cfg)],
                                stderr=fh, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    conn = UnixHTTPConnection(tmp_path / "dev/api.sock", timeout=30)
    try:
        end = time.monotonic() + 30
        while True:
            try:
                conn.request("GET", "/v2/health/live")
                break
            except OSError:
                assert time.monotonic() < end, err.read_text()
                conn.close()
                time.sleep(0.05)
        response = conn.getresponse()
        assert response.status == 200 and response.read()
        assert response.getheader("connection") != "close"  # kept alive, now idle
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(8) == 0, err.read_text()  # under the 10 s drain it used to wait
        assert conn.sock is not None and conn.sock.recv(1) == b""  # closed by the agent
    finally:
        conn.close()
        if proc.poll() is None:
            proc.kill()
    assert "Traceback" not in err.read_text(), err.read_text()


def test_repeated_lines_are_held_back_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    from agent.logs import RateLimited
    from agent.testing import FakeClock

    clock = FakeClock()
    limited = RateLimited(logging.getLogger("t"), interval_s=60, max_keys=2, clock=clock)
    with caplog.at_level(logging.INFO, logger="t"):
        assert limited.log(logging.WARNING, "a", "down %s", "x")
        assert not any(limited.log(logging.WARNING, "a", "down %s", "x") for _ in range(9))
        assert limited.log(logging.WARNING, "b", "other")  # another key logs at once
        clock.jump(61)
        assert limited.log(logging.WARNING, "a", "down %s", "x")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["down x", "other", "down x (and 9 more like it in the last 60s)"]
    assert limited.forget("a") == 0 and limited.forget("nothing") == 0
    for key in "cdef":  # bounded: old keys are forgotten
        limited.log(logging.INFO, key, "k")
    assert len(limited._seen) == 2


def test_client_errors_are_counted_by_status_and_logged_once_a_minute(tmp_path: Path) -> None:
    """A client looping on a bad request (or cycling through random paths) costs one log
    line a minute per status, and every answer is counted by status."""
    keys = make_keys(tmp_path / "keys")
    cfg = write_config(tmp_path / "dev", keys, profile="x86_64-generic")
    err = tmp_path / "stderr.log"
    with err.open("wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(cfg)],
                                stderr=fh, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    sock = tmp_path / "dev/api.sock"
    try:
        end = time.monotonic() + 30
        while True:
            try:
                unix_call(sock, "GET", "/v2/health/live")
                break
            except OSError:
                assert time.monotonic() < end, err.read_text()
                time.sleep(0.05)
        for i in range(40):
            assert unix_call(sock, "GET", f"/v2/models/nope-{i}")[0] == 404
            assert unix_call(sock, "GET", f"/no/such/route/{i}")[0] == 404
        assert unix_call(sock, "POST", "/v2/repository/index", {"ready": 3})[0] == 400
        metrics = unix_call(sock, "GET", "/metrics")[1]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
    assert 'edge_agent_http_responses_total{code="404",kind="api"} 80' in metrics, metrics
    assert 'edge_agent_http_responses_total{code="400",kind="api"} 1' in metrics, metrics
    # the health checks polled above are counted apart from API traffic
    assert re.search(r'edge_agent_http_responses_total\{code="200",kind="health"\} [1-9]',
                     metrics), metrics
    text = err.read_text()
    assert text.count("http.error status=404") == 1, text
    assert text.count("http.error status=400") == 1, text


def test_answers_are_counted_by_what_they_were_for() -> None:
    """Scrapes and health checks are not traffic (they diluted the refusal-rate alert)."""
    from agent.api import route_kind

    assert {p: route_kind(p) for p in (
        "/v2/models/digits/infer", "/v2/models/digits/versions/1/infer",
        "/v1/models/digits:predict", "/v1/models/digits/versions/2:classify",
        "/v1/models/energy:regress", "/v2/health/live", "/v2/health/ready", "/metrics",
        "/metrics?x=1", "/v2/models/digits", "/v2/repository/index", "/v1/admin/install",
        "/no/such/route", "/v1/models/digits/metadata")} == {
        "/v2/models/digits/infer": "inference", "/v2/models/digits/versions/1/infer": "inference",
        "/v1/models/digits:predict": "inference",
        "/v1/models/digits/versions/2:classify": "inference",
        "/v1/models/energy:regress": "inference", "/v2/health/live": "health",
        "/v2/health/ready": "health", "/metrics": "metrics", "/metrics?x=1": "metrics",
        "/v2/models/digits": "api", "/v2/repository/index": "api", "/v1/admin/install": "api",
        "/no/such/route": "api", "/v1/models/digits/metadata": "api"}
