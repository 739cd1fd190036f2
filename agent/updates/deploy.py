"""The deploy flow of one fleet deploy command, pure: its phases and transitions as one
table of data, in the manner of h11's state machine.

    start ──already_serving──▶ ALREADY        (the release is active and committed: done)
    start ──begin──▶ DOWNLOADING ──downloaded──▶ INSTALLING ──installed──▶ WATCHING
    WATCHING ──window_over──▶ COMMITTED
    WATCHING ──anomaly──▶ ROLLED_BACK         (the health window caught the new model)
    DOWNLOADING | INSTALLING ──failed──▶ FAILED (nothing installed; the old model serves)

A rollback command for the model while its deploy runs is a `cancel`. It cannot interrupt a
download or an install in flight, so it is recorded in the flow (`cancelled`) and takes
effect at the next transition out of that phase:

    DOWNLOADING ──downloaded, cancelled──▶ CANCELLED     (nothing was installed)
    INSTALLING ──installed, cancelled──▶ ROLLED_BACK     (installed, then undone)
    WATCHING ──cancel──▶ ROLLED_BACK                      (at once)
    START ──cancel──▶ CANCELLED                           (before it began: nothing done)

COMMITTED, ROLLED_BACK, FAILED, CANCELLED and ALREADY are final; a `cancel` that meets a
final flow changes nothing, and the caller rolls back the committed release as a plain
rollback. Any pair the table lacks raises `ValueError`: the I/O around this
(`agent.link.deploying`) cannot take a step the design does not have.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum


class Phase(StrEnum):
    START = "start"
    DOWNLOADING = "downloading"
    INSTALLING = "installing"
    WATCHING = "watching"
    COMMITTED = "committed"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"
    CANCELLED = "cancelled"
    ALREADY = "already"


class Step(StrEnum):
    BEGIN = "begin"
    ALREADY_SERVING = "already_serving"
    DOWNLOADED = "downloaded"
    INSTALLED = "installed"
    FAILED = "failed"
    ANOMALY = "anomaly"
    WINDOW_OVER = "window_over"
    CANCEL = "cancel"


P, S = Phase, Step
FINAL = frozenset({P.COMMITTED, P.ROLLED_BACK, P.FAILED, P.CANCELLED, P.ALREADY})
#: Phases whose work (a download, an install) cannot be interrupted: a cancel waits for it.
UNINTERRUPTIBLE = frozenset({P.DOWNLOADING, P.INSTALLING})

#: (phase, step, cancelled) -> next phase.
TRANSITIONS: dict[tuple[Phase, Step, bool], Phase] = {
    (P.START, S.BEGIN, False): P.DOWNLOADING,
    (P.START, S.ALREADY_SERVING, False): P.ALREADY,
    (P.START, S.CANCEL, False): P.CANCELLED,
    (P.DOWNLOADING, S.DOWNLOADED, False): P.INSTALLING,
    (P.DOWNLOADING, S.DOWNLOADED, True): P.CANCELLED,
    (P.INSTALLING, S.INSTALLED, False): P.WATCHING,
    (P.INSTALLING, S.INSTALLED, True): P.ROLLED_BACK,
    (P.WATCHING, S.WINDOW_OVER, False): P.COMMITTED,
    (P.WATCHING, S.ANOMALY, False): P.ROLLED_BACK,
    (P.WATCHING, S.CANCEL, False): P.ROLLED_BACK,
    **{(p, S.FAILED, c): P.FAILED for p in UNINTERRUPTIBLE for c in (False, True)},
    # too late: a no-op (a final phase never carries a cancel: `advance` clears it)
    **{(p, S.CANCEL, False): p for p in FINAL},
}


@dataclass(frozen=True)
class Flow:
    """Where one deploy stands. `cancelled`: a rollback command asked to stop it."""

    phase: Phase = Phase.START
    cancelled: bool = False

    @property
    def final(self) -> bool:
        return self.phase in FINAL


def advance(flow: Flow, step: Step) -> Flow:
    """The flow after `step`.

    Raises:
        ValueError: the table has no such transition (an I/O bug, not bad input).
    """
    if step is Step.CANCEL and flow.phase in UNINTERRUPTIBLE:  # takes effect later
        return replace(flow, cancelled=True)
    try:
        phase = TRANSITIONS[(flow.phase, step, flow.cancelled)]
    except KeyError:
        raise ValueError(f"deploy: no transition from {flow.phase.value}"
                         f"{' (cancelled)' if flow.cancelled else ''} on {step.value}") from None
    return replace(flow, phase=phase, cancelled=flow.cancelled and phase not in FINAL)
