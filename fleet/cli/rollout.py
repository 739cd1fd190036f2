"""`edge-fleet rollout`: staged rollouts."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.trust.root import load_pinned_root
from fleet.cli.common import Subparsers, add_broker, auth, default_db, passphrase
from fleet.errors import FleetError, LeaseLost
from fleet.rollout.lease import LEASE_S
from fleet.rollout.policy import Criteria
from fleet.trust.keys import load_key

#: `edge-fleet rollout start|run|abort` exit codes: what became of the rollout (an error
#: before or while driving it is 2, as for every command).
ROLLOUT_EXIT = {"completed": 0, "halted": 4, "aborted": 5, "paused": 6, "running": 7}
#: `rollout run` whose lease another controller took while it was stopped or cut off.
LEASE_LOST_EXIT = 8


def cmd_rollout(ns: argparse.Namespace) -> int:
    from fleet.devices.registry import FleetDB  # noqa: PLC0415  # each command loads only what it needs
    from fleet.rollout.controller import Controller  # noqa: PLC0415
    from fleet.rollout.record import Rollouts  # noqa: PLC0415
    from fleet.rollout.status import rollout_lines  # noqa: PLC0415

    db = FleetDB(ns.db)
    rollouts = Rollouts(db)
    if ns.id is None and ns.action != "start":
        if not (ids := rollouts.ids()):
            raise FleetError(f"{db.store} has no rollout yet")
        ns.id = ids[-1]
    if ns.action == "status":
        return _status(ns, rollouts)
    if ns.action in ("pause", "resume"):
        print(f"rollout {ns.id}: {rollouts.move(ns.id, ns.action).value}")
        return 0
    holder = rollouts.leases.holder(ns.id) if ns.action == "abort" and ns.id else None
    if holder is not None:  # a controller drives it: the status moves, it sends rollbacks
        rollouts.move(ns.id, "abort", "aborted by the operator")
        print(f"rollout {ns.id}: aborted; its controller ({holder}) sends the rollbacks")
        return ROLLOUT_EXIT["aborted"]
    if ns.action == "start" and ns.detach:  # the controllers serving the fleet drive it
        rid = _start_rollout(ns, db, rollouts, _criteria(ns))
        print(f"rollout {rid}: created; a controller (edge-fleet controller) drives it")
        return 0
    if not (ns.key and ns.root):
        raise FleetError(f"rollout {ns.action} needs --broker, --key and --root")
    fleet = load_pinned_root(ns.root.read_bytes()).fleet
    controller = Controller(db, auth(ns), fleet,
                            [load_key(k, passphrase(ns)) for k in ns.key], lease_s=ns.lease)
    try:
        rid = ns.id
        if ns.action == "abort":
            controller.abort(rid)
        elif ns.action == "start":
            rid = _start_rollout(ns, db, rollouts, _criteria(ns))
        try:
            status = controller.run(rid, timeout_s=ns.timeout)
        except LeaseLost as exc:
            print(f"edge-fleet: {exc}; this controller stops (it wrote nothing after)",
                  file=sys.stderr)
            return LEASE_LOST_EXIT
        print(f"rollout {rid}: {status}")
        print("\n".join(rollout_lines(rollouts, rid)))
    finally:
        controller.close()
    return ROLLOUT_EXIT[status.value]


def _status(ns: argparse.Namespace, rollouts: Any) -> int:
    from fleet.rollout.status import rollout_lines  # noqa: PLC0415

    print("\n".join(rollout_lines(rollouts, ns.id, every_device=ns.every_device)))
    if ns.device:
        history = rollouts.history(ns.id, ns.device)
        if not history:
            raise FleetError(f"{ns.device} is not part of rollout {ns.id}")
        print(f"history of {ns.device}:")
        print("\n".join(f"  {datetime.fromtimestamp(h.at, UTC):%H:%M:%S.%f}"[:-3]
                         + f"  {h.from_status or '-':>15} -> {h.to_status:15} "
                         f"{h.event:15} {h.cause}" for h in history))
    return 0


def cmd_controller(ns: argparse.Namespace) -> int:
    """Serve every rollout that needs a controller until SIGTERM or SIGINT."""
    import signal  # noqa: PLC0415
    import threading  # noqa: PLC0415

    from fleet.devices.registry import FleetDB  # noqa: PLC0415
    from fleet.rollout.controller import Controller  # noqa: PLC0415
    from fleet.rollout.service import serve  # noqa: PLC0415

    if not (ns.key and ns.root):
        raise FleetError("controller needs --broker, --key and --root")
    fleet = load_pinned_root(ns.root.read_bytes()).fleet
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    controller = Controller(FleetDB(ns.db), auth(ns), fleet,
                            [load_key(k, passphrase(ns)) for k in ns.key], lease_s=ns.lease)
    print(f"controller {controller.owner}: serving the rollouts of fleet {fleet} "
          f"in {controller.db.store}", flush=True)
    try:
        let_go = serve(controller, stop=stop, max_rollouts=ns.max_rollouts)
    finally:
        controller.close()  # gives its leases up: another controller carries on at once
    for rid, how in let_go.items():
        print(f"rollout {rid}: {how}")
    w = controller.watcher
    print(f"controller {controller.owner}: took " + ", ".join(
        f"{w.ingested[k]} {k}" for k in ("state", "telemetry", "event"))
        + f", {controller.results.received} result(s) from the broker; {w.stale} stale")
    return 0


def _criteria(ns: argparse.Namespace) -> Criteria:
    return Criteria(**{f.name: getattr(ns, f.name) for f in fields(Criteria)})


def _waves(text: str) -> list[float]:
    """`1,10,50,100` (cumulative percentages) or `exp:1,2` (from 1 %, doubling)."""
    from fleet.rollout.policy import exponential_fractions  # noqa: PLC0415  # when used

    try:
        if text.startswith("exp:"):
            start, factor = (float(x) for x in text[4:].split(","))
            return exponential_fractions(start, factor)
        return [float(f) / 100 for f in text.split(",")]
    except ValueError as exc:
        raise FleetError(f"--waves {text!r}: {exc}") from exc


def _start_rollout(ns: argparse.Namespace, db: Any, rollouts: Any, criteria: Any) -> str:
    from fleet.rollout.policy import RetryPolicy  # noqa: PLC0415  # when used

    if not (ns.bundle and ns.url_base and ns.group):
        raise FleetError("rollout start needs --bundle, --url-base and --group")
    time.sleep(ns.wait)  # the controller's watcher gathers the retained states meanwhile
    members = db.devices(group=ns.group)
    # Online devices first: the first waves are canaries that can answer; devices away
    # come last and are sent the release when they come back.
    devices = [r.device for r in sorted(members, key=lambda r: (not r.online, r.device))]
    fractions = _waves(ns.waves)
    rid: str = rollouts.create(
        archive=ns.bundle, urls=[f"{ns.url_base.rstrip('/')}/{ns.bundle.name}"],
        group=ns.group, devices=devices, fractions=fractions, criteria=criteria,
        wave_timeout_s=ns.wave_timeout, health_window_s=ns.health_window,
        retry=RetryPolicy(backoff_s=ns.retry_backoff) if ns.retry_backoff is not None
        else RetryPolicy(), command_ttl_s=ns.command_ttl, max_per_minute=ns.max_per_minute,
        continuous=ns.continuous)
    online = sum(r.online for r in members)
    print(f"rollout {rid}: {len(devices)} device(s) in group {ns.group}"
          + (f" ({len(devices) - online} away)" if online < len(devices) else ""),
          flush=True)
    return rid


def add_parsers(sub: Subparsers) -> None:  # type: ignore[type-arg]
    ro = sub.add_parser("rollout", help="staged rollouts")
    ro.set_defaults(func=cmd_rollout)
    ro.add_argument("action", choices=["start", "status", "run", "pause", "resume", "abort"])
    ro.add_argument("id", nargs="?")
    ro.add_argument("--db", default=default_db())
    ro.add_argument("--every-device", action="store_true",
                    help="status: one line per device even for large rollouts")
    ro.add_argument("--device", help="status: also this device's execution history "
                                     "(every status change and its cause)")
    add_broker(ro, required=False)
    ro.add_argument("--key", type=Path, action="append")
    ro.add_argument("--root", type=Path)
    ro.add_argument("--bundle", type=Path, help="the signed archive")
    ro.add_argument("--url-base", help="where devices download it, e.g. http://host:8080")
    ro.add_argument("--group")
    ro.add_argument("--waves", default="1,10,50,100",
                    help="cumulative percentages, or exp:START,FACTOR (e.g. exp:1,2)")
    ro.add_argument("--wave-timeout", type=float, default=300.0,
                    help="seconds a device may take to answer a deploy before its "
                         "execution times out (not a failure; retried per policy)")
    ro.add_argument("--max-per-minute", type=int, default=0,
                    help="deploys sent per minute at most (0: no limit)")
    ro.add_argument("--command-ttl", type=float, default=3600.0,
                    help="seconds a deploy stays valid, also while queued for a device "
                         "that is away")
    ro.add_argument("--retry-backoff", type=float, default=None,
                    help="seconds before the first retry of a failed deploy (doubles)")
    ro.add_argument("--continuous", action="store_true",
                    help="after the last wave keep deploying to devices that come back "
                         "or join the group, until aborted")
    ro.add_argument("--health-window", type=float, default=60.0,
                    help="seconds each wave is watched before the next one")
    criteria = Criteria()  # the defaults are Criteria's own
    for name, text in (
            ("max_failed_share", "share of a wave's devices that may fail or roll back"),
            ("min_committed_share", "share of the answering devices that must commit"),
            ("max_anomalous_excess",
             "share of updated devices with anomalies above the baseline's"),
            ("max_latency_ratio", "updated devices' median p95 latency over the baseline's")):
        ro.add_argument(f"--{name.replace('_', '-')}", type=float,
                        default=getattr(criteria, name), help=f"{text} (%(default)s)")
    ro.add_argument("--lease", type=float, default=LEASE_S,
                    help="seconds this controller's lease lasts after each step; a standby "
                         "takes the rollout over that long after it stopped (%(default)s)")
    ro.add_argument("--detach", action="store_true",
                    help="start: create the rollout and exit; the controllers serving the "
                         "fleet (edge-fleet controller) drive it")
    ro.add_argument("--wait", type=float, default=2.0)
    ro.add_argument("--timeout", type=float, default=3600.0)

    co = sub.add_parser("controller", help="serve every rollout that needs a controller "
                        "(run one or more, on any hosts, on one database)")
    co.set_defaults(func=cmd_controller)
    co.add_argument("--db", default=default_db())
    add_broker(co, required=False)
    co.add_argument("--key", type=Path, action="append")
    co.add_argument("--root", type=Path)
    co.add_argument("--lease", type=float, default=LEASE_S,
                    help="seconds a lease lasts after each step (%(default)s)")
    co.add_argument("--max-rollouts", type=int, default=16,
                    help="rollouts this controller drives at once at most (%(default)s)")
