"""Reports in their device's order, not in order of arrival: pure.

Every report a device signs carries its place in that device's order
(`agent.link.wire.ReportOrder`: an epoch fixed when the device's sequence began and a
device-wide sequence number, persisted across restarts and power cuts). The fleet keeps,
per device and kind of report, a `Mark` of what it applied, and applies a report only
when `admit` says it is new:

    state       the newest wins: (epoch, connection, will, seq). A state names the
                connection it went out on (the seq of that connection's Last Will); the
                Will closes its connection, so it supersedes every state of it, and any
                state of a later connection supersedes the Will.
    telemetry   the newest wins: (epoch, seq).
    event,      each one once: an anti-replay window as IPsec keeps one (RFC 4303
    result      §3.4.3): the highest seq seen and a bitmap of the `WINDOW` before it. An
                event or result older than the window, or one already seen, is stale;
                one inside the window that was not seen yet (delivered late by another
                consumer of the controllers' shared group) is applied.

A later epoch starts afresh (a device whose state was wiped); an earlier one is stale (a
replay from before a reset). Stale reports are counted (`ignored_stale`) and dropped: a
late retained state, a duplicate, or a genuine message published again by someone else
never changes the record.

A report without an order (an agent older than this field) is refused
(`ignored_unordered`, in `edge-fleet status`'s ignored messages): its replays cannot be
told from the truth. Upgrade such a device's agent before the fleet tier.

Between kinds, the order is compared where one kind's news can contradict another's: an
execution records the order of the device report that last moved it, and the device's
retained state settles it only when the state is newer (`fleet.rollout`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

#: Events and results a device may deliver out of order and still be applied: the
#: device-wide seqs below the newest one seen that the window remembers.
WINDOW = 62  # bits: the bitmap fits a signed 64-bit integer in either database
KINDS = ("state", "telemetry", "event", "cmd/result")


@dataclass(frozen=True)
class Mark:
    """What the fleet applied last of one device's reports of one kind."""

    epoch: int
    seq: int
    connection: int = 0  # state: the connection of the newest state applied
    will: bool = False  # state: that state was the connection's Last Will
    window: int = 0  # event, result: bit i set = seq - 1 - i was applied


def admit(kind: str, mark: Mark | None, epoch: int, seq: int, *,
          connection: int | None = None, will: bool = False) -> Mark | None:
    """The mark after applying a report of `kind` at (`epoch`, `seq`), or None when the
    report is stale (not to be applied). `connection`, `will`: a state's."""
    if kind == "state":
        new = Mark(epoch, seq, connection or 0, will)
        return new if mark is None or _state_key(new) > _state_key(mark) else None
    if kind == "telemetry":
        new = Mark(epoch, seq)
        return new if mark is None or (epoch, seq) > (mark.epoch, mark.seq) else None
    if kind not in KINDS:
        raise ValueError(f"unknown kind of report {kind!r}")
    if mark is None or epoch != mark.epoch:
        return Mark(epoch, seq) if mark is None or epoch > mark.epoch else None
    return _in_window(mark, seq)


def _in_window(mark: Mark, seq: int) -> Mark | None:
    """An event or result of the mark's epoch: the anti-replay window's verdict."""
    if seq > mark.seq:
        shift = seq - mark.seq
        window = ((mark.window << shift) | (1 << (shift - 1))) if shift <= WINDOW else 0
        return replace(mark, seq=seq, window=window & ((1 << WINDOW) - 1))
    behind = mark.seq - seq
    if behind == 0 or behind > WINDOW or mark.window & (1 << (behind - 1)):
        return None
    return replace(mark, window=mark.window | (1 << (behind - 1)))


def _state_key(m: Mark) -> tuple[int, int, bool, int]:
    return (m.epoch, m.connection, m.will, m.seq)
