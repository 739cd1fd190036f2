"""The fleet broker's configuration: mosquitto with mutual TLS and a per-device ACL,
rendered from the templates shipped in `fleet/mosquitto/` (`edge-fleet broker-config`).

What it enforces (docs/telemetry.md, "Broker and ACL"): no anonymous client; a device
(certificate CN = device id) publishes only its own state, telemetry, events and results
and reads only its own commands, its groups' commands and the fleet's root and heartbeat;
`fleet-controller` may do anything under the fleet's topics, `fleet-monitor` only read.
`deploy/mosquitto/` holds a rendered example.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path


@dataclass(frozen=True, kw_only=True)
class BrokerConfig:
    fleet: str
    pki: Path  # ca.crt, server.crt, server.key (`edge-fleet pki init`)
    port: int = 8883
    bind: str = "0.0.0.0"  # a fleet broker listens for devices
    data_dir: Path = Path("/var/lib/mosquitto")
    log_dest: str = "syslog"
    user: str | None = None  # mosquitto drops to this user when started as root
    autosave_s: int = 5  # persistence saved this often (a crash loses at most this much)


def _template(name: str) -> str:
    return resources.files("fleet").joinpath("mosquitto", name).read_text()


def render(cfg: BrokerConfig, out: Path) -> tuple[Path, Path]:
    """Write `out/mosquitto.conf` and `out/acl`; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    acl = out / "acl"
    acl.write_text(_template("acl.in").replace("{fleet}", cfg.fleet))
    conf = out / "mosquitto.conf"
    conf.write_text(_template("mosquitto.conf.in").format(
        acl_file=acl, data_dir=cfg.data_dir, log_dest=cfg.log_dest, autosave_s=cfg.autosave_s,
        user_line=f"user {cfg.user}" if cfg.user else "", port=cfg.port, bind=cfg.bind,
        ca_file=cfg.pki / "ca.crt", cert_file=cfg.pki / "server.crt",
        key_file=cfg.pki / "server.key"))
    return conf, acl
