"""Separate hosts on one machine, for the fleet's multi-host tests and benches.

A `Lan` is a Linux bridge in the root network namespace with the gateway address (where
the broker and PostgreSQL listen); each host is a network namespace joined to it by a veth
pair, with an address of its own, its own hostname and process-id space (`unshare`), and
its own state directory (its cwd, HOME and TMPDIR). Nothing local, neither a process id
nor a file, is shared between two hosts: they coordinate through the network or not at
all. `kill(host)` is a host dying: its link goes down, then every process in its
namespace is killed (SIGKILL).

Needs root (`ip netns`, `ip link`); `Lan.available()` says whether this machine can.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parents[1]


def _ip(*argv: str) -> None:
    p = subprocess.run(["ip", *argv], capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise RuntimeError(f"ip {' '.join(argv)}: {p.stderr.strip()}")


class Lan:
    def __init__(self, where: Path, hosts: int) -> None:
        self.where = where
        self.tag = secrets.token_hex(2)  # interface names: at most 15 characters
        octet = 100 + secrets.randbelow(100)
        self.subnet = f"10.{octet}.{int(self.tag[:2], 16)}"
        self.gateway = f"{self.subnet}.1"
        self.cidr = f"{self.subnet}.0/24"
        self.bridge = f"ebr{self.tag}"
        self.names = [f"host-{chr(ord('a') + i)}" for i in range(hosts)]
        self.procs: list[subprocess.Popen[bytes]] = []
        self._up = False

    @staticmethod
    def available() -> bool:
        return os.geteuid() == 0 and shutil.which("ip") is not None \
            and shutil.which("unshare") is not None

    def netns(self, host: str) -> str:
        return f"edge-{self.tag}-{host}"

    def address(self, host: str) -> str:
        return f"{self.subnet}.{10 + self.names.index(host)}"

    def dir(self, host: str) -> Path:
        return self.where / host

    def up(self) -> Lan:
        _ip("link", "add", self.bridge, "type", "bridge")
        self._up = True
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i, host in enumerate(self.names):
            ns, outer, inner = self.netns(host), f"ev{self.tag}{i}a", f"ev{self.tag}{i}b"
            _ip("netns", "add", ns)
            _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            _ip("link", "set", inner, "netns", ns)
            _ip("link", "set", outer, "master", self.bridge, "up")
            _ip("-n", ns, "addr", "add", f"{self.address(host)}/24", "dev", inner)
            _ip("-n", ns, "link", "set", inner, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            self.dir(host).mkdir(parents=True, exist_ok=True)
        return self

    def popen(self, host: str, argv: list[str], *, log: IO[Any],
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Run `argv` on `host`: in its network namespace, with its hostname, in a
        process-id space of its own, from its state directory."""
        d = self.dir(host)
        wrapped = ["ip", "netns", "exec", self.netns(host), "unshare", "--uts", "--pid",
                   "--fork", "sh", "-c", f'hostname {host} && exec "$@"',
                   "sh", *argv]
        environ = {**os.environ, "HOME": str(d), "TMPDIR": str(d),
                   "PYTHONPATH": str(REPO), **(env or {})}
        p = subprocess.Popen(wrapped, cwd=d, env=environ, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(p)
        return p

    def pids(self, host: str) -> list[int]:
        p = subprocess.run(["ip", "netns", "pids", self.netns(host)], capture_output=True,
                           text=True, check=False)
        return [int(x) for x in p.stdout.split()]

    def stop(self, host: str, timeout_s: float = 30.0) -> None:
        """A clean shutdown of the host's processes: SIGTERM to each (the program is
        process 1 of its own process-id space: it stops only through its own handler),
        until none is left (polled), then SIGKILL to what remains."""
        end = time.monotonic() + timeout_s
        for pid in self.pids(host):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        while self.pids(host) and time.monotonic() < end:
            time.sleep(0.05)
        self._kill_all(host)

    def _kill_all(self, host: str) -> None:
        for pid in self.pids(host):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def kill(self, host: str) -> None:
        """The host dies as a power cut would take it: its link goes down first (nothing it
        had open says goodbye: no FIN, no RST reaches a peer), then every process on it is
        killed (SIGKILL)."""
        subprocess.run(["ip", "-n", self.netns(host), "link", "set",
                        f"ev{self.tag}{self.names.index(host)}b", "down"],
                       capture_output=True, check=False)
        self._kill_all(host)

    def revive(self, host: str) -> None:
        """A killed host back on the network (with nothing running on it)."""
        _ip("-n", self.netns(host), "link", "set", f"ev{self.tag}{self.names.index(host)}b",
            "up")

    def down(self) -> None:
        for host in self.names:
            self.kill(host)
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(10)
        for host in self.names:
            subprocess.run(["ip", "netns", "del", self.netns(host)], capture_output=True,
                           check=False)
        if self._up:
            subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, check=False)
            self._up = False
