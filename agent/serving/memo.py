"""Bounded memos for the request path: what a client sends again and again (a route, a
binary request's header, an answer's header) is worked out once and kept, within a cap."""

from __future__ import annotations

from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


def remember(table: dict[K, V], key: K, value: V, cap: int) -> V:
    """Keep `value` under `key`, emptying `table` first when it holds `cap` entries: a
    client that varies its keys only misses, and the table never grows past `cap`."""
    if len(table) >= cap:
        table.clear()
    table[key] = value
    return value
