"""A power-cut harness: the agent's state directory on ext4 in an image file on a loop
device; a cut is a copy of that image file taken without syncing anything.

Why that is a power cut: the loop device hands the filesystem's writes to the image file,
so the file holds exactly what the "disk" has received, and nothing still in the
filesystem's own page cache. The writer is stopped (SIGSTOP) for the copy, then killed.
The copy is repaired as a boot would (`e2fsck -p`: the journal is replayed), mounted, and
checked by starting the agent on it.

The filesystem is mounted with `noauto_da_alloc` (ext4 otherwise flushes a file replaced by
rename on its own, hiding a missing fsync) and `commit=600` (no periodic journal commit in
the few seconds a cut takes: what reaches the disk is what an fsync sent there). With the
agent's fsyncs switched off (`tests/powercut_child.py --no-sync`) the cuts must find
broken states; `test_powercut.py` and `bench/bench_powercut.py` show both.

Needs root, `losetup`, `mkfs.ext4` and `e2fsck` (e2fsprogs, util-linux).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fixture_agent import AgentProcess, infer_body, write_config

from agent.updates.lifecycle import State
from agent.updates.store import ModelStore

CHILD = [sys.executable, str(Path(__file__).with_name("powercut_child.py"))]
MOUNT_OPTIONS = "noauto_da_alloc,commit=600"
IMAGE_BYTES = 64 << 20


def available() -> str | None:
    """Why the harness cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (loop devices and mount)"
    for tool in ("losetup", "mkfs.ext4", "e2fsck", "mount", "umount"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=120)


def make_image(path: Path) -> None:
    with path.open("wb") as fh:
        fh.truncate(IMAGE_BYTES)
    done = _run("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0",
                str(path))
    if done.returncode:
        raise RuntimeError(f"mkfs.ext4: {done.stderr}")


@contextlib.contextmanager
def mounted(image: Path, where: Path) -> Iterator[Path]:
    """`image` on a loop device, mounted at `where` for the block."""
    where.mkdir(exist_ok=True)
    dev = _run("losetup", "--find", "--show", str(image))
    if dev.returncode:
        raise RuntimeError(f"losetup: {dev.stderr}")
    loop = dev.stdout.strip()
    try:
        done = _run("mount", "-t", "ext4", "-o", MOUNT_OPTIONS, loop, str(where))
        if done.returncode:
            raise RuntimeError(f"mount {image}: {done.stderr}")
        try:
            yield where
        finally:
            for _ in range(50):  # a killed process may hold it for a moment
                if _run("umount", str(where)).returncode == 0:
                    break
                time.sleep(0.1)
            else:
                raise RuntimeError(f"{where} stays busy: {_run('umount', str(where)).stderr}")
    finally:
        _run("losetup", "-d", loop)


def cut(image: Path, out: Path) -> None:
    """The power cut: what the image file holds now, read without syncing anything."""
    done = _run("cp", "--sparse=always", str(image), str(out))
    if done.returncode:
        raise RuntimeError(f"cp: {done.stderr}")


def repair(image: Path) -> str | None:
    """`e2fsck -p`, as a boot runs it; None when it left a clean filesystem (exit 0 or 1),
    else what it said."""
    done = _run("e2fsck", "-p", str(image))
    if done.returncode in (0, 1):
        return None
    return f"e2fsck exit {done.returncode}: {(done.stdout + done.stderr).strip()[-200:]}"


@dataclass
class Outcome:
    """One cut: when, whether the writer had acknowledged its work, what the restart found."""

    at_s: float
    acknowledged: bool
    result: str = ""  # install: "old" | "new"; writer: "ok"
    broken: list[str] = field(default_factory=list)


def summary(outcomes: list[Outcome]) -> dict[str, Any]:
    return {"cuts": len(outcomes),
            "broken": sum(1 for o in outcomes if o.broken),
            "results": dict(Counter(o.result for o in outcomes if not o.broken)),
            "acknowledged_before_cut": sum(o.acknowledged for o in outcomes),
            "problems": dict(Counter(p for o in outcomes for p in o.broken))}


