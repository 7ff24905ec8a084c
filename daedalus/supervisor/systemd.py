"""systemd's ``Type=notify`` protocol with the standard library only.

A notification is one datagram of ``KEY=value`` lines sent to the AF_UNIX socket named
in ``NOTIFY_SOCKET`` (a path, or an abstract name written with a leading ``@``). With
``WatchdogSec=`` systemd sets ``WATCHDOG_USEC`` and expects ``WATCHDOG=1`` at least that
often; we ping at half of it from the supervisor's own loop, so a loop that hangs gets the
service restarted. Without ``NOTIFY_SOCKET`` (not under systemd) everything is a no-op.
The python packages for this are unmaintained or need a compiler; it is a few lines.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

from daedalus.logs import get_logger

log = get_logger(__name__)

#: what children must not inherit: only the supervisor talks to systemd
SYSTEMD_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class SystemdNotifier:
    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.socket_name = env.get("NOTIFY_SOCKET") or ""
        self.address: str | bytes | None = None
        if self.socket_name.startswith("@"):
            self.address = b"\0" + self.socket_name[1:].encode()
        elif self.socket_name.startswith("/"):
            self.address = self.socket_name
        self.watchdog_interval: float | None = None
        usec, pid = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
        if self.address is not None and usec and (not pid or pid == str(os.getpid())):
            self.watchdog_interval = half_watchdog(usec)
        self._last_ping: float | None = None
        self._last_status: str | None = None
        self._failed = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *lines: str) -> bool:
        """Send one datagram; False (logged once) when it cannot be delivered."""
        if self.address is None:
            return False
        payload = "\n".join(lines).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self.address)
                sock.sendall(payload)
        except OSError as exc:
            if not self._failed:
                log.warning("systemd_notify_failed", socket=self.socket_name, error=exc.strerror or repr(exc))
            self._failed = True
            return False
        self._failed = False
        return True

    def ready(self, status: str) -> None:
        self.notify("READY=1", f"STATUS={status}")

    def status_changed(self, status: str) -> None:
        """``STATUS=`` (what ``systemctl status`` shows), sent when it differs from the last one."""
        if status != self._last_status and self.notify(f"STATUS={status}"):
            self._last_status = status

    def stopping(self) -> None:
        self.notify("STOPPING=1", "STATUS=stopping children")

    def watchdog(self, now: float | None = None) -> None:
        """Ping when half the watchdog interval has passed since the last ping."""
        if self.watchdog_interval is None:
            return
        now = time.monotonic() if now is None else now
        if self._last_ping is None or now - self._last_ping >= self.watchdog_interval:
            self._last_ping = now
            self.notify("WATCHDOG=1")


def half_watchdog(usec: str) -> float | None:
    """Half of ``WATCHDOG_USEC`` in seconds (ping twice per period, as sd_watchdog_enabled(3)
    advises); None, logged, for a value that is not a positive whole number."""
    try:
        value = int(usec)
    except ValueError:
        value = 0
    if value <= 0:
        log.warning("systemd_watchdog_usec_invalid", value=usec, hint="no WATCHDOG pings will be sent")
        return None
    return max(0.05, value / 1_000_000 / 2)
