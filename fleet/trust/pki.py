"""A small PKI for the broker's mutual TLS: a fleet CA, a server certificate for the
broker, and client certificates whose common name is the identity the broker's ACL uses
(`use_identity_as_username`): a device's id, or `fleet-controller` / `fleet-monitor`.

    edge-fleet pki init --dir PKI --server-host HOST   the CA and the broker's certificate
    edge-fleet pki issue --dir PKI NAME...             client certificates (NAME.crt/.key)

Keys are EC P-256 (fast to make, small on devices), certificates valid `days`, serials
random (RFC 5280 §4.1.2.2). Made in process with pyca/cryptography (the `fleet` extra):
`issue_many` loads the CA key once for a whole batch (a thousand certificates in about a
second, where three `openssl` processes per certificate took ~55 s). For a production
fleet an existing CA (step-ca, Vault, a corporate PKI) does the same job; the broker
configuration (`fleet.broker`) only needs its CA file and the CN convention.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from agent.trust.signatures import NAME_PATTERN
from fleet.errors import FleetError

#: Names the ACL gives fleet-wide rights; no device may be called so.
CONTROLLER, MONITOR = "fleet-controller", "fleet-monitor"
NAME = re.compile(NAME_PATTERN)
_BACKDATE = timedelta(minutes=5)  # a device whose clock is a little behind accepts it


def _crypto() -> Any:
    try:
        from cryptography import x509  # noqa: PLC0415  # the fleet extra, loaded when used
    except ImportError as exc:
        raise FleetError("the PKI needs the fleet extra: pip install 'edgekeeper[fleet]' "
                         "(pyca/cryptography)") from exc
    return x509


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    path.chmod(0o600)


def _new_key(path: Path) -> Any:
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415

    key = ec.generate_private_key(ec.SECP256R1())
    _write_private(path, key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return key


def _load_key(path: Path) -> Any:
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415

    try:
        return serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise FleetError(f"{path}: not a usable private key ({exc})") from exc


def _name(cn: str) -> Any:
    x509 = _crypto()
    from cryptography.x509.oid import NameOID  # noqa: PLC0415

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _sign(builder: Any, ca_key: Any, path: Path) -> None:
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415

    cert = builder.sign(ca_key, hashes.SHA256())
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _builder(subject: Any, issuer: Any, public_key: Any, days: int) -> Any:
    x509 = _crypto()
    now = datetime.now(UTC)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
            .public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE).not_valid_after(now + timedelta(days=days)))


def init_ca(where: Path, *, server_hosts: list[str], days: int = 825) -> dict[str, Path]:
    """`ca.crt`/`ca.key` and the broker's `server.crt`/`server.key` for `server_hosts`
    (DNS names or IP addresses).

    Raises:
        FleetError: a CA exists there already, or the cryptography package is missing.
    """
    x509 = _crypto()
    where.mkdir(parents=True, exist_ok=True)
    ca_key, ca_crt = where / "ca.key", where / "ca.crt"
    if ca_crt.exists():
        raise FleetError(f"{ca_crt} exists; refusing to replace a CA")
    key = _new_key(ca_key)
    name = _name("edge-fleet CA")
    _sign(_builder(name, name, key.public_key(), days)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                       crl_sign=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False,
                                       decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                         critical=False), key, ca_crt)
    sans = [x509.IPAddress(ipaddress.ip_address(h)) if _is_ip(h) else x509.DNSName(h)
            for h in server_hosts]
    _CA(where).issue("server", days=days, sans=sans)
    return {"ca": ca_crt, "server_crt": where / "server.crt", "server_key": where / "server.key"}


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class _CA:
    """The CA of `where`, its key loaded once."""

    def __init__(self, where: Path) -> None:
        x509 = _crypto()
        if not (where / "ca.key").exists():
            raise FleetError(f"no CA in {where}: run `edge-fleet pki init` first")
        self.where = where
        self.key = _load_key(where / "ca.key")
        try:
            self.cert = x509.load_pem_x509_certificate((where / "ca.crt").read_bytes())
        except (OSError, ValueError) as exc:
            raise FleetError(f"{where / 'ca.crt'}: not a usable certificate ({exc})") from exc

    def issue(self, name: str, *, days: int, sans: list[Any] | None = None
              ) -> tuple[Path, Path]:
        x509 = _crypto()
        if not NAME.match(name):
            raise FleetError(f"{name!r} is not a valid name (letters, digits, _ . -)")
        key_path, crt = self.where / f"{name}.key", self.where / f"{name}.crt"
        key = _load_key(key_path) if key_path.exists() else _new_key(key_path)
        b = (_builder(_name(name), self.cert.subject, key.public_key(), days)
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                 self.key.public_key()), critical=False))
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        _sign(b, self.key, crt)
        return crt, key_path


def issue(where: Path, name: str, *, days: int = 825) -> tuple[Path, Path]:
    """A certificate with CN `name` signed by the CA in `where`: `name.crt`, `name.key`
    (a key already there is kept: the certificate is renewed).

    Raises:
        FleetError: an invalid name, no CA, or an unusable CA file.
    """
    return _CA(where).issue(name, days=days)


def issue_many(where: Path, names: Iterable[str], *, days: int = 825
               ) -> list[tuple[Path, Path]]:
    """`issue` for every name, the CA key loaded once; returns each (certificate, key).

    Raises:
        FleetError: as `issue`, at the first name that fails.
    """
    ca = _CA(where)
    return [ca.issue(name, days=days) for name in names]
