"""ESC/POS, the ticket printer's language: builder, ticket layout and status.

Pure code: bytes in, values out, no I/O. The driver (edge.printer.printer) uses the builder
and the status decoders; the emulator (emulator.printer) uses the status encoders and the
printer-side parser (edge.printer.parser), so both sides of the wire share one reading of
the bytes.

Byte layouts follow Epson's ESC/POS command reference as summarised in
PROTOCOLS.md, "ESC/POS ticket printers":

- ``1B 40`` init, ``1B 61 n`` align, ``1B 45 n`` bold, ``1D 21 n`` character size (high
  nibble width-1, low nibble height-1), ``1B 64 n`` print and feed n lines, ``1B 74 n``
  code page, ``1D 56 m`` cut.
- QR: ``1D 28 6B pL pH 31 fn ...`` where pL + 256*pH counts the bytes after pH.
- ``10 04 n`` real-time status: one byte back, bits 1 and 4 set, bits 0 and 7 clear.
- ``1D 61 n`` automatic status back (ASB): the printer pushes 4 bytes whenever a watched
  status changes. The first byte has bits 0 and 1 clear and bit 4 set; the other three have
  bits 4 and 7 clear. A real-time answer always has bit 1 set, so the two never collide.
"""

from __future__ import annotations

import codecs
import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Union

from hallkiosk.errors import ProtocolError

ESC = 0x1B
GS = 0x1D
DLE = 0x10
LF = 0x0A
CR = 0x0D
EOT = 0x04

#: Columns of one line at normal size (80 mm paper, Font A, 512 of 576 dots).
LINE_COLUMNS = 42

#: QR model 2 holds at most 7089 data bytes (numeric mode); ``GS ( k`` store adds 3 bytes
#: (cn fn m) to its length. A longer ``GS ( k`` is never buffered (see EscPosParser).
MAX_QR_STORE = 7089
MAX_GS_K_LENGTH = MAX_QR_STORE + 3

#: The parser never holds more than this many unconsumed bytes between two feed() calls.
MAX_BUFFERED = 5 + MAX_GS_K_LENGTH

#: Epson code page numbers for ``ESC t n`` and the Python codec that matches each.
CODE_PAGES: dict[str, int] = {
    "cp437": 0, "cp850": 2, "cp860": 3, "cp863": 4, "cp865": 5,
    "cp1252": 16, "cp866": 17, "cp852": 18, "cp858": 19,
}

QR_ERROR_LEVELS = "LMQH"     # fn 45 parameter 0x30 + index


class Alignment(enum.IntEnum):
    LEFT = 0
    CENTER = 1
    RIGHT = 2


def codec_name(encoding: str) -> str:
    """Python's canonical name of a text encoding (ValueError when it has none)."""
    try:
        return codecs.lookup(encoding).name
    except LookupError:
        raise ValueError(f"unknown text encoding {encoding!r}") from None


