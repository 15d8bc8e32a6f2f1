"""Driver for an ID-card reader with a GA 467 SAM module on a serial line.

Wiring: the caller opens the port (a pyserial ``Serial`` or anything from
``serial.serial_for_url``: a real adapter, an emulator's pty, ``socket://``) with a finite
read ``timeout`` of a few tens of milliseconds, hands it to :class:`IdCardReader`, and
stays its owner: :meth:`IdCardReader.close` never closes it. Real readers run at 115200
8N1 (PROTOCOLS.md); PROTOCOLS.md also says to poll no faster than every 300 ms.

One call is one transaction: drop stale input, write a command, read until one whole
reply frame arrives or ``timeout_s`` passes on the injected clock's monotonic time.
Transactions are serialised by a lock, so the reader may be shared between threads.

Errors (all name the device and its port, never card data):

- :class:`hallkiosk.errors.DeviceTimeout`: no whole reply in time (silence, a torn reply).
- :class:`ReaderRefused` (a ``DeviceRefused``): the SAM answered with a failure SW3;
  ``.sw3`` holds the code.
- :class:`ReaderGarbled` (a ``DeviceError`` and a ``ProtocolError``): a reply arrived but is corrupt (bad
  checksum) or does not fit the command sent.
- :class:`hallkiosk.errors.DeviceGone`: the port raised ``SerialException``, ``OSError``
  or ``termios.error`` (unplugged), or the reader was closed; the caller reopens the
  port and calls ``init()``.

Each failure leaves the reader ready for the next transaction: nothing of a failed
exchange is carried over.
"""

from __future__ import annotations

import logging
import threading

import serial

from edge.clock import SYSTEM_CLOCK, Clock
from edge.idcard.card import TEXT_BLOCK_LEN, CardData, parse_new_address
from edge.idcard.protocol import (
    ChecksumError,
    Command,
    FrameDecoder,
    ResponseFrame,
    Sw3,
    describe_sw3,
    encode_command,
)
from hallkiosk.errors import (
    DeviceError,
    DeviceGone,
    DeviceRefused,
    DeviceTimeout,
    ProtocolError,
)

log = logging.getLogger(__name__)

try:
    import termios
except ImportError:  # not POSIX: pyserial's other backends raise SerialException/OSError
    _PORT_ERRORS: tuple[type[BaseException], ...] = (serial.SerialException, OSError)
else:
    # pyserial's reset_input_buffer() calls termios.tcflush() unwrapped, and on an
    # unplugged adapter or pty that raises termios.error, which is not an OSError.
    _PORT_ERRORS = (serial.SerialException, OSError, termios.error)

_MAX_CHUNK = 4096
"""Largest single ``port.read``; a 30 01 reply (1295 bytes on the wire) fits in one."""


class ReaderRefused(DeviceRefused):
    """The SAM answered with a failure result code; ``sw3`` holds it (see ``Sw3``)."""

    def __init__(self, message: str, sw3: int) -> None:
        super().__init__(message)
        self.sw3 = sw3


class ReaderGarbled(DeviceError, ProtocolError):
    """A reply arrived but is corrupt or does not fit the command that was sent.

    Both a device fault and a protocol error, so callers that treat either family as
    "retry on the next poll" catch it.
    """


def _port_label(port: object) -> str:
    for attr in ("port", "name"):
        value = getattr(port, attr, None)
        if value:
            return str(value)
    return "an unnamed port"


