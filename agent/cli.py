"""`edge-agent`: the device command (the daemon arrives with the serving issue).

    edge-agent profiles                 list the firmware profiles this install knows
    edge-agent profile NAME             validate and print one profile
    edge-agent selftest BUNDLE_DIR      check a bundle's files and run its self-test here
    edge-agent device-key ID --out DIR  make this device's X25519 key pair for sealed models
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from agent import __version__
from agent.bundle import check_files, read_manifest
from agent.errors import AgentError
from agent.profiles import available_profiles, load_profile
from agent.sealing import generate_device_key
from agent.selftest import run_selftest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edge-agent", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("profiles")
    p = sub.add_parser("profile")
    p.add_argument("name")
    s = sub.add_parser("selftest")
    s.add_argument("bundle", type=Path)
    dk = sub.add_parser("device-key")
    dk.add_argument("device")
    dk.add_argument("--out", type=Path, required=True)
    ns = parser.parse_args(argv)
    try:
        if ns.command == "profiles":
            for name in available_profiles():
                print(f"{name:22} {load_profile(name).description}")
        elif ns.command == "device-key":
            key, pub = generate_device_key(ns.device, ns.out)
            print(f"private key {key} (keep on this device), public key {pub} (give to the "
                  "operator for `edge-fleet seal`)")
        elif ns.command == "profile":
            print(json.dumps(load_profile(ns.name).model_dump(), indent=2))
        else:
            manifest = read_manifest(ns.bundle)
            check_files(ns.bundle, manifest)
            res = run_selftest(ns.bundle, manifest)
            print(f"{manifest.name} v{manifest.version} ({manifest.runtime}): self-test "
                  f"{'passed' if res.passed else 'FAILED'} on {res.samples} samples, max |diff| "
                  f"{res.max_abs_diff:.4g} (atol {manifest.selftest.atol:.4g}), top-1 agreement "
                  f"{res.top1_agreement:.0%}")
            return 0 if res.passed else 1
    except AgentError as exc:
        print(f"edge-agent: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
