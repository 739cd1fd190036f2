"""The update state machine: states and the transitions between them, as data in one table.

    (none) --verified--> VERIFIED --staged--> STAGED --loaded--> LOADED
           --self_tested--> SELF_TESTED --activated--> ACTIVE --committed--> COMMITTED
    any state before ACTIVE --failed--> FAILED       (the old model keeps serving)
    ACTIVE | COMMITTED --rolled_back--> ROLLED_BACK  (the previous slot serves again)
    any unfinished state --interrupted--> ROLLED_BACK (found in the journal at start)

`advance` is pure; the store journals each transition before acting on it, so a restart
can tell how far an update got (docs/architecture.md, Lifecycles).
"""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    VERIFIED = "verified"
    STAGED = "staged"
    LOADED = "loaded"
    SELF_TESTED = "self_tested"
    ACTIVE = "active"
    COMMITTED = "committed"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"


_BEFORE_ACTIVE = (State.VERIFIED, State.STAGED, State.LOADED, State.SELF_TESTED)

TRANSITIONS: dict[tuple[State | None, str], State] = {
    (None, "verified"): State.VERIFIED,
    (State.VERIFIED, "staged"): State.STAGED,
    (State.STAGED, "loaded"): State.LOADED,
    (State.LOADED, "self_tested"): State.SELF_TESTED,
    (State.SELF_TESTED, "activated"): State.ACTIVE,
    (State.ACTIVE, "committed"): State.COMMITTED,
    (State.ACTIVE, "rolled_back"): State.ROLLED_BACK,
    (State.COMMITTED, "rolled_back"): State.ROLLED_BACK,
    **{(s, "failed"): State.FAILED for s in _BEFORE_ACTIVE},
    **{(s, "interrupted"): State.ROLLED_BACK for s in (*_BEFORE_ACTIVE, State.ACTIVE)},
}

TERMINAL = frozenset({State.COMMITTED, State.FAILED, State.ROLLED_BACK})


def advance(state: State | None, event: str) -> State:
    """The state after `event`; ValueError for a transition the table does not have."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise ValueError(f"no transition from {state} on {event!r}") from None
