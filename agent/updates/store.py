"""The model store on the device: installed bundles, `active`/`previous` slots, the journal.

    STATE/store/bundles/NAME/V-SHA8/   verified bundles, immutable once renamed here
    STATE/store/staging/               unpacking in progress; emptied at every start
    STATE/store/slots/NAME.json        {"active", "previous", "committed"}: replaced atomically
    STATE/store/journal.jsonl          one line per update transition, fsynced

Every durable step is ordered so a power cut leaves a state `recover` can finish: a bundle
directory appears only by rename after its files and directory were fsynced; slots change
only by `os.replace` of a fsynced file; each transition is journaled (`agent.updates.lifecycle`)
before the next step starts. At start `recover` empties staging, rolls back every update
the journal shows unfinished (restoring the previous slot if the new one was already
active), and removes bundle directories no slot names.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from agent.durable import fsync, fsync_dir, write_atomic
from agent.errors import BundleError, StoreError
from agent.trust.archive import unpack_bundle
from agent.trust.bundle import check_files, read_capped, verify_bundle_dir
from agent.trust.manifest import MANIFEST_FILE, MAX_MANIFEST_BYTES, SIGNATURES_FILE, Manifest
from agent.trust.root import Root
from agent.trust.signatures import MAX_SIGNATURES_BYTES
from agent.trust.verify import Device, verify_installed
from agent.updates.lifecycle import TERMINAL, State, advance


class Slots(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    active: str | None = None
    previous: str | None = None
    committed: int | None = None


class JournalEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    update: str
    model: str
    version: int
    dir: str
    state: State
    at: datetime
    reason: str = ""


@dataclass(frozen=True)
class Staged:
    """A verified bundle renamed into the store, not yet serving."""

    update: str
    manifest: Manifest
    path: Path


def _utcnow() -> datetime:
    return datetime.now(UTC)


class ModelStore:
    """Installed bundles and their slots under one state directory."""

    def __init__(self, state_dir: Path, *, clock: Callable[[], datetime] = _utcnow) -> None:
        self.base = state_dir / "store"
        self.clock = clock
        for sub in ("bundles", "staging", "slots"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        self.journal_path = self.base / "journal.jsonl"

    # -- slots ---------------------------------------------------------------------------
    def slots(self, name: str) -> Slots:
        path = self.base / "slots" / f"{name}.json"
        if not path.exists():
            return Slots()
        try:
            return Slots.model_validate_json(path.read_bytes())
        except ValidationError:
            # Written only by os.replace of a fsynced file, so this is outside damage.
            return Slots()

    def _write_slots(self, name: str, slots: Slots) -> None:
        write_atomic(self.base / "slots" / f"{name}.json", slots.model_dump_json().encode())

    def models(self) -> list[str]:
        return sorted(p.stem for p in (self.base / "slots").glob("*.json")
                      if self.slots(p.stem).active)

    def bundle_dir(self, name: str, slot: str | None) -> Path | None:
        return None if slot is None else self.base / "bundles" / name / slot

    def active_dir(self, name: str) -> Path | None:
        return self.bundle_dir(name, self.slots(name).active)

    def active_manifest_sha256(self, name: str) -> str | None:
        """The sha256 of the active bundle's manifest (what a deploy command pins)."""
        d = self.active_dir(name)
        if d is None:
            return None
        try:
            raw = read_capped(d / MANIFEST_FILE, MAX_MANIFEST_BYTES, check="manifest")
        except (OSError, BundleError):
            return None
        return hashlib.sha256(raw).hexdigest()

    def committed(self) -> dict[str, int]:
        out = {}
        for name in self.models():
            c = self.slots(name).committed
            if c is not None:
                out[name] = c
        return out

    # -- journal -------------------------------------------------------------------------
    def journal(self) -> list[JournalEntry]:
        """Every readable entry; a line torn by a power cut is skipped."""
        if not self.journal_path.exists():
            return []
        out = []
        for line in self.journal_path.read_bytes().splitlines():
            try:
                out.append(JournalEntry.model_validate_json(line))
            except ValidationError:
                continue
        return out

    def _last(self, update: str) -> JournalEntry | None:
        return next((e for e in reversed(self.journal()) if e.update == update), None)

    def record(self, staged: Staged, event: str, reason: str = "") -> State:
        """Journal a transition of `staged`'s update (checked against the table).

        Raises:
            StoreError: the journal cannot be read or written, or has no such transition.
        """
        try:
            last = self._last(staged.update)
            try:
                state = advance(last.state if last else None, event)
            except ValueError as exc:
                raise StoreError(f"the update journal cannot advance update "
                                 f"{staged.update[:8]} on {event!r}: {exc}") from exc
            self._append(JournalEntry(update=staged.update, model=staged.manifest.name,
                                      version=staged.manifest.version,
                                      dir=staged.path.name, state=state, at=self.clock(),
                                      reason=reason))
        except OSError as exc:
            raise StoreError(f"the update journal {self.journal_path} cannot be read or "
                             f"written: {exc.strerror or exc}") from exc
        return state

    def _append(self, entry: JournalEntry) -> None:
        with self.journal_path.open("a+b") as fh:
            line = entry.model_dump_json().encode() + b"\n"
            if fh.tell() > 0:  # a line torn by a power cut must not swallow this one
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":
                    line = b"\n" + line
            fh.write(line)
            fh.flush()
            fsync(fh.fileno())

    # -- install -------------------------------------------------------------------------
    def stage(self, source: Path, root: Root, *, device: Device, now: datetime) -> Staged:
        """Verify an archive or bundle directory into staging, then rename it into the store.

        Raises:
            RejectedError: the bundle fails verification (nothing is left behind).
        """
        if not (source.is_dir() or source.is_file()):  # a FIFO or device would block or lie
            raise BundleError(f"{source} is neither a bundle directory nor an archive file",
                              check="source")
        device = Device(profile=device.profile, agent_version=device.agent_version,
                        committed=self.committed())
        tmp = self.base / "staging" / uuid.uuid4().hex
        if source.is_dir():
            verified = verify_bundle_dir(source, root, device=device, now=now)
            try:
                shutil.copytree(source, tmp)
                check_files(tmp, verified.manifest)  # the copy is ours: check it, not source
                _fsync_tree(tmp)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        else:
            verified = unpack_bundle(source, tmp, root, device=device, now=now)
        m = verified.manifest
        final = self.base / "bundles" / m.name / f"{m.version}-{verified.manifest_sha256[:8]}"
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():  # left by an install interrupted after its rename
            shutil.rmtree(final)
        staged = Staged(uuid.uuid4().hex, m, final)
        try:
            self.record(staged, "verified")
        except StoreError:
            shutil.rmtree(tmp, ignore_errors=True)  # nothing verified is left behind
            raise
        os.replace(tmp, final)
        fsync_dir(final.parent)
        fsync_dir(tmp.parent)
        self.record(staged, "staged")
        return staged

    def activate(self, staged: Staged) -> Slots:
        """Make `staged` the active slot; the active one becomes previous."""
        old = self.slots(staged.manifest.name)
        new = Slots(active=staged.path.name, previous=old.active, committed=old.committed)
        self._write_slots(staged.manifest.name, new)
        self.record(staged, "activated")
        return new

    def commit(self, staged: Staged) -> None:
        """Commit the active update: its version becomes the floor for rollback checks.
        Journaled first: a power cut between the two leaves a committed update whose floor
        `recover` raises (the other order left a floor for a version that was then rolled
        back as unfinished, and the device refused to install it again)."""
        self.record(staged, "committed")
        self._raise_floor(staged.manifest.name, staged.manifest.version)
        self._collect(staged.manifest.name)

    def _raise_floor(self, name: str, version: int) -> bool:
        s = self.slots(name)
        if (s.committed or 0) >= version:
            return False
        self._write_slots(name, s.model_copy(update={"committed": version}))
        return True

    def fail(self, staged: Staged, reason: str) -> None:
        """An update that failed before activation: journal it, drop its files."""
        self.record(staged, "failed", reason)
        shutil.rmtree(staged.path, ignore_errors=True)

    def roll_back(self, name: str, reason: str) -> Slots:
        """Serve the previous slot again (after a failed health check or on command).

        Raises:
            BundleError: check "no_previous" when there is no previous slot.
        """
        s = self.slots(name)
        if s.previous is None:
            raise BundleError(f"{name} has no previous version to roll back to",
                              check="no_previous")
        self._write_slots(name, Slots(active=s.previous, previous=None, committed=s.committed))
        self._journal_rolled_back(name, s.active, reason)
        self._collect(name)
        return self.slots(name)

    def _journal_rolled_back(self, name: str, undone: str | None, reason: str) -> None:
        """Journal that the update which installed slot `undone` was rolled back, through
        the lifecycle table (only ACTIVE and COMMITTED updates can be). A slot whose
        history the journal lost (a torn line) gets an entry of its own, as committed."""
        last = next((e for e in reversed(self.journal())
                     if e.model == name and e.dir == undone), None)
        if last is None:
            last = JournalEntry(update=uuid.uuid4().hex, model=name,
                                version=int((undone or "0").split("-")[0]), dir=undone or "",
                                state=State.COMMITTED, at=self.clock())
        self._append(last.model_copy(update={"state": advance(last.state, "rolled_back"),
                                             "at": self.clock(), "reason": reason}))

    def _collect(self, name: str) -> None:
        """Remove bundle directories of `name` that no slot refers to."""
        s = self.slots(name)
        keep = {s.active, s.previous}
        for d in (self.base / "bundles" / name).glob("*"):
            if d.name not in keep:
                shutil.rmtree(d, ignore_errors=True)

    def upload_path(self) -> Path:
        """A fresh file name in staging for an archive the API receives (removed after its
        install, or by `recover` at the next start)."""
        return self.base / "staging" / f"upload-{uuid.uuid4().hex}.bundle"

    # -- start ---------------------------------------------------------------------------
    def recover(self) -> list[str]:
        """Finish what a crash interrupted; returns one line per action taken."""
        notes = []
        for tmp in (self.base / "staging").iterdir():
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp, ignore_errors=True)
            else:  # an upload the API was receiving
                tmp.unlink(missing_ok=True)
            notes.append(f"removed unfinished staging {tmp.name}")
        last: dict[str, JournalEntry] = {}
        for e in self.journal():
            last[e.update] = e
        for e in last.values():
            if e.state in TERMINAL:
                continue
            s = self.slots(e.model)
            if s.active == e.dir:  # already switched: put the previous one back
                self._write_slots(e.model, Slots(active=s.previous, previous=None,
                                                 committed=s.committed))
            self._append(e.model_copy(update={
                "state": advance(e.state, "interrupted"), "at": self.clock(),
                "reason": f"interrupted at {e.state.value}; restarted before commit"}))
            notes.append(f"{e.model} v{e.version}: interrupted at {e.state.value}, "
                         "rolled back")
        for e in last.values():  # a commit journaled, its floor not yet written
            if e.state == State.COMMITTED and self._raise_floor(e.model, e.version):
                notes.append(f"{e.model}: committed floor raised to v{e.version}")
        for name in {p.name for p in (self.base / "bundles").iterdir()}:
            self._collect(name)
        return notes

    def check_installed(self, name: str, slot: str, root: Root) -> Manifest:
        """Re-verify an installed bundle's signatures and every file's hash.

        Raises:
            RejectedError: damaged or no longer validly signed.
        """
        d = self.base / "bundles" / name / slot
        sig = d / SIGNATURES_FILE
        m = verify_installed(root, read_capped(d / MANIFEST_FILE, MAX_MANIFEST_BYTES,
                                               check="manifest"),
                             read_capped(sig, MAX_SIGNATURES_BYTES, check="signatures")
                             if sig.exists() else None)
        check_files(d, m)
        return m

    def fall_back(self, name: str, reason: str) -> Slots:
        """The active slot is unusable at start: use previous (or nothing) and say why."""
        s = self.slots(name)
        self._write_slots(name, Slots(active=s.previous, previous=None, committed=s.committed))
        self._journal_rolled_back(name, s.active, reason)
        self._collect(name)
        return self.slots(name)

    def __repr__(self) -> str:
        return f"ModelStore({self.base})"


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*"), reverse=True):
        if p.is_file():
            with p.open("rb") as fh:
                fsync(fh.fileno())
        else:
            fsync_dir(p)
    fsync_dir(path)
