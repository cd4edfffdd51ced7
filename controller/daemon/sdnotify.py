"""systemd's notify protocol, for Type=notify units with a watchdog.

A datagram on the socket named by $NOTIFY_SOCKET: READY=1 once the filter is
attached, STATUS= with the mode and the last reload's result, WATCHDOG=1 from the controller's loop at least twice per
$WATCHDOG_USEC, so that systemd restarts a controller that hangs. Without
$NOTIFY_SOCKET every call does nothing."""

import os
import socket
import time


class Notifier:
    def __init__(self, environ=os.environ):
        path = environ.get("NOTIFY_SOCKET", "")
        self.address = "\0" + path[1:] if path.startswith("@") else path   # "@": abstract namespace
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        watched = usec.isdigit() and (not pid or pid == str(os.getpid()))
        self.watchdog_interval_s = int(usec) / 2e6 if watched else None
        self._last_ping = 0.0

    def send(self, message):
        if not self.address:
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            try:
                sock.sendto(message.encode(), self.address)
            except OSError:
                return False   # systemd gone: nothing to tell
        return True

    def ready(self, status=""):
        return self.send("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def status(self, status):
        """STATUS=: the line `systemctl status` shows (the mode, the last reload's result)."""
        return self.send(f"STATUS={status}")

    def stopping(self):
        return self.send("STOPPING=1")

    def watchdog(self):
        """Ping when half the watchdog interval has passed; cheap to call often."""
        if self.watchdog_interval_s is None:
            return False
        now = time.monotonic()
        if now - self._last_ping < self.watchdog_interval_s:
            return False
        self._last_ping = now
        return self.send("WATCHDOG=1")
