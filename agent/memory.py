"""Give memory freed after a burst of work back to the system.

An install (archive reading, hashing, decompressing, a second model loaded for its
self-test) and a model load allocate and free many megabytes. CPython returns its own
arenas, but glibc keeps freed heap memory mapped for reuse, so the daemon's RSS would stay
at its peak. After such work, `release()` collects garbage and asks glibc to trim
(`malloc_trim(0)`); elsewhere (musl, macOS) it only collects.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
from typing import Any


@functools.cache
def _libc() -> Any:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def release() -> None:
    """Collect garbage, then return free heap pages to the system where glibc allows."""
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
