"""systemd's notification protocol (sd_notify(3)): READY, WATCHDOG, STATUS, STOPPING.

One datagram per message to the socket named by `NOTIFY_SOCKET` (a path, or an abstract
socket when it starts with "@"). Without that variable (not under systemd) every call is a
no-op, so the daemon runs the same way by hand. Send errors are swallowed on purpose: a
missing notification must never take the service down; systemd's watchdog notices.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        addr = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + addr[1:] if addr.startswith("@") else addr
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        # The watchdog applies to us unless it names another process.
        self.watchdog_usec = int(usec) if usec.isdigit() and (
            not pid or pid == str(os.getpid())) else 0

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def notify(self, **fields: str | int) -> bool:
        """Send `KEY=value` lines; returns whether a datagram went out."""
        if not self.address:
            return False
        message = "\n".join(f"{k.upper()}={v}" for k, v in fields.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.sendto(message, self.address)
        except OSError:
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.notify(ready=1, status=status, mainpid=os.getpid())

    def watchdog(self) -> bool:
        return self.notify(watchdog=1)

    def status(self, status: str) -> bool:
        return self.notify(status=status)

    def stopping(self, status: str = "stopping") -> bool:
        return self.notify(stopping=1, status=status)
