"""The packaged agent under a real systemd: a fresh Debian 12 with the .deb installed,
booted with `systemd-nspawn -b`. `systemctl start` returns once the agent said READY (after
verifying and self-testing its model); inference works under the unit's hardening with
TFLite (XNNPACK); a hung agent is killed by the watchdog and restarted; journald files its
warnings as warnings; `systemctl stop` with a keep-alive client connected is clean."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from debroot import Root, add_onnxruntime, fresh_root, second_build, unpack_release
from polling import wait_until

# One worker runs the package tests (tests/test_deb.py too): they share one package build
# and the cached Debian root.
pytestmark = pytest.mark.xdist_group("debian-package")

CONFIG = """
[device]
id = "dev-1"
fleet = "acme"
groups = ["lab"]
profile = "raspberry-pi-4"
[paths]
state_dir = "/var/lib/edge-agent"
root_file = "/etc/edge-agent/root.json"
[api]
socket = "/run/edge-agent/api.sock"
admin_socket = "/run/edge-agent/admin.sock"
"""
# The same checks through the agent's own client, with the packaged interpreter.
CLIENT = "/opt/venvs/edgekeeper/bin/python"


class Booted:
    def __init__(self, root: Root, nspawn: subprocess.Popen[bytes]) -> None:
        self.root, self.nspawn = root, nspawn
        self.pid1 = 0

    def find_init(self) -> bool:
        for p in psutil.Process(self.nspawn.pid).children(recursive=True):
            if p.name() == "systemd" and p.parent() is not None \
                    and p.parent().name() == "systemd-nspawn":
                self.pid1 = p.pid
                return True
        return False

    def run(self, *cmd: str, check: bool = True, timeout: float = 120
            ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(["nsenter", "-t", str(self.pid1), "-a", "--", *cmd],
                              capture_output=True, text=True, timeout=timeout, check=False,
                              stdin=subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise AssertionError(f"{cmd} -> {proc.returncode}: {proc.stdout}{proc.stderr}")
        return proc

    def agent_processes(self) -> list[str]:
        """The command lines of the container's `edge-agent run` processes."""
        found = []
        for p in psutil.Process(self.pid1).children(recursive=True):
            try:
                cmd = " ".join(p.cmdline())
            except psutil.Error:  # gone meanwhile
                continue
            if "edge-agent run" in cmd:
                found.append(cmd)
        return found

    def show(self, *props: str) -> dict[str, str]:
        out = self.run("systemctl", "show", "edge-agent", *(f"-p{p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def call(self, method: str, url: str, body: Any = None, admin: bool = False) -> Any:
        sock = "/run/edge-agent/admin.sock" if admin else "/run/edge-agent/api.sock"
        code = ("import json, sys; from agent.client import unix_call; "
                f"print(json.dumps(unix_call({sock!r}, {method!r}, {url!r}, "
                f"json.loads(sys.argv[1]))))")
        return json.loads(self.run(CLIENT, "-c", code, json.dumps(body)).stdout)


@pytest.fixture
def booted(deb: Path, tmp_path: Path, releases: dict[str, Path]) -> Iterator[Booted]:
    if not shutil.which("systemd-nspawn"):
        pytest.fail("systemd-nspawn missing: scripts/bootstrap.sh installs systemd-container")
    with fresh_root(tmp_path) as root:
        shutil.copy(deb, root.path / "tmp/edgekeeper.deb")
        root.run("apt-get", "update", "-qq")
        root.run("apt-get", "install", "-y", "-qq", "--no-install-recommends",
                 "/tmp/edgekeeper.deb", "dbus")
        etc = root.path / "etc/edge-agent"
        (etc / "agent.toml").write_text(CONFIG)
        shutil.copy(releases["keys"] / "root.json", etc / "root.json")
        shutil.copy(releases["tflite1"], root.path / "var/tmp/digits.tar.zst")
        unpack_release(releases["onnx1"], root.path / "srv/onnx-bundle")
        # A short watchdog for the test (the unit's is 30 s), as an operator's drop-in.
        dropin = root.path / "etc/systemd/system/edge-agent.service.d"
        dropin.mkdir(parents=True)
        (dropin / "watchdog.conf").write_text("[Service]\nWatchdogSec=4s\nRestartSec=1s\n")
        # Mounted by the boot itself, not by us.
        for m in ("dev/pts", "dev", "sys", "proc"):
            subprocess.run(["umount", "-l", str(root.path / m)], check=False)
        log = (tmp_path / "boot.log").open("wb")
        nspawn = subprocess.Popen(
            ["script", "-q", "-e", "-c", f"systemd-nspawn --register=no --keep-unit "
             f"-D {root.path} -b", "/dev/null"], stdout=log, stderr=log,
            stdin=subprocess.DEVNULL)
        b = Booted(root, nspawn)
        try:
            wait_until(b.find_init, timeout_s=60, what="the container's systemd")
            wait_until(lambda: b.run("systemctl", "is-system-running", check=False
                                     ).stdout.strip() in ("running", "degraded"),
                       timeout_s=120, what="the container to finish booting")
            yield b
        finally:
            if b.pid1:
                b.run("systemctl", "poweroff", check=False)
            try:
                nspawn.wait(60)
            except subprocess.TimeoutExpired:
                nspawn.kill()
            log.close()


def test_the_packaged_agent_under_systemd(booted: Booted) -> None:
    b = booted
    assert b.show("UnitFileState")["UnitFileState"] == "enabled"
    # Not started by the package (no root.json then); now configured, start returns only
    # once the agent sent READY=1.
    b.run("systemctl", "start", "edge-agent")
    s = b.show("ActiveState", "SubState", "StatusText", "MainPID", "Type", "NRestarts")
    assert (s["ActiveState"], s["Type"]) == ("active", "notify"), s
    assert s["StatusText"].startswith("serving"), s

    # A model installed through the admin socket, served under the hardening (TFLite with
    # XNNPACK: MemoryDenyWriteExecute, the system call filter, no capabilities).
    b.run("edge-agent", "install", "/var/tmp/digits.tar.zst")
    # `systemctl status` follows the served models without a restart
    wait_until(lambda: "digits v1" in b.show("StatusText")["StatusText"], timeout_s=20,
               what="STATUS= naming the installed model")
    meta = b.call("GET", "/v2/models/digits")
    status, out = meta[0], meta[1]
    assert status == 200 and out["platform"] == "tensorflow_lite", meta
    name = out["inputs"][0]["name"]
    status, res = b.call("POST", "/v2/models/digits/infer", {"inputs": [
        {"name": name, "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.5] * 64}]})
    assert status == 200 and res["outputs"][0]["shape"] == [1, 10], res

    # onnxruntime under the same hardening: the unit's sandboxing properties on a transient
    # service (PrivateTmp: the bundle lies in /srv) that runs an ONNX bundle's self-test
    # (the package is TFLite-only, so onnxruntime is added to its environment first, as
    # `edgekeeper[onnx]` would).
    add_onnxruntime(b.root)
    unit = b.run("systemctl", "cat", "edge-agent").stdout
    hardening = unit.split("# Hardening", 1)[1].split("[Install]", 1)[0]
    props = [f"-p{line.strip()}" for line in hardening.splitlines()
             if "=" in line and not line.lstrip().startswith("#")]
    assert any("MemoryDenyWriteExecute=yes" in p for p in props), props
    onnx = b.run("systemd-run", "--wait", "--pipe", "--quiet", "-pUser=edge-agent",
                 *props, "/usr/bin/edge-agent", "selftest",
                 "/srv/onnx-bundle", check=False, timeout=300)
    assert onnx.returncode == 0 and "passed" in onnx.stdout, onnx.stdout + onnx.stderr

    # journald files a warning (a client error, logged once) at priority 4, info at 6.
    assert b.call("GET", "/v2/models/nope")[0] == 404
    wait_until(lambda: "http.error status=404" in b.run(
        "journalctl", "-u", "edge-agent", "-p", "warning", "-o", "cat").stdout,
        timeout_s=20, what="the warning in the journal")
    lines = [json.loads(x) for x in b.run("journalctl", "-u", "edge-agent", "-o", "json"
                                          ).stdout.splitlines()]
    prio = {x["MESSAGE"].split()[2] if x["MESSAGE"].startswith(("WARNING", "INFO")) else "":
            x["PRIORITY"] for x in lines if isinstance(x.get("MESSAGE"), str)}
    assert prio.get("http.error") == "4" and prio.get("agent.ready") == "6", prio

    # A hung agent (stopped, so its event loop cannot ping) is killed by the watchdog and
    # restarted; the new one is READY again.
    before = int(s["MainPID"])
    b.run("systemctl", "kill", "--kill-whom=main", "--signal=SIGSTOP", "edge-agent")
    wait_until(lambda: b.show("NRestarts")["NRestarts"] != s["NRestarts"], timeout_s=60,
               what="the watchdog restart")
    wait_until(lambda: b.show("ActiveState")["ActiveState"] == "active"
               and int(b.show("MainPID")["MainPID"]) not in (0, before), timeout_s=60,
               what="the restarted agent")
    result = b.run("journalctl", "-u", "edge-agent", "-o", "cat").stdout
    assert "Watchdog timeout" in result, result[-2000:]

    # A keep-alive client holds a connection; stop is clean and does not wait it out.
    holder = subprocess.Popen(
        ["nsenter", "-t", str(b.pid1), "-a", "--", CLIENT, "-c",
         "import time; from agent.client import UnixHTTPConnection; "
         "c = UnixHTTPConnection('/run/edge-agent/api.sock', timeout=60); "
         "c.request('GET', '/v2/health/live'); c.getresponse().read(); "
         "print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    t0 = time.monotonic()
    b.run("systemctl", "stop", "edge-agent")
    took = time.monotonic() - t0
    holder.kill()
    s = b.show("ActiveState", "Result")
    assert (s["ActiveState"], s["Result"]) == ("inactive", "success"), s
    assert took < 10, f"stop took {took:.1f} s (the drain used to wait 10 s)"
    print(f"systemctl stop with a keep-alive client: {took:.2f} s")


def test_upgrade_remove_and_purge_with_the_agent_running(booted: Booted, deb: Path,
                                                          tmp_path: Path) -> None:
    """The package's lifecycle with a live agent: an upgrade brings the new build's code and
    unit into service and keeps the installed model; remove leaves no process (it used to
    leave the agent running with its unit gone); purge deletes the state and the
    configuration with nothing running, and keeps the system user."""
    b = booted
    b.run("systemctl", "start", "edge-agent")
    b.run("edge-agent", "install", "/var/tmp/digits.tar.zst")
    old_pid = int(b.show("MainPID")["MainPID"])
    assert len(b.agent_processes()) == 1, b.agent_processes()  # what the check below sees
    status, info = b.call("GET", "/v2")
    assert status == 200 and not info["version"].startswith("build2"), info

    shutil.copy(second_build(deb, tmp_path), b.root.path / "var/tmp/edgekeeper2.deb")
    b.run("apt-get", "install", "-y", "-qq", "--no-install-recommends",
          "/var/tmp/edgekeeper2.deb", timeout=600)
    s = b.show("ActiveState", "MainPID", "Description", "NeedDaemonReload", "StatusText")
    assert s["ActiveState"] == "active" and int(s["MainPID"]) not in (0, old_pid), s
    assert s["Description"].startswith("(build2) ") and s["NeedDaemonReload"] == "no", s
    status, info = b.call("GET", "/v2")
    assert status == 200 and info["version"].startswith("build2-"), info
    assert b.call("GET", "/v2/models/digits")[0] == 200  # the state survived the upgrade

    b.run("apt-get", "remove", "-y", "-qq", "edgekeeper", timeout=300)
    s = b.show("ActiveState", "LoadState")
    assert (s["ActiveState"], s["LoadState"]) == ("inactive", "not-found"), s
    assert not b.agent_processes(), f"left running after remove: {b.agent_processes()}"
    assert (b.root.path / "var/lib/edge-agent").is_dir()  # remove keeps the state

    b.run("apt-get", "purge", "-y", "-qq", "edgekeeper", timeout=300)
    for gone in ("var/lib/edge-agent", "etc/edge-agent", "opt/venvs/edgekeeper",
                 "etc/systemd/system/multi-user.target.wants/edge-agent.service"):
        assert not (b.root.path / gone).exists() and not (b.root.path / gone).is_symlink(), \
            gone
    assert not b.agent_processes()
    assert b.run("getent", "passwd", "edge-agent").stdout.startswith("edge-agent:")
