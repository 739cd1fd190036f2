"""`edge-fleet`: the operator's command.

    edge-fleet keys init --dir D --fleet F      root, release and command keys + root.json v1
    edge-fleet keys rotate --dir D [...]        root.json v+1: revoke/add keys, thresholds
    edge-fleet keys renew --dir D               root.json v+1, same keys, later expiry
    edge-fleet keys show --dir D                the current root: roles, keys, thresholds
    edge-fleet root publish --dir D ...         announce the root to devices (retained)
    edge-fleet heartbeat --key K ...            the signed, retained freshness heartbeat
    edge-fleet pki init|issue --dir D ...       CA and certificates for mutual TLS
    edge-fleet broker-config --fleet F ...      mosquitto.conf + per-device ACL
    edge-fleet devices add ID --key DEVICE.pub  register a device's report key
    edge-fleet devices import PATH...           register many (.pub files or directories)
    edge-fleet devices list                     registered and unknown devices
    edge-fleet seal BUNDLE --device-pub P ...   encrypt the model to devices (before signing)
    edge-fleet sign BUNDLE --key K [--key K]    append release signatures
    edge-fleet pack BUNDLE [--out A]            one .tar.zst (or .tar.gz) archive
    edge-fleet verify BUNDLE|ARCHIVE --root R   the device's own verification
    edge-fleet command KIND --key K ...         a signed deploy/rollback/restart/reload/config
    edge-fleet serve-artifacts DIR [--port N]  HTTP with Range for bundle archives
    edge-fleet status --broker URL --fleet F    devices, versions, health, last anomaly
    edge-fleet watch --broker URL --fleet F     the same table, live
    edge-fleet recover --group G|--device D ... signed rollback/restart/reload, results
    edge-fleet rollout start --bundle A ...     waves to a group; halt and roll back on failure
    edge-fleet rollout status|run|pause|resume|abort ID
    edge-fleet dashboard --broker URL --fleet F a live web page of the fleet
    edge-fleet simulate --devices N --faulty P  simulated devices on the agent's protocol code
    edge-fleet bundle inspect BUNDLE            summarise a bundle and check its files

`rollout start|run|abort` exit with what became of the rollout: 0 completed, 4 halted,
5 aborted, 6 paused, 7 still running when --timeout ran out; 2 is an error (as for every
command), 3 a rejected bundle or command.

Passphrase-protected keys read the passphrase from the environment variable named by
--passphrase-env (default EDGE_FLEET_PASSPHRASE), or prompt when a terminal is attached.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import os
import sys
import time
from dataclasses import fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from agent import __version__
from agent.errors import AgentError, RejectedError
from agent.pipes import reader_gone
from agent.trust.archive import read_archive_head
from agent.trust.bundle import check_files, read_manifest
from agent.trust.manifest import SIGNATURES_FILE, parse_manifest
from agent.trust.root import ROLES, RoleName, load_pinned_root
from agent.trust.verify import Device
from fleet._terminal import Printable
from fleet.commands import build_command, deploy_fields, parse_settings, sign_command
from fleet.errors import FleetError
from fleet.keys import KeyDir, init_keys, load_key, rotate_keys
from fleet.policy import Criteria
from fleet.release import (
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


def _passphrase(ns: argparse.Namespace, *, new: bool = False) -> str | None:
    value = os.environ.get(ns.passphrase_env)
    if value is None and sys.stdin.isatty():
        if not new:
            return getpass.getpass("key passphrase (empty if none): ") or None
        value = getpass.getpass("passphrase for the new keys (empty for none): ")
        if value and value != getpass.getpass("again: "):
            raise FleetError("passphrases differ")
    if new and not value and not getattr(ns, "no_passphrase", False):
        print(f"edge-fleet: warning: the new private keys are written unencrypted (no "
              f"passphrase in ${ns.passphrase_env} or from a terminal): whoever reads "
              f"{ns.dir / 'keys'} can sign releases and commands; pass --no-passphrase if "
              "that is intended (e.g. keys kept on an HSM-backed or encrypted volume)",
              file=sys.stderr)
    return value or None


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
                         passphrase=_passphrase(ns, new=True))
        print(f"created keys in {ns.dir / 'keys'} and {ns.dir / 'root.json'} v{root.version}")
    elif ns.action in ("rotate", "renew"):
        old = KeyDir(ns.dir).root()
        rotating = ns.action == "rotate"
        root = rotate_keys(ns.dir, revoke=ns.revoke if rotating else [],
                           add=_role_numbers(ns.add) if rotating else {},
                           thresholds=_role_numbers(ns.threshold) if rotating else {},
                           expires_days=ns.expires_days, passphrase=_passphrase(ns, new=True))
        print(f"root.json v{old.version} -> v{root.version}; announce it to devices: "
              f"edge-fleet root publish --dir {ns.dir} --artifacts DIR --url-base URL")
    root = KeyDir(ns.dir).root()
    names = {f.keyid: f.name for _, f in KeyDir(ns.dir).key_files()}
    print(f"fleet {root.fleet}, root v{root.version}, expires {root.expires:%Y-%m-%d}")
    for role in ROLES:
        r = root.roles[role]
        print(f"  {role:8} {r.threshold} of {len(r.keyids)}: "
              + ", ".join(f"{names.get(k, '?')} ({k[:10]})" for k in r.keyids))


def _device_pubs(paths: list[Path]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        out += sorted(p.glob("*.pub")) if p.is_dir() else [p]
    return out


def cmd_devices(ns: argparse.Namespace) -> None:
    from agent.trust.identity import read_device_public  # noqa: PLC0415  # when used
    from fleet.state import FleetDB  # noqa: PLC0415  # each command loads only what it needs

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
    print(f"{len(files)} device key(s) registered in {ns.db} ({changed} new or changed)")


def cmd_sign(ns: argparse.Namespace) -> None:
    root = load_pinned_root(ns.root.read_bytes()) if ns.root else None
    res = sign_bundle(ns.bundle, [load_key(k, _passphrase(ns)) for k in ns.key], root)
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
    keys = [load_key(k, _passphrase(ns)) for k in ns.key]
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
    from fleet.artifacts import make_server  # noqa: PLC0415  # when used

    server = make_server(ns.dir, ns.host, ns.port)
    print(f"serving {ns.dir} on http://{ns.host}:{server.server_address[1]}/ (Ctrl-C stops)",
          flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()


def _watcher(ns: argparse.Namespace) -> Any:
    from fleet.state import FleetDB, FleetWatcher  # noqa: PLC0415  # paho only here

    db = FleetDB(ns.db)
    return db, FleetWatcher(db, _auth(ns), ns.fleet).start()


def cmd_status(ns: argparse.Namespace) -> None:
    from fleet.state import status_lines  # noqa: PLC0415  # each command loads only what it needs

    db, watcher = _watcher(ns)
    time.sleep(ns.wait)
    watcher.stop()
    print("\n".join(status_lines(db.devices(group=ns.group), unknown=db.unknown(),
                                  ignored=db.ignored())))


def cmd_watch(ns: argparse.Namespace) -> None:
    from fleet.state import status_lines  # noqa: PLC0415  # each command loads only what it needs

    db, watcher = _watcher(ns)
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
    from fleet.recover import recover  # noqa: PLC0415  # each command loads only what it needs

    if ns.action == "rollback" and not ns.model:
        raise FleetError("rollback needs --model")
    keys = [load_key(k, _passphrase(ns)) for k in ns.key]
    fleet = load_pinned_root(ns.root.read_bytes()).fleet
    expected = [ns.device] if ns.device else []
    if ns.group:
        db, watcher = _watcher(argparse.Namespace(**{**vars(ns), "fleet": fleet}))
        time.sleep(ns.wait)
        watcher.stop()
        expected = [r.device for r in db.devices(group=ns.group) if r.online]
    from fleet.state import FleetDB  # noqa: PLC0415  # each command loads only what it needs

    summary = recover(_auth(ns), fleet, keys, FleetDB(ns.db), action=ns.action,
                      expected=expected,
                      device=ns.device, group=ns.group, model=ns.model, reason=ns.reason,
                      timeout_s=ns.timeout)
    print("\n".join(summary.lines()))
    if summary.failed or summary.silent:
        raise FleetError(f"{len(summary.failed)} failed, {len(summary.silent)} silent")


#: `edge-fleet rollout start|run|abort` exit codes: what became of the rollout (an error
#: before or while driving it is 2, as for every command).
ROLLOUT_EXIT = {"completed": 0, "halted": 4, "aborted": 5, "paused": 6, "running": 7}


def cmd_rollout(ns: argparse.Namespace) -> int:
    from fleet.rollout import LOCK_STALE_S, Controller, Rollouts  # noqa: PLC0415  # when used
    from fleet.state import FleetDB  # noqa: PLC0415  # each command loads only what it needs

    db = FleetDB(ns.db)
    rollouts = Rollouts(db)
    if ns.id is None and ns.action != "start":
        if not (ids := rollouts.ids()):
            raise FleetError(f"{ns.db} has no rollout yet")
        ns.id = ids[-1]
    if ns.action == "status":
        print("\n".join(rollouts.status_lines(ns.id, every_device=ns.every_device)))
        if ns.device:
            history = rollouts.history(ns.id, ns.device)
            if not history:
                raise FleetError(f"{ns.device} is not part of rollout {ns.id}")
            print(f"history of {ns.device}:")
            print("\n".join(f"  {datetime.fromtimestamp(h.at, UTC):%H:%M:%S.%f}"[:-3]
                             + f"  {h.from_status or '-':>15} -> {h.to_status:15} "
                             f"{h.event:15} {h.cause}" for h in history))
        return 0
    if ns.action in ("pause", "resume"):
        print(f"rollout {ns.id}: {rollouts.move(ns.id, ns.action).value}")
        return 0
    if ns.action == "abort" and ns.id:
        ro = rollouts.get(ns.id)
        if ro.owner and ro.owner_beat and time.time() - ro.owner_beat < LOCK_STALE_S:
            rollouts.move(ns.id, "abort", "aborted by the operator")
            print(f"rollout {ns.id}: aborted; its controller ({ro.owner}) sends the "
                  "rollbacks")
            return ROLLOUT_EXIT["aborted"]
    if not (ns.key and ns.root):
        raise FleetError(f"rollout {ns.action} needs --broker, --key and --root")
    fleet = load_pinned_root(ns.root.read_bytes()).fleet
    controller = Controller(db, _auth(ns), fleet,
                            [load_key(k, _passphrase(ns)) for k in ns.key])
    try:
        rid = ns.id
        if ns.action == "abort":
            controller.abort(rid)
        elif ns.action == "start":
            rid = _start_rollout(ns, db, rollouts, Criteria(
                **{f.name: getattr(ns, f.name) for f in fields(Criteria)}))
        status = controller.run(rid, timeout_s=ns.timeout)
        print(f"rollout {rid}: {status}")
        print("\n".join(rollouts.status_lines(rid)))
    finally:
        controller.close()
    return ROLLOUT_EXIT[status.value]


def _waves(text: str) -> list[float]:
    """`1,10,50,100` (cumulative percentages) or `exp:1,2` (from 1 %, doubling)."""
    from fleet.policy import exponential_fractions  # noqa: PLC0415  # when used

    try:
        if text.startswith("exp:"):
            start, factor = (float(x) for x in text[4:].split(","))
            return exponential_fractions(start, factor)
        return [float(f) / 100 for f in text.split(",")]
    except ValueError as exc:
        raise FleetError(f"--waves {text!r}: {exc}") from exc


def _start_rollout(ns: argparse.Namespace, db: Any, rollouts: Any, criteria: Any) -> str:
    from fleet.policy import RetryPolicy  # noqa: PLC0415  # when used

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


def cmd_dashboard(ns: argparse.Namespace) -> None:
    from fleet.dashboard import Dashboard, make_server  # noqa: PLC0415  # when used

    db, watcher = _watcher(ns)
    server = make_server(Dashboard(db, ns.fleet), ns.host, ns.port)
    print(f"dashboard on http://{ns.host}:{server.server_address[1]}/ (Ctrl-C stops)",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        watcher.stop()


def cmd_simulate(ns: argparse.Namespace) -> None:
    import signal  # noqa: PLC0415  # each command loads only what it needs
    from collections import Counter  # noqa: PLC0415  # each command loads only what it needs

    from fleet.simulate import SimSettings, SimulatedFleet  # noqa: PLC0415  # when used

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


def cmd_bundle(ns: argparse.Namespace) -> None:
    for line in inspect_bundle(ns.dir):
        print(line)


# Help for options and subcommands not given one where they are added: "--opt" applies to
# every command that takes it, "COMMAND [SUB] --opt" (or a subcommand path) to one only.
# tests/test_cli_pipes.py checks that no option of any of the three commands is left bare.
HELP = {
    "--passphrase-env": "environment variable holding the private keys' passphrase "
                        "(default EDGE_FLEET_PASSPHRASE; a terminal prompts without it)",
    "--db": "the fleet database (default fleet.sqlite)",
    "--dir": "the fleet's key directory (keys/ and root.json)",
    "--key": "a private key file to sign with (repeat up to the role's threshold)",
    "--root": "the fleet's trusted root.json",
    "--group": "only devices in this group",
    "--fleet": "the fleet's name (as in root.json)",
    "--days": "validity in days",
    "--out": "where to write the result",
    "--model": "the model name",
    "--reason": "why, recorded with the command and in the audit trail",
    "--timeout": "seconds to wait for the devices' answers",
    "--interval": "seconds between refreshes",
    "--host": "address to listen on",
    "--port": "TCP port to listen on",
    "--device": "one device id",
    "pki init --dir": "the CA's directory (ca.crt, ca.key, the broker's certificate)",
    "pki issue --dir": "the CA's directory made by pki init",
    "rollout --timeout": "start, run, abort: seconds the controller drives the rollout "
                         "before it stops waiting (default 3600)",
    "rollout --wait": "seconds to listen for the devices' reports before a status or "
                      "after a pause or resume (default 2)",
    "recover --device": "one device id (default: every device that needs it)",
    "command --device": "send to one device",
    "command --group": "send to every device of a group",
    "command kind": "deploy, rollback, restart, reload or config",
    "recover --action": "what to send: rollback, restart or reload",
    "keys init": "root, release and command keys and root.json v1",
    "keys init --fleet": "the fleet's name, bound into root.json and every signature",
    "keys rotate": "root.json v+1: revoke keys, add keys, change thresholds",
    "keys rotate --revoke": "a key to revoke, by name or key id (repeatable)",
    "keys rotate --add": "ROLE=N: N new keys for the role (repeatable)",
    "keys rotate --threshold": "ROLE=N: the role's new threshold (repeatable)",
    "keys show": "the roles, keys, thresholds and expiry of root.json",
    "pki issue names": "device ids (or fleet-controller, fleet-monitor), one certificate each",
    "broker-config --fleet": "the fleet whose topic tree the ACL covers",
    "broker-config --out": "directory for mosquitto.conf, its ACL file and the guard plugin",
    "broker-config --port": "the broker's TLS port (default 8883)",
    "broker-config --bind": "address the broker listens on",
    "broker-config --data-dir": "mosquitto's persistence directory",
    "broker-config --log-dest": "mosquitto's log_dest line (default stderr)",
    "broker-config --autosave": "seconds between mosquitto's persistence saves",
    "heartbeat --root": "the root.json the heartbeat announces",
    "devices list": "registered devices and their report keys",
    "devices add id": "the device id (CN of its certificate, device.id in its config)",
    "devices import paths": "ID.pub files made by edge-agent device-key",
    "sign bundle": "an unpacked bundle directory",
    "verify path": "a bundle directory or archive",
    "verify --new-root": "a root.json v+1 to check against --root",
    "verify --profile": "check compatibility with this firmware profile",
    "verify --agent-version": "check compatibility with this agent version",
    "verify --committed": "the version the device has committed (refuses older ones)",
    "seal bundle": "an unpacked, unsigned bundle directory",
    "seal --device-pub": "a device's ID.pub: only the listed devices can open the model",
    "pack bundle": "a signed bundle directory",
    "pack --compression": "zstd (default) or gzip",
    "command --archive": "the signed bundle archive a deploy names",
    "command --url": "where devices download the archive (repeatable: mirrors)",
    "command --set": "KEY=VALUE for a config command (repeatable)",
    "command --out": "write the signed command here instead of publishing it",
    "status": "every device: state, version, health, last seen",
    "watch": "status, refreshed as reports arrive",
    "recover": "send a signed recovery action to devices that need one",
    "dashboard": "a live web dashboard of the fleet (read-only)",
    "rollout action": "start, status, run, pause, resume or abort",
    "rollout id": "the rollout id (default: the newest)",
    "simulate --broker": "the broker the simulated devices connect to",
    "simulate --devices": "how many simulated devices",
    "simulate --profile": "their firmware profile",
    "simulate --prefix": "device id prefix (ids are PREFIX-0001 ...)",
    "simulate --telemetry-interval": "seconds between telemetry reports",
    "simulate --health-window": "seconds after a deploy in which anomalies roll it back",
    "serve-artifacts dir": "directory of bundle archives to serve",
    "bundle": "inspect bundles",
    "bundle inspect": "a bundle's summary, every file's size and sha256 checked",
    "bundle inspect dir": "an unpacked bundle directory",
}


def _fill_help(parser: argparse.ArgumentParser, path: str = "") -> None:
    """Give every option and subcommand without help its entry in HELP (the most
    specific first)."""
    for action in parser._actions:  # argparse has no public walk
        if isinstance(action, argparse._SubParsersAction):
            helped = {c.dest: c for c in action._choices_actions}
            for name, sub in action.choices.items():
                where = f"{path} {name}".strip()
                if name in helped and not helped[name].help and where in HELP:
                    helped[name].help = HELP[where]
                elif name not in helped and where in HELP:  # added without help=
                    action._choices_actions.append(
                        action._ChoicesPseudoAction(name, (), HELP[where]))
                if not sub.description and where in HELP:
                    sub.description = HELP[where]
                _fill_help(sub, where)
        elif not action.help:
            names = [*action.option_strings] or [action.dest]
            for key in (*(f"{path} {n}".strip() for n in names), *names):
                if key in HELP:
                    action.help = HELP[key]
                    break


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-fleet", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passphrase-env", default="EDGE_FLEET_PASSPHRASE", metavar="VAR")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_keys(sub)
    _add_trust(sub)
    _add_devices(sub)
    _add_release(sub)
    _add_command(sub)
    _add_watching(sub)
    ro = sub.add_parser("rollout", help="staged rollouts")
    ro.set_defaults(func=cmd_rollout)
    ro.add_argument("action", choices=["start", "status", "run", "pause", "resume", "abort"])
    ro.add_argument("id", nargs="?")
    ro.add_argument("--db", type=Path, default=Path("fleet.sqlite"))
    ro.add_argument("--every-device", action="store_true",
                    help="status: one line per device even for large rollouts")
    ro.add_argument("--device", help="status: also this device's execution history "
                                     "(every status change and its cause)")
    _add_broker(ro, required=False)
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
    ro.add_argument("--wait", type=float, default=2.0)
    ro.add_argument("--timeout", type=float, default=3600.0)
    _add_simulate(sub)
    sa = sub.add_parser("serve-artifacts", help="serve bundle archives over HTTP with Range")
    sa.set_defaults(func=cmd_serve_artifacts)
    sa.add_argument("dir", type=Path)
    sa.add_argument("--host", default="127.0.0.1")
    sa.add_argument("--port", type=int, default=8080)
    bundle = sub.add_parser("bundle").add_subparsers(dest="action", required=True)
    bi = bundle.add_parser("inspect")
    bi.set_defaults(func=cmd_bundle)
    bi.add_argument("dir", type=Path)
    _fill_help(parser)
    return parser


Subparsers = argparse._SubParsersAction  # argparse exposes no public name


def _add_watching(sub: Subparsers) -> None:  # type: ignore[type-arg]
    for name, func in (("status", cmd_status), ("watch", cmd_watch), ("recover", cmd_recover),
                       ("dashboard", cmd_dashboard)):
        p = sub.add_parser(name)
        p.set_defaults(func=func)
        _add_broker(p)
        p.add_argument("--db", type=Path, default=Path("fleet.sqlite"))
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


def _add_simulate(sub: Subparsers) -> None:  # type: ignore[type-arg]
    from fleet.simulate import DEFAULT_FAULTS, FAULTS, SimSettings  # noqa: PLC0415  # numpy

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


def _add_broker(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    """The connection options every command that speaks MQTT takes; each falls back to
    its environment variable (`fleet._mqtt.ENV`); the password is read only from
    EDGE_FLEET_MQTT_PASSWORD."""
    g = p.add_argument_group("broker connection (flags, or the EDGE_FLEET_* environment)")
    g.add_argument("--broker", help="mqtts://host:port (TLS) or mqtt://host:port; "
                   "EDGE_FLEET_BROKER" + ("" if required else "; needed to send commands"))
    g.add_argument("--ca-file", type=Path, help="CA certificate of the broker "
                   "(EDGE_FLEET_CA_FILE; default: the system's)")
    g.add_argument("--cert-file", type=Path, help="client certificate (EDGE_FLEET_CERT_FILE)")
    g.add_argument("--key-file", type=Path, help="its private key (EDGE_FLEET_KEY_FILE)")
    g.add_argument("--username", help="EDGE_FLEET_USERNAME; the password comes from "
                   "EDGE_FLEET_MQTT_PASSWORD")


def _auth(ns: argparse.Namespace) -> Any:
    from fleet._mqtt import BrokerAuth  # noqa: PLC0415  # paho only here

    return BrokerAuth.from_options(broker=ns.broker, ca_file=ns.ca_file,
                                   cert_file=ns.cert_file, key_file=ns.key_file,
                                   username=ns.username)


def cmd_root(ns: argparse.Namespace) -> int:
    from fleet.publish import copy_roots, publish_root  # noqa: PLC0415  # paho only here

    kd = KeyDir(ns.dir)
    if ns.artifacts:
        n = copy_roots(kd, ns.artifacts)
        print(f"{n} root(s) copied to {ns.artifacts / 'roots'}")
    version = publish_root(_auth(ns), kd, ns.url_base)
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
    from fleet.publish import root_reach  # noqa: PLC0415  # paho only here

    db, watcher = _watcher(ns)
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
    from fleet.publish import heartbeat, publish_retained  # noqa: PLC0415  # paho only here

    keys = [load_key(k, _passphrase(ns)) for k in ns.key]
    fleet = load_pinned_root(ns.root.read_bytes()).fleet
    auth = _auth(ns)
    while True:
        publish_retained(auth, f"edge/v1/{fleet}/heartbeat",
                         heartbeat(fleet, keys, ttl=timedelta(seconds=ns.ttl)))
        print(f"{datetime.now(UTC):%H:%M:%S} heartbeat for fleet {fleet}, valid {ns.ttl:g} s",
              flush=True)
        if ns.every <= 0:
            return
        time.sleep(ns.every)


def cmd_pki(ns: argparse.Namespace) -> None:
    from fleet import pki  # noqa: PLC0415  # each command loads only what it needs

    if ns.action == "init":
        made = pki.init_ca(ns.dir, server_hosts=ns.server_host, days=ns.days)
        print(f"CA {made['ca']}, broker certificate {made['server_crt']} for "
              f"{', '.join(ns.server_host)}")
        return
    for name, (crt, key) in zip(ns.names, pki.issue_many(ns.dir, ns.names, days=ns.days),
                                strict=True):
        print(f"{name}: {crt} {key}")


def cmd_broker_config(ns: argparse.Namespace) -> None:
    from fleet.broker import BrokerConfig, render  # noqa: PLC0415  # when used

    conf, acl = render(BrokerConfig(fleet=ns.fleet, pki=ns.pki.resolve(), port=ns.port,
                                    bind=ns.bind, data_dir=ns.data_dir,
                                    log_dest=ns.log_dest, user=ns.user,
                                    autosave_s=ns.autosave), ns.out)
    print(f"{conf}, {acl} and the guard plugin {conf.parent / 'edge_fleet_guard.so'}: "
          f"mutual TLS on {ns.bind}:{ns.port}, per-device ACL for fleet {ns.fleet}; start "
          f"with: mosquitto -c {conf}")


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
    pub.add_argument("--db", type=Path, default=Path("fleet.sqlite"),
                     help="with --wait: the fleet database (registered devices)")
    _add_broker(pub)
    hb = sub.add_parser("heartbeat", help="the fleet's signed, retained heartbeat")
    hb.set_defaults(func=cmd_heartbeat)
    hb.add_argument("--key", type=Path, action="append", required=True,
                    help="command key(s), up to the command threshold")
    hb.add_argument("--root", type=Path, required=True)
    hb.add_argument("--ttl", type=float, default=600.0,
                    help="seconds each heartbeat stays valid (%(default)s)")
    hb.add_argument("--every", type=float, default=0.0,
                    help="send again every this many seconds (0: once)")
    _add_broker(hb)


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
        p.add_argument("--db", type=Path, default=Path("fleet.sqlite"))


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


def main(argv: list[str] | None = None) -> int:
    ns = _parser().parse_args(argv)
    out, err = sys.stdout, sys.stderr
    # Device-provided text is printed in tables and errors: never as terminal controls.
    sys.stdout, sys.stderr = Printable(out), Printable(err)
    try:
        rc = ns.func(ns)
    except RejectedError as exc:
        print(f"edge-fleet: rejected ({exc.check}): {exc}", file=sys.stderr)
        return 3
    except BrokenPipeError:  # `edge-fleet status | head`
        return reader_gone()
    except (AgentError, FleetError, OSError) as exc:
        print(f"edge-fleet: error: {exc}", file=sys.stderr)
        return 2
    finally:
        sys.stdout, sys.stderr = out, err
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
