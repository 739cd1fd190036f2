"""`edge-fleet keys`, `root`, `heartbeat`, `pki`, `broker-config`: the fleet's keys and trust."""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from agent.trust.root import ROLES, RoleName, load_pinned_root
from fleet.cli.common import Subparsers, add_broker, auth, default_db, passphrase, watcher_of
from fleet.errors import FleetError
from fleet.trust.keys import KeyDir, init_keys, load_key, rotate_keys


def _role_count(text: str) -> tuple[int, int]:
    n, _, t = text.partition("/")
    return int(n), int(t or n)


def _role_numbers(pairs: list[str]) -> dict[RoleName, int]:
    out: dict[RoleName, int] = {}
    for pair in pairs:
        role, _, n = pair.partition("=")
        if role not in ROLES or not n.isdigit():
            raise FleetError(f"{pair!r}: expected ROLE=N with ROLE one of {', '.join(ROLES)}")
        out[role] = int(n)
    return out


def cmd_keys(ns: argparse.Namespace) -> None:
    if ns.action == "init":
        counts: dict[RoleName, tuple[int, int]] = {
            "root": ns.root, "release": ns.release, "command": ns.command_keys}
        root = init_keys(ns.dir, fleet=ns.fleet, counts=counts, expires_days=ns.expires_days,
                         passphrase=passphrase(ns, new=True))
        print(f"created keys in {ns.dir / 'keys'} and {ns.dir / 'root.json'} v{root.version}")
    elif ns.action in ("rotate", "renew"):
        old = KeyDir(ns.dir).root()
        rotating = ns.action == "rotate"
        root = rotate_keys(ns.dir, revoke=ns.revoke if rotating else [],
                           add=_role_numbers(ns.add) if rotating else {},
                           thresholds=_role_numbers(ns.threshold) if rotating else {},
                           expires_days=ns.expires_days, passphrase=passphrase(ns, new=True))
        print(f"root.json v{old.version} -> v{root.version}; announce it to devices: "
              f"edge-fleet root publish --dir {ns.dir} --artifacts DIR --url-base URL")
    root = KeyDir(ns.dir).root()
    names = {f.keyid: f.name for _, f in KeyDir(ns.dir).key_files()}
    print(f"fleet {root.fleet}, root v{root.version}, expires {root.expires:%Y-%m-%d}")
    for role in ROLES:
        r = root.roles[role]
        print(f"  {role:8} {r.threshold} of {len(r.keyids)}: "
              + ", ".join(f"{names.get(k, '?')} ({k[:10]})" for k in r.keyids))


def cmd_root(ns: argparse.Namespace) -> int:
    from fleet.trust.publish import copy_roots, publish_root  # noqa: PLC0415  # paho only here

    kd = KeyDir(ns.dir)
    if ns.artifacts:
        n = copy_roots(kd, ns.artifacts)
        print(f"{n} root(s) copied to {ns.artifacts / 'roots'}")
    version = publish_root(auth(ns), kd, ns.url_base)
    print(f"root v{version} announced on edge/v1/{kd.root().fleet}/root (retained); devices "
          f"fetch missing versions from {', '.join(ns.url_base) or 'nowhere (no --url-base)'}")
    if ns.wait <= 0:
        return 0
    return _wait_for_root(argparse.Namespace(**{**vars(ns), "fleet": kd.root().fleet}),
                          version)


def _wait_for_root(ns: argparse.Namespace, version: int) -> int:
    """Watch the devices' signed states until every online device runs root `version`
    (or `ns.wait` seconds pass); print where each device is. 0 when every online device
    runs it, 1 otherwise."""
    from fleet.devices.status import root_reach  # noqa: PLC0415  # paho only here

    db, watcher = watcher_of(ns)
    t0 = time.monotonic()
    try:
        watcher.synced(max_s=min(5.0, ns.wait))  # the retained states first
        while not (reach := root_reach(db, version)).done and time.monotonic() - t0 < ns.wait:
            time.sleep(0.2)
    finally:
        watcher.stop()
    print("\n".join(reach.lines()))
    print(f"after {time.monotonic() - t0:.1f} s" + ("" if reach.done else
          f"; {len(reach.behind)} online device(s) still on an older root: a root they "
          f"refused is a trust.root_refused event on edge/v1/{ns.fleet}/DEVICE/event"))
    return 0 if reach.done else 1


