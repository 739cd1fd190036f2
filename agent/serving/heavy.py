"""Work that holds the GIL for long: parsing or encoding a large JSON body.

`json.loads` of 4 MiB holds the interpreter lock for ~65 ms and `numpy.asarray` over the
result another ~20 ms, in C, without a pause: the event loop, and every other client with
it, waits the whole time. Running it in a worker thread only moves where the lock is held.
Under a loop of such requests (two clients sending 4 MiB of JSON back to back) a
well-behaved client's p50 went from 1.3 ms to 65 ms.

So large work goes through one gate: one piece at a time, and at most `share` of the wall
time. After a piece that took `d` seconds the gate stays shut for `d * (1 - share) / share`
(with share 0.25, three times as long as it ran); waiters go through in arrival order. A
client with small requests then finds the lock free at least `1 - share` of the time, and
one that really sends large tensors is slowed, not refused: the binary tensor extension
has no such cost.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")


class HeavyGate:
    """One piece of heavy work at a time, at most `share` of the wall time.

    `on_wait` hears each wait the gate imposes (seconds); `clock` and `sleep` are the
    event loop's by default, tests give a fake pair."""

    def __init__(self, share: float, *, on_wait: Callable[[float], None] = lambda s: None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        if not 0 < share <= 1:
            raise ValueError(f"share must be in (0, 1], not {share}")
        self.share, self._on_wait, self._clock, self._sleep = share, on_wait, clock, sleep
        self._lock: asyncio.Lock | None = None
        self._open_at = float("-inf")

    def shut_for(self, took_s: float) -> float:
        """How long the gate stays shut after a piece that took `took_s`."""
        return took_s * (1 - self.share) / self.share

    async def run(self, work: Callable[[], Awaitable[T]]) -> T:
        """Await `work()` when the gate is open and shut it for as long as `shut_for`."""
        if self._lock is None:  # made on first use, inside the loop that serves
            self._lock = asyncio.Lock()
        async with self._lock:
            wait = self._open_at - self._clock()
            if wait > 0:
                self._on_wait(wait)
                await self._sleep(wait)
            started = self._clock()
            try:
                return await work()
            finally:
                ended = self._clock()
                self._open_at = ended + self.shut_for(ended - started)


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` in the loop's default executor."""
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)
