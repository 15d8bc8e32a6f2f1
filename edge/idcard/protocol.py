"""GA 467 framing between a host and an ID-card reader's SAM module. Pure: no I/O.

Wire layout (PROTOCOLS.md, "ID-card reader"; no public copy of the standard exists, three
independent implementations agree)::

    AA AA AA 96 69 | LEN_HI LEN_LO | payload ...            | CHK
    preamble (5)   | length (2, BE) | host->SAM: CMD PARAM [data]
                                    | SAM->host: SW1 SW2 SW3 [data]

``LEN`` counts the bytes after the length field, checksum included. ``CHK`` is the XOR of
every byte from ``LEN_HI`` through the last payload byte. A bare command is therefore
``00 03 CMD PARAM CHK``.

The same code serves both ends of the wire: the driver encodes commands and decodes
responses, the emulator does the opposite (``FrameDecoder(direction="command")``).

Every exception raised here is a :class:`hallkiosk.errors.ProtocolError` (which is also a
``ValueError``), including the ones for caller mistakes such as a parameter above 255.
"""

from __future__ import annotations

import enum
import functools
import operator
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from hallkiosk.errors import ChecksumError, FrameTooLong, ProtocolError

PREAMBLE = b"\xaa\xaa\xaa\x96\x69"
HEADER_LEN = len(PREAMBLE) + 2
"""Preamble plus the 2-byte length field: bytes before the payload."""

MIN_COMMAND_LEN = 3
"""CMD PARAM CHK: the smallest legal length field host -> SAM."""
MIN_RESPONSE_LEN = 4
"""SW1 SW2 SW3 CHK: the smallest legal length field SAM -> host."""

TEXT_BLOCK_LEN = 256
PHOTO_LEN = 1024
FINGERPRINT_LEN = 1024

MAX_RESPONSE_LEN = 2560
"""Bound on a response's length field. The largest reply in use is ``30 10`` (text, photo
and fingerprint): 3 SW + 6 length bytes + 256 + 1024 + 1024 + 1 CHK = 2314; ``30 01``
(text and photo) is 1288. 2560 leaves room for vendor padding and nothing more."""
MAX_COMMAND_LEN = 64
"""Bound on a command's length field: every command we know is 3 bytes long."""

_MAX_ERRORS = 64


def xor_checksum(data: bytes | bytearray | memoryview) -> int:
    """XOR of all bytes (0 for empty input)."""
    return functools.reduce(operator.xor, data, 0)


class Sw3(enum.IntEnum):
    """Result code (third status byte) of every SAM reply, per PROTOCOLS.md."""

    OK = 0x90
    FIELD_EMPTY = 0x91
    CARD_FOUND = 0x9F
    CHECKSUM_ERROR = 0x10
    LENGTH_ERROR = 0x11
    BAD_COMMAND = 0x21
    NO_PRIVILEGE = 0x23
    AUTH_CARD_REJECTED_SAM = 0x31
    AUTH_SAM_REJECTED_CARD = 0x32
    AUTH_VERIFY_FAILED = 0x33
    UNKNOWN_CARD = 0x40
    READ_FAILED = 0x41
    SELF_TEST_FAILED = 0x60
    UNLICENSED = 0x66
    FIND_FAILED = 0x80
    SELECT_FAILED = 0x81

    @property
    def description(self) -> str:
        return _SW3_TEXT[self]


# PROTOCOLS.md groups 31/32/33 as "authentication failures"; the split below is the one
# the public implementations use (card authenticates SAM, SAM authenticates card, then
# the data's own verification).
_SW3_TEXT: dict[Sw3, str] = {
    Sw3.OK: "operation succeeded",
    Sw3.FIELD_EMPTY: "the requested field is empty on this card",
    Sw3.CARD_FOUND: "a card is in the field",
    Sw3.CHECKSUM_ERROR: "the SAM received a frame with a bad checksum",
    Sw3.LENGTH_ERROR: "the SAM received a frame with a bad length",
    Sw3.BAD_COMMAND: "the SAM does not know this command",
    Sw3.NO_PRIVILEGE: "the SAM is not allowed to run this command",
    Sw3.AUTH_CARD_REJECTED_SAM: "authentication failed: the card rejected the SAM",
    Sw3.AUTH_SAM_REJECTED_CARD: "authentication failed: the SAM rejected the card",
    Sw3.AUTH_VERIFY_FAILED: "authentication failed: card data did not verify",
    Sw3.UNKNOWN_CARD: "the card is of an unknown kind",
    Sw3.READ_FAILED: "reading the card failed (present it again)",
    Sw3.SELF_TEST_FAILED: "the SAM failed its self test",
    Sw3.UNLICENSED: "the SAM is not licensed",
    Sw3.FIND_FAILED: "no card in the field",
    Sw3.SELECT_FAILED: "selecting the card failed",
}


