"""Poll for state, never sleep for it: `wait_until` asks again until the predicate holds or
the deadline passes, and then says what it was waiting for."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], *, timeout_s: float = 15.0, every_s: float = 0.02,
               what: str = "the condition") -> T:
    """The predicate's first truthy value.

    Raises:
        AssertionError: it stayed falsy for `timeout_s`.
    """
    end = time.monotonic() + timeout_s
    while True:
        if value := predicate():
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(every_s)