class InstallCuts:
    """Cuts during `edge-agent install` of `v2` over `v1`, through the admin socket."""

    def __init__(self, where: Path, keys: Path, v1: Path, v2: Path, *,
                 no_sync: bool = False) -> None:
        self.where, self.keys, self.v1, self.v2 = where, keys, v1, v2
        where.mkdir(parents=True, exist_ok=True)
        self.command = [*CHILD, *(["--no-sync"] if no_sync else []), "agent"]
        self.base = where / "base.img"
        self.mnt = where / "mnt"
        self.config = write_config(where, keys, profile="x86_64-generic",
                                   paths={"state_dir": str(self.mnt / "state")})
        make_image(self.base)
        with mounted(self.base, self.mnt):  # v1 installed, then a clean unmount
            agent = self._agent().start()
            try:
                status, body = agent.install(v1)
                assert status == 200, body
            finally:  # nothing left running on an image about to be unmounted
                assert agent.stop() == 0
        self.window_s = self._measure()

    def _agent(self) -> AgentProcess:
        return AgentProcess(self.config, command=self.command)

    def _measure(self) -> float:
        """The install's own duration (median of 3), from which cut moments are drawn."""
        spans = []
        for _ in range(3):
            work = self.where / "work.img"
            shutil.copyfile(self.base, work)
            with mounted(work, self.mnt):
                agent = self._agent().start()
                try:
                    t = time.perf_counter()
                    assert agent.install(self.v2)[0] == 200
                    spans.append(time.perf_counter() - t)
                finally:
                    agent.stop()
        return sorted(spans)[1]

    def once(self, at_s: float) -> Outcome:
        work, copy = self.where / "work.img", self.where / "cut.img"
        shutil.copyfile(self.base, work)
        with mounted(work, self.mnt):
            agent = self._agent().start()
            answers: list[tuple[int, Any]] = []
            client = threading.Thread(target=_quietly, args=(agent, self.v2, answers))
            t0 = time.perf_counter()
            client.start()
            try:
                time.sleep(max(0.0, at_s - (time.perf_counter() - t0)))  # the cut's moment
                assert agent.proc is not None
                agent.proc.send_signal(signal.SIGSTOP)  # no write reaches the disk from here
                cut(work, copy)
            finally:
                agent.kill9()
            client.join(30)
        # A 200 read by the client was written before the stop: the install was promised.
        outcome = Outcome(at_s, acknowledged=bool(answers) and answers[0][0] == 200)
        self._check(copy, outcome)
        return outcome

    def _check(self, image: Path, outcome: Outcome) -> None:
        damage = repair(image)
        if damage:
            outcome.broken.append(damage)
            return
        with mounted(image, self.mnt):
            agent = self._agent()
            try:
                agent.start()
            except AssertionError:
                outcome.broken.append("agent did not start")
                return
            try:
                _check_served(agent, self.mnt / "state", outcome)
            finally:
                agent.stop()


def _quietly(agent: AgentProcess, archive: Path, answers: list[tuple[int, Any]]) -> None:
    with contextlib.suppress(OSError):  # cut mid-request: no answer
        answers.append(agent.install(archive))


