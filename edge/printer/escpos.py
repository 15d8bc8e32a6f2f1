"""ESC/POS, the ticket printer's language: builder, ticket layout, status and a stream parser.

Pure code: bytes in, values out, no I/O. The driver (edge.printer.printer) uses the builder
and the status decoders; the emulator (emulator.printer) uses the parser and the status
encoders, so both sides of the wire share one reading of the bytes.

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
_CODECS_BY_PAGE = {n: name for name, n in CODE_PAGES.items()}

QR_ERROR_LEVELS = "LMQH"     # fn 45 parameter 0x30 + index


class Alignment(enum.IntEnum):
    LEFT = 0
    CENTER = 1
    RIGHT = 2


def _codec_name(encoding: str) -> str:
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
        self.encoding = _codec_name(encoding)
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


def qr_module_size(data: bytes) -> int:
    """Largest module size (dots, at most 6) at which a model 2, level M symbol fits."""
    import segno   # pure Python; imported here so status/parser users do not pay for it

    try:
        # Only the symbol's size is wanted: a fixed mask skips the search for the best one
        # (most of the encoding time) and does not change the size.
        symbol = segno.make(data, error="m", micro=False, boost_error=False, mask=0)
    except segno.DataOverflowError as exc:
        raise ValueError(f"QR data of {len(data)} bytes does not fit a level M symbol") from exc
    modules = symbol.symbol_size(border=0)[0]
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


# -- the printer-side parser ---------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Style:
    width: int = 1
    height: int = 1
    align: Alignment = Alignment.LEFT
    bold: bool = False


@dataclass(frozen=True, slots=True)
class Text:
    """Printable characters (decoded with the current code page) in the current style."""

    text: str
    style: Style


@dataclass(frozen=True, slots=True)
class Feed:
    """Print the line buffer, then feed: LF is Feed(1), ``ESC d n`` is Feed(n)."""

    lines: int


@dataclass(frozen=True, slots=True)
class Init:
    pass


@dataclass(frozen=True, slots=True)
class SetSize:
    width: int
    height: int


@dataclass(frozen=True, slots=True)
class Align:
    alignment: Alignment


@dataclass(frozen=True, slots=True)
class Bold:
    on: bool


@dataclass(frozen=True, slots=True)
class CodePage:
    page: int


@dataclass(frozen=True, slots=True)
class QrModel:
    model: int             # 1, 2, or 3 for micro QR


@dataclass(frozen=True, slots=True)
class QrModuleSize:
    dots: int


@dataclass(frozen=True, slots=True)
class QrErrorLevel:
    level: str             # "L", "M", "Q" or "H"


@dataclass(frozen=True, slots=True)
class QrStore:
    data: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class QrPrint:
    pass


@dataclass(frozen=True, slots=True)
class Cut:
    partial: bool
    feed: int = 0          # dots fed before cutting (GS V 65/66 n); 0 for GS V 0/1


@dataclass(frozen=True, slots=True)
class StatusRequest:
    n: int


@dataclass(frozen=True, slots=True)
class AsbEnable:
    mask: int


@dataclass(frozen=True, slots=True)
class Unknown:
    """Bytes the parser recognised the extent of but does not act on (or a lone control)."""

    data: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class Oversized:
    """A length-prefixed command longer than the parser buffers; its payload is skipped."""

    command: bytes
    length: int


Op = Union[Text, Feed, Init, SetSize, Align, Bold, CodePage, QrModel, QrModuleSize, QrErrorLevel,
           QrStore, QrPrint, Cut, StatusRequest, AsbEnable, Unknown, Oversized]
OP_TYPES = (Text, Feed, Init, SetSize, Align, Bold, CodePage, QrModel, QrModuleSize, QrErrorLevel,
            QrStore, QrPrint, Cut, StatusRequest, AsbEnable, Unknown, Oversized)

# Commands we do not act on but must step over whole, or their parameter bytes would print
# as text: (prefix, second byte) -> number of parameter bytes (Epson ESC/POS reference).
_ESC_FIXED = {0x20: 1, 0x24: 2, 0x25: 1, 0x2D: 1, 0x32: 0, 0x33: 1, 0x3C: 0, 0x3D: 1, 0x3F: 1,
              0x47: 1, 0x4A: 1, 0x4B: 1, 0x4C: 0, 0x4D: 1, 0x52: 1, 0x53: 0, 0x54: 1, 0x55: 1,
              0x56: 1, 0x5C: 2, 0x63: 2, 0x69: 0, 0x6D: 0, 0x70: 3, 0x72: 1, 0x75: 1, 0x76: 0,
              0x7B: 1}
_GS_FIXED = {0x24: 2, 0x2F: 1, 0x3A: 0, 0x42: 1, 0x45: 1, 0x48: 1, 0x49: 1, 0x4C: 2, 0x50: 2,
             0x54: 1, 0x57: 2, 0x5C: 2, 0x5E: 3, 0x62: 1, 0x66: 1, 0x68: 1, 0x72: 1, 0x77: 1,
             0x7C: 1}
_NUL_TERMINATED_MAX = 255


class EscPosParser:
    """Streaming parser of the host-to-printer byte stream.

    ``feed(data)`` returns the ops completed so far; an incomplete command waits for the
    next feed. It never raises on any input and never holds more than ``MAX_BUFFERED``
    bytes between calls: a ``GS ( k`` longer than ``MAX_GS_K_LENGTH`` yields ``Oversized``
    and its payload is counted off, not stored (other long commands, raster images, are
    skipped the same way). Unknown commands become ``Unknown`` ops.

    Real-time commands (``DLE EOT``) are recognised between commands only; inside another
    command's payload they are payload, which is what our driver relies on: it never sends
    a query in the middle of a job.
    """

    def __init__(self, encoding: str = "cp437") -> None:
        self._default_codec = _codec_name(encoding)
        self._codec = self._default_codec
        self._buf = bytearray()
        self._skip = 0
        self.style = Style()

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete command (bounded by MAX_BUFFERED)."""
        return len(self._buf)

    @property
    def skipping(self) -> int:
        """Payload bytes of an oversized command still to be discarded."""
        return self._skip

    def reset(self) -> None:
        self._buf.clear()
        self._skip = 0
        self._codec = self._default_codec
        self.style = Style()

    def feed(self, data: bytes) -> list[Op]:
        out: list[Op] = []
        view = memoryview(bytes(data))
        if self._skip:
            take = min(self._skip, len(view))
            self._skip -= take
            view = view[take:]
        self._buf += view
        buf = self._buf
        i = 0
        while i < len(buf):
            if self._skip:
                take = min(self._skip, len(buf) - i)
                self._skip -= take
                i += take
                continue
            nxt = self._step(buf, i, out)
            if nxt is None:
                break
            i = nxt
        del buf[:i]
        return out

    # Each _step returns the index after the item it consumed, or None if more bytes are
    # needed. Every path consumes at least one byte, so feed() terminates.
    def _step(self, buf: bytearray, i: int, out: list[Op]) -> int | None:
        b = buf[i]
        if b >= 0x20:
            j = i + 1
            end = len(buf)
            while j < end and buf[j] >= 0x20:
                j += 1
            out.append(Text(bytes(buf[i:j]).decode(self._codec, errors="replace"), self.style))
            return j
        if b == LF:
            out.append(Feed(1))
            return i + 1
        if b == CR:
            return i + 1        # ignored, as on Epson serial printers with auto line feed off
        if b == ESC:
            return self._esc(buf, i, out)
        if b == GS:
            return self._gs(buf, i, out)
        if b == DLE:
            return self._dle(buf, i, out)
        out.append(Unknown(bytes((b,))))
        return i + 1

    def _fixed(self, buf: bytearray, i: int, length: int, out: list[Op]) -> int | None:
        if i + length > len(buf):
            return None
        out.append(Unknown(bytes(buf[i:i + length])))
        return i + length

    def _nul_terminated(self, buf: bytearray, i: int, start: int, out: list[Op]) -> int | None:
        end = buf.find(0, start, start + _NUL_TERMINATED_MAX + 1)
        if end >= 0:
            out.append(Unknown(bytes(buf[i:end + 1])))
            return end + 1
        if len(buf) - start <= _NUL_TERMINATED_MAX:
            return None
        out.append(Unknown(bytes(buf[i:start])))   # no terminator: step over the command only
        return start

    def _skip_payload(self, header: bytes, length: int, out: list[Op], end: int) -> int:
        out.append(Unknown(header))
        self._skip = length
        return end

    def _esc(self, buf: bytearray, i: int, out: list[Op]) -> int | None:
        if i + 2 > len(buf):
            return None
        c = buf[i + 1]
        if c == 0x40:
            self.style = Style()
            self._codec = self._default_codec
            out.append(Init())
            return i + 2
        if c == 0x44:                        # ESC D n1..nk NUL: tab positions
            return self._nul_terminated(buf, i, i + 2, out)
        if c == 0x2A:                        # ESC * m nL nH d...: bit image
            if i + 5 > len(buf):
                return None
            m, dots = buf[i + 2], buf[i + 3] | buf[i + 4] << 8
            return self._skip_payload(bytes(buf[i:i + 5]), dots * (3 if m in (32, 33) else 1), out, i + 5)
        if c in _ESC_FIXED:
            return self._fixed(buf, i, 2 + _ESC_FIXED[c], out)
        if c not in (0x61, 0x45, 0x21, 0x64, 0x74):
            out.append(Unknown(bytes(buf[i:i + 2])))
            return i + 2
        if i + 3 > len(buf):
            return None
        n = buf[i + 2]
        if c == 0x61:                        # ESC a n: 0/48 left, 1/49 centre, 2/50 right
            if n in (0, 1, 2, 48, 49, 50):
                alignment = Alignment(n % 48)
                self.style = dataclasses.replace(self.style, align=alignment)
                out.append(Align(alignment))
            else:
                out.append(Unknown(bytes(buf[i:i + 3])))
        elif c == 0x45:                      # ESC E n: bit 0 emphasised
            self.style = dataclasses.replace(self.style, bold=bool(n & 1))
            out.append(Bold(bool(n & 1)))
        elif c == 0x21:                      # ESC ! n: bit 3 bold, bit 4 double height, bit 5 double width
            width, height = 2 if n & 0x20 else 1, 2 if n & 0x10 else 1
            self.style = dataclasses.replace(self.style, bold=bool(n & 0x08), width=width, height=height)
            out.append(Bold(bool(n & 0x08)))
            out.append(SetSize(width, height))
        elif c == 0x64:                      # ESC d n
            out.append(Feed(n))
        else:                                # ESC t n
            codec = _CODECS_BY_PAGE.get(n)
            if codec is not None:
                self._codec = codec
            out.append(CodePage(n))
        return i + 3

    def _gs(self, buf: bytearray, i: int, out: list[Op]) -> int | None:
        if i + 2 > len(buf):
            return None
        c = buf[i + 1]
        if c == 0x28:                        # GS ( x pL pH ...
            if i + 5 > len(buf):
                return None
            letter, length = buf[i + 2], buf[i + 3] | buf[i + 4] << 8
            header = bytes(buf[i:i + 5])
            if letter != 0x6B:
                return self._skip_payload(header, length, out, i + 5)
            if length > MAX_GS_K_LENGTH:
                out.append(Oversized(header, length))
                self._skip = length
                return i + 5
            if i + 5 + length > len(buf):
                return None
            out.append(self._gs_k(bytes(buf[i + 5:i + 5 + length]), header))
            return i + 5 + length
        if c == 0x38:                        # GS 8 L p1..p4 ...: 32-bit length
            if i + 7 > len(buf):
                return None
            length = int.from_bytes(buf[i + 3:i + 7], "little")
            return self._skip_payload(bytes(buf[i:i + 7]), length, out, i + 7)
        if c == 0x76:                        # GS v 0 m xL xH yL yH d...: raster image
            if i + 8 > len(buf):
                return None
            if buf[i + 2] != 0x30:
                out.append(Unknown(bytes(buf[i:i + 3])))
                return i + 3
            xbytes, rows = buf[i + 4] | buf[i + 5] << 8, buf[i + 6] | buf[i + 7] << 8
            return self._skip_payload(bytes(buf[i:i + 8]), xbytes * rows, out, i + 8)
        if c == 0x6B:                        # GS k m ...: 1D barcode
            if i + 3 > len(buf):
                return None
            m = buf[i + 2]
            if m <= 6:
                return self._nul_terminated(buf, i, i + 3, out)
            if 65 <= m <= 79:
                if i + 4 > len(buf):
                    return None
                return self._fixed(buf, i, 4 + buf[i + 3], out)
            out.append(Unknown(bytes(buf[i:i + 3])))
            return i + 3
        if c in _GS_FIXED:
            return self._fixed(buf, i, 2 + _GS_FIXED[c], out)
        if c not in (0x21, 0x56, 0x61):
            out.append(Unknown(bytes(buf[i:i + 2])))
            return i + 2
        if i + 3 > len(buf):
            return None
        n = buf[i + 2]
        if c == 0x21:                        # GS ! n
            width, height = (n >> 4) + 1, (n & 0x0F) + 1
            if width > 8 or height > 8:
                out.append(Unknown(bytes(buf[i:i + 3])))
            else:
                self.style = dataclasses.replace(self.style, width=width, height=height)
                out.append(SetSize(width, height))
            return i + 3
        if c == 0x61:                        # GS a n
            out.append(AsbEnable(n))
            return i + 3
        # GS V m [n]: 0/48 full, 1/49 partial; 65/66 (and 97/98, 103/104) take a feed byte,
        # the even one of each pair is the partial cut.
        if n in (0, 48, 1, 49):
            out.append(Cut(partial=n in (1, 49)))
            return i + 3
        if n in (65, 66, 97, 98, 103, 104):
            if i + 4 > len(buf):
                return None
            out.append(Cut(partial=n % 2 == 0, feed=buf[i + 3]))
            return i + 4
        out.append(Unknown(bytes(buf[i:i + 3])))
        return i + 3

    def _gs_k(self, body: bytes, header: bytes) -> Op:
        """One ``GS ( k`` body (cn fn params). Only QR (cn 0x31) is understood."""
        unknown = Unknown(header + body)
        if len(body) < 3 or body[0] != 0x31:
            return unknown
        fn, p = body[1], body[2:]
        if fn == 0x41 and len(p) == 2 and 49 <= p[0] <= 51:
            return QrModel(p[0] - 48)
        if fn == 0x43 and len(p) == 1 and 1 <= p[0] <= 16:
            return QrModuleSize(p[0])
        if fn == 0x45 and len(p) == 1 and 48 <= p[0] <= 51:
            return QrErrorLevel(QR_ERROR_LEVELS[p[0] - 48])
        if fn == 0x50 and p[0] == 0x30:
            return QrStore(bytes(p[1:]))
        if fn == 0x51 and p == b"\x30":
            return QrPrint()
        return unknown

    def _dle(self, buf: bytearray, i: int, out: list[Op]) -> int | None:
        if i + 2 > len(buf):
            return None
        c = buf[i + 1]
        if c not in (0x04, 0x05, 0x14):
            out.append(Unknown(bytes((DLE,))))   # a lone DLE; the next byte is parsed afresh
            return i + 1
        if i + 3 > len(buf):
            return None
        n = buf[i + 2]
        if c == 0x04:                        # DLE EOT n [a]
            if n in (1, 2, 3, 4):
                out.append(StatusRequest(n))
                return i + 3
            return self._fixed(buf, i, 4 if n in (7, 8) else 3, out)
        if c == 0x05:                        # DLE ENQ n
            return self._fixed(buf, i, 3, out)
        # DLE DC4 fn ...: fn 1 and 2 take two more bytes, 7 one, 8 seven.
        extra = {1: 2, 2: 2, 7: 1, 8: 7}.get(n, 0)
        return self._fixed(buf, i, 3 + extra, out)
