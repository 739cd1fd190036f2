"""What the fleet says about trust itself: new roots and the heartbeat.

* `edge/v1/{fleet}/root` (retained, `RootAnnouncement`): when it announces a version above
  the trusted one, the roots in between are fetched from the announcement's `chain` URLs
  (`{url}{N}.root.json`, each capped at `MAX_ROOT_BYTES`), and the chain is walked with
  `agent.trust.root.update_root` (a threshold of the old root keys and of the new ones,
  version exactly N+1). The final root must be unexpired. The accepted root is persisted
  atomically in the state directory and used from then on for bundles and commands
  (`AgentPort.adopt_root`); an installed bundle the new root no longer accepts (signed only
  by revoked keys) falls back to the previous slot, with a `trust.revoked` event. An older
  or equal version is ignored; a chain that does not verify is a `trust.root_refused`
  event, and the trusted root stays.
* `edge/v1/{fleet}/heartbeat` (retained, signed by the command role,
  `agent.trust.heartbeat`): the newest valid one is kept (persisted, so a restart cannot
  reset the counter). Once it expired, the device is `stale` (a `trust.stale` event, and
  `trust.stale` in its state); a fresh heartbeat clears it (`trust.fresh`).
* every telemetry interval, `tick`: a `trust.root_expiring` event when the root expires
  within `root_expiry_warning_s` (once a day), and the heartbeat's expiry.

Roots and heartbeats are handled on a thread each (a fetch must not hold the MQTT thread,
and a slow chain server must not hold the heartbeat); only the newest message per topic
waits, so a flood cannot queue up. Each root fetch has a total deadline
(`FETCH_DEADLINE_S`), not only a per-read timeout (a server sending a byte every few
seconds never trips one), and a newer announcement abandons a walk in progress. Chain URLs
come from the announcement, which is not signed (each root is), unless the device pins its
own (`mqtt.root_urls`).
"""

from __future__ import annotations

import http.client
import json
import logging
import ssl
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

from pydantic import ValidationError

from agent.durable import write_atomic
from agent.errors import RejectedError
from agent.link.port import AgentPort
from agent.link.reporting import Reporter
from agent.link.wire import RootAnnouncement, TrustState
from agent.trust.heartbeat import verify_heartbeat
from agent.trust.root import MAX_ROOT_BYTES, Root, parse_root, update_root_chain
from agent.trust.signatures import canonical, strict_json

log = logging.getLogger("edge_agent.trust")
MAX_ANNOUNCEMENT_BYTES = MAX_ROOT_BYTES + 16 * 1024
#: A root server silent this long is given up (a newer announcement waits at most this).
FETCH_TIMEOUT_S = 5.0
#: The most one root's fetch may take in all, however slowly its server sends.
FETCH_DEADLINE_S = 15.0
KINDS = ("root", "heartbeat")


class _Superseded(Exception):
    """A newer root announcement arrived while a walk was fetching."""
#: At most this many roots are fetched to catch up in one go.
MAX_CHAIN = 64