def describe_sw3(code: int) -> str:
    """``"0x41 READ_FAILED: reading the card failed ..."``; unknown codes are named as such."""
    try:
        known = Sw3(code)
    except ValueError:
        return f"0x{code:02X} (unknown result code)"
    return f"0x{code:02X} {known.name}: {known.description}"


class Command(tuple, enum.Enum):
    """Host -> SAM commands as ``(cmd, param)`` pairs: ``encode_command(*Command.FIND)``."""

    RESET = (0x10, 0xFF)
    STATUS = (0x11, 0xFF)
    SAM_ID = (0x12, 0xFF)
    FIND = (0x20, 0x01)
    SELECT = (0x20, 0x02)
    READ_TEXT_PHOTO = (0x30, 0x01)
    READ_ADDRESS = (0x30, 0x03)
    SET_BAUD = (0x60, 0x00)
    """``60 nn``: the parameter picks the speed (see :func:`set_baud`); 00 is 115200."""

    @property
    def cmd(self) -> int:
        return self.value[0]

    @property
    def param(self) -> int:
        return self.value[1]


BAUD_CODES: dict[int, int] = {115200: 0x00, 57600: 0x01, 38400: 0x02, 19200: 0x03, 9600: 0x04}
"""Parameter of ``60 nn`` for each line speed (PROTOCOLS.md: 00 = 115200 ... 04 = 9600)."""


def set_baud(baud: int) -> tuple[int, int]:
    """The ``(cmd, param)`` pair that switches the SAM to ``baud`` bit/s."""
    try:
        return (Command.SET_BAUD.cmd, BAUD_CODES[baud])
    except KeyError:
        raise ProtocolError(
            f"GA 467 has no code for {baud} bit/s; known: {sorted(BAUD_CODES)}") from None


def command_name(cmd: int, param: int) -> str:
    """``"FIND"`` for ``(0x20, 0x01)``, ``"60 04"`` style hex for anything else."""
    try:
        return Command((cmd, param)).name
    except ValueError:
        return f"{cmd:02X} {param:02X}"


# -- encoding ------------------------------------------------------------------------
def _check_byte(name: str, value: int) -> None:
    if not isinstance(value, int) or not 0 <= value <= 0xFF:
        raise ProtocolError(f"{name} must be a byte (0..255), got {value!r}")


def _frame(payload: bytes, max_len: int) -> bytes:
    length = len(payload) + 1
    if length > max_len:
        raise FrameTooLong(f"GA 467 frame of {length} bytes exceeds the bound of {max_len}")
    body = length.to_bytes(2, "big") + payload
    return PREAMBLE + body + bytes([xor_checksum(body)])


def encode_command(cmd: int, param: int, data: bytes = b"") -> bytes:
    """Host -> SAM frame. ``encode_command(0x20, 0x01)`` is ``AA AA AA 96 69 00 03 20 01 22``."""
    _check_byte("cmd", cmd)
    _check_byte("param", param)
    return _frame(bytes([cmd, param]) + bytes(data), MAX_COMMAND_LEN)


def encode_response(sw3: int, data: bytes = b"", *, sw1: int = 0, sw2: int = 0) -> bytes:
    """SAM -> host frame (the emulator's side). SW1 SW2 are always ``00 00`` on real SAMs."""
    for name, value in (("sw1", sw1), ("sw2", sw2), ("sw3", sw3)):
        _check_byte(name, value)
    return _frame(bytes([sw1, sw2, sw3]) + bytes(data), MAX_RESPONSE_LEN)


