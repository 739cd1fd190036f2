"""`edge-agent`: the device command.

    edge-agent run [--config PATH]            the daemon (systemd runs this)
    edge-agent check-config [--config PATH]   validate a configuration, naming each problem
    edge-agent install BUNDLE [--config PATH] install through the running daemon, or
                                              directly when it is stopped
    edge-agent status [--config PATH]         what the running daemon serves
    edge-agent unit [--config PATH]           the systemd unit, MemoryMax from the budgets
    edge-agent schema [--out DIR]             JSON Schema of every MQTT topic's payload
    edge-agent profiles                       list the firmware profiles this install knows
    edge-agent profile NAME                   validate and print one profile
    edge-agent selftest BUNDLE_DIR            check a bundle's files and run its self-test here
    edge-agent device-key ID --out DIR        make this device's keys: Ed25519 to sign its
                                              reports, X25519 for sealed models
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import typing
from pathlib import Path

from agent import __version__, logs
from agent.config import DEFAULT_PATH, AgentConfig, load_config
from agent.errors import AgentError, StateLocked
from agent.pipes import reader_gone
from agent.profiles import available_profiles, load_profile
from agent.serving.selftest import run_selftest
from agent.trust.bundle import check_files, read_manifest
from agent.trust.identity import generate_device_key
from agent.unit import render_unit


def _selftest(bundle: Path) -> int:
    manifest = read_manifest(bundle)
    check_files(bundle, manifest)
    res = run_selftest(bundle, manifest)
    print(f"{manifest.name} v{manifest.version} ({manifest.runtime}): self-test "
          f"{'passed' if res.passed else 'FAILED'} on {res.samples} samples, max |diff| "
          f"{res.max_abs_diff:.4g} (atol {manifest.selftest.atol:.4g}), top-1 agreement "
          f"{res.top1_agreement:.0%}")
    return 0 if res.passed else 1


def _schema(out: Path | None) -> None:
    from agent.link.wire import json_schemas  # noqa: PLC0415  # when used

    schemas = json_schemas()
    if out is None:
        print(json.dumps(schemas, indent=2))
        return
    out.mkdir(parents=True, exist_ok=True)
    for topic, schema in schemas.items():
        (out / f"{topic.replace('/', '.')}.schema.json").write_text(json.dumps(schema,
                                                                             indent=2))
    print(f"wrote {len(schemas)} schemas to {out}")


def _install(config: AgentConfig, bundle: Path) -> int:
    from agent.service import lock_state  # noqa: PLC0415  # the daemon (runtimes) only here

    try:
        lock = lock_state(config.paths.state_dir)
    except StateLocked:  # the daemon runs: upload the archive to it, it keeps serving
        if not bundle.is_file():
            print(f"{bundle}: the running daemon takes a bundle archive (.tar.zst or .tar.gz,"
                  " as edge-fleet pack writes); a directory installs only while it is "
                  "stopped", file=sys.stderr)
            return 2
        from agent.client import upload  # noqa: PLC0415  # http.client: not in the daemon

        status, body = upload(config.api.admin_socket, bundle)
        print(json.dumps(body, indent=2))
        return 0 if status == 200 else 3
    try:  # stopped: install directly, the daemon loads it at its next start
        from agent.daemon import Agent  # noqa: PLC0415  # each command loads only what it needs

        agent = Agent(config)
        agent.store.recover()
        r = agent.install(bundle)
        print(f"installed {r.model} v{r.version} directly (daemon stopped); self-test "
              f"{r.selftest}")
    finally:
        lock.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-agent", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    helps = {"run": "the daemon (systemd runs it)",
             "check-config": "every check run makes of a configuration, every problem named",
             "install": "install a bundle archive through the running daemon, or directly "
                        "into the state directory while it is stopped",
             "status": "what the running daemon serves",
             "unit": "the systemd unit for this installation, MemoryMax from the budgets"}
    for name, text in helps.items():
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--config", type=Path, default=DEFAULT_PATH,
                       help=f"the agent's configuration (default {DEFAULT_PATH})")
        if name == "install":
            p.add_argument("bundle", type=Path, help="a bundle archive (.tar.zst or .tar.gz)")
        if name == "run":
            p.add_argument("--log-format", choices=typing.get_args(logs.Format), default="text",
                           help="log lines on stderr (default text; under systemd each line "
                                "also carries its syslog priority for journald)")
            p.add_argument("--log-level", choices=logs.LEVELS,
                           default="info", help="least severe level logged (default info)")
    sub.add_parser("profiles", help="list the firmware profiles this install knows")
    sub.add_parser("schema", help="JSON Schema of every MQTT topic's payload").add_argument(
        "--out", type=Path, help="write one file per payload here (default: print them)")
    sub.add_parser("profile", help="validate and print one firmware profile").add_argument(
        "name", help="a profile name (edge-agent profiles lists them)")
    sub.add_parser("selftest", help="check a bundle's files and run its self-test here"
                   ).add_argument("bundle", type=Path, help="an unpacked bundle directory")
    dk = sub.add_parser("device-key", help="make this device's keys: Ed25519 to sign its "
                        "reports, X25519 to open models sealed to it")
    dk.add_argument("device", help="the device id (as in device.id)")
    dk.add_argument("--out", type=Path, required=True,
                    help="directory for ID.key (private, mode 0600) and ID.pub")
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        return _dispatch(ns)
    except AgentError as exc:
        print(f"edge-agent: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `edge-agent profiles | head -1`
        return reader_gone()
    except OSError as exc:  # the daemon's socket is absent or refuses
        print(f"edge-agent: error: cannot reach the agent: {exc}", file=sys.stderr)
        return 2


def _dispatch(ns: argparse.Namespace) -> int:
    if ns.command == "profiles":
        for name in available_profiles():
            print(f"{name:22} {load_profile(name).description}")
    elif ns.command == "profile":
        print(json.dumps(load_profile(ns.name).model_dump(), indent=2))
    elif ns.command == "device-key":
        key, pub = generate_device_key(ns.device, ns.out)
        print(f"private keys {key} (keep on this device: set paths.device_key), public "
              f"keys {pub} (give to the operator: `edge-fleet devices add {ns.device} --key "
              f"{pub.name}`, and `edge-fleet seal`)")
    elif ns.command == "selftest":
        return _selftest(ns.bundle)
    elif ns.command == "check-config":
        from agent.preflight import preflight  # noqa: PLC0415  # each command loads what it needs

        cfg = load_config(ns.config)
        for line in preflight(cfg):
            print(f"ok: {line}")
        print(f"{ns.config}: valid (device {cfg.device.id}, profile {cfg.device.profile}); "
              "edge-agent run makes these same checks")
    elif ns.command == "run":
        from agent.service import run  # noqa: PLC0415  # each command loads only what it needs

        return run(load_config(ns.config), ns.config, log_format=ns.log_format,
                   log_level=ns.log_level)
    elif ns.command == "install":
        return _install(load_config(ns.config), ns.bundle)
    elif ns.command == "schema":
        _schema(ns.out)
    elif ns.command == "unit":
        unit_cfg = load_config(ns.config) if ns.config.exists() else None
        sys.stdout.write(render_unit(unit_cfg, config_path=ns.config.absolute(),
                                     exec_start=installed_command()))
    elif ns.command == "status":
        from agent.client import unix_call  # noqa: PLC0415  # http.client: not in the daemon

        status, body = unix_call(load_config(ns.config).api.admin_socket, "GET",
                                 "/v1/admin/status")
        print(json.dumps(body, indent=2))
        return 0 if status == 200 else 2
    return 0


def installed_command() -> str:
    """ExecStart for this installation: its own `edge-agent` script beside the interpreter
    (a virtual environment's or dh-virtualenv's bin/), else this interpreter running the
    module; never a PATH lookup, which under systemd finds another install or nothing."""
    script = Path(sys.executable).parent / "edge-agent"
    if script.is_file() and os.access(script, os.X_OK):
        return str(script.absolute())
    return f"{Path(sys.executable).absolute()} -m agent.cli"


if __name__ == "__main__":
    sys.exit(main())
