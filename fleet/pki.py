"""A small PKI for the broker's mutual TLS, with the `openssl` command (present on every
Debian/Ubuntu host): a fleet CA, a server certificate for the broker, and client
certificates whose common name is the identity the broker's ACL uses
(`use_identity_as_username`): a device's id, or `fleet-controller` / `fleet-monitor`.

    edge-fleet pki init --dir PKI --server-host HOST   the CA and the broker's certificate
    edge-fleet pki issue --dir PKI NAME...             client certificates (NAME.crt/.key)

Keys are EC P-256 (fast to make, small on devices), certificates valid `days`. For a
production fleet an existing CA (step-ca, Vault, a corporate PKI) does the same job; the
broker configuration (`fleet.broker`) only needs its CA file and the CN convention.
"""

from __future__ import annotations

import ipaddress
import re
import subprocess
from pathlib import Path

from agent.trust.signatures import NAME_PATTERN
from fleet.errors import FleetError

#: Names the ACL gives fleet-wide rights; no device may be called so.
CONTROLLER, MONITOR = "fleet-controller", "fleet-monitor"
NAME = re.compile(NAME_PATTERN)


def _openssl(*args: str) -> None:
    try:
        subprocess.run(["openssl", *args], check=True, capture_output=True, text=True)
    except FileNotFoundError as exc:
        raise FleetError("the openssl command is not installed") from exc
    except subprocess.CalledProcessError as exc:
        raise FleetError(f"openssl {args[0]} failed: {exc.stderr.strip()[:300]}") from exc


def _key(path: Path) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-out", str(path))
    path.chmod(0o600)


def init_ca(where: Path, *, server_hosts: list[str], days: int = 825) -> dict[str, Path]:
    """`ca.crt`/`ca.key` and the broker's `server.crt`/`server.key` for `server_hosts`
    (DNS names or IP addresses).

    Raises:
        FleetError: a CA exists there already, or openssl failed.
    """
    where.mkdir(parents=True, exist_ok=True)
    ca_key, ca_crt = where / "ca.key", where / "ca.crt"
    if ca_crt.exists():
        raise FleetError(f"{ca_crt} exists; refusing to replace a CA")
    _key(ca_key)
    _openssl("req", "-x509", "-new", "-key", str(ca_key), "-days", str(days), "-subj",
             "/CN=edge-fleet CA", "-out", str(ca_crt))
    sans = ",".join(f"IP:{h}" if _is_ip(h) else f"DNS:{h}" for h in server_hosts)
    issue(where, "server", days=days, san=sans)
    return {"ca": ca_crt, "server_crt": where / "server.crt", "server_key": where / "server.key"}


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def issue(where: Path, name: str, *, days: int = 825, san: str | None = None
          ) -> tuple[Path, Path]:
    """A certificate with CN `name` signed by the CA in `where`: `name.crt`, `name.key`.

    Raises:
        FleetError: an invalid name, no CA, or openssl failed.
    """
    if not NAME.match(name):
        raise FleetError(f"{name!r} is not a valid name (letters, digits, _ . -)")
    if not (where / "ca.key").exists():
        raise FleetError(f"no CA in {where}: run `edge-fleet pki init` first")
    key, crt, csr = where / f"{name}.key", where / f"{name}.crt", where / f"{name}.csr"
    if not key.exists():
        _key(key)
    _openssl("req", "-new", "-key", str(key), "-subj", f"/CN={name}", "-out", str(csr))
    ext = []
    if san:
        (where / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        ext = ["-extfile", str(where / f"{name}.ext")]
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(where / "ca.crt"), "-CAkey",
             str(where / "ca.key"), "-CAcreateserial", "-days", str(days), "-out", str(crt),
             *ext)
    csr.unlink()
    return crt, key