class TrustFeed:
    def __init__(self, agent: AgentPort, report: Reporter, *, heartbeat_file: Path | None,
                 expiry_warning: timedelta, changed: Callable[[], None],
                 root_urls: list[str] | None = None) -> None:
        self.agent, self.report, self.changed = agent, report, changed
        self.heartbeat_file, self.expiry_warning = heartbeat_file, expiry_warning
        self.root_urls = list(root_urls or [])
        self._latest: dict[str, bytes] = {}
        self._cv = threading.Condition()
        self._hb_counter, self._hb_expires = self._load_heartbeat()
        self.stale = False
        self._warned: tuple[int, datetime] | None = None
        self._tick_lock = threading.Lock()  # from the telemetry and the trust threads

    # -- state ----------------------------------------------------------------------------
    @property
    def state(self) -> TrustState:
        root = self.agent.root
        return TrustState(root_version=root.version, root_expires=root.expires,
                          heartbeat_counter=self._hb_counter or None,
                          heartbeat_expires=self._hb_expires, stale=self.stale)

    def _load_heartbeat(self) -> tuple[int, datetime | None]:
        if self.heartbeat_file is None or not self.heartbeat_file.exists():
            return 0, None
        try:
            data = json.loads(self.heartbeat_file.read_bytes())
            return int(data["counter"]), datetime.fromisoformat(data["expires"])
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("trust.heartbeat_file_unreadable %s", self.heartbeat_file)
            return 0, None

    # -- incoming (MQTT thread) -----------------------------------------------------------
    def received(self, kind: str, payload: bytes) -> None:
        """Keep the newest message of `kind` ("root" or "heartbeat") for the worker."""
        with self._cv:
            self._latest[kind] = payload
            self._cv.notify()

    def run(self, stop: threading.Event, kind: str) -> None:
        """The worker of one kind ("root" or "heartbeat"), until `stop`."""
        while not stop.is_set():
            with self._cv:
                self._cv.wait_for(lambda: kind in self._latest or stop.is_set(), timeout=0.5)
                payload = self._latest.pop(kind, None)
            if payload is not None:
                self.handle(kind, payload)

    def _newer_root_waits(self) -> bool:
        with self._cv:
            return "root" in self._latest

    def handle(self, kind: str, payload: bytes) -> None:
        """One message ("root" or "heartbeat"); never raises."""
        try:
            if kind == "root":
                self.root_announced(payload)
            else:
                self.heartbeat(payload, datetime.now(UTC))
        except Exception:  # one message must never stop the feed
            log.exception("trust.%s_failed", kind)

    # -- roots ----------------------------------------------------------------------------
    def root_announced(self, payload: bytes) -> Root | None:
        """Walk to the announced root; the new trusted root, or None when nothing changed."""
        trusted = self.agent.root
        try:
            ann = RootAnnouncement.model_validate(strict_json(
                payload, what="root announcement", max_bytes=MAX_ANNOUNCEMENT_BYTES,
                error=RejectedError, check="format"))
        except (RejectedError, ValidationError) as exc:
            self._refused(f"root announcement unreadable: {str(exc)[:300]}", "format")
            return None
        if ann.version <= trusted.version:
            if ann.version < trusted.version:
                log.info("trust.root_old announced v%d, trusted v%d", ann.version,
                         trusted.version)
            return None
        if ann.version - trusted.version > MAX_CHAIN:
            self._refused(f"root v{ann.version} is more than {MAX_CHAIN} versions ahead of "
                          f"v{trusted.version}", "version")
            return None
        try:
            final = canonical(ann.root)
            announced, _, _ = parse_root(final)
            if announced.version != ann.version:
                raise RejectedError(f"the announcement says v{ann.version} but holds "
                                    f"v{announced.version}", check="version")
            bases = self.root_urls or ann.chain
            chain = [self._fetch(bases, v) for v in range(trusted.version + 1, ann.version)]
            new = update_root_chain(trusted, [*chain, final], datetime.now(UTC))
        except _Superseded:
            log.info("trust.root_superseded v%d: a newer announcement arrived", ann.version)
            return None
        except (RejectedError, OSError, ValueError) as exc:
            check = getattr(exc, "check", "fetch")
            self._refused(f"root v{ann.version} not accepted (trusted v{trusted.version}): "
                          f"{str(exc)[:300]}", check)
            return None
        notes = self.agent.adopt_root(final, new)
        self.report.event("trust.root_updated", "info",
                          f"root v{trusted.version} -> v{new.version}, expires "
                          f"{new.expires:%Y-%m-%d}", evidence={
                              "from": trusted.version, "to": new.version,
                              "expires": new.expires.isoformat()})
        for note in notes:
            self.report.event("trust.revoked", "warning", note)
        self.changed()
        return new

    def _fetch(self, bases: list[str], version: int) -> bytes:
        """`{base}{version}.root.json` from the first base URL that has it, all of them
        within `FETCH_DEADLINE_S`.

        Raises:
            RejectedError: check "fetch", no base served it in time.
            _Superseded: a newer announcement arrived meanwhile.
        """
        errors = []
        deadline = time.monotonic() + FETCH_DEADLINE_S
        for base in bases:
            url = f"{base}{version}.root.json"  # http(s) only: RootAnnouncement's pattern
            try:
                return self._get(url, deadline)
            except TimeoutError as exc:
                late = time.monotonic() >= deadline
                errors.append(f"{url}: " + (f"not fetched within {FETCH_DEADLINE_S:g} s"
                                            if late else str(exc)))
            except (OSError, ValueError) as exc:
                errors.append(f"{url}: {exc}")
        raise RejectedError(f"root v{version} could not be fetched: "
                            + ("; ".join(errors)[:400] or "no chain URL announced"),
                            check="fetch", version=version)

    def _get(self, url: str, deadline: float, redirects: int = 3) -> bytes:
        """The body at `url`, read in pieces, each read's timeout what is left before
        `deadline`; at most `MAX_ROOT_BYTES`; up to `redirects` http(s) redirects
        followed (a static host may answer 301/302), all within the same deadline."""
        def left() -> float:
            if self._newer_root_waits():
                raise _Superseded
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"not fetched within {FETCH_DEADLINE_S:g} s")
            return min(remaining, FETCH_TIMEOUT_S)

        u = urlsplit(url)
        conn = (http.client.HTTPSConnection(u.netloc, timeout=left(),
                                            context=ssl.create_default_context())
                if u.scheme == "https" else http.client.HTTPConnection(u.netloc, timeout=left()))
        try:
            conn.request("GET", u.path or "/")
            sock = conn.sock  # the response reads from it (the connection may let go)
            assert sock is not None  # request() connected
            resp = conn.getresponse()
            target = resp.getheader("Location", "")
            if resp.status in (301, 302, 303, 307, 308) and redirects > 0:
                target = urljoin(url, target)
                if urlsplit(target).scheme not in ("http", "https"):
                    raise ValueError(f"redirected to {target[:200]!r}")
                return self._get(target, deadline, redirects - 1)
            if resp.status != 200:
                raise ValueError(f"HTTP {resp.status} {resp.reason}")
            body = bytearray()
            while True:
                sock.settimeout(left())
                chunk = resp.read1(16 * 1024)
                if not chunk:
                    return bytes(body)
                body += chunk
                if len(body) > MAX_ROOT_BYTES:
                    raise ValueError(f"{url} is larger than {MAX_ROOT_BYTES} bytes")
        finally:
            conn.close()

    def _refused(self, message: str, check: str) -> None:
        log.warning("trust.root_refused %s", message)
        self.report.event("trust.root_refused", "warning", message,
                          evidence={"check": check})

    # -- heartbeat ------------------------------------------------------------------------
    def heartbeat(self, payload: bytes, now: datetime) -> bool:
        """Take a heartbeat; True when it was valid and newer."""
        d = self.agent.config.device
        try:
            hb = verify_heartbeat(self.agent.root, payload, fleet=d.fleet,
                                  last_counter=self._hb_counter, now=now)
        except RejectedError as exc:
            if exc.check != "replay":  # the retained one again after a reconnect
                log.warning("trust.heartbeat_refused %s", exc)
            return False
        self._hb_counter, self._hb_expires = hb.counter, hb.expires
        if self.heartbeat_file is not None:
            write_atomic(self.heartbeat_file, json.dumps({
                "counter": hb.counter, "expires": hb.expires.isoformat()}).encode())
        self.tick(now)
        return True

    # -- every interval -------------------------------------------------------------------
    def tick(self, now: datetime) -> None:
        with self._tick_lock:
            self._tick(now)

    def _tick(self, now: datetime) -> None:
        root = self.agent.root
        left = root.expires - now
        if left <= self.expiry_warning and (
                self._warned is None or self._warned[0] != root.version
                or now - self._warned[1] >= timedelta(days=1)):
            self._warned = (root.version, now)
            expired = left <= timedelta(0)
            self.report.event(
                "trust.root_expiring", "error" if expired else "warning",
                f"root v{root.version} {'expired' if expired else 'expires'} at "
                f"{root.expires:%Y-%m-%d %H:%M} UTC; "
                + ("every command is refused until a renewed root arrives" if expired
                   else "renew it: edge-fleet keys renew, then edge-fleet root publish"),
                evidence={"root_version": root.version, "expires": root.expires.isoformat()})
        stale = self._hb_expires is not None and now >= self._hb_expires
        if stale != self.stale:
            self.stale = stale
            if stale:
                self.report.event("trust.stale", "warning",
                                  f"the fleet's heartbeat {self._hb_counter} expired at "
                                  f"{self._hb_expires:%Y-%m-%d %H:%M:%S} UTC: its messages "
                                  "are being withheld; serving goes on",
                                  evidence={"counter": self._hb_counter})
            else:
                self.report.event("trust.fresh", "info",
                                  f"heartbeat {self._hb_counter} received; fresh again")
            self.changed()


def announcement(root_raw: bytes, chain: list[str]) -> bytes:
    """The retained `root` message for a root.json (what `edge-fleet root publish` sends)."""
    root, _, _ = parse_root(root_raw)
    msg: dict[str, Any] = {"schema": 1, "version": root.version,
                           "root": json.loads(root_raw), "chain": chain}
    return canonical(RootAnnouncement.model_validate(msg).model_dump(mode="json",
                                                                     by_alias=True))