class IdCardReader:
    """A GA 467 reader on an already-open serial port.

    ``timeout_s`` bounds each transaction (seconds, monotonic time of ``clock``); the
    port's own read timeout only sets how often the deadline is checked, and must be
    finite and positive.
    """

    def __init__(self, port, *, name: str = "idcard-reader", timeout_s: float = 1.0,
                 clock: Clock = SYSTEM_CLOCK) -> None:
        port_timeout = getattr(port, "timeout", 0.05)
        if port_timeout is None or port_timeout <= 0:
            # None blocks forever on a silent reader; 0 would make the read loop spin.
            raise ValueError(f"{name}: the port needs a finite, positive read timeout, "
                             f"got {port_timeout!r}")
        if timeout_s <= 0:
            raise ValueError(f"{name}: timeout_s must be positive, got {timeout_s}")
        self.port = port
        self.name = name
        self.timeout_s = timeout_s
        self._clock = clock
        self._decoder = FrameDecoder("response")
        self._lock = threading.Lock()
        self._closed = False

    @property
    def where(self) -> str:
        """``"idcard-reader on /dev/serial/by-id/..."``, for messages."""
        return f"{self.name} on {_port_label(self.port)}"

    def __repr__(self) -> str:
        return f"<IdCardReader {self.where}{' closed' if self._closed else ''}>"

    # -- lifecycle -------------------------------------------------------------------
    def close(self) -> None:
        """Stop using the port. The port belongs to the caller and stays open."""
        with self._lock:
            self._closed = True
            self._decoder.reset()

    def __enter__(self) -> IdCardReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- commands --------------------------------------------------------------------
    def init(self) -> None:
        """Check the SAM (``11 FF``); on failure reset it (``10 FF``) and check again.

        A vanished port is not retried. Raises what the second check raised.
        """
        try:
            self._expect_ok(Command.STATUS, "status")
            return
        except DeviceGone:
            raise
        except DeviceError as first:
            log.warning("%s: SAM status failed (%s); resetting the SAM", self.where, first)
        self._expect_ok(Command.RESET, "reset")
        self._expect_ok(Command.STATUS, "status after reset")

    def sam_id(self) -> bytes:
        """The SAM's identity bytes (``12 FF``), e.g. for the kiosk's inventory."""
        return self._expect_ok(Command.SAM_ID, "SAM id").data

    def find(self) -> bool:
        """True when a card is in the field (SW3 9F), False when none (80)."""
        reply = self.transact(Command.FIND)
        if reply.sw3 == Sw3.CARD_FOUND:
            return True
        if reply.sw3 == Sw3.FIND_FAILED:
            return False
        raise self._refused("find card", reply.sw3)

    def select(self) -> None:
        """Select the card found by :meth:`find` (90); 81 and others raise ReaderRefused."""
        self._expect_ok(Command.SELECT, "select card")

    def read_text(self) -> CardData:
        """Read text and photo (``30 01``); return the text, discard the photo.

        Reply data: text length (2, BE), photo length (2, BE), text, photo (PROTOCOLS.md).
        """
        reply = self._expect_ok(Command.READ_TEXT_PHOTO, "read card")
        data = reply.data
        if len(data) < 4:
            raise ReaderGarbled(
                f"{self.where}: read reply of {len(data)} bytes has no length fields")
        text_len = int.from_bytes(data[0:2], "big")
        photo_len = int.from_bytes(data[2:4], "big")
        if text_len != TEXT_BLOCK_LEN or len(data) < 4 + text_len + photo_len:
            raise ReaderGarbled(
                f"{self.where}: read reply announces text {text_len} B and photo {photo_len} B "
                f"but carries {len(data) - 4} B")
        return CardData(memoryview(data)[4:4 + text_len])

    def read_new_address(self) -> str | None:
        """The card's newer address (``30 03``), or None when the field is empty (91)."""
        reply = self.transact(Command.READ_ADDRESS)
        if reply.sw3 == Sw3.FIELD_EMPTY:
            return None
        if reply.sw3 != Sw3.OK:
            raise self._refused("read new address", reply.sw3)
        try:
            return parse_new_address(reply.data)
        except ValueError:
            raise ReaderGarbled(f"{self.where}: new-address reply is malformed") from None

    def read_card(self) -> CardData | None:
        """Find, select and read in one go; None when no card is in the field.

        A failed select or read raises :class:`ReaderRefused`; PROTOCOLS.md says the card
        must then be presented again.
        """
        if not self.find():
            return None
        self.select()
        return self.read_text()

    # -- transactions ----------------------------------------------------------------
    def _refused(self, what: str, sw3: int) -> ReaderRefused:
        return ReaderRefused(f"{self.where}: {what} refused, SW3 {describe_sw3(sw3)}", sw3)

    def _expect_ok(self, command: Command, what: str) -> ResponseFrame:
        reply = self.transact(command)
        if reply.sw3 != Sw3.OK:
            raise self._refused(what, reply.sw3)
        return reply

    def transact(self, command: tuple[int, int], data: bytes = b"") -> ResponseFrame:
        """Send ``(cmd, param)`` and return the SAM's reply frame, whatever its SW3."""
        cmd, param = command
        frame = encode_command(cmd, param, data)
        with self._lock:
            if self._closed:
                raise DeviceGone(f"{self.where}: the reader was closed")
            self._decoder.reset()
            try:
                # The SAM speaks only when spoken to, so whatever is waiting now is the
                # tail of an earlier exchange (a torn or late reply), never our answer.
                self.port.reset_input_buffer()
                self.port.write(frame)
            except serial.SerialTimeoutException as exc:
                raise DeviceTimeout(f"{self.where}: write timed out") from exc
            except _PORT_ERRORS as exc:
                raise DeviceGone(f"{self.where}: port failed on write ({exc})") from exc
            try:
                reply = self._read_reply(cmd, param)
            finally:
                self._decoder.reset()
        log.debug("%s: %02X %02X -> SW3 %02X, %d data bytes", self.where, cmd, param,
                  reply.sw3, len(reply.data))
        return reply

    def _read_reply(self, cmd: int, param: int) -> ResponseFrame:
        deadline = self._clock.monotonic() + self.timeout_s
        problem = None
        while self._clock.monotonic() < deadline:
            try:
                waiting = getattr(self.port, "in_waiting", 0)
                chunk = self.port.read(max(1, min(waiting, _MAX_CHUNK)))
            except _PORT_ERRORS as exc:
                raise DeviceGone(f"{self.where}: port failed on read ({exc})") from exc
            if not chunk:
                continue  # the port's own timeout elapsed; check the deadline again
            frames = self._decoder.feed(chunk)
            errors = self._decoder.pop_errors()
            if frames:
                return frames[0]
            for error in errors:
                if isinstance(error, ChecksumError):
                    # A whole reply arrived and it is corrupt; the SAM sends no other.
                    raise ReaderGarbled(f"{self.where}: reply to {cmd:02X} {param:02X} "
                                        f"is corrupt ({error})") from error
                problem = error
        detail = f"; last problem: {problem}" if problem is not None else ""
        raise DeviceTimeout(f"{self.where}: no reply to {cmd:02X} {param:02X} "
                            f"within {self.timeout_s:g} s{detail}")
