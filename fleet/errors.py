"""Errors of the fleet package.

    FleetError            root: an operator action that cannot be carried out as asked
                          (missing or wrong key, passphrase, impossible threshold...)

Rejections of bundles, roots and commands come from `agent.errors` (`RejectedError` and its
branches), since `edge-fleet verify` runs the device's own verifier.
"""

from __future__ import annotations


class FleetError(Exception):
    """An operator action failed; the message says what to fix."""
