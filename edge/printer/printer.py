"""The ticket printer driver: status over DLE EOT, tickets over ESC/POS.

Wiring: ``TicketPrinter(port)`` is handed a port that is already open (pyserial
``Serial`` from edge.serialdev, or anything with read/write/flush/timeout). The driver
changes ``port.timeout`` while it waits for an answer and puts it back afterwards; it never
opens, reopens or closes the port: whoever opened it closes it.

Silence is a fault: every status answer must arrive within ``timeout_s`` or the call
raises DeviceTimeout (python-escpos reports "paper OK" from a printer that never answered;
a kiosk that believed it would hand out blank paper).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

from serial import SerialTimeoutException

from edge.clock import SYSTEM_CLOCK, Clock
from edge.printer.escpos import (ASB_DEFAULT_MASK, AsbBlock, EscPos, InboundSplitter, PrinterStatus,
                                 StatusAnswer, StrayByte, TicketLayout, asb_enable, decode_status,
                                 render_ticket, status_query)
from hallkiosk.errors import DeviceGone, DeviceRefused, DeviceTimeout, HallkioskError

#: Unsolicited bytes tolerated while waiting for one answer (64 ASB blocks); a printer that
#: chatters more than this is broken, and the bound keeps a status call finite.
_MAX_BYTES_PER_ANSWER = 256
_DRAIN_CHUNK = 4096
_MAX_DRAIN_READS = 16


class PrinterNotReady(DeviceRefused):
    """The printer reported a condition that stops printing (offline, cover open, paper out,
    an error). ``status`` is what it reported; nothing was sent to print."""

    def __init__(self, message: str, status: PrinterStatus) -> None:
        super().__init__(message)
        self.status = status


class TicketPrinter:
    """An ESC/POS ticket printer on an open serial port.

    ``timeout_s`` bounds the wait for each one-byte status answer (seconds, measured on
    ``clock.monotonic()``). ``encoding`` is the printer's code page as a Python codec.
    Thread-safe: one lock serialises status queries and jobs. A context manager;
    ``close()`` is safe twice and leaves the port open (it was handed to us).
    """

    def __init__(self, port, *, name: str = "ticket-printer", timeout_s: float = 0.5,
                 encoding: str = "cp437", clock: Clock = SYSTEM_CLOCK) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, not {timeout_s!r}")
        self.encoding = EscPos(encoding).encoding      # ValueError now, not at the first ticket
        self.name = name
        self.timeout_s = float(timeout_s)
        self._port = port
        self._clock = clock
        self._lock = threading.Lock()
        self._splitter = InboundSplitter()
        self._closed = False
        #: The last status the printer pushed by ASB (None until one arrives).
        self.last_asb: PrinterStatus | None = None

    @property
    def port_name(self) -> str:
        return str(getattr(self._port, "port", None) or getattr(self._port, "name", None) or "?")

    def __repr__(self) -> str:
        return f"<TicketPrinter {self.name} on {self.port_name}>"

    # -- public API ------------------------------------------------------------------
    def status(self) -> PrinterStatus:
        """Ask DLE EOT 1, 2 and 4 (and 3 when 2 reports an error) and merge the answers.

        Raises DeviceTimeout if any answer is late, DeviceGone if the port fails.
        """
        with self._lock:
            self._check_open()
            return self._status()

    def print_ticket(self, layout: TicketLayout) -> PrinterStatus:
        """Print one ticket; return the status read right after it (e.g. paper near end).

        Refuses with PrinterNotReady, before sending anything, when the printer is offline,
        has its cover open, is out of paper or reports an error. Paper near end still prints.
        If the status after printing cannot be read, the error propagates: the ticket may or
        may not be on paper, and the caller must treat it as unknown.
        """
        data = render_ticket(layout, encoding=self.encoding)
        with self._lock:
            self._check_open()
            before = self._status()
            if not before.ok_to_print:
                raise PrinterNotReady(f"{self.name} on {self.port_name}: not ready to print "
                                      f"({', '.join(before.faults) or 'status unknown'})", before)
            with self._io("printing"):
                self._port.write(data)
                self._port.flush()
            return self._status()

    def enable_asb(self, mask: int = ASB_DEFAULT_MASK) -> None:
        """Ask the printer to push status changes (``GS a``); 0 turns it off. Pushed blocks
        are read whenever the driver reads and kept in ``last_asb``; see ``poll_asb()``."""
        with self._lock:
            self._check_open()
            with self._io("enabling status back"):
                self._port.write(asb_enable(mask))
                self._port.flush()

    def poll_asb(self) -> PrinterStatus | None:
        """Read what the printer pushed so far, without waiting; return ``last_asb``."""
        with self._lock:
            self._check_open()
            with self._io("reading status back"), self._port_timeout():
                self._drain()
            return self.last_asb

    def close(self) -> None:
        """Stop using the port. The port itself stays open: its owner closes it."""
        self._closed = True

    def __enter__(self) -> TicketPrinter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise DeviceGone(f"{self.name} on {self.port_name}: driver is closed")

    @contextmanager
    def _io(self, doing: str) -> Iterator[None]:
        try:
            yield
        except HallkioskError:
            raise
        except SerialTimeoutException as exc:
            raise DeviceTimeout(f"{self.name} on {self.port_name}: write timed out while {doing}") from exc
        except OSError as exc:      # SerialException is an OSError too
            raise DeviceGone(f"{self.name} on {self.port_name}: port failed while {doing}: {exc}") from exc

    @contextmanager
    def _port_timeout(self) -> Iterator[None]:
        """Put the port's own read timeout back however the wait ends."""
        saved = self._port.timeout
        try:
            yield
        finally:
            try:
                self._port.timeout = saved
            except OSError:
                pass    # the port just failed; the error already propagating says so

    def _status(self) -> PrinterStatus:
        with self._io("reading status"), self._port_timeout():
            # Bytes already waiting are late answers to an earlier, timed-out query (or a
            # DLE EOT inside QR data that the printer answered): never read them as ours.
            self._drain()
            # DLE EOT is a real-time command: the printer answers each one in order as it
            # arrives, so the three usual queries go out in one write and cost one round trip.
            first, second, fourth = self._query_many((1, 2, 4))
            status = decode_status(2, second, decode_status(1, first))
            if status.error:
                status = decode_status(3, self._query(3), status)
            return decode_status(4, fourth, status)

    def _take(self, items) -> int | None:
        """Consume split items: keep ASB pushes, drop strays, return the first answer."""
        answer = None
        for item in items:
            if isinstance(item, AsbBlock):
                self.last_asb = item.status
            elif isinstance(item, StatusAnswer) and answer is None:
                answer = item.value
        return answer

    def _drain(self) -> None:
        self._port.timeout = 0
        for _ in range(_MAX_DRAIN_READS):
            chunk = self._port.read(_DRAIN_CHUNK)
            if not chunk:
                return
            self._take(self._splitter.feed(chunk))

    def _query(self, n: int) -> int:
        return self._query_many((n,))[0]

    def _query_many(self, ns: tuple[int, ...]) -> list[int]:
        self._port.write(b"".join(status_query(n) for n in ns))
        self._port.flush()
        return [self._answer(n) for n in ns]

    def _answer(self, n: int) -> int:
        """Read the answer to status query ``n`` (the next one due), within timeout_s."""
        deadline = self._clock.monotonic() + self.timeout_s
        strays = 0
        for _ in range(_MAX_BYTES_PER_ANSWER):
            remaining = deadline - self._clock.monotonic()
            if remaining <= 0:
                break
            self._port.timeout = remaining
            chunk = self._port.read(1)
            if not chunk:
                break       # the port waited the remaining time: silence
            items = self._splitter.feed(chunk)
            strays += sum(isinstance(item, StrayByte) for item in items)
            answer = self._take(items)
            if answer is not None:
                return answer
        else:
            raise DeviceTimeout(f"{self.name} on {self.port_name}: more than {_MAX_BYTES_PER_ANSWER} "
                                f"unsolicited bytes while waiting for status {n}")
        hint = f" ({strays} bytes that are not ESC/POS status: wrong baud rate?)" if strays else ""
        raise DeviceTimeout(f"{self.name} on {self.port_name}: no answer to status query {n} "
                            f"within {self.timeout_s:g} s{hint}")
