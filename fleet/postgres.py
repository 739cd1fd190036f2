"""A PostgreSQL cluster of the fleet's own, for tests, benches and a first try: Debian's
`postgresql` binaries, a data directory owned by the `postgres` user (PostgreSQL refuses
to run as root), a password (SCRAM) for the fleet's role, and one free loopback port.

    pg = LocalPostgres(Path("/var/tmp/fleet-pg")).start()
    url = pg.create_database("fleet")   # postgresql://edge_fleet:…@127.0.0.1:PORT/fleet
    edge-fleet rollout … --db "$url"    # or EDGE_FLEET_DB="$url"
    pg.stop()

A production fleet points `--db` at the PostgreSQL its operators run; nothing here is
needed for that.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import socket
import subprocess
from pathlib import Path

from fleet._proc import pid_alive
from fleet.errors import FleetError

ROLE = "edge_fleet"


def _bin_dir() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found:
        raise FleetError("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    return found[-1].parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalPostgres:
    def __init__(self, where: Path, *, port: int | None = None,
                 hosts: tuple[str, ...] = ("127.0.0.1",),
                 clients: tuple[str, ...] = ()) -> None:
        """`hosts`: the addresses it listens on; `clients`: networks (CIDR) beyond
        loopback allowed to connect, with the password (SCRAM), as on loopback."""
        self.hosts, self.clients = hosts, clients
        self.dir = where
        self.data = where / "data"
        self.port = port or _free_port()
        self.bin = _bin_dir()
        self.password = secrets.token_urlsafe(18)
        self._as: list[str] = []
        if os.geteuid() == 0:  # as the postgres user, which owns the data directory
            self._as = ["runuser", "-u", "postgres", "--"]

    def _run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        p = subprocess.run([*self._as, *argv], capture_output=True, text=True, check=False,
                           cwd="/")
        if p.returncode != 0:
            raise FleetError(f"{Path(argv[0]).name} failed ({p.returncode}): "
                             f"{(p.stderr or p.stdout).strip()[-400:]}")
        return p

    def start(self, timeout_s: float = 60.0) -> LocalPostgres:
        remove_orphans(self.dir.parent)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "started-by").write_text(str(os.getpid()))
        if self._as:
            user = pwd.getpwnam("postgres")
            os.chown(self.dir, user.pw_uid, user.pw_gid)
        pwfile = self.dir / "pw"
        pwfile.write_text(self.password + "\n")
        if self._as:
            os.chown(pwfile, pwd.getpwnam("postgres").pw_uid, -1)
        pwfile.chmod(0o600)
        try:
            self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", ROLE,
                      "--pwfile", str(pwfile), "--auth=scram-sha-256", "--encoding=UTF8",
                      "--locale=C", "--no-instructions")
        finally:
            pwfile.unlink(missing_ok=True)
        if self.clients:
            with (self.data / "pg_hba.conf").open("a") as hba:
                hba.writelines(f"host all all {c} scram-sha-256\n" for c in self.clients)
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l",
                  str(self.dir / "postgres.log"), "-w", "-t", str(int(timeout_s)), "-o",
                  f"-p {self.port} -c listen_addresses={','.join(self.hosts)} "
                  f"-c unix_socket_directories='{self.dir}' -c max_connections=200",
                  "start")
        return self

    def url(self, database: str = "postgres", host: str = "127.0.0.1") -> str:
        return f"postgresql://{ROLE}:{self.password}@{host}:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new, empty database; returns its URL."""
        import psycopg  # noqa: PLC0415  # the [fleet] extra

        if not name.replace("_", "").isalnum():
            raise FleetError(f"not a database name: {name!r}")
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        with contextlib.suppress(FleetError):
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w",
                      "stop")

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> LocalPostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.remove()


def remove_orphans(where: Path) -> list[Path]:
    """Stop and remove the clusters under `where` whose starting process is gone (a test
    session or bench killed before it could clean up); returns their directories."""
    gone = []
    for d in where.glob("edge-pg-*"):
        try:
            pid = int((d / "started-by").read_text())
        except (OSError, ValueError):
            continue  # not one of ours, or not started yet
        if pid_alive(pid):
            continue
        LocalPostgres(d).remove()
        gone.append(d)
    return gone
