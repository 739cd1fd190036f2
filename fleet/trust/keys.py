"""Operator keys: Ed25519 signing keys on disk, `root.json` creation and rotation.

A key directory looks like this:

    DIR/root.json            the current root (what devices pin and update to)
    DIR/roots/N.root.json    every root version, for devices that are several behind
    DIR/keys/NAME.key        private keys, mode 0600, optionally passphrase-protected

A private key file is JSON with the role, name, key id, public key and either the raw
seed or the seed in a SecretBox under a key derived from the passphrase with Argon2id
(libsodium's `crypto_pwhash`, via PyNaCl). Writes are temp file, fsync, rename.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import nacl.exceptions
import nacl.pwhash
import nacl.secret
import nacl.signing
import nacl.utils
from pydantic import BaseModel, ConfigDict, ValidationError

from agent.durable import write_atomic
from agent.errors import RejectedError
from agent.trust.root import ROLES, RoleKeys, RoleName, Root, load_pinned_root, update_root
from agent.trust.signatures import Name, PublicKey, Signature, canonical
from fleet.errors import FleetError

KDF = nacl.pwhash.argon2id


class EncryptedSeed(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    kdf: str = "argon2id"
    opslimit: int
    memlimit: int
    salt: str
    box: str


class KeyFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    keytype: str = "ed25519"
    name: Name
    role: RoleName
    keyid: str
    public: str
    seed: str | None = None
    encrypted: EncryptedSeed | None = None


@dataclass(frozen=True)
class SigningKey:
    """A loaded private key with its role and name."""

    name: str
    role: str
    key: nacl.signing.SigningKey

    @property
    def public(self) -> PublicKey:
        return PublicKey(public=bytes(self.key.verify_key).hex())

    @property
    def keyid(self) -> str:
        return self.public.keyid

    def sign(self, message: bytes) -> Signature:
        return Signature(keyid=self.keyid, sig=self.key.sign(message).signature.hex())


def save_key(path: Path, key: SigningKey, passphrase: str | None) -> None:
    seed = bytes(key.key)
    fields: dict[str, Any] = {"name": key.name, "role": key.role, "keyid": key.keyid,
                              "public": key.public.public}
    if passphrase:
        salt = nacl.utils.random(KDF.SALTBYTES)
        ops, mem = KDF.OPSLIMIT_INTERACTIVE, KDF.MEMLIMIT_INTERACTIVE
        box = nacl.secret.SecretBox(KDF.kdf(32, passphrase.encode(), salt, opslimit=ops,
                                            memlimit=mem))
        fields["encrypted"] = EncryptedSeed(opslimit=ops, memlimit=mem, salt=salt.hex(),
                                            box=box.encrypt(seed).hex())
    else:
        fields["seed"] = seed.hex()
    write_atomic(path, KeyFile(**fields).model_dump_json(indent=2, exclude_none=True).encode(),
                 mode=0o600)


def load_key(path: Path, passphrase: str | None = None) -> SigningKey:
    """Load a private key file.

    Raises:
        FleetError: unreadable, malformed, passphrase missing or wrong.
    """
    try:
        f = KeyFile.model_validate_json(path.read_bytes())
    except (OSError, ValidationError) as exc:
        raise FleetError(f"key file {path} unreadable or invalid: {str(exc)[:200]}") from exc
    if f.encrypted is not None:
        if not passphrase:
            raise FleetError(f"key {path} is passphrase-protected; set the passphrase "
                             "(--passphrase-env VAR)")
        e = f.encrypted
        box = nacl.secret.SecretBox(KDF.kdf(32, passphrase.encode(), bytes.fromhex(e.salt),
                                            opslimit=e.opslimit, memlimit=e.memlimit))
        try:
            seed = box.decrypt(bytes.fromhex(e.box))
        except nacl.exceptions.CryptoError as exc:
            raise FleetError(f"wrong passphrase for key {path}") from exc
    elif f.seed is not None:
        seed = bytes.fromhex(f.seed)
    else:
        raise FleetError(f"key file {path} holds no key")
    key = SigningKey(f.name, f.role, nacl.signing.SigningKey(seed))
    if key.keyid != f.keyid:
        raise FleetError(f"key file {path}: key id does not match the key")
    return key


def sign_envelope(signed: Mapping[str, Any], keys: Iterable[SigningKey]) -> bytes:
    """A `{"signed", "signatures"}` envelope, signed by each key once."""
    message = canonical(dict(signed))
    sigs = {k.keyid: k.sign(message).model_dump() for k in keys}
    return json.dumps({"signed": signed, "signatures": list(sigs.values())}, indent=1,
                      sort_keys=True).encode()


@dataclass(frozen=True)
class KeyDir:
    path: Path

    @property
    def root_file(self) -> Path:
        return self.path / "root.json"

    @property
    def keys(self) -> Path:
        return self.path / "keys"

    def key_file(self, name: str) -> Path:
        return self.keys / f"{name}.key"

    def root(self) -> Root:
        return load_pinned_root(self.root_file.read_bytes())

    def load_keys(self, names: Iterable[str], passphrase: str | None) -> list[SigningKey]:
        return [load_key(self.key_file(n), passphrase) for n in names]

    def key_files(self) -> list[tuple[Path, KeyFile]]:
        """Every key file here, parsed (public parts only are used)."""
        out = []
        for path in sorted(self.keys.glob("*.key")):
            try:
                out.append((path, KeyFile.model_validate_json(path.read_bytes())))
            except (OSError, ValidationError) as exc:
                raise FleetError(f"key file {path} unreadable or invalid") from exc
        return out

    def keys_of(self, root: Root, role: RoleName, passphrase: str | None) -> list[SigningKey]:
        """Every key of `role` in `root` whose private file is in this directory."""
        wanted = set(root.roles[role].keyids)
        return [load_key(p, passphrase) for p, f in self.key_files() if f.keyid in wanted]

    def publish_root(self, raw: bytes, version: int) -> None:
        (self.path / "roots").mkdir(exist_ok=True)
        write_atomic(self.path / "roots" / f"{version}.root.json", raw)
        write_atomic(self.root_file, raw)


def _new_keys(kd: KeyDir, role: str, count: int, passphrase: str | None,
              start: int = 1) -> list[SigningKey]:
    keys = []
    for i in range(start, start + count):
        name = f"{role}-{i}"
        if kd.key_file(name).exists():
            raise FleetError(f"{kd.key_file(name)} exists; refusing to overwrite a key")
        k = SigningKey(name, role, nacl.signing.SigningKey.generate())
        save_key(kd.key_file(name), k, passphrase)
        keys.append(k)
    return keys


def init_keys(path: Path, *, fleet: str, counts: Mapping[RoleName, tuple[int, int]],
              expires_days: int = 365, passphrase: str | None = None) -> Root:
    """Create keys for each role and a self-signed root.json version 1.

    Args:
        counts: role -> (number of keys, threshold), for "root", "release", "command".

    Raises:
        FleetError: the directory already holds a root, or a threshold is impossible.
    """
    kd = KeyDir(path)
    if kd.root_file.exists():
        raise FleetError(f"{kd.root_file} exists; use `edge-fleet keys rotate` to change keys")
    kd.keys.mkdir(parents=True, exist_ok=True)
    kd.keys.chmod(0o700)
    made = {role: _new_keys(kd, role, counts[role][0], passphrase) for role in ROLES}
    signed = _root_signed(fleet, 1, expires_days,
                          {r: ([k.keyid for k in ks], counts[r][1]) for r, ks in made.items()},
                          [k for ks in made.values() for k in ks])
    raw = sign_envelope(signed, made["root"])
    root = load_pinned_root(raw)
    kd.publish_root(raw, 1)
    return root


def _root_signed(fleet: str, version: int, expires_days: int,
                 roles: Mapping[RoleName, tuple[list[str], int]],
                 keys: Iterable[SigningKey | tuple[str, PublicKey]]) -> dict[str, Any]:
    pub: dict[str, PublicKey] = {}
    for k in keys:
        keyid, p = (k.keyid, k.public) if isinstance(k, SigningKey) else k
        pub[keyid] = p
    try:
        root = Root(fleet=fleet, version=version,
                    expires=datetime.now(UTC).replace(microsecond=0)
                    + timedelta(days=expires_days), keys=pub,
                    roles={r: RoleKeys(keyids=ids, threshold=t)
                           for r, (ids, t) in roles.items()})
    except ValidationError as exc:
        raise FleetError(f"invalid root: {exc.errors()[0]['msg']}") from exc
    return root.model_dump(mode="json", by_alias=True)


def rotate_keys(path: Path, *, revoke: Iterable[str] = (),
                add: Mapping[RoleName, int] | None = None,
                thresholds: Mapping[RoleName, int] | None = None, expires_days: int = 365,
                passphrase: str | None = None) -> Root:
    """Write root.json version N+1: revoke keys (by name or key id), add new keys, change
    thresholds. Signed by every old and new root key available here; the result must pass
    the same check devices apply (`agent.trust.root.update_root`).

    Raises:
        FleetError: not enough root keys at hand, or an impossible threshold.
    """
    kd = KeyDir(path)
    old = kd.root()
    files = [f for _, f in kd.key_files()]
    names = {f.name: f.keyid for f in files}
    gone = {names.get(r, r) for r in revoke}
    roles: dict[RoleName, tuple[list[str], int]] = {}
    for role in ROLES:
        ids = [k for k in old.roles[role].keyids if k not in gone]
        fresh = _new_keys(kd, role, (add or {}).get(role, 0), passphrase,
                          start=_next_index(kd, role))
        ids += [k.keyid for k in fresh]
        roles[role] = (ids, (thresholds or {}).get(role, old.roles[role].threshold))
    keyids = {k for ids, _ in roles.values() for k in ids}
    all_keys = {k: old.keys[k] for k in keyids if k in old.keys}
    for f in [f for _, f in kd.key_files()]:
        if f.keyid in keyids and f.keyid not in all_keys:
            all_keys[f.keyid] = PublicKey(public=f.public)
    signed = _root_signed(old.fleet, old.version + 1, expires_days, roles, all_keys.items())
    new_root = Root.model_validate(signed)
    signers = {k.keyid: k for k in kd.keys_of(old, "root", passphrase)
               + kd.keys_of(new_root, "root", passphrase)}
    raw = sign_envelope(signed, signers.values())
    try:
        update_root(old, raw)
    except RejectedError as exc:
        raise FleetError(f"the new root would not be accepted by devices: {exc}") from exc
    kd.publish_root(raw, new_root.version)
    return new_root


def _next_index(kd: KeyDir, role: str) -> int:
    taken = [int(p.stem.rsplit("-", 1)[1]) for p in kd.keys.glob(f"{role}-*.key")
             if p.stem.rsplit("-", 1)[1].isdigit()]
    return max(taken, default=0) + 1
