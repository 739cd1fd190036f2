"""What every command group shares: the passphrase, the broker connection options."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from pathlib import Path
from typing import Any

from fleet.errors import FleetError


def passphrase(ns: argparse.Namespace, *, new: bool = False) -> str | None:
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

Subparsers = argparse._SubParsersAction  # argparse exposes no public name


def add_broker(p: argparse.ArgumentParser, *, required: bool = True) -> None:
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


def auth(ns: argparse.Namespace) -> Any:
    from fleet._mqtt import BrokerAuth  # noqa: PLC0415  # paho only here

    return BrokerAuth.from_options(broker=ns.broker, ca_file=ns.ca_file,
                                   cert_file=ns.cert_file, key_file=ns.key_file,
                                   username=ns.username)


def watcher_of(ns: argparse.Namespace) -> Any:
    from fleet.devices.registry import FleetDB  # noqa: PLC0415  # paho only here
    from fleet.devices.watcher import FleetWatcher  # noqa: PLC0415

    db = FleetDB(ns.db)
    return db, FleetWatcher(db, auth(ns), ns.fleet).start()


def default_db() -> str:
    """The fleet record: $EDGE_FLEET_DB (an SQLite path or a postgresql:// URL), else
    fleet.sqlite here."""
    return os.environ.get("EDGE_FLEET_DB") or "fleet.sqlite"