def cmd_heartbeat(ns: argparse.Namespace) -> None:
    from fleet.trust.publish import heartbeat, publish_retained  # noqa: PLC0415  # paho only here

    keys = [load_key(k, passphrase(ns)) for k in ns.key]
    fleet = load_pinned_root(ns.root.read_bytes()).fleet
    broker = auth(ns)
    while True:
        publish_retained(broker, f"edge/v1/{fleet}/heartbeat",
                         heartbeat(fleet, keys, ttl=timedelta(seconds=ns.ttl)))
        print(f"{datetime.now(UTC):%H:%M:%S} heartbeat for fleet {fleet}, valid {ns.ttl:g} s",
              flush=True)
        if ns.every <= 0:
            return
        time.sleep(ns.every)


def cmd_pki(ns: argparse.Namespace) -> None:
    from fleet.trust import pki  # noqa: PLC0415  # each command loads only what it needs

    if ns.action == "init":
        made = pki.init_ca(ns.dir, server_hosts=ns.server_host, days=ns.days)
        print(f"CA {made['ca']}, broker certificate {made['server_crt']} for "
              f"{', '.join(ns.server_host)}")
        return
    for name, (crt, key) in zip(ns.names, pki.issue_many(ns.dir, ns.names, days=ns.days),
                                strict=True):
        print(f"{name}: {crt} {key}")


def cmd_broker_config(ns: argparse.Namespace) -> None:
    from fleet.broker import Bridge, BrokerConfig, render  # noqa: PLC0415  # when used

    pki = ns.pki.resolve()
    bridge = None
    if ns.bridge_to:  # a site broker: its devices bridged to the core broker
        cert = pki / "fleet-bridge.crt"
        if not cert.exists():
            raise FleetError(f"a bridge needs {cert}: edge-fleet pki issue --dir {ns.pki} "
                             "fleet-bridge")
        bridge = Bridge(name=ns.bridge_name, address=ns.bridge_to, ca_file=pki / "ca.crt",
                        cert_file=cert, key_file=pki / "fleet-bridge.key")
    conf, acl = render(BrokerConfig(fleet=ns.fleet, pki=pki, port=ns.port,
                                    bind=ns.bind, data_dir=ns.data_dir,
                                    log_dest=ns.log_dest, user=ns.user,
                                    autosave_s=ns.autosave, bridge=bridge), ns.out)
    print(f"{conf}, {acl} and the guard plugin {conf.parent / 'edge_fleet_guard.so'}: "
          f"mutual TLS on {ns.bind}:{ns.port}, per-device ACL for fleet {ns.fleet}"
          + (f", bridged to {ns.bridge_to}" if bridge else "")
          + f"; start with: mosquitto -c {conf}")


