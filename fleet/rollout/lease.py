"""Which controller drives a rollout: a lease in the record, timed by the database's
clock, with a fencing token.

A controller takes the lease of a rollout (`acquire`) before its first step and renews it
at every step; it runs out `lease_s` after the last renewal, by the database's clock (a
controller's own clock, and its process id, mean nothing on another host). Each time the
lease changes hands its token goes up by one. Every write a controller makes to the
rollout's record checks, in the same transaction and under the row's lock, that the
lease is still its own, with its token, and has not run out (`check`): a controller paused
or cut off past its lease, then resumed, finds `LeaseLost` at its first write and has
changed nothing. A standby that finds the lease held waits (`LeaseHeld`) and takes it once
it has run out, so a dead controller's rollout is carried on within one lease period.
"""

from __future__ import annotations

from fleet.errors import FleetError, LeaseHeld, LeaseLost
from fleet.store.engine import Store

#: How long a lease lasts after its last renewal (a controller renews it every step).
LEASE_S = 15.0


def session_s(lease_s: float) -> int:
    """A controller's MQTT session expiry and keepalive: one lease (at least 5 s), so a
    dead controller leaves the controllers' shared group about as soon as its lease."""
    return max(5, int(lease_s))


class Leases:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.held: dict[str, tuple[str, int]] = {}  # rollout -> (owner, token) taken here

    def acquire(self, rid: str, owner: str, lease_s: float = LEASE_S) -> int:
        """Take the lease of rollout `rid` for `owner`, or renew it; returns its token.

        Raises:
            LeaseHeld: another controller holds it and it has not run out.
            LeaseLost: this controller held it, and another took it meanwhile (whether
                or not that one still holds it: this one's view of the rollout is stale).
        """
        st = self.store
        with st.tx():
            row = st.one(f"SELECT owner, lease_until, lease_token, {st.now} FROM rollouts "
                         f"WHERE id = ?{st.for_update}", (rid,))
            if row is None:
                raise FleetError(f"no rollout {rid}")
            holder, until, token, now = row[0], row[1], int(row[2] or 0), float(row[3])
            if holder not in (None, owner) and until is not None and until > now:
                if self.held.pop(rid, None) is not None:  # it was ours: taken meanwhile
                    raise LeaseLost(f"rollout {rid}: this controller's lease was taken by "
                                    f"{holder}")
                raise LeaseHeld(f"rollout {rid} is driven by controller {holder} (its lease "
                                f"runs {until - now:.1f} s more)", remaining_s=until - now)
            mine = self.held.get(rid)
            if mine is not None and mine != (holder, token):  # another drove it meanwhile
                self.held.pop(rid)
                raise LeaseLost(f"rollout {rid}: this controller's lease was taken by "
                                f"{holder or 'another controller'} meanwhile")
            if holder != owner:
                token += 1  # a new holder: every write of the last one is fenced off
            self._hold(rid, owner, lease_s, token)
        self.held[rid] = (owner, token)
        return token

    def claim(self, owner: str, lease_s: float = LEASE_S, *, limit: int = 1,
              ended_within_s: float = 60.0) -> list[str]:
        """Take the leases of up to `limit` rollouts that need a controller and have none
        (never taken, given up, or run out by the database's clock): running ones, and
        halted or aborted ones that ended within `ended_within_s` (their rollbacks are
        still being sent and answered), oldest first. Rows another controller is claiming
        at this moment are passed over (`SELECT … FOR UPDATE SKIP LOCKED` on PostgreSQL;
        SQLite's one writer at a time orders the claims), so controllers on several hosts
        spread the rollouts among them and never take the same one. Returns their ids."""
        st = self.store
        with st.tx():
            rows = st.all(
                f"SELECT id, owner, lease_token FROM rollouts WHERE (status = 'running' OR "
                f"(status IN ('halted', 'aborted') AND ended > {st.now} - ?)) AND "
                f"(lease_until IS NULL OR lease_until <= {st.now}) ORDER BY created, id "
                f"LIMIT ?{st.skip_locked}", (ended_within_s, limit))
            # a lease this controller let run out (a slow step) and nobody took meanwhile
            # comes back with its token: it did not change hands
            taken = [(rid, int(token or 0) + (holder != owner)) for rid, holder, token in rows]
            for rid, token in taken:
                self._hold(rid, owner, lease_s, token)
        for rid, token in taken:
            self.held[rid] = (owner, token)
        return [rid for rid, _ in taken]

    def next_expiry_s(self, ended_within_s: float = 60.0) -> float | None:
        """Seconds until the first lease of a rollout `claim` would take runs out, by the
        database's clock (None: no such lease), so a standby claims a dead controller's
        rollout when its lease ends, not at its next poll."""
        st = self.store
        row = st.one(f"SELECT MIN(lease_until) - {st.now} FROM rollouts WHERE (status = "
                     f"'running' OR (status IN ('halted', 'aborted') AND ended > {st.now} - ?))"
                     f" AND lease_until > {st.now}", (ended_within_s,))
        return None if row is None or row[0] is None else max(0.0, float(row[0]))

    def _hold(self, rid: str, owner: str, lease_s: float, token: int) -> None:
        """Inside the caller's transaction: `owner` holds rollout `rid`'s lease with
        `token` until `lease_s` from now, by the database's clock."""
        st = self.store
        st.execute(f"UPDATE rollouts SET owner = ?, owner_beat = {st.now}, "
                   f"lease_until = {st.now} + ?, lease_token = ? WHERE id = ?",
                   (owner, lease_s, token, rid))

    def check(self, rid: str) -> None:
        """Inside a write transaction on rollout `rid`: raise `LeaseLost` unless this
        controller's lease is still its own and running (a no-op for a writer that took no
        lease: an operator's command)."""
        mine = self.held.get(rid)
        if mine is None:
            return
        st = self.store
        row = st.one(f"SELECT owner, lease_token, lease_until, {st.now} FROM rollouts "
                     f"WHERE id = ?{st.for_update}", (rid,))
        if row is None or (row[0], row[1]) != mine or row[2] is None or row[2] <= row[3]:
            taken = row is not None and (row[0], row[1]) != mine
            raise LeaseLost(f"rollout {rid}: this controller's lease "
                            + (f"was taken by {row[0]}" if taken else "ran out"))

    def release(self, rid: str, owner: str) -> None:
        """Give the lease up (a standby may take it at once)."""
        mine = self.held.pop(rid, None)
        if mine is not None:
            self.store.execute("UPDATE rollouts SET owner = NULL, lease_until = NULL "
                               "WHERE id = ? AND owner = ? AND lease_token = ?",
                               (rid, owner, mine[1]))

    def holder(self, rid: str) -> str | None:
        """The controller whose lease of `rid` is running now (by the database's clock)."""
        st = self.store
        row = st.one(f"SELECT owner FROM rollouts WHERE id = ? AND lease_until > {st.now}",
                     (rid,))
        return None if row is None else row[0]