# -- decoded frames ------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ResponseFrame:
    """One SAM -> host frame. ``data`` may hold a citizen's data, so repr shows its size only."""

    sw1: int
    sw2: int
    sw3: int
    data: bytes = field(repr=False)

    @property
    def ok(self) -> bool:
        return self.sw3 == Sw3.OK

    def __repr__(self) -> str:
        return f"ResponseFrame(sw3=0x{self.sw3:02X}, data=<{len(self.data)} bytes>)"


@dataclass(frozen=True, slots=True)
class CommandFrame:
    """One host -> SAM frame."""

    cmd: int
    param: int
    data: bytes = b""

    @property
    def name(self) -> str:
        return command_name(self.cmd, self.param)


Frame = ResponseFrame | CommandFrame


# -- decoding problems (reported, never raised by feed) -------------------------------
class GarbageSkipped(ProtocolError):
    """Bytes outside any frame were dropped. ``count`` says how many."""

    def __init__(self, count: int) -> None:
        super().__init__(f"skipped {count} byte(s) outside any GA 467 frame")
        self.count = count


class LengthError(ProtocolError):
    """A length field shorter than the smallest legal frame."""


class TornFrame(ProtocolError):
    """A frame whose bytes stopped and a new preamble started inside it."""


class FrameDecoder:
    """Streaming GA 467 decoder: bytes in any chunking, whole frames out.

    ``feed(data)`` returns the frames completed by ``data``, in wire order. Problems are
    never raised from ``feed``: each one is recorded as a :class:`ProtocolError` instance
    (:class:`ChecksumError`, :class:`FrameTooLong`, :class:`LengthError`,
    :class:`TornFrame`, :class:`GarbageSkipped`) and handed out by :meth:`pop_errors`,
    oldest first, at most the last 64. Whoever only wants frames can ignore errors; the
    driver inspects them to fail fast on a corrupt reply.

    Resynchronisation: garbage before a preamble is skipped; a bad length field or
    checksum drops that preamble and the search restarts one byte later. A frame still
    waiting for its body is declared torn when a complete, checksum-valid frame starts
    inside it; otherwise a frame whose bytes stopped could hold back every later short
    frame until enough bytes arrive to fill its announced length. The price is that a
    payload which itself contains a whole valid frame, delivered in pieces, would be cut
    there; photo bytes are the only payload where that is conceivable, and the driver
    checks a reply's shape against its command.

    Memory: between calls at most ``HEADER_LEN + max_len`` bytes stay buffered, and a
    large ``data`` is consumed in slices of that size, so the buffer is bounded whatever
    the input.
    """

    def __init__(self, direction: Literal["response", "command"] = "response",
                 max_len: int | None = None) -> None:
        if direction == "response":
            self._min_len, default = MIN_RESPONSE_LEN, MAX_RESPONSE_LEN
        elif direction == "command":
            self._min_len, default = MIN_COMMAND_LEN, MAX_COMMAND_LEN
        else:
            raise ProtocolError(f"direction must be 'response' or 'command', got {direction!r}")
        self.direction = direction
        self.max_len = default if max_len is None else max_len
        if self.max_len < self._min_len or self.max_len > 0xFFFF:
            raise ProtocolError(
                f"max_len must be within {self._min_len}..65535, got {self.max_len}")
        self._buf = bytearray()
        self._errors: deque[ProtocolError] = deque(maxlen=_MAX_ERRORS)
        # Bytes still to skip silently: the rest of a frame already reported as bad, so it
        # is not reported a second time as garbage.
        self._quiet = 0

    @property
    def buffered(self) -> int:
        """Bytes held waiting for the rest of a frame."""
        return len(self._buf)

    @property
    def buffer_bound(self) -> int:
        """The most bytes :attr:`buffered` can ever report between calls."""
        return HEADER_LEN + self.max_len

    def reset(self) -> None:
        """Forget buffered bytes (zeroed first: they may hold card data) and errors."""
        self._buf[:] = bytes(len(self._buf))
        self._buf.clear()
        self._errors.clear()
        self._quiet = 0

    def pop_errors(self) -> list[ProtocolError]:
        """Problems recorded since the last call, oldest first."""
        errors = list(self._errors)
        self._errors.clear()
        return errors

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        out: list[Frame] = []
        view = memoryview(data).cast("B")
        step = self.buffer_bound
        for start in range(0, len(view), step):
            self._buf += view[start:start + step]
            self._parse(out)
        return out

    # -- internals ---------------------------------------------------------------------
    def _report(self, error: ProtocolError) -> None:
        self._errors.append(error)

    def _drop(self, count: int) -> None:
        """Drop ``count`` leading bytes, reporting the ones not already accounted for."""
        if count <= 0:
            return
        silent = min(count, self._quiet)
        self._quiet -= silent
        if count > silent:
            self._report(GarbageSkipped(count - silent))
        del self._buf[:count]

    def _reject(self, error: ProtocolError, skip: int) -> None:
        """Report a bad frame and move one byte past its preamble; the following ``skip``
        bytes belong to it and are dropped without a garbage report."""
        self._report(error)
        del self._buf[:1]
        self._quiet = max(self._quiet, skip)

    def _parse(self, out: list[Frame]) -> None:
        buf = self._buf
        while True:
            start = buf.find(PREAMBLE)
            if start < 0:
                # Keep a tail that may be the first bytes of a preamble still arriving.
                keep = _preamble_prefix_len(buf)
                self._drop(len(buf) - keep)
                return
            self._drop(start)
            if len(buf) < HEADER_LEN:
                return
            length = int.from_bytes(buf[5:7], "big")
            if length < self._min_len:
                self._reject(LengthError(
                    f"GA 467 length field {length} is below the minimum {self._min_len}"),
                    HEADER_LEN - 1)
                continue
            if length > self.max_len:
                self._reject(FrameTooLong(
                    f"GA 467 length field {length} exceeds the bound of {self.max_len}"),
                    HEADER_LEN - 1)
                continue
            total = HEADER_LEN + length
            if len(buf) < total:
                inner = _complete_frame_inside(buf, self._min_len, self.max_len)
                if inner is None:
                    return
                self._report(TornFrame(f"GA 467 frame cut off after {inner} bytes by a new frame"))
                del buf[:inner]
                self._quiet = 0
                continue
            if xor_checksum(memoryview(buf)[5:total - 1]) != buf[total - 1]:
                nxt = buf.find(PREAMBLE, 1, total + len(PREAMBLE) - 1)
                if 0 < nxt:
                    self._report(TornFrame(
                        f"GA 467 frame cut off after {nxt} bytes by a new frame"))
                    del buf[:nxt]
                    self._quiet = 0
                else:
                    self._reject(ChecksumError(
                        f"GA 467 frame of {length} bytes failed its XOR checksum"), total - 1)
                continue
            payload = bytes(buf[HEADER_LEN:total - 1])
            buf[:total] = bytes(total)  # zero before dropping: it may be card data
            del buf[:total]
            self._quiet = 0
            out.append(self._make(payload))

    def _make(self, payload: bytes) -> Frame:
        if self.direction == "response":
            return ResponseFrame(payload[0], payload[1], payload[2], payload[3:])
        return CommandFrame(payload[0], payload[1], payload[2:])


def _preamble_prefix_len(buf: bytearray) -> int:
    """Length of the longest suffix of ``buf`` that is a proper prefix of the preamble."""
    for n in range(min(len(PREAMBLE) - 1, len(buf)), 0, -1):
        if buf.endswith(PREAMBLE[:n]):
            return n
    return 0


def _complete_frame_inside(buf: bytearray, min_len: int, max_len: int) -> int | None:
    """Offset (> 0) of the first complete, checksum-valid frame starting inside ``buf``."""
    pos = 1
    while True:
        k = buf.find(PREAMBLE, pos)
        if k < 0 or k + HEADER_LEN > len(buf):
            return None
        length = int.from_bytes(buf[k + 5:k + 7], "big")
        end = k + HEADER_LEN + length
        if min_len <= length <= max_len and end <= len(buf):
            if xor_checksum(memoryview(buf)[k + 5:end - 1]) == buf[end - 1]:
                return k
        pos = k + 1
