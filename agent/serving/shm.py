"""The system shared-memory extension of the Open Inference Protocol, as Triton defines it
(docs/protocol/extension_shared_memory.md in triton-inference-server/server): a process on
the same device registers a POSIX shared-memory object (`shm_open` key) as a named region;
inputs name a region, offset and byte size instead of carrying data, and outputs can be
written into a region. A 96x96x3 camera frame then crosses no socket.

The client is not trusted with the agent's memory, so nothing is mapped:

- keys name objects directly under /dev/shm (`/name`, the `shm_open` convention); opened
  with O_NOFOLLOW, and only regular files;
- every use checks the object's size again and reads with `preadv` straight into the
  tensor's buffer (one copy) and writes with `pwrite`: a client that shrinks its object
  afterwards gets a 400, where a mapping would have killed the daemon with SIGBUS;
- at most `max_regions` regions per owner (below) and `MAX_OWNERS` owners, of at most
  `max_region_bytes` each (so one client cannot take every region, and the descriptors
  held stay bounded); names and keys are bounded and checked before any file is touched;
- an object the agent can only read serves inputs; writing an output to it is refused;
- a region belongs to the credential of the connection that registered it (a Unix
  socket's peer user, or the TCP bearer token): each owner sees, uses and unregisters
  only its own regions, under names of its own (two owners may both call theirs "cam"),
  so one client can neither free another's regions nor slip its own object in under a
  name the other uses.

On a device the camera process and the agent share the object through file permissions:
create it with the agent's group and mode 0660 (the agent runs as `edge-agent`).
"""

from __future__ import annotations

import os
import re
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import ApiError

NAME = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
KEY = re.compile(r"^/?[A-Za-z0-9_.-]{1,200}$")
SHM_ROOT = Path("/dev/shm")


@dataclass
class Region:
    name: str
    key: str
    offset: int
    byte_size: int
    fd: int
    writable: bool
    lock: threading.Lock = field(default_factory=threading.Lock)
    closed: bool = False

    def status(self) -> dict[str, Any]:
        return {"name": self.name, "key": self.key, "offset": self.offset,
                "byte_size": self.byte_size}

    def _span(self, offset: int, size: int, what: str) -> int:
        """The absolute file offset of [offset, offset + size) of this region, checked
        against the region and against the object's size now."""
        if offset < 0 or size < 0 or offset + size > self.byte_size:
            raise ApiError(400, f"{what}: bytes {offset}..{offset + size} are outside region "
                           f"{self.name!r} ({self.byte_size} bytes)")
        start = self.offset + offset
        have = os.fstat(self.fd).st_size
        if start + size > have:
            raise ApiError(400, f"{what}: region {self.name!r} ends at byte {have} of its "
                           f"object now, not {start + size} (was it shrunk?)")
        return start

    def read_into(self, out: np.ndarray, offset: int, what: str) -> None:
        """Fill `out` (C-contiguous) from the region at `offset`."""
        with self.lock:
            if self.closed:
                raise ApiError(400, f"{what}: region {self.name!r} was unregistered")
            start = self._span(offset, out.nbytes, what)
            got = os.preadv(self.fd, [out.data.cast("B")], start)
        if got != out.nbytes:
            raise ApiError(400, f"{what}: read {got} of {out.nbytes} bytes from region "
                           f"{self.name!r}")

    def write(self, data: np.ndarray, offset: int, what: str) -> None:
        if not self.writable:
            raise ApiError(400, f"{what}: region {self.name!r} is read-only to the agent")
        raw = np.ascontiguousarray(data).data.cast("B")
        with self.lock:
            if self.closed:
                raise ApiError(400, f"{what}: region {self.name!r} was unregistered")
            start = self._span(offset, len(raw), what)
            done = os.pwrite(self.fd, raw, start)
        if done != len(raw):
            raise ApiError(400, f"{what}: wrote {done} of {len(raw)} bytes to region "
                           f"{self.name!r}")

    def close(self) -> None:
        with self.lock:
            if not self.closed:
                self.closed = True
                os.close(self.fd)


#: Credentials holding regions at once (each with up to `max_regions`).
MAX_OWNERS = 8


