"""The heavy gate (agent.serving.heavy) as a pure core: a fake clock and sleep, so every
instant below is exact."""

from __future__ import annotations

import asyncio

import pytest

from agent.serving.heavy import HeavyGate


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    async def sleep(self, s: float) -> None:
        self.now += s
        await asyncio.sleep(0)  # let others run, as the loop would


def gate(share: float, t: FakeTime, waits: list[float]) -> HeavyGate:
    return HeavyGate(share, on_wait=waits.append, clock=t.clock, sleep=t.sleep)


def piece(t: FakeTime, took: float, log: list[tuple[str, float, float]], name: str):
    async def work() -> str:
        start = t.now
        t.now += took
        await asyncio.sleep(0)
        log.append((name, start, t.now))
        return name
    return work


def test_pieces_run_one_at_a_time_in_arrival_order_within_their_share() -> None:
    """share 0.25: after a piece of 1 s the gate is shut 3 s; after 2 s, 6 s."""
    t, waits, log = FakeTime(), [], []
    g = gate(0.25, t, waits)

    async def main() -> list[str]:
        return await asyncio.gather(g.run(piece(t, 1.0, log, "a")),
                                    g.run(piece(t, 2.0, log, "b")),
                                    g.run(piece(t, 1.0, log, "c")))

    assert asyncio.run(main()) == ["a", "b", "c"]
    assert log == [("a", 0.0, 1.0), ("b", 4.0, 6.0), ("c", 12.0, 13.0)]
    assert waits == [3.0, 6.0]


@pytest.mark.parametrize(("share", "took", "shut"), [
    (0.25, 1.0, 3.0), (0.5, 1.0, 1.0), (1.0, 5.0, 0.0), (0.1, 0.5, 4.5)])
def test_the_gate_stays_shut_in_proportion(share: float, took: float, shut: float) -> None:
    assert HeavyGate(share).shut_for(took) == pytest.approx(shut)


def test_a_piece_that_fails_shuts_the_gate_too() -> None:
    t, waits = FakeTime(), []
    g = gate(0.5, t, waits)

    async def fails() -> None:
        t.now += 2.0
        raise ValueError("bad JSON")

    async def main() -> float:
        with pytest.raises(ValueError):
            await g.run(fails)
        await g.run(piece(t, 0.0, [], "next"))
        return t.now

    assert asyncio.run(main()) == 4.0 and waits == [2.0]


def test_pieces_apart_in_time_do_not_wait() -> None:
    t, waits = FakeTime(), []
    g = gate(0.25, t, waits)

    async def main() -> None:
        await g.run(piece(t, 1.0, [], "a"))
        t.now += 3.0  # the gate has opened again meanwhile
        await g.run(piece(t, 1.0, [], "b"))

    asyncio.run(main())
    assert waits == []


@pytest.mark.parametrize("share", [0.0, -0.1, 1.5])
def test_a_share_outside_its_range_is_refused(share: float) -> None:
    with pytest.raises(ValueError, match="share"):
        HeavyGate(share)
