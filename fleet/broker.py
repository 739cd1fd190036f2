"""The fleet broker's configuration: mosquitto with mutual TLS and a per-device ACL,
rendered from the templates shipped in `fleet/mosquitto/` (`edge-fleet broker-config`).

What it enforces (docs/telemetry.md, "Broker and ACL"): no anonymous client; a device
(certificate CN = device id) publishes only its own state, telemetry, events and results
and reads only its own commands, its groups' commands and the fleet's root and heartbeat;
`fleet-controller` may do anything under the fleet's topics, `fleet-monitor` only read.
What mosquitto 2.0's ACL file cannot say is said by a small plugin built here from
`fleet/mosquitto/edge_fleet_guard.c`: the username is the certificate's common name, a
device connects only with its own client id (`<fleet>-<CN>`, so no certificate takes over
another's session), only `fleet-controller` joins a shared subscription, and a device
retains nothing but its own state. `deploy/mosquitto/` holds a rendered example.

A site broker (`Bridge`) has the same configuration for its devices, plus a bridge to the
core broker the controllers use, as `fleet-bridge`: devices' reports out, commands, root
and heartbeat in.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from fleet.errors import FleetError

#: Certificate names that are operators' tools, not devices (the ACL's `user` lines):
#: their client ids begin "edge-fleet-" and they are never taken for a device.
OPERATORS = ("fleet-controller", "fleet-monitor", "fleet-bridge")
#: Who may join a shared subscription (the controllers' group, `fleet.devices.watcher`).
SHARE_USERS = ("fleet-controller",)
GUARD = "edge_fleet_guard"
#: What building the plugin needs on Debian/Ubuntu.
BUILD_PACKAGES = "gcc libc6-dev libssl-dev libmosquitto-dev mosquitto-dev"


@dataclass(frozen=True, kw_only=True)
class Bridge:
    """A site broker's bridge to the core broker the controllers use: devices' reports
    out, commands, the root and the heartbeat in, over mutual TLS as `fleet-bridge` (a
    certificate from the fleet's PKI; the core's ACL gives it those topics only)."""

    name: str  # this site's name: the bridge's client ids
    address: str  # the core broker, host:port
    ca_file: Path
    cert_file: Path
    key_file: Path

    #: (topic under edge/v1/{fleet}/, direction) bridged; QoS 1 both ways.
    TOPICS = (("+/state", "out"), ("+/telemetry", "out"), ("+/event", "out"),
              ("+/cmd/result", "out"), ("+/cmd", "in"), ("group/+/cmd", "in"),
              ("root", "in"), ("heartbeat", "in"))

    def render(self, fleet: str) -> str:
        """The bridge's lines of mosquitto.conf.

        Raises:
            FleetError: a name or address that is not one (a space or a line break in
                either would write lines of its own into the broker's configuration).
        """
        if not self.name.replace("-", "").isalnum():
            raise FleetError(f"bridge name {self.name!r}: letters, digits and - only")
        if not re.fullmatch(r"[A-Za-z0-9.-]+:[0-9]{1,5}", self.address):
            raise FleetError(f"bridge address {self.address!r}: expected HOST:PORT")
        lines = [f"connection edge-fleet-bridge-{self.name}", f"address {self.address}",
                 "bridge_protocol_version mqttv50",
                 f"remote_clientid edge-fleet-bridge-{self.name}",
                 f"local_clientid edge-fleet-bridge-{self.name}-local",
                 "cleansession false", "try_private true", "notifications false",
                 "restart_timeout 1 10", f"bridge_cafile {self.ca_file}",
                 f"bridge_certfile {self.cert_file}", f"bridge_keyfile {self.key_file}"]
        lines += [f"topic edge/v1/{fleet}/{t} {d} 1" for t, d in self.TOPICS]
        return "\n".join(lines) + "\n"


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
    bridge: Bridge | None = None  # a site broker: its bridge to the core broker


def _template(name: str) -> str:
    return resources.files("fleet").joinpath("mosquitto", name).read_text()


def build_guard(out: Path) -> Path:
    """Compile the guard plugin into `out/edge_fleet_guard.so` (again only when its source
    changed); returns its path.

    Raises:
        FleetError: no C compiler, or the headers are missing (naming the packages).
    """
    source = resources.files("fleet").joinpath("mosquitto", f"{GUARD}.c").read_bytes()
    lib, stamp = out / f"{GUARD}.so", out / f"{GUARD}.c"
    if lib.exists() and stamp.exists() and stamp.read_bytes() == source:
        return lib
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise FleetError(f"building the broker's {GUARD} plugin needs a C compiler: "
                         f"apt-get install {BUILD_PACKAGES}")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        src, built = Path(tmp) / f"{GUARD}.c", Path(tmp) / f"{GUARD}.so"
        src.write_bytes(source)
        done = subprocess.run([cc, "-shared", "-fPIC", "-O2", "-Wall", "-o", str(built),
                               str(src), "-lcrypto"], capture_output=True, text=True,
                              check=False, timeout=120)
        if done.returncode != 0:
            raise FleetError(f"building the broker's {GUARD} plugin failed (apt-get install "
                             f"{BUILD_PACKAGES}): " + done.stderr.strip()[-600:])
        built.replace(lib)  # atomic: a running broker keeps the file it loaded
        src.replace(stamp)
    return lib


def render(cfg: BrokerConfig, out: Path, *, plugin: Path | None = None) -> tuple[Path, Path]:
    """Write `out/mosquitto.conf` and `out/acl`, and build the guard plugin into `out`
    (unless `plugin` names where it is); returns the conf and ACL paths."""
    out.mkdir(parents=True, exist_ok=True)
    acl = out / "acl"
    acl.write_text(_template("acl.in").replace("{fleet}", cfg.fleet))
    conf = out / "mosquitto.conf"
    conf.write_text(_template("mosquitto.conf.in").format(
        acl_file=acl, data_dir=cfg.data_dir, log_dest=cfg.log_dest, autosave_s=cfg.autosave_s,
        user_line=f"user {cfg.user}" if cfg.user else "", port=cfg.port, bind=cfg.bind,
        ca_file=cfg.pki / "ca.crt", cert_file=cfg.pki / "server.crt",
        key_file=cfg.pki / "server.key", plugin=plugin or build_guard(out),
        fleet=cfg.fleet, operators=" ".join(OPERATORS), share_users=" ".join(SHARE_USERS)))
    if cfg.bridge is not None:
        with conf.open("a") as f:
            f.write("\n# The bridge to the core broker (`fleet.broker.Bridge`).\n"
                    + cfg.bridge.render(cfg.fleet))
    return conf, acl
