"""`edge-fleet simulate`: simulated devices on the agent's protocol code."""

from __future__ import annotations

import argparse
import contextlib
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

from fleet.cli.common import Subparsers


def cmd_simulate(ns: argparse.Namespace) -> None:
    import signal  # noqa: PLC0415  # each command loads only what it needs
    from collections import Counter  # noqa: PLC0415  # each command loads only what it needs

    from fleet.sim.processes import SimulatedFleet  # noqa: PLC0415
    from fleet.sim.settings import SimSettings  # noqa: PLC0415  # when used

    def stop(_sig: int, _frame: Any) -> None:
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, stop)
    settings = SimSettings(broker=ns.broker, root_file=ns.root,
                           groups=tuple(ns.group) if ns.group else SimSettings.groups,
                           profile=ns.profile, initial=ns.initial,
                           telemetry_interval_s=ns.telemetry_interval,
                           health_window_s=ns.health_window, keys_dir=ns.keys_dir,
                           ca_file=ns.ca_file, certs_dir=ns.certs_dir)
    fleet = SimulatedFleet(settings, ns.devices, faulty_percent=ns.faulty, prefix=ns.prefix,
                           fault_kinds=tuple(ns.fault_kinds.split(",")))
    with fleet:
        connected = fleet.start()
        kinds = Counter(fleet.faults.values())
        print(f"{connected} of {ns.devices} simulated device(s) connected, group(s) "
              f"{', '.join(settings.groups)}; device keys in {fleet.keys_dir}; "
              f"faulty: {len(fleet.faults)}"
              + (f" ({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))})"
                 if kinds else ""), flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            time.sleep(ns.duration if ns.duration > 0 else 10**9)
        served = Counter(f"{m} v{v}" for d in fleet.versions().values() for m, v in d.items())
        print("serving at exit: " + (", ".join(f"{k} on {n}" for k, n in sorted(
            served.items())) or "nothing"), flush=True)


def add_parsers(sub: Subparsers) -> None:  # type: ignore[type-arg]
    from fleet.sim.settings import DEFAULT_FAULTS, FAULTS, SimSettings  # noqa: PLC0415  # numpy

    sim: dict[str, Any] = {f.name: f.default for f in fields(SimSettings)}  # its defaults

    si = sub.add_parser("simulate", help="simulated devices speaking the agent's protocol")
    si.set_defaults(func=cmd_simulate)
    si.add_argument("--broker", required=True)
    si.add_argument("--root", type=Path, required=True, help="the fleet's root.json")
    si.add_argument("--devices", type=int, default=100)
    si.add_argument("--faulty", type=float, default=0.0, metavar="PERCENT",
                    help="devices that fail new releases (self-test, latency, drift)")
    si.add_argument("--fault-kinds", default=",".join(DEFAULT_FAULTS),
                    help=f"taken in turn; known: {', '.join(FAULTS)} (%(default)s)")
    si.add_argument("--initial", type=Path, help="a signed archive every device starts with")
    si.add_argument("--group", action="append", default=None,
                    help=f"repeatable (default: {', '.join(sim['groups'])})")
    si.add_argument("--profile", default=sim["profile"])
    si.add_argument("--prefix", default="sim")
    si.add_argument("--telemetry-interval", type=float, default=sim["telemetry_interval_s"])
    si.add_argument("--health-window", type=float, default=sim["health_window_s"])
    si.add_argument("--duration", type=float, default=0.0, help="seconds (0: until stopped)")
    si.add_argument("--ca-file", type=Path, help="the broker's CA (mqtts://)")
    si.add_argument("--certs-dir", type=Path, help="each device's NAME.crt and NAME.key "
                    "(edge-fleet pki issue) for a broker with mutual TLS")
    si.add_argument("--keys-dir", type=Path, help="each device's key files, made when "
                    "missing; register them with `edge-fleet devices import DIR` (default: "
                    "a temporary directory)")
