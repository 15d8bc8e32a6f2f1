"""Talking to systemd: READY, STATUS, WATCHDOG and STOPPING over ``NOTIFY_SOCKET``.

The protocol is one datagram per notification, newline-separated ``KEY=value`` assignments,
sent to the AF_UNIX SOCK_DGRAM socket named in ``NOTIFY_SOCKET`` (sd_notify(3)). A name
starting with ``@`` is in Linux's abstract namespace: the ``@`` becomes a NUL byte. No
library is needed, and none is used.

Wiring: the agent builds one ``Notifier.from_env()`` at start-up and calls it from its main
loop only, never from a timer thread of its own: ``watchdog()`` must prove that the loop runs
and its health checks pass (PROTOCOLS.md), so a thread that pings while the loop is stuck
would defeat it. ``watchdog_interval_s`` is half of ``WATCHDOG_USEC`` (sd_watchdog_enabled(3)
advises pinging at half the timeout); ``next_watchdog_deadline()`` is a monotonic time the
loop can wait on alongside its other deadlines.

Outside systemd (no ``NOTIFY_SOCKET``, e.g. the emulator or a developer's shell) every call is
a cheap no-op that returns False. A failed send is logged once per kind of error and returns
False: the kiosk keeps serving, and systemd's own watchdog notices what went wrong.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Mapping

from edge.clock import SYSTEM_CLOCK, Clock

log = logging.getLogger("hallkiosk.sdnotify")

#: Longest STATUS text sent; systemctl shows one line and journald truncates anyway.
MAX_STATUS_CHARS = 200


def _socket_address(value: str) -> str | bytes | None:
    """The sendto() address for a NOTIFY_SOCKET value, or None when unusable here."""
    if value.startswith("@") and len(value) > 1:
        # Abstract namespace: a leading NUL, no file on disk, no trailing NUL.
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    # systemd also speaks vsock: (VMs); a kiosk never runs in one.
    return None


def _watchdog_usec(environ: Mapping[str, str], pid: int) -> int | None:
    """WATCHDOG_USEC when it is meant for process ``pid`` (sd_watchdog_enabled semantics)."""
    raw = environ.get("WATCHDOG_USEC")
    if raw is None:
        return None
    try:
        usec = int(raw)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not an integer", raw[:40])
        return None
    if usec <= 0:
        return None
    owner = environ.get("WATCHDOG_PID")
    if owner is not None:
        try:
            if int(owner) != pid:
                # Inherited from a parent that is the one systemd watches (e.g. a wrapper).
                return None
        except ValueError:
            log.warning("ignoring WATCHDOG_PID=%r: not an integer", owner[:40])
            return None
    return usec


class Notifier:
    """One process's line to systemd. Thread-safe; every method returns True when sent.

    ``address`` is what ``sendto`` takes (a path, or bytes starting with NUL for the abstract
    namespace); None disables every call. ``watchdog_usec`` is the service's WatchdogSec in
    microseconds, or None when the watchdog is off or meant for another process.
    """

    def __init__(self, address: str | bytes | None, *, watchdog_usec: int | None = None,
                 clock: Clock = SYSTEM_CLOCK) -> None:
        self.address = address
        self.watchdog_usec = watchdog_usec
        self._clock = clock
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._last_status: str | None = None
        self._last_ping: float | None = None
        self._logged_errors: set[str] = set()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *, pid: int | None = None,
                 unset: bool = False, clock: Clock = SYSTEM_CLOCK) -> Notifier:
        """Read NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID (default: ``os.environ``).

        ``unset=True`` removes them from ``environ`` afterwards, as sd_notify's
        ``unset_environment`` does, so child processes do not talk to systemd as us.
        """
        env = os.environ if environ is None else environ
        pid = os.getpid() if pid is None else pid
        raw = env.get("NOTIFY_SOCKET")
        address = _socket_address(raw) if raw else None
        if raw and address is None:
            log.warning("NOTIFY_SOCKET %r is not a unix socket path; not notifying systemd", raw[:80])
        usec = _watchdog_usec(env, pid) if address is not None else None
        if unset and hasattr(env, "pop"):
            for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                env.pop(key, None)
        return cls(address, watchdog_usec=usec, clock=clock)

    # -- what the agent asks -------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        """True when running under systemd with a notify socket."""
        return self.address is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """Seconds between pings: half of WATCHDOG_USEC; None when the watchdog is off."""
        if self.watchdog_usec is None:
            return None
        return self.watchdog_usec / 2_000_000

    def next_watchdog_deadline(self) -> float | None:
        """Monotonic time by which the next ``watchdog()`` is due (now, if never sent)."""
        interval = self.watchdog_interval_s
        if interval is None:
            return None
        with self._lock:
            last = self._last_ping
        return self._clock.monotonic() if last is None else last + interval

    def watchdog_due(self) -> bool:
        deadline = self.next_watchdog_deadline()
        return deadline is not None and self._clock.monotonic() >= deadline

    # -- notifications --------------------------------------------------------------------
    def ready(self, status: str | None = None) -> bool:
        """Start-up done (Type=notify): systemd marks the unit active only now."""
        fields = {"READY": "1"}
        if status is not None:
            fields["STATUS"] = _status_text(status)
        sent = self.notify(fields)
        if sent and status is not None:
            with self._lock:
                self._last_status = fields["STATUS"]
        return sent

    def status(self, text: str, *, force: bool = False) -> bool:
        """One line for ``systemctl status``. Unchanged text is not re-sent unless ``force``."""
        text = _status_text(text)
        with self._lock:
            if text == self._last_status and not force:
                return False
        sent = self.notify({"STATUS": text})
        if sent:
            with self._lock:
                self._last_status = text
        return sent

    def watchdog(self) -> bool:
        """Ping the service watchdog. Call only while the health checks pass."""
        if self.watchdog_usec is None:
            return False
        sent = self.notify({"WATCHDOG": "1"})
        if sent:
            with self._lock:
                self._last_ping = self._clock.monotonic()
        return sent

    def watchdog_trigger(self) -> bool:
        """Ask systemd to act as if the watchdog had expired (restart us now)."""
        return self.notify({"WATCHDOG": "trigger"})

    def reloading(self) -> bool:
        """Config reload started (SIGHUP); follow with ``ready()`` when done, kept or refused.

        MONOTONIC_USEC is required by Type=notify-reload and harmless for Type=notify.
        """
        usec = int(self._clock.monotonic() * 1_000_000)
        return self.notify({"RELOADING": "1", "MONOTONIC_USEC": str(usec)})

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown started (SIGTERM): systemd shows 'deactivating' and stops expecting pings."""
        fields = {"STOPPING": "1"}
        if status is not None:
            fields["STATUS"] = _status_text(status)
        return self.notify(fields)

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for ``seconds`` more of the current start/stop timeout (EXTEND_TIMEOUT_USEC)."""
        if not seconds > 0:
            raise ValueError(f"seconds must be > 0, not {seconds!r}")
        return self.notify({"EXTEND_TIMEOUT_USEC": str(int(seconds * 1_000_000))})

    def notify(self, fields: Mapping[str, str]) -> bool:
        """Send raw assignments in one datagram. A caller mistake (a key with '=' or a newline
        anywhere) raises ValueError at once; a failed send returns False."""
        lines = []
        for key, value in fields.items():
            if not key or "=" in key or "\n" in key or "\n" in value:
                raise ValueError(f"not a valid sd_notify assignment: {key!r}")
            lines.append(f"{key}={value}")
        if self.address is None or not lines:
            return False
        data = "\n".join(lines).encode("utf-8", "replace")
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.sendto(data, self.address)
            except OSError as exc:
                self._forget_socket()
                kind = type(exc).__name__ + str(exc.errno)
                if kind not in self._logged_errors:
                    self._logged_errors.add(kind)
                    log.warning("cannot notify systemd: %s", exc)
                return False
        return True

    def close(self) -> None:
        """Release the socket (safe twice; a later call reopens it)."""
        with self._lock:
            self._forget_socket()

    def _forget_socket(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def __repr__(self) -> str:
        where = "off" if self.address is None else ("abstract" if isinstance(self.address, bytes)
                                                      else self.address)
        return f"<Notifier {where} watchdog_usec={self.watchdog_usec}>"


def _status_text(text: str) -> str:
    # STATUS is one assignment: a newline would start another one, and systemd reads the
    # datagram as a C string, so a NUL would cut it. Other controls are noise in systemctl.
    text = "".join(c if c.isprintable() else " " for c in str(text))
    return " ".join(text.split())[:MAX_STATUS_CHARS]
