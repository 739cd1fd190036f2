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
    edge-fleet controller --db postgresql://... serve every rollout needing a controller
    edge-fleet dashboard --broker URL --fleet F a live web page of the fleet
    edge-fleet simulate --devices N --faulty P  simulated devices on the agent's protocol code
    edge-fleet bundle inspect BUNDLE            summarise a bundle and check its files

`rollout start|run|abort` exit with what became of the rollout: 0 completed, 4 halted,
5 aborted, 6 paused, 7 still running when --timeout ran out, 8 this controller's lease was
taken by another while it was stopped or cut off (it wrote nothing after); 2 is an error
(as for every command), 3 a rejected bundle or command. `rollout run` on a second host is
a standby: it waits for the lease of the controller that drives the rollout to run out
(--lease, 15 s after its last step), then carries the rollout on from the record.
`edge-fleet controller` runs until stopped on as many hosts as wanted, all on one
database: each claims rollouts without a live lease (`rollout start --detach` leaves one
to them), so a dead controller's rollouts are carried on within one lease.

Passphrase-protected keys read the passphrase from the environment variable named by
--passphrase-env (default EDGE_FLEET_PASSPHRASE), or prompt when a terminal is attached.
"""

from __future__ import annotations

import argparse
import sys

from agent.errors import AgentError, RejectedError
from agent.pipes import reader_gone
from fleet._terminal import Printable
from fleet.cli import devices, release, rollout, sim, trust
from fleet.errors import FleetError

# Help for options and subcommands not given one where they are added: "--opt" applies to
# every command that takes it, "COMMAND [SUB] --opt" (or a subcommand path) to one only.
# tests/test_cli_pipes.py checks that no option of any of the three commands is left bare.
HELP = {
    "--passphrase-env": "environment variable holding the private keys' passphrase "
                        "(default EDGE_FLEET_PASSPHRASE; a terminal prompts without it)",
    "--db": "the fleet record: an SQLite file or a postgresql://user@host:port/db URL "
            "(default: $EDGE_FLEET_DB, else fleet.sqlite)",
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
    trust.add_parsers(sub)
    devices.add_parsers(sub)
    release.add_parsers(sub)
    rollout.add_parsers(sub)
    sim.add_parsers(sub)
    _fill_help(parser)
    return parser


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
