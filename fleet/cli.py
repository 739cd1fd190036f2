"""`edge-fleet`: operator command (signing and rollouts arrive with their issues).

    edge-fleet bundle inspect BUNDLE_DIR   summarise a bundle and check its files' hashes
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from agent.bundle import check_files, read_manifest
from agent.errors import AgentError
from agent.manifest import SIGNATURES_FILE


def inspect_bundle(bundle: Path) -> list[str]:
    """Human summary lines of a bundle; raises BundleError when files do not match."""
    m = read_manifest(bundle)
    check_files(bundle, m)
    ins = ", ".join(f"{t.name} {t.dtype}{t.shape}" for t in m.inputs)
    outs = ", ".join(f"{t.name} {t.dtype}{t.shape}" for t in m.outputs)
    signed = (bundle / SIGNATURES_FILE).is_file()
    return [
        f"{m.name} v{m.version}: {m.runtime} model {m.model_file}, "
        f"profiles {', '.join(m.profiles)}",
        f"inputs: {ins}",
        f"outputs: {outs}",
        f"files: {len(m.files)}, all sizes and sha256 match",
        f"expires {m.expires:%Y-%m-%d}, min agent {m.min_agent_version}, "
        f"{'signed' if signed else 'unsigned (sign before release)'}",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edge-fleet", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    bundle = sub.add_parser("bundle").add_subparsers(dest="action", required=True)
    bundle.add_parser("inspect").add_argument("dir", type=Path)
    ns = parser.parse_args(argv)
    try:
        for line in inspect_bundle(ns.dir):
            print(line)
    except AgentError as exc:
        print(f"edge-fleet: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
