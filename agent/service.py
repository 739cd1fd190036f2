"""`edge-agent run`: the daemon's process around `Agent` and the API.

Holds an exclusive lock on `STATE/agent.lock` (so `edge-agent install --direct` cannot race
a running daemon), starts the Unix socket (and TCP if configured), tells systemd READY with
a status line, pings the watchdog from the event loop (so a wedged loop stops the pings and
systemd restarts the service), and on SIGTERM/SIGINT says STOPPING, stops accepting, drains
the queues and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import resource
import signal
import threading
from pathlib import Path
from typing import IO

from agent import logs
from agent.api import METRICS_MAX_CONNECTIONS, Api
from agent.config import AgentConfig
from agent.daemon import Agent
from agent.errors import StateLocked
from agent.preflight import preflight, read_token
from agent.sdnotify import Notifier

log = logging.getLogger("edge_agent")
#: Descriptors kept for everything but API connections.
FD_RESERVE = 128


def lock_state(state_dir: Path) -> IO[bytes]:
    """Take the state directory's exclusive lock; keep the returned file open.

    Raises:
        StateLocked: another process holds it.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    fh = (state_dir / "agent.lock").open("ab")
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        fh.close()
        raise StateLocked(f"{state_dir} is in use by a running edge-agent") from exc
    return fh


async def serve(agent: Agent, notifier: Notifier) -> None:
    cfg = agent.config.api
    token = read_token(cfg.token_file) if cfg.tcp_port is not None else None
    api = Api(agent, token)
    http = api.server()
    cfg.socket.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        cfg.socket.unlink()
    servers = [await http.start_unix(str(cfg.socket))]
    cfg.socket.chmod(cfg.socket_mode)
    cfg.admin_socket.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        cfg.admin_socket.unlink()
    # Made with the mode already set: never a moment when others could connect.
    old = os.umask(0o777 & ~cfg.admin_socket_mode)
    try:
        servers.append(await http.start_unix(str(cfg.admin_socket), admin=True))
    finally:
        os.umask(old)
    cfg.admin_socket.chmod(cfg.admin_socket_mode)
    where = [str(cfg.socket), f"{cfg.admin_socket} (admin)"]
    if cfg.tcp_port is not None:
        servers.append(await http.start_tcp(cfg.tcp_host, cfg.tcp_port))
        where.append(f"{cfg.tcp_host}:{cfg.tcp_port}")
    scrape = None
    if cfg.metrics_port is not None:
        scrape = api.metrics_server()
        servers.append(await scrape.start_tcp(cfg.metrics_host, cfg.metrics_port))
        where.append(f"{cfg.metrics_host}:{cfg.metrics_port} (metrics)")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    models = served(agent)
    notifier.ready(f"serving {models} on {' and '.join(where)}")
    log.info("agent.ready pid=%d listen=%s models=%s", os.getpid(), ",".join(where), models)
    tasks = [asyncio.create_task(_follow_status(agent, notifier, where, models))]
    if agent.config.systemd.watchdog:
        tasks.append(asyncio.create_task(_watchdog(notifier)))
    await stop.wait()
    notifier.stopping("draining requests")
    log.info("agent.stopping")
    for task in tasks:
        task.cancel()
    for server in servers:
        server.close()
    await http.drain(timeout_s=10)
    if scrape is not None:
        await scrape.drain(timeout_s=1)
    if api.serving.shm is not None:  # after the drain: answered requests have read their regions
        api.serving.shm.close()
    agent.scheduler.stop()


def served(agent: Agent) -> str:
    """The models being served, as systemd's STATUS= and the ready line say them."""
    return ", ".join(f"{n} v{r.manifest.version}" for n, r in
                     sorted(agent.scheduler.models().items())) or "no model yet"


#: How often STATUS= is brought up to date with the served models (installs, rollbacks,
#: loads and unloads change them; `systemctl status` shows the line).
STATUS_EVERY_S = 1.0


async def _follow_status(agent: Agent, notifier: Notifier, where: list[str], said: str
                         ) -> None:
    if not notifier.enabled:
        return
    while True:
        await asyncio.sleep(STATUS_EVERY_S)
        now = served(agent)
        if now != said:
            notifier.status(f"serving {now} on {' and '.join(where)}")
            said = now


async def _watchdog(notifier: Notifier) -> None:
    if not notifier.watchdog_usec:
        return
    interval = notifier.watchdog_usec / 2e6
    while True:
        notifier.watchdog()
        await asyncio.sleep(interval)


def raise_fd_limit(max_connections: int) -> None:
    """Raise the soft descriptor limit to the hard one (what the unit allows), and say
    so if the connection cap would not fit under it with room for models, stores and the
    broker connection."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    if max_connections + FD_RESERVE > soft:
        log.warning("%d connections on all listeners leave less than %d of %d descriptors "
                    "for the rest; lower api.max_connections or raise LimitNOFILE",
                    max_connections, FD_RESERVE, soft)


def run(config: AgentConfig, config_path: Path | None = None, *,
        log_format: logs.Format = "text", log_level: str = "info") -> int:
    logs.configure(log_format, log_level)
    for line in preflight(config):  # every check check-config makes; ConfigError stops here
        log.info("config: %s", line)
    raise_fd_limit(2 * config.api.max_connections + config.api.admin_max_connections
                   + METRICS_MAX_CONNECTIONS)
    lock = lock_state(config.paths.state_dir)
    fleet = None
    sensing = threading.Event()
    try:
        notifier = Notifier()
        notifier.status("verifying installed models")
        agent = Agent(config)
        agent.config_path = config_path
        agent.start()
        # The sensors are read at rest too: an idle device knows its temperature.
        threading.Thread(target=agent.scheduler.poll_sensors, args=(sensing,),
                         name="sensors", daemon=True).start()
        if config.mqtt is not None:
            from agent.link.fleetlink import FleetLink  # noqa: PLC0415  # paho only when used

            fleet = FleetLink(agent, config.mqtt, scheduler=agent.scheduler)
            fleet.start()
        asyncio.run(serve(agent, notifier))
    finally:
        sensing.set()
        if fleet is not None:
            fleet.stop()
        lock.close()
    return 0
