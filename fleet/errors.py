"""Errors of the fleet package.

    FleetError            root: an operator action that cannot be carried out as asked
                          (missing or wrong key, passphrase, impossible threshold...)
    ├── LeaseHeld         another controller holds the rollout's lease (wait, or stop it)
    └── LeaseLost         this controller's lease expired or was taken: it may not write
                          to the rollout's record again (`fleet.rollout.lease`)

Rejections of bundles, roots and commands come from `agent.errors` (`RejectedError` and its
branches), since `edge-fleet verify` runs the device's own verifier.
"""

from __future__ import annotations


class FleetError(Exception):
    """An operator action failed; the message says what to fix."""


class LeaseHeld(FleetError):
    """Another controller drives the rollout and its lease has not run out."""

    def __init__(self, message: str, *, remaining_s: float = 0.0) -> None:
        super().__init__(message)
        self.remaining_s = remaining_s  # until it runs out, by the database's clock


class LeaseLost(FleetError):
    """This controller no longer holds the rollout's lease; nothing was written."""