def _check_served(agent: AgentProcess, state: Path, outcome: Outcome) -> None:
    """A verified model serves; staging is empty; journal and slots agree; a promised
    install survived."""
    models = agent.call("GET", "/v1/admin/status")[1].get("models", {})
    version = models.get("digits", {}).get("version")
    if version not in (1, 2):
        outcome.broken.append(f"serves version {version}")
        return
    outcome.result = "new" if version == 2 else "old"
    status, out = agent.call("POST", "/v2/models/digits/infer", infer_body("input"))
    if status != 200 or out.get("model_version") != str(version):
        outcome.broken.append(f"inference answered {status}")
    if outcome.acknowledged and version != 2:
        outcome.broken.append("an acknowledged install was lost")
    store = ModelStore(state)
    if any((store.base / "staging").iterdir()):
        outcome.broken.append("staging not empty")
    journal = store.journal()
    last = {e.update: e for e in journal}
    slots = store.slots("digits")
    if any(e.state not in (State.COMMITTED, State.FAILED, State.ROLLED_BACK)
           for e in last.values()):
        outcome.broken.append("an unfinished update in the journal after start")
    serving = {e.dir for e in last.values() if e.state == State.COMMITTED}
    floor = max((e.version for e in journal if e.state == State.COMMITTED), default=None)
    if slots.active not in serving:
        outcome.broken.append("the active slot is no committed update of the journal")
    if slots.committed != floor:
        outcome.broken.append(f"rollback floor v{slots.committed}, journal's v{floor}")


class WriterCuts:
    """Cuts while the agent's outbox and nonce store take writes (tests/powercut_child.py
    writer): every message and nonce acknowledged before the cut must be there after."""

    def __init__(self, where: Path, *, no_sync: bool = False) -> None:
        self.where = where
        where.mkdir(parents=True, exist_ok=True)
        self.command = [*CHILD, *(["--no-sync"] if no_sync else []), "writer"]
        self.base = where / "writer-base.img"
        self.mnt = where / "wmnt"
        make_image(self.base)

    def once(self, at_s: float) -> Outcome:
        work, copy = self.where / "writer-work.img", self.where / "writer-cut.img"
        shutil.copyfile(self.base, work)
        with mounted(work, self.mnt):
            state = self.mnt / "state"
            state.mkdir()
            proc = subprocess.Popen([*self.command, str(state)], stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL, text=True)
            try:
                assert proc.stdout is not None
                assert proc.stdout.readline().strip() == "ready"
                time.sleep(at_s)  # the cut's moment
                proc.send_signal(signal.SIGSTOP)
                cut(work, copy)
            finally:  # whatever failed, the writer goes before its image is unmounted
                proc.kill()
            lines = proc.stdout.read().split("\n")  # everything printed before the stop
            proc.wait(10)
        acked = {"o": 0, "n": 0, "r": 0}
        for line in lines:
            kind, _, n = line.partition(" ")
            if kind in acked and n.isdigit():
                acked[kind] = int(n)
        outcome = Outcome(at_s, acknowledged=acked["o"] > 0)
        damage = repair(copy)
        if damage:
            outcome.broken.append(damage)
            return outcome
        with mounted(copy, self.mnt):
            _check_written(self.mnt / "state", acked, outcome)
        return outcome


def _check_written(state: Path, acked: dict[str, int], outcome: Outcome) -> None:
    from agent.link.outbox import Outbox
    from agent.trust.nonces import NonceStore

    try:
        outbox = Outbox(state / "outbox.sqlite", cap=1_000_000)
        nonces = NonceStore(state / "nonces.sqlite")
    except Exception as exc:  # a database a cut ruined is the finding
        outcome.broken.append(f"a store does not open: {type(exc).__name__}")
        return
    try:
        if len(outbox) < acked["o"]:  # nothing was ever sent: all of them still wait
            outcome.broken.append("acknowledged telemetry lost")
        if any(f"nonce-{i:08d}" not in nonces for i in range(1, acked["n"] + 1)):
            outcome.broken.append("accepted nonces forgotten")
        if (after := outbox.reserve().seq) <= acked["r"]:  # the fleet would call it stale
            outcome.broken.append(f"the report order went back: {after} after {acked['r']}")
        outcome.result = "ok"
    finally:
        outbox.close()
        nonces.close()


def run_cuts(harness: InstallCuts | WriterCuts, n: int, span_s: float,
             seed: int = 1) -> list[Outcome]:
    """`n` cuts at moments drawn uniformly from [0, span_s)."""
    rng = random.Random(seed)
    return [harness.once(rng.uniform(0, span_s)) for _ in range(n)]
