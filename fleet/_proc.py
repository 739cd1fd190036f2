"""Processes of this host, for the fleet tools that leave something behind a process (a
rollout's lock, the simulator's scratch directories)."""

from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """False only when no process `pid` exists on this host (one of another user is
    alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