# -- builder ---------------------------------------------------------------------------
class EscPos:
    """Accumulates ESC/POS commands; ``to_bytes()`` returns them. Methods chain.

    Text is encoded with ``encoding`` (a single-byte code page the printer knows, default
    cp437); characters it cannot encode, and control characters (which would otherwise
    smuggle commands into the stream), print as ``?``.
    """

    __slots__ = ("encoding", "_out")

    def __init__(self, encoding: str = "cp437") -> None:
        self.encoding = codec_name(encoding)
        self._out = bytearray()

    def to_bytes(self) -> bytes:
        return bytes(self._out)

    def raw(self, data: bytes) -> EscPos:
        self._out += data
        return self

    def init(self) -> EscPos:
        """``ESC @``: clear the print buffer and reset modes to power-on defaults."""
        return self.raw(b"\x1b@")

    def code_page(self) -> EscPos:
        """``ESC t n`` for this builder's encoding (ValueError if the printer has no match)."""
        page = CODE_PAGES.get(self.encoding)
        if page is None:
            raise ValueError(f"no ESC/POS code page for encoding {self.encoding!r}")
        return self.raw(bytes((ESC, 0x74, page)))

    def align(self, alignment: Alignment) -> EscPos:
        return self.raw(bytes((ESC, 0x61, Alignment(alignment))))

    def bold(self, on: bool = True) -> EscPos:
        return self.raw(bytes((ESC, 0x45, 1 if on else 0)))

    def size(self, width: int, height: int) -> EscPos:
        """``GS ! n``: character magnification, 1 to 8 in each direction."""
        if not (1 <= width <= 8 and 1 <= height <= 8):
            raise ValueError(f"character size must be 1..8 x 1..8, not {width}x{height}")
        return self.raw(bytes((GS, 0x21, (width - 1) << 4 | (height - 1))))

    def text(self, s: str) -> EscPos:
        clean = "".join("?" if ord(ch) < 0x20 or ord(ch) == 0x7F else ch for ch in s)
        return self.raw(clean.encode(self.encoding, errors="replace"))

    def line(self, s: str = "") -> EscPos:
        """Text then LF (print the line buffer and feed one line)."""
        return self.text(s).raw(b"\n")

    def feed(self, lines: int = 1) -> EscPos:
        """``ESC d n``: print the line buffer and feed ``lines`` lines (0..255)."""
        if not 0 <= lines <= 255:
            raise ValueError(f"feed must be 0..255 lines, not {lines}")
        return self.raw(bytes((ESC, 0x64, lines)))

    def qr(self, data: str | bytes, *, module_size: int = 6, error: str = "M") -> EscPos:
        """A model 2 QR code: select model, module size (dots), error level, store, print.

        ``str`` data is stored as UTF-8. The symbol prints at the current alignment.
        """
        payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
        if not payload:
            raise ValueError("QR data must not be empty")
        if len(payload) > MAX_QR_STORE:
            raise ValueError(f"QR data is {len(payload)} bytes, the printer stores at most {MAX_QR_STORE}")
        if not 1 <= module_size <= 16:
            raise ValueError(f"QR module size must be 1..16 dots, not {module_size}")
        if error not in QR_ERROR_LEVELS or len(error) != 1:
            raise ValueError(f"QR error level must be one of L, M, Q, H, not {error!r}")
        store_len = len(payload) + 3          # cn fn m + data
        self.raw(b"\x1d(k\x04\x00\x31\x41\x32\x00")                          # fn 65: model 2
        self.raw(bytes((GS, 0x28, 0x6B, 3, 0, 0x31, 0x43, module_size)))      # fn 67: module
        self.raw(bytes((GS, 0x28, 0x6B, 3, 0, 0x31, 0x45, 0x30 + QR_ERROR_LEVELS.index(error))))
        self.raw(bytes((GS, 0x28, 0x6B, store_len & 0xFF, store_len >> 8, 0x31, 0x50, 0x30)))
        self.raw(payload)                                                     # fn 80: store
        return self.raw(b"\x1d(k\x03\x00\x31\x51\x30")                       # fn 81: print

    def cut(self, *, partial: bool = True) -> EscPos:
        """``GS V 1`` partial cut (one tab left, the ticket does not fall) or ``GS V 0`` full."""
        return self.raw(bytes((GS, 0x56, 1 if partial else 0)))


def status_query(n: int) -> bytes:
    """``DLE EOT n``: ask for real-time status n (1 printer, 2 offline cause, 3 error cause,
    4 paper sensor). The printer answers one byte even while offline."""
    if n not in (1, 2, 3, 4):
        raise ValueError(f"real-time status n must be 1..4, not {n}")
    return bytes((DLE, EOT, n))


#: ``GS a n`` bits: 1 online/offline, 2 error, 3 paper sensor (bit 0, the drawer, unused).
ASB_DEFAULT_MASK = 0x0E


def asb_enable(mask: int = ASB_DEFAULT_MASK) -> bytes:
    """``GS a n``: enable automatic status back for the statuses in ``mask`` (0 disables)."""
    if not 0 <= mask <= 0xFF:
        raise ValueError(f"ASB mask must be one byte, not {mask}")
    return bytes((GS, 0x61, mask))


# -- the ticket ------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class TicketLayout:
    """What one queue ticket shows. All strings are already formatted by the caller.

    ``qr_data`` is kept out of repr(): it identifies the ticket and has no place in logs.
    """

    hall_name: str
    service_name: str
    ticket_number: str        # display string, e.g. "A-07-0123"
    issued_at: str            # e.g. "2026-11-12 09:41"
    waiting_ahead: int
    qr_data: str = field(repr=False)
    notice: str | None = None  # e.g. "clock not synchronised", "Appointment"

    def __post_init__(self) -> None:
        for name in ("hall_name", "service_name", "ticket_number", "issued_at", "qr_data"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"TicketLayout.{name} must be a non-empty string")
        if self.notice is not None and not isinstance(self.notice, str):
            raise ValueError("TicketLayout.notice must be a string or None")
        if isinstance(self.waiting_ahead, bool) or not isinstance(self.waiting_ahead, int) \
                or self.waiting_ahead < 0:
            raise ValueError("TicketLayout.waiting_ahead must be an int >= 0")


