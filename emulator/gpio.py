"""The GPIO of an agent in another process: the emulator's side of edge.gpio's mock-pin
socket (``HALLKIOSK_MOCK_GPIO``).

:class:`RemotePins` looks like the part of gpiozero's MockFactory the emulator uses
(``pin(n).drive_low()``, ``drive_high()``, ``state``), so :class:`emulator.kiosk.Buttons`
and :class:`emulator.cells.EmulatedCell` drive a spawned agent exactly as they drive an
in-process one. Every request waits for the agent's answer.

Input levels are remembered: a level driven while no agent serves the socket (not started
yet, killed and not yet restarted) is only recorded, as a button pressed on a kiosk whose
agent is restarting does nothing, and :meth:`RemotePins.resync` drives every recorded level
once the agent is up (a new process starts with its pins at their pull defaults).
"""

from __future__ import annotations

import os
import socket
import tempfile
import threading
from pathlib import Path

from hallkiosk.errors import HallkioskError


class RemoteGpioError(HallkioskError, RuntimeError):
    """The agent's pins could not be reached (not started yet, killed) or refused."""


class AgentNotServing(RemoteGpioError):
    """Nobody is bound to the socket: the agent is not running (yet, or any more)."""


#: sun_path holds 108 bytes on Linux, with the terminating NUL.
MAX_SOCKET_PATH = 107


class RemotePins:
    def __init__(self, path: str | os.PathLike[str], *, timeout_s: float = 2.0) -> None:
        self.path = str(path)
        if len(os.fsencode(self.path)) > MAX_SOCKET_PATH:
            raise RemoteGpioError(f"{self.path}: longer than a unix socket path may be")
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._dir = tempfile.mkdtemp(prefix="hk-gpio-")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(os.path.join(self._dir, "c"))
        self._sock.settimeout(timeout_s)
        self.levels: dict[int, bool] = {}

    def pin(self, number: int) -> "RemotePin":
        return RemotePin(self, int(number))

    def request(self, op: str, number: int) -> bytes:
        with self._lock:
            self._drain()
            try:
                self._sock.sendto(f"{op} {number}".encode(), self.path)
                reply = self._sock.recv(256)
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                raise AgentNotServing(f"{self.path}: no agent serving its pins ({exc})") from None
            except TimeoutError:
                raise RemoteGpioError(f"{self.path}: no answer within {self.timeout_s} s") from None
        if reply.startswith(b"E"):
            raise RemoteGpioError(f"pin {number}: {reply[2:].decode('utf-8', 'replace')}")
        return reply

    def drive(self, number: int, high: bool) -> bool:
        """Record and drive an input; False when no agent serves the pins (recorded only)."""
        self.levels[number] = high
        try:
            self.request("H" if high else "L", number)
        except AgentNotServing:
            return False
        return True

    def resync(self) -> None:
        """Drive every recorded input level (after the agent started or restarted)."""
        for number, high in sorted(self.levels.items()):
            self.request("H" if high else "L", number)

    def _drain(self) -> None:
        """Drop a late answer to a request that timed out, so it is not taken for the next."""
        self._sock.setblocking(False)
        try:
            while True:
                self._sock.recv(256)
        except BlockingIOError:
            pass
        finally:
            self._sock.settimeout(self.timeout_s)

    def close(self) -> None:
        self._sock.close()
        for p in (Path(self._dir) / "c", Path(self._dir)):
            try:
                p.unlink() if p.is_file() or p.is_socket() else p.rmdir()
            except OSError:
                pass


class RemotePin:
    def __init__(self, pins: RemotePins, number: int) -> None:
        self._pins = pins
        self.number = number

    def drive_low(self) -> None:
        self._pins.drive(self.number, False)

    def drive_high(self) -> None:
        self._pins.drive(self.number, True)

    @property
    def state(self) -> bool:
        return self._pins.request("?", self.number) == b"1"
