"""A GM65-class serial QR scanner module: the pure framer, and the worker that keeps it open.

Wire format (PROTOCOLS.md, "QR"; GM65/GM805/GM861 manuals): the module sends each code it
reads as the raw payload bytes followed by a configurable terminator: CR (factory default),
LF, CRLF, TAB, or nothing. With no terminator the only frame boundary is silence: a module
writes a whole code in one burst, so a gap of 50-100 ms without bytes ends it.

In command-trigger mode the host starts a read with the register write
``7E 00 08 01 00 02 01 AB CD`` (head 7E 00, type 08 = write, length 01, register 0x0002,
value 01 = "scan once", AB CD = "no CRC" placeholder the modules accept); the module answers
``02 00 00 01 00 33 31`` (head 02 00, status 00 OK, length 01, data 00, CRC 33 31) and then
sends the code, if it finds one before its own timeout. That acknowledgement shares the data
stream with payloads, so the framer recognises and drops it wherever a frame starts.

Bounds: a frame longer than ``max_len`` bytes is dropped whole (never buffered without
bound), reported as ``FrameTooLong``, and the framer resynchronises at the next terminator
(or gap). With a terminator configured, a partial frame left without its terminator for
``stale_s`` is dropped and reported too: it usually means the module's terminator setting
does not match the config, which ops must see rather than a scanner that silently reads
nothing.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from edge.clock import SYSTEM_CLOCK, Clock
from edge.qr import QrScanned, QrUnreadable
from edge.serialdev import SerialWorker
from hallkiosk.errors import DeviceGone, FrameTooLong, ProtocolError

log = logging.getLogger("hallkiosk.qr")

TRIGGER_COMMAND = bytes.fromhex("7E 00 08 01 00 02 01 AB CD")
TRIGGER_ACK = bytes.fromhex("02 00 00 01 00 33 31")

TERMINATORS: dict[str, bytes] = {"CR": b"\r", "LF": b"\n", "CRLF": b"\r\n", "TAB": b"\t",
                                 "NONE": b""}
DEFAULT_MAX_LEN = 512
DEFAULT_IDLE_GAP_S = 0.08


class UnterminatedFrame(ProtocolError):
    """Bytes that never got their terminator within the stale time."""


class ScanFramer:
    """Bytes in, payloads out. Pure: the caller passes the time (``clock.monotonic()``).

    ``feed(data, now)`` returns the payloads completed by ``data``; ``poll(now)`` returns the
    payload completed by silence (terminator ``NONE``) and drops stale partial frames;
    ``deadline()`` says when ``poll`` next has something to do (None: nothing pending).
    Framing errors are collected and handed out by ``pop_errors()`` (FrameTooLong,
    UnterminatedFrame), whose messages give lengths only, never content.
    """

    def __init__(self, *, terminator: str = "CR", idle_gap_s: float = DEFAULT_IDLE_GAP_S,
                 max_len: int = DEFAULT_MAX_LEN, stale_s: float = 0.5) -> None:
        if terminator not in TERMINATORS:
            raise ValueError(f"unknown terminator {terminator!r}; known: {', '.join(TERMINATORS)}")
        if not 0 < idle_gap_s <= 2.0 or max_len < 1 or stale_s < idle_gap_s:
            raise ValueError("ScanFramer: idle_gap_s in (0, 2], max_len >= 1, stale_s >= idle_gap_s")
        self.terminator = terminator
        self._term = TERMINATORS[terminator]
        self.idle_gap_s = idle_gap_s
        self.max_len = max_len
        self.stale_s = stale_s
        self._buf = bytearray()
        self._discarding = False     # inside an oversized frame: drop until its end
        self._last_byte: float | None = None
        self._errors: list[ProtocolError] = []
        self.frames = 0
        self.acks = 0

    def reset(self) -> None:
        self._buf.clear()
        self._discarding = False
        self._last_byte = None

    def pop_errors(self) -> list[ProtocolError]:
        errors, self._errors = self._errors, []
        return errors

    def deadline(self) -> float | None:
        if self._last_byte is None or not (self._buf or self._discarding):
            return None
        return self._last_byte + (self.stale_s if self._term else self.idle_gap_s)

    def feed(self, data: bytes, now: float) -> list[bytes]:
        out: list[bytes] = []
        if not self._term:
            if self._last_byte is not None and now - self._last_byte >= self.idle_gap_s:
                out.extend(self._end_frame())   # the gap before these bytes ended a frame
            if data:
                self._last_byte = now
                self._buf += data
                self._check_length()
            return out
        if not data:
            return out
        self._last_byte = now
        self._buf += data
        term = self._term
        while (cut := self._buf.find(term)) >= 0:
            frame = bytes(self._buf[:cut])
            del self._buf[:cut + len(term)]
            if self._discarding:
                self._discarding = False       # the oversized frame ends here; resynchronised
                continue
            out.extend(self._finish(frame))
        self._check_length()
        return out

    def poll(self, now: float) -> list[bytes]:
        due = self.deadline()
        if due is None or now < due:
            return []
        if not self._term:
            return self._end_frame()
        _strip_acks(self._buf, self)
        if self._buf:
            self._errors.append(UnterminatedFrame(
                f"scanner frame of {len(self._buf)} bytes without its {self.terminator} terminator"))
        self._buf.clear()
        self._discarding = False
        return []

    def _check_length(self) -> None:
        # Leave room for a terminator split between two reads (the CR of a CRLF).
        keep = max(0, len(self._term) - 1)
        if self._discarding:
            del self._buf[:len(self._buf) - keep]
            return
        _strip_acks(self._buf, self)
        if len(self._buf) > self.max_len + keep:
            self._errors.append(FrameTooLong(f"scanner frame longer than {self.max_len} bytes"))
            del self._buf[:len(self._buf) - keep]
            self._discarding = True

    def _end_frame(self) -> list[bytes]:
        frame = bytes(self._buf)
        self._buf.clear()
        if self._discarding:
            self._discarding = False
            return []
        return self._finish(frame)

    def _finish(self, frame: bytes) -> list[bytes]:
        buf = bytearray(frame)
        _strip_acks(buf, self)
        if not buf:
            return []
        if len(buf) > self.max_len:
            self._errors.append(FrameTooLong(f"scanner frame longer than {self.max_len} bytes"))
            return []
        self.frames += 1
        return [bytes(buf)]


def _strip_acks(buf: bytearray, framer: ScanFramer) -> None:
    """Drop trigger acknowledgements at the start of a frame (where the module puts them)."""
    while buf.startswith(TRIGGER_ACK):
        del buf[:len(TRIGGER_ACK)]
        framer.acks += 1


class QrScannerWorker(SerialWorker):
    """Keeps a GM65-class module open (SerialWorker: reconnect with backoff, fault events) and
    turns its frames into ``QrScanned(payload, "scanner", mono)`` events on ``sink``; framing
    errors become ``QrUnreadable("scanner", reason)``.

    ``trigger_interval_s``: in command-trigger mode, send the trigger command this often
    (None: the module runs in continuous or sensing mode and needs no trigger). ``trigger()``
    asks for one read now, from any thread. Defaults: 9600 baud, the modules' factory rate.
    """

    device = "qr-scanner"

    def __init__(self, url: str, *, sink: Callable[[object], None], terminator: str = "CR",
                 idle_gap_s: float = DEFAULT_IDLE_GAP_S, max_len: int = DEFAULT_MAX_LEN,
                 trigger_interval_s: float | None = None, clock: Clock = SYSTEM_CLOCK,
                 baudrate: int = 9600, read_timeout_s: float = 0.02, **kwargs) -> None:
        super().__init__(url, sink=sink, baudrate=baudrate, read_timeout_s=read_timeout_s, **kwargs)
        # Validate now (config mistakes raise at construction, not on the worker thread).
        ScanFramer(terminator=terminator, idle_gap_s=idle_gap_s, max_len=max_len)
        if trigger_interval_s is not None and trigger_interval_s <= 0:
            raise ValueError("trigger_interval_s must be > 0 or None")
        self.terminator = terminator
        self.idle_gap_s = idle_gap_s
        self.max_len = max_len
        self.trigger_interval_s = trigger_interval_s
        self.clock = clock
        self._trigger_now = threading.Event()
        self.scans = 0

    def trigger(self) -> None:
        """Ask the module for one read (sent by the worker thread at its next turn)."""
        self._trigger_now.set()

    def attach(self, port) -> ScanFramer:
        # Bytes that waited in the adapter while we were away belong to no frame we can trust.
        port.reset_input_buffer()
        return ScanFramer(terminator=self.terminator, idle_gap_s=self.idle_gap_s,
                          max_len=self.max_len)

    def serve(self, framer: ScanFramer) -> None:
        port = self._port
        if port is None:
            raise DeviceGone(f"{self.url}: port closed")
        next_trigger = self.clock.monotonic() if self.trigger_interval_s else None
        while not self.stopping.is_set():
            now = self.clock.monotonic()
            if self._trigger_now.is_set() or (next_trigger is not None and now >= next_trigger):
                self._trigger_now.clear()
                port.write(TRIGGER_COMMAND)
                if self.trigger_interval_s:
                    next_trigger = now + self.trigger_interval_s
            # Blocks up to read_timeout_s for the first byte, then takes what has arrived.
            data = port.read(1)
            if data:
                waiting = port.in_waiting
                if waiting:
                    data += port.read(min(waiting, 4096))
            now = self.clock.monotonic()
            for payload in framer.feed(data, now) + framer.poll(now):
                self.scans += 1
                self._emit(QrScanned(payload, "scanner", now))
            for error in framer.pop_errors():
                reason = "oversized" if isinstance(error, FrameTooLong) else "unterminated"
                log.info("%s: %s", self.device, error)
                self._emit(QrUnreadable("scanner", reason))


__all__ = ["DEFAULT_IDLE_GAP_S", "DEFAULT_MAX_LEN", "QrScannerWorker", "ScanFramer",
           "TERMINATORS", "TRIGGER_ACK", "TRIGGER_COMMAND", "UnterminatedFrame"]