def waiting_line(n: int) -> str:
    return "1 person waiting ahead" if n == 1 else f"{n} people waiting ahead"


def ticket_number_size(number: str) -> int:
    """Magnification for the ticket number: 4x4 when it fits on one line, else smaller."""
    for mag in (4, 3, 2):
        if len(number) * mag <= LINE_COLUMNS:
            return mag
    return 1


#: QR symbols are kept within 512 of the 576 printable dots so they never clip.
_QR_MAX_DOTS = 512
_QR_MAX_MODULE = 6


#: Data codewords of a model 2 symbol at error correction level M, versions 1-40 (ISO/IEC
#: 18004:2015, table 7). With the bit counts below this is all a printer's own encoder needs
#: to pick the smallest version; the agent computes the size itself instead of importing a
#: QR encoder (segno and what it imports cost about 0.4 MB resident).
_QR_M_CODEWORDS = (
    16, 28, 44, 64, 86, 108, 124, 154, 182, 216, 254, 290, 334, 365, 415, 453, 507, 563, 627,
    669, 714, 782, 860, 914, 1000, 1062, 1128, 1193, 1267, 1373, 1455, 1541, 1631, 1725, 1812,
    1914, 1992, 2102, 2216, 2334)
_QR_ALNUM = frozenset(b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ $%*+-./:")
_QR_DIGITS = frozenset(b"0123456789")


def _qr_data_bits(data: bytes, version: int) -> int:
    """Bits of ``data`` as ONE segment in the densest mode that can hold all of it (numeric,
    alphanumeric or byte): mode indicator, character count, data."""
    band = 0 if version <= 9 else 1 if version <= 26 else 2
    n = len(data)
    if n and _QR_DIGITS.issuperset(data):
        return 4 + (10, 12, 14)[band] + 10 * (n // 3) + (0, 4, 7)[n % 3]
    if n and _QR_ALNUM.issuperset(data):
        return 4 + (9, 11, 13)[band] + 11 * (n // 2) + 6 * (n % 2)
    return 4 + (8, 16, 16)[band] + 8 * n


def qr_version(data: bytes) -> int:
    """The smallest model 2 version (1-40) that holds ``data`` at level M in one segment;
    ValueError when none does."""
    for version, codewords in enumerate(_QR_M_CODEWORDS, start=1):
        if _qr_data_bits(data, version) <= 8 * codewords:
            return version
    raise ValueError(f"QR data of {len(data)} bytes does not fit a level M symbol")


def qr_module_size(data: bytes) -> int:
    """Largest module size (dots, at most 6) at which a model 2, level M symbol fits."""
    modules = 17 + 4 * qr_version(data)
    return max(1, min(_QR_MAX_MODULE, _QR_MAX_DOTS // modules))


def render_ticket(layout: TicketLayout, *, encoding: str = "cp437") -> bytes:
    """The whole ticket as one ESC/POS job, ending in a partial cut."""
    qr_payload = layout.qr_data.encode("utf-8")
    mag = ticket_number_size(layout.ticket_number)
    b = EscPos(encoding)
    b.init()
    if b.encoding in CODE_PAGES:
        b.code_page()
    b.align(Alignment.CENTER)
    b.bold(True).line(layout.hall_name).bold(False)
    b.line(layout.service_name)
    b.line()
    b.size(mag, mag).line(layout.ticket_number).size(1, 1)
    b.line()
    b.line(layout.issued_at)
    b.line(waiting_line(layout.waiting_ahead))
    if layout.notice:
        b.bold(True).line(layout.notice).bold(False)
    b.line()
    b.qr(qr_payload, module_size=qr_module_size(qr_payload), error="M")
    b.feed(4)        # the cutter sits a few lines above the print head
    b.cut(partial=True)
    return b.to_bytes()


# -- real-time status --------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class PrinterStatus:
    """What the printer said about itself, merged from DLE EOT 1..4 answers (or one ASB block).

    ``answered`` lists which status bytes contributed; a flag whose byte was not asked keeps
    its default ("not seen"). ``ok_to_print`` needs the printer to have *said* it is online:
    an empty status is never healthy.
    """

    online: bool = True                 # n=1 bit 3 clear
    cover_open: bool = False            # n=2 bit 2
    feed_button: bool = False           # n=2 bit 3: paper being fed by the button
    stopped_by_paper_end: bool = False  # n=2 bit 5
    error: bool = False                 # n=2 bit 6
    mechanical_error: bool = False      # n=3 bit 2
    cutter_error: bool = False          # n=3 bit 3
    unrecoverable: bool = False         # n=3 bit 5
    auto_recoverable: bool = False      # n=3 bit 6
    paper_near_end: bool = False        # n=4 bits 2+3
    paper_out: bool = False             # n=4 bits 5+6
    answered: frozenset[int] = frozenset()

    @property
    def faults(self) -> tuple[str, ...]:
        """Conditions that stop printing, as short names (empty when none was reported)."""
        names = []
        if not self.online:
            names.append("offline")
        if self.cover_open:
            names.append("cover_open")
        if self.paper_out or self.stopped_by_paper_end:
            names.append("paper_out")
        if self.cutter_error:
            names.append("cutter_error")
        if self.mechanical_error:
            names.append("mechanical_error")
        if self.unrecoverable:
            names.append("unrecoverable_error")
        if self.auto_recoverable:
            names.append("auto_recoverable_error")
        if self.error and not (self.cutter_error or self.mechanical_error
                               or self.unrecoverable or self.auto_recoverable):
            names.append("error")
        return tuple(names)

    @property
    def warnings(self) -> tuple[str, ...]:
        """Conditions that still print but need staff soon."""
        return ("paper_near_end",) if self.paper_near_end and not self.paper_out else ()

    @property
    def ok_to_print(self) -> bool:
        return 1 in self.answered and not self.faults


def _check_fixed_bits(n: int, byte: int) -> None:
    if not isinstance(byte, int) or not 0 <= byte <= 0xFF:
        raise ProtocolError(f"status answer must be one byte, not {byte!r}")
    if byte & 0x93 != 0x12:
        raise ProtocolError(f"status byte 0x{byte:02X} for n={n} breaks the fixed bits "
                            "(bits 1 and 4 set, 0 and 7 clear)")


def decode_status(n: int, byte: int, base: PrinterStatus | None = None) -> PrinterStatus:
    """Merge the answer ``byte`` to ``DLE EOT n`` into ``base`` (replacing that n's flags).

    ValueError for n outside 1..4 (a caller mistake); ProtocolError for a byte that breaks
    the fixed bits (wrong baud rate, or not an ESC/POS printer).
    """
    if n not in (1, 2, 3, 4):
        raise ValueError(f"real-time status n must be 1..4, not {n}")
    _check_fixed_bits(n, byte)
    base = base or PrinterStatus()
    answered = base.answered | {n}
    if n == 1:
        return dataclasses.replace(base, online=not byte & 0x08, answered=answered)
    if n == 2:
        return dataclasses.replace(base, cover_open=bool(byte & 0x04), feed_button=bool(byte & 0x08),
                                   stopped_by_paper_end=bool(byte & 0x20), error=bool(byte & 0x40),
                                   answered=answered)
    if n == 3:
        return dataclasses.replace(base, mechanical_error=bool(byte & 0x04),
                                   cutter_error=bool(byte & 0x08), unrecoverable=bool(byte & 0x20),
                                   auto_recoverable=bool(byte & 0x40), answered=answered)
    return dataclasses.replace(base, paper_near_end=bool(byte & 0x0C), paper_out=bool(byte & 0x60),
                               answered=answered)


def encode_status(n: int, status: PrinterStatus) -> int:
    """The byte a printer in ``status`` answers to ``DLE EOT n`` (for the emulator)."""
    byte = 0x12
    if n == 1:
        byte |= 0 if status.online else 0x08
    elif n == 2:
        byte |= (0x04 * status.cover_open | 0x08 * status.feed_button
                 | 0x20 * status.stopped_by_paper_end | 0x40 * status.error)
    elif n == 3:
        byte |= (0x04 * status.mechanical_error | 0x08 * status.cutter_error
                 | 0x20 * status.unrecoverable | 0x40 * status.auto_recoverable)
    elif n == 4:
        byte |= 0x0C * status.paper_near_end | 0x60 * status.paper_out
    else:
        raise ValueError(f"real-time status n must be 1..4, not {n}")
    return byte


# -- automatic status back ---------------------------------------------------------------
ASB_LENGTH = 4


def is_asb_first_byte(b: int) -> bool:
    """Bits 0 and 1 clear, bit 4 set, bit 7 clear: the start of a 4-byte ASB block."""
    return b & 0x93 == 0x10


def is_asb_trailing_byte(b: int) -> bool:
    """Bytes 2..4 of an ASB block have bits 4 and 7 clear."""
    return b & 0x90 == 0


def is_status_answer(b: int) -> bool:
    """A real-time answer: bits 1 and 4 set, bits 0 and 7 clear."""
    return b & 0x93 == 0x12


def decode_asb(block: bytes) -> PrinterStatus:
    """One ASB block (Epson ``GS a`` layout) as a full status.

    Byte 1: bit 3 offline, bit 5 cover open, bit 6 feed button. Byte 2: bit 2 mechanical
    error, bit 3 cutter error, bit 5 unrecoverable, bit 6 auto-recoverable. Byte 3: bits 0+1
    paper near end, bits 2+3 paper end. Byte 4: nothing used here.
    """
    if len(block) != ASB_LENGTH or not is_asb_first_byte(block[0]) \
            or not all(is_asb_trailing_byte(b) for b in block[1:]):
        raise ProtocolError(f"not an ASB block: {bytes(block).hex(' ')}")
    b1, b2, b3 = block[0], block[1], block[2]
    errors = b2 & 0x6C
    return PrinterStatus(
        online=not b1 & 0x08, cover_open=bool(b1 & 0x20), feed_button=bool(b1 & 0x40),
        error=bool(errors), mechanical_error=bool(b2 & 0x04), cutter_error=bool(b2 & 0x08),
        unrecoverable=bool(b2 & 0x20), auto_recoverable=bool(b2 & 0x40),
        paper_near_end=bool(b3 & 0x03), paper_out=bool(b3 & 0x0C),
        answered=frozenset((1, 2, 3, 4)))


def encode_asb(status: PrinterStatus) -> bytes:
    """The ASB block a printer in ``status`` pushes (for the emulator)."""
    b1 = 0x10 | (0 if status.online else 0x08) | 0x20 * status.cover_open | 0x40 * status.feed_button
    b2 = (0x04 * status.mechanical_error | 0x08 * status.cutter_error
          | 0x20 * status.unrecoverable | 0x40 * status.auto_recoverable)
    b3 = 0x03 * status.paper_near_end | 0x0C * (status.paper_out or status.stopped_by_paper_end)
    return bytes((b1, b2, b3, 0))


@dataclass(frozen=True, slots=True)
class AsbBlock:
    raw: bytes

    @property
    def status(self) -> PrinterStatus:
        return decode_asb(self.raw)


@dataclass(frozen=True, slots=True)
class StatusAnswer:
    value: int


@dataclass(frozen=True, slots=True)
class StrayByte:
    """A byte that is neither a status answer nor part of an ASB block (line noise, an
    ASB block cut short, an XON/XOFF)."""

    value: int


Inbound = Union[AsbBlock, StatusAnswer, StrayByte]


class InboundSplitter:
    """Splits the printer-to-host stream into ASB blocks, real-time answers and strays.

    Rule (from the fixed bits): a byte with bits 0,1 clear and bit 4 set opens a 4-byte
    ASB block; a byte with bit 1 and bit 4 set (0 and 7 clear) is a real-time answer. A
    partial block survives between feed() calls (at most 3 bytes are held). If a byte
    that cannot continue a block arrives, the partial block is dropped as strays and the
    byte is classified afresh, so a truncated block never swallows an answer.
    """

    __slots__ = ("_partial",)

    def __init__(self) -> None:
        self._partial = bytearray()

    def feed(self, data: bytes) -> list[Inbound]:
        out: list[Inbound] = []
        for b in data:
            if self._partial:
                if is_asb_trailing_byte(b):
                    self._partial.append(b)
                    if len(self._partial) == ASB_LENGTH:
                        out.append(AsbBlock(bytes(self._partial)))
                        self._partial.clear()
                    continue
                out.extend(StrayByte(x) for x in self._partial)
                self._partial.clear()
            if is_asb_first_byte(b):
                self._partial.append(b)
            elif is_status_answer(b):
                out.append(StatusAnswer(b))
            else:
                out.append(StrayByte(b))
        return out

    def reset(self) -> None:
        self._partial.clear()
