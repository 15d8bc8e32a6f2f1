"""An emulated GM65-class QR scanner module on the far side of a real pty.

Scripting::

    scanner = EmulatedQrScanner(path, terminator="CR")
    scanner.scan(payload)            # continuous mode: the code is read and sent at once
    scanner.mode = "command"         # command-trigger mode: ...
    scanner.scan(payload)            # ... the code waits in front of the window
    # the host sends 7E 00 08 01 00 02 01 AB CD -> ACK 02 00 00 01 00 33 31, then the code
    scanner.inject_garbage()         # line noise, a power-on blip

``commands`` lists every host command recognised (as bytes); ``sent`` every write made.
``chunk`` splits each write into pieces of that many bytes (as a slow UART or a USB adapter's
packetisation does), so the host's reassembly is exercised.
"""

from __future__ import annotations

import threading
from typing import Literal

from edge.qr.scanner import TERMINATORS, TRIGGER_ACK, TRIGGER_COMMAND
from emulator.pty import PtyDevice

_GARBAGE = b"\x00\xff\x7e\x00\x13\x02\x00\x00garbage\x1b[2J"


class EmulatedQrScanner(PtyDevice):
    kind = "qr-scanner"

    def __init__(self, path, *, terminator: str = "CR",
                 mode: Literal["continuous", "command"] = "continuous",
                 chunk: int | None = None) -> None:
        if terminator not in TERMINATORS:
            raise ValueError(f"unknown terminator {terminator!r}")
        self._state = threading.Lock()
        self.terminator = terminator
        self.mode = mode
        self.chunk = chunk
        self._pending: bytes | None = None
        self._rx = bytearray()
        self._commands: list[bytes] = []
        self._sent: list[bytes] = []
        super().__init__(path)

    # -- scripting ----------------------------------------------------------------------------
    def scan(self, payload: bytes) -> None:
        """A code in front of the window: sent now (continuous) or at the next trigger."""
        if self.mode == "command":
            with self._state:
                self._pending = bytes(payload)
            return
        self._send(bytes(payload) + TERMINATORS[self.terminator])

    def inject_garbage(self, data: bytes | None = None) -> None:
        """Write bytes that are no code at all (default: a blip with a partial command echo,
        controls and an ANSI escape), followed by the terminator if one is set."""
        self._send((_GARBAGE if data is None else data) + TERMINATORS[self.terminator])

    def send_raw(self, data: bytes) -> None:
        """Write exactly ``data`` (no terminator): for framing tests."""
        self._send(data)

    @property
    def commands(self) -> list[bytes]:
        with self._state:
            return list(self._commands)

    @property
    def sent(self) -> list[bytes]:
        with self._state:
            return list(self._sent)

    # -- the module -----------------------------------------------------------------------------
    def on_bytes(self, data: bytes) -> None:
        with self._state:
            self._rx += data
            found = []
            while (i := self._rx.find(TRIGGER_COMMAND)) >= 0:
                found.append(bytes(self._rx[i:i + len(TRIGGER_COMMAND)]))
                del self._rx[:i + len(TRIGGER_COMMAND)]
            # Keep only what could still be the start of a command.
            if len(self._rx) > len(TRIGGER_COMMAND):
                del self._rx[:-len(TRIGGER_COMMAND)]
            self._commands.extend(found)
        for _ in found:
            with self._state:
                pending, self._pending = self._pending, None
            reply = TRIGGER_ACK
            if pending is not None:
                reply += pending + TERMINATORS[self.terminator]
            self._send(reply)

    def _send(self, data: bytes) -> None:
        with self._state:
            self._sent.append(data)
        step = self.chunk or len(data) or 1
        for i in range(0, len(data), step):
            self.write(data[i:i + step])

    def on_replug(self) -> None:
        with self._state:
            self._rx.clear()
            self._pending = None


__all__ = ["EmulatedQrScanner"]