class SharedMemory:
    """The registered regions of one agent, each under its owner (a connection's
    credential: `agent.serving.http.Request.peer`)."""

    def __init__(self, *, max_regions: int, max_region_bytes: int,
                 root: Path = SHM_ROOT) -> None:
        self.max_regions, self.max_region_bytes, self.root = (max_regions, max_region_bytes,
                                                              root)
        self._regions: dict[tuple[str, str], Region] = {}
        self._lock = threading.Lock()

    def of(self, owner: str) -> Regions:
        """The regions `owner` registered, as inference sees them."""
        return Regions(self, owner)

    def register(self, owner: str, name: str, body: Any) -> None:
        """Register `name` for {"key", "offset", "byte_size"} (Triton's request body).

        Raises:
            ApiError: 400 for a bad name, key, offset or size, an object that does not
                exist, is not a regular file or is smaller than the region, a name taken,
                or too many regions.
        """
        if not NAME.match(name):
            raise ApiError(400, "region names are 1-128 letters, digits, '_', '.', '-'")
        if not isinstance(body, dict) or set(body) - {"key", "offset", "byte_size"}:
            raise ApiError(400, 'register takes {"key": str, "offset": int, "byte_size": '
                           "int}")
        key, offset, size = body.get("key"), body.get("offset", 0), body.get("byte_size")
        if not isinstance(key, str) or not KEY.match(key) or key.strip("/") in (".", ".."):
            raise ApiError(400, "key must name a shared-memory object: '/name', 1-200 "
                           "letters, digits, '_', '.', '-'")
        for what, v in (("offset", offset), ("byte_size", size)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ApiError(400, f"{what} must be a non-negative integer")
        assert isinstance(offset, int) and isinstance(size, int)
        if not 0 < size <= self.max_region_bytes:
            raise ApiError(400, f"byte_size must be 1..{self.max_region_bytes}")
        with self._lock:
            if (owner, name) in self._regions:
                raise ApiError(400, f"region {name!r} is already registered; unregister it "
                               "first")
            owners = {o for o, _ in self._regions}
            if sum(o == owner for o, _ in self._regions) >= self.max_regions:
                raise ApiError(400, f"{self.max_regions} regions are registered by this "
                               "client already")
            if owner not in owners and len(owners) >= MAX_OWNERS:
                raise ApiError(400, f"{MAX_OWNERS} clients hold regions already")
            region = self._open(name, key, offset, size)
            self._regions[(owner, name)] = region

    def _open(self, name: str, key: str, offset: int, size: int) -> Region:
        path = self.root / key.lstrip("/")
        flags = os.O_NOFOLLOW | os.O_CLOEXEC
        writable = True
        try:
            fd = os.open(path, os.O_RDWR | flags)
        except PermissionError:
            writable = False
            try:
                fd = os.open(path, os.O_RDONLY | flags)
            except OSError as exc:
                raise ApiError(400, f"shared-memory object {key!r} cannot be opened: "
                               f"{exc.strerror}") from exc
        except OSError as exc:
            raise ApiError(400, f"shared-memory object {key!r} cannot be opened: "
                           f"{exc.strerror}") from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ApiError(400, f"{key!r} is not a shared-memory object")
            if st.st_size < offset + size:
                raise ApiError(400, f"shared-memory object {key!r} holds {st.st_size} bytes, "
                               f"fewer than offset + byte_size = {offset + size}")
        except BaseException:
            os.close(fd)
            raise
        return Region(name, key, offset, size, fd, writable)

    def unregister(self, owner: str | None, name: str | None) -> None:
        """Unregister `owner`'s region `name` (404 if it has none of that name) or, with
        name None, all of `owner`'s regions (owner None: every region, at shutdown)."""
        with self._lock:
            if name is None:
                keys = [k for k in self._regions if owner is None or k[0] == owner]
                regions = [self._regions.pop(k) for k in keys]
            else:
                region = self._regions.pop((owner or "", name), None)
                if region is None:
                    raise ApiError(404, f"no region {name!r} is registered")
                regions = [region]
        for r in regions:
            r.close()

    def status(self, owner: str, name: str | None) -> list[dict[str, Any]]:
        with self._lock:
            if name is None:
                return [r.status() for (o, _), r in self._regions.items() if o == owner]
            region = self._regions.get((owner, name))
        if region is None:
            raise ApiError(404, f"no region {name!r} is registered")
        return [region.status()]

    def get(self, owner: str, name: Any, what: str) -> Region:
        with self._lock:
            region = self._regions.get((owner, name)) if isinstance(name, str) else None
        if region is None:
            raise ApiError(400, f"{what}: shared_memory_region {name!r} is not registered")
        return region

    def close(self) -> None:
        self.unregister(None, None)


@dataclass(frozen=True)
class Regions:
    """One owner's regions (what an inference request may name)."""

    shm: SharedMemory
    owner: str

    def get(self, name: Any, what: str) -> Region:
        return self.shm.get(self.owner, name, what)


@dataclass(frozen=True)
class ShmRef:
    """A tensor's place in a region, from its `shared_memory_*` parameters."""

    region: Region
    offset: int
    byte_size: int


def shm_ref(params: dict[str, Any], shm: Regions | None, what: str) -> ShmRef | None:
    """The shared-memory reference in a tensor's parameters, or None when it has none.

    Raises:
        ApiError: 400 when the parameters are incomplete or wrong, or shared memory is off.
    """
    if not any(k.startswith("shared_memory_") for k in params):
        return None
    if shm is None:
        raise ApiError(400, f"{what}: shared memory is not enabled on this agent")
    region, size = params.get("shared_memory_region"), params.get("shared_memory_byte_size")
    offset = params.get("shared_memory_offset", 0)
    if region is None or size is None:
        raise ApiError(400, f"{what}: shared_memory_region and shared_memory_byte_size go "
                       "together")
    for name, v in (("shared_memory_byte_size", size), ("shared_memory_offset", offset)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ApiError(400, f"{what}: {name} must be a non-negative integer")
    return ShmRef(shm.get(region, what), offset, size)
