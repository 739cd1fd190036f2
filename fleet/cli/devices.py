"""`edge-fleet devices`, `status`, `watch`, `recover`, `dashboard`: the device registry
and what devices say."""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from agent.trust.root import load_pinned_root
from fleet._terminal import Printable
from fleet.cli.common import Subparsers, add_broker, auth, default_db, passphrase, watcher_of
from fleet.errors import FleetError
from fleet.trust.keys import load_key


def _device_pubs(paths: list[Path]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        out += sorted(p.glob("*.pub")) if p.is_dir() else [p]
    return out


def cmd_devices(ns: argparse.Namespace) -> None:
    from agent.trust.identity import read_device_public  # noqa: PLC0415  # when used
    from fleet.devices.registry import FleetDB  # noqa: PLC0415  # each command loads only what it needs

    db = FleetDB(ns.db)
    if ns.action == "list":
        for device, key in db.registered().items():
            print(f"{device:24} registered  report key {key.keyid[:16]}")
        for device, n in db.unknown():
            print(f"{device:24} UNKNOWN     {n} message(s) ignored: no registered key")
        return
    files = [ns.key] if ns.action == "add" else _device_pubs(ns.paths)
    if not files:
        raise FleetError("no .pub files found")
    changed = 0
    for f in files:
        pub = read_device_public(f.read_bytes(), what=str(f))
        if ns.action == "add" and pub.device != ns.id:
            raise FleetError(f"{f} is device {pub.device}'s key, not {ns.id}'s")
        if pub.report_key is None:
            raise FleetError(f"{f} has no report key (made by an older edge-agent): make a "
                             "new one with `edge-agent device-key` on the device")
        changed += db.register(pub.device, pub.report_key)
    print(f"{len(files)} device key(s) registered in {db.store} ({changed} new or changed)")


def cmd_status(ns: argparse.Namespace) -> None:
    from fleet.devices.status import status_lines  # noqa: PLC0415  # each command loads only what it needs

    db, watcher = watcher_of(ns)
    time.sleep(ns.wait)
    watcher.stop()
    print("\n".join(status_lines(db.devices(group=ns.group), unknown=db.unknown(),
                                  ignored=db.ignored())))


def cmd_watch(ns: argparse.Namespace) -> None:
    from fleet.devices.status import status_lines  # noqa: PLC0415  # each command loads only what it needs

    db, watcher = watcher_of(ns)
    try:
        while True:
            time.sleep(ns.interval)
            table = "\n".join(status_lines(db.devices(group=ns.group), unknown=db.unknown(),
                                            ignored=db.ignored()))
            screen = sys.stdout.raw if isinstance(sys.stdout, Printable) else sys.stdout
            screen.write("\x1b[2J\x1b[H")  # ours: the one control that reaches the terminal
            print(f"{datetime.now(UTC):%H:%M:%S} fleet {ns.fleet}\n{table}", flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        watcher.stop()


def cmd_recover(ns: argparse.Namespace) -> None:
    from fleet.rollout.recover import recover  # noqa: PLC0415  # each command loads only what it needs

    if ns.action == "rollback" and not ns.model:
        raise FleetError("rollback needs --model")
    keys = [load_key(k, passphrase(ns)) for k in ns.key]
    fleet = load_pinned_root(ns.root.read_bytes()).fleet
    expected = [ns.device] if ns.device else []
    if ns.group:
        db, watcher = watcher_of(argparse.Namespace(**{**vars(ns), "fleet": fleet}))
        time.sleep(ns.wait)
        watcher.stop()
        expected = [r.device for r in db.devices(group=ns.group) if r.online]
    from fleet.devices.registry import FleetDB  # noqa: PLC0415  # each command loads only what it needs

    summary = recover(auth(ns), fleet, keys, FleetDB(ns.db), action=ns.action,
                      expected=expected,
                      device=ns.device, group=ns.group, model=ns.model, reason=ns.reason,
                      timeout_s=ns.timeout)
    print("\n".join(summary.lines()))
    if summary.failed or summary.silent:
        raise FleetError(f"{len(summary.failed)} failed, {len(summary.silent)} silent")


def cmd_dashboard(ns: argparse.Namespace) -> None:
    from fleet.dashboard import Dashboard, make_server  # noqa: PLC0415  # when used

    db, watcher = watcher_of(ns)
    server = make_server(Dashboard(db, ns.fleet), ns.host, ns.port)
    print(f"dashboard on http://{ns.host}:{server.server_address[1]}/ (Ctrl-C stops)",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        watcher.stop()


def _add_devices(sub: Subparsers) -> None:  # type: ignore[type-arg]
    dev = sub.add_parser("devices", help="register devices' report keys")
    dev.set_defaults(func=cmd_devices)
    da = dev.add_subparsers(dest="action", required=True)
    add = da.add_parser("add", help="register one device's DEVICE.pub")
    add.add_argument("id")
    add.add_argument("--key", type=Path, required=True, help="DEVICE.pub (edge-agent "
                     "device-key)")
    imp = da.add_parser("import", help="register many: .pub files or directories of them")
    imp.add_argument("paths", type=Path, nargs="+")
    ls = da.add_parser("list")
    for p in (add, imp, ls):
        p.add_argument("--db", default=default_db())


def _add_watching(sub: Subparsers) -> None:  # type: ignore[type-arg]
    for name, func in (("status", cmd_status), ("watch", cmd_watch), ("recover", cmd_recover),
                       ("dashboard", cmd_dashboard)):
        p = sub.add_parser(name)
        p.set_defaults(func=func)
        add_broker(p)
        p.add_argument("--db", default=default_db())
        p.add_argument("--wait", type=float, default=2.0,
                       help="seconds to collect retained state first")
        p.add_argument("--group")
        if name == "watch":
            p.add_argument("--interval", type=float, default=2.0)
        if name == "dashboard":
            p.add_argument("--host", default="127.0.0.1")
            p.add_argument("--port", type=int, default=8090)
        if name != "recover":
            p.add_argument("--fleet", required=True)
            continue
        p.add_argument("--device")
        p.add_argument("--action", choices=["rollback", "restart", "reload"], required=True)
        p.add_argument("--model")
        p.add_argument("--reason", default="")
        p.add_argument("--key", type=Path, action="append", required=True)
        p.add_argument("--root", type=Path, required=True)
        p.add_argument("--timeout", type=float, default=30.0)


def add_parsers(sub: Subparsers) -> None:  # type: ignore[type-arg]
    _add_devices(sub)
    _add_watching(sub)
