"""`edge-fleet sign`, `seal`, `pack`, `verify`, `bundle`, `command`, `serve-artifacts`: releases."""

from __future__ import annotations

import argparse
import contextlib
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from agent import __version__
from agent.trust.archive import read_archive_head
from agent.trust.bundle import check_files, read_manifest
from agent.trust.manifest import SIGNATURES_FILE, parse_manifest
from agent.trust.root import load_pinned_root
from agent.trust.verify import Device
from fleet.cli.common import Subparsers, passphrase
from fleet.errors import FleetError
from fleet.trust.commands import build_command, deploy_fields, parse_settings, sign_command
from fleet.trust.keys import load_key
from fleet.trust.release import (
    archive_name,
    describe,
    load_device_public,
    pack_bundle,
    seal_bundle,
    sign_bundle,
    verify_release,
)


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
        f"{'signed' if signed else 'unsigned (sign before release)'}"
        + (f", sealed to {len(m.sealed.recipients)} device(s)" if m.sealed else ""),
    ]


def cmd_sign(ns: argparse.Namespace) -> None:
    root = load_pinned_root(ns.root.read_bytes()) if ns.root else None
    res = sign_bundle(ns.bundle, [load_key(k, passphrase(ns)) for k in ns.key], root)
    if res.threshold is None:
        print(f"{ns.bundle}: {res.signatures} signature(s)")
    else:
        more = max(0, res.threshold - res.valid)
        print(f"{ns.bundle}: {res.valid} of {res.threshold} release signature(s)"
              + (f"; {more} more needed" if more else "; threshold met"))


def cmd_verify(ns: argparse.Namespace) -> None:
    root = load_pinned_root(ns.root.read_bytes())
    now = ns.at or datetime.now(UTC)
    if now.tzinfo is None:  # --at without an offset means UTC
        now = now.replace(tzinfo=UTC)
    profile = ns.profile
    if profile is None:  # check against the first profile the bundle names
        m = (read_manifest(ns.path) if ns.path.is_dir()
             else parse_manifest(read_archive_head(ns.path)[0]))
        profile = m.profiles[0]
    committed = {ns.model: ns.committed} if ns.model and ns.committed else {}
    device = Device(profile=profile, agent_version=ns.agent_version, committed=committed)
    verified = verify_release(ns.path, root, device=device, now=now,
                              new_roots=[p.read_bytes() for p in ns.new_root])
    print(describe(verified) + f"; for profile {profile}")


def cmd_command(ns: argparse.Namespace) -> None:
    keys = [load_key(k, passphrase(ns)) for k in ns.key]
    fleet = load_pinned_root(ns.root.read_bytes()).fleet
    fields: dict[str, Any] = {}
    if ns.kind == "deploy":
        if not ns.archive or not ns.url:
            raise FleetError("deploy needs --archive and at least one --url")
        fields = deploy_fields(ns.archive, ns.url)
    elif ns.kind == "rollback":
        fields = {"model": ns.model, "reason": ns.reason}
    elif ns.kind == "config":
        fields = {"settings": parse_settings(ns.set)}
    cmd = build_command(ns.kind, fleet=fleet, device=ns.device, group=ns.group,
                        ttl=timedelta(seconds=ns.ttl), **fields)
    raw = sign_command(cmd, keys)
    if ns.out:
        ns.out.write_bytes(raw)
        print(f"{ns.kind} command {cmd.id} for "
              f"{'device ' + ns.device if ns.device else 'group ' + ns.group} -> {ns.out}")
    else:
        sys.stdout.write(raw.decode() + "\n")


def cmd_seal(ns: argparse.Namespace) -> None:
    m = seal_bundle(ns.bundle, [load_device_public(p) for p in ns.device_pub])
    assert m.sealed is not None
    print(f"{m.name} v{m.version}: {m.model_file} sealed to "
          f"{', '.join(sorted(m.sealed.recipients))}; now sign it")


def cmd_pack(ns: argparse.Namespace) -> None:
    out = ns.out or ns.bundle.parent / archive_name(read_manifest(ns.bundle), ns.compression)
    pack_bundle(ns.bundle, out, ns.compression)
    print(f"{out} ({out.stat().st_size} bytes)")


def cmd_serve_artifacts(ns: argparse.Namespace) -> None:
    from fleet.trust.artifacts import make_server  # noqa: PLC0415  # when used

    server = make_server(ns.dir, ns.host, ns.port)
    print(f"serving {ns.dir} on http://{ns.host}:{server.server_address[1]}/ (Ctrl-C stops)",
          flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()


def cmd_bundle(ns: argparse.Namespace) -> None:
    for line in inspect_bundle(ns.dir):
        print(line)


def _add_release(sub: Subparsers) -> None:  # type: ignore[type-arg]
    s = sub.add_parser("sign", help="append release signatures to a bundle")
    s.set_defaults(func=cmd_sign)
    s.add_argument("bundle", type=Path)
    s.add_argument("--key", type=Path, action="append", required=True)
    s.add_argument("--root", type=Path, help="report progress against this root's threshold")

    v = sub.add_parser("verify", help="verify a bundle or archive as a device would")
    v.set_defaults(func=cmd_verify)
    v.add_argument("path", type=Path)
    v.add_argument("--root", type=Path, required=True)
    v.add_argument("--new-root", type=Path, action="append", default=[])
    v.add_argument("--profile")
    v.add_argument("--agent-version", default=__version__)
    v.add_argument("--model")
    v.add_argument("--committed", type=int)
    v.add_argument("--at", type=datetime.fromisoformat, help="reference time (ISO 8601)")
    se = sub.add_parser("seal", help="encrypt a bundle's model to devices' X25519 keys")
    se.set_defaults(func=cmd_seal)
    se.add_argument("bundle", type=Path)
    se.add_argument("--device-pub", type=Path, action="append", required=True)
    pk = sub.add_parser("pack", help="pack a bundle into one compressed archive")
    pk.set_defaults(func=cmd_pack)
    pk.add_argument("bundle", type=Path)
    pk.add_argument("--out", type=Path)
    pk.add_argument("--compression", choices=["zst", "gz"], default="zst")


def _add_command(sub: Subparsers) -> None:  # type: ignore[type-arg]
    c = sub.add_parser("command", help="build a signed command")
    c.set_defaults(func=cmd_command)
    c.add_argument("kind", choices=["deploy", "rollback", "restart", "reload", "config"])
    c.add_argument("--key", type=Path, action="append", required=True)
    c.add_argument("--root", type=Path, required=True)
    who = c.add_mutually_exclusive_group(required=True)
    who.add_argument("--device")
    who.add_argument("--group")
    c.add_argument("--ttl", type=int, default=3600, help="seconds until it expires")
    c.add_argument("--archive", type=Path)
    c.add_argument("--url", action="append", default=[])
    c.add_argument("--model")
    c.add_argument("--reason", default="")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    c.add_argument("--out", type=Path)


def add_parsers(sub: Subparsers) -> None:  # type: ignore[type-arg]
    _add_release(sub)
    _add_command(sub)
    sa = sub.add_parser("serve-artifacts", help="serve bundle archives over HTTP with Range")
    sa.set_defaults(func=cmd_serve_artifacts)
    sa.add_argument("dir", type=Path)
    sa.add_argument("--host", default="127.0.0.1")
    sa.add_argument("--port", type=int, default=8080)
    bundle = sub.add_parser("bundle").add_subparsers(dest="action", required=True)
    bi = bundle.add_parser("inspect")
    bi.set_defaults(func=cmd_bundle)
    bi.add_argument("dir", type=Path)