def _add_trust(sub: Subparsers) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("pki", help="a CA and certificates for the broker's mutual TLS")
    p.set_defaults(func=cmd_pki)
    pa = p.add_subparsers(dest="action", required=True)
    pi = pa.add_parser("init", help="the CA and the broker's server certificate")
    pi.add_argument("--server-host", action="append", required=True,
                    help="the broker's DNS name or IP address (repeatable)")
    ps = pa.add_parser("issue", help="client certificates: CN = device id, "
                       "fleet-controller or fleet-monitor")
    ps.add_argument("names", nargs="+")
    for q in (pi, ps):
        q.add_argument("--dir", type=Path, required=True)
        q.add_argument("--days", type=int, default=825)
    bc = sub.add_parser("broker-config", help="mosquitto.conf and ACL for the fleet")
    bc.set_defaults(func=cmd_broker_config)
    bc.add_argument("--fleet", required=True)
    bc.add_argument("--pki", type=Path, required=True, help="made by `edge-fleet pki init`")
    bc.add_argument("--out", type=Path, required=True)
    bc.add_argument("--port", type=int, default=8883)
    bc.add_argument("--bind", default="0.0.0.0")  # devices connect from afar
    bc.add_argument("--data-dir", type=Path, default=Path("/var/lib/mosquitto"))
    bc.add_argument("--log-dest", default="syslog")
    bc.add_argument("--user", help="the user mosquitto drops to when started as root")
    bc.add_argument("--bridge-to", metavar="HOST:PORT",
                    help="a site broker: bridge its devices to this core broker (as "
                         "fleet-bridge, a certificate from --pki)")
    bc.add_argument("--bridge-name", default="site",
                    help="this site's name in the bridge's client ids (%(default)s)")
    bc.add_argument("--autosave", type=int, default=5,
                    help="seconds between saves of sessions, queued commands and retained "
                         "messages (a crash loses at most this much; default 5)")

    root = sub.add_parser("root", help="announce the current root to every device")
    root.set_defaults(func=cmd_root)
    ra = root.add_subparsers(dest="action", required=True)
    pub = ra.add_parser("publish", help="retained on edge/v1/{fleet}/root")
    pub.add_argument("--dir", type=Path, required=True, help="the key directory")
    pub.add_argument("--url-base", action="append", default=[],
                     help="an artifact server that serves roots/N.root.json (repeatable)")
    pub.add_argument("--artifacts", type=Path,
                     help="copy roots/ into this directory served by serve-artifacts")
    pub.add_argument("--wait", type=float, default=0.0,
                     help="then watch up to this many seconds until every online device "
                          "reports the new root, and print each device's root (exit 1 if "
                          "some have not)")
    pub.add_argument("--db", default=default_db(),
                     help="with --wait: the fleet database (registered devices)")
    add_broker(pub)
    hb = sub.add_parser("heartbeat", help="the fleet's signed, retained heartbeat")
    hb.set_defaults(func=cmd_heartbeat)
    hb.add_argument("--key", type=Path, action="append", required=True,
                    help="command key(s), up to the command threshold")
    hb.add_argument("--root", type=Path, required=True)
    hb.add_argument("--ttl", type=float, default=600.0,
                    help="seconds each heartbeat stays valid (%(default)s)")
    hb.add_argument("--every", type=float, default=0.0,
                    help="send again every this many seconds (0: once)")
    add_broker(hb)


def _add_keys(sub: Subparsers) -> None:  # type: ignore[type-arg]
    keys = sub.add_parser("keys", help="create, rotate and show the fleet's keys")
    keys.set_defaults(func=cmd_keys)
    ka = keys.add_subparsers(dest="action", required=True)
    init = ka.add_parser("init")
    init.add_argument("--fleet", required=True)
    for role, default in (("root", "3/2"), ("release", "3/2"), ("command", "2/1")):
        init.add_argument(f"--{role}", dest="command_keys" if role == "command" else role,
                          type=_role_count, default=_role_count(default), metavar="N/T",
                          help=f"{role} keys and threshold (default {default})")
    rot = ka.add_parser("rotate")
    rot.add_argument("--revoke", action="append", default=[], metavar="NAME|KEYID")
    rot.add_argument("--add", action="append", default=[], metavar="ROLE=N")
    rot.add_argument("--threshold", action="append", default=[], metavar="ROLE=N")
    renew = ka.add_parser("renew", help="the same keys in root.json v+1 with a later "
                          "expiry (before or after it expired)")
    show = ka.add_parser("show")
    for p in (init, rot, renew, show):
        p.add_argument("--dir", type=Path, required=True)
        p.add_argument("--expires-days", type=int, default=365,
                       help="days until the new root.json expires (default 365)")
    for p in (init, rot, renew):
        p.add_argument("--no-passphrase", action="store_true",
                       help="write the new private keys unencrypted without a warning")


def add_parsers(sub: Subparsers) -> None:  # type: ignore[type-arg]
    _add_keys(sub)
    _add_trust(sub)
