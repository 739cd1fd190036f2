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

Messages are handled on a thread of their own (a fetch must not hold the MQTT thread); only
the newest message per topic waits, so a flood cannot queue up.
"""

from __future__ import annotations

import json
import logging
import threading
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

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
FETCH_TIMEOUT_S = 10.0
#: At most this many roots are fetched to catch up in one go.
MAX_CHAIN = 64


class TrustFeed:
    def __init__(self, agent: AgentPort, report: Reporter, *, heartbeat_file: Path | None,
                 expiry_warning: timedelta, changed: Callable[[], None]) -> None:
        self.agent, self.report, self.changed = agent, report, changed
        self.heartbeat_file, self.expiry_warning = heartbeat_file, expiry_warning
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

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            with self._cv:
                self._cv.wait_for(lambda: bool(self._latest) or stop.is_set(), timeout=0.5)
                work, self._latest = self._latest, {}
            for kind, payload in work.items():
                self.handle(kind, payload)

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
            chain = [self._fetch(ann.chain, v) for v in range(trusted.version + 1,
                                                               ann.version)]
            new = update_root_chain(trusted, [*chain, final], datetime.now(UTC))
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
        """`roots/{version}.root.json` from the first base URL that has it."""
        errors = []
        for base in bases:
            url = f"{base}{version}.root.json"  # http(s) only: RootAnnouncement's pattern
            try:
                with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S) as resp:
                    raw = bytes(resp.read(MAX_ROOT_BYTES + 1))
                if len(raw) > MAX_ROOT_BYTES:
                    raise ValueError(f"{url} is larger than {MAX_ROOT_BYTES} bytes")
                return raw
            except (OSError, ValueError) as exc:
                errors.append(f"{url}: {exc}")
        raise RejectedError(f"root v{version} could not be fetched: "
                            + ("; ".join(errors)[:400] or "no chain URL announced"),
                            check="fetch", version=version)

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
