"""What `edge-fleet` prints is safe on a terminal: device-provided text (a profile, a model
name, an anomaly's message, a rollout's reason) can hold escape sequences that clear the
screen, rewrite earlier lines, set the window title or reorder text (bidi overrides). Every
C0/C1 control but newline and tab, DEL, and the Unicode format characters that reorder or
hide text are written as visible escapes (`\\x1b`, `\\u202e`).

The CLI wraps its standard output and error in `Printable` for the length of a command;
what it means to send to the terminal itself (`watch`'s clear-screen) it writes to the
stream underneath (`Printable.raw`).
"""

from __future__ import annotations

import re
from typing import TextIO

UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2066-\u2069"
                    "\ufeff]")


def printable(text: str) -> str:
    return UNSAFE.sub(lambda m: (f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100
                                 else f"\\u{ord(m.group()):04x}"), text)


class Printable:
    """A text stream that writes through `printable`."""

    def __init__(self, raw: TextIO) -> None:
        self.raw = raw

    def write(self, text: str) -> int:
        self.raw.write(printable(text))
        return len(text)

    def flush(self) -> None:
        self.raw.flush()

    def isatty(self) -> bool:
        return self.raw.isatty()

    def fileno(self) -> int:
        return self.raw.fileno()

    @property
    def encoding(self) -> str:
        return self.raw.encoding
