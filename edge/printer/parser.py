"""ESC/POS from the printer's side: a streaming parser of the host-to-printer byte stream.

Pure code, no I/O. The emulated printer (emulator.printer) reads what the agent's driver
writes with it; the agent itself never parses ESC/POS, so this lives apart from
edge.printer.escpos (the builder, the layout and the status codes, which both sides share)
and the agent does not load it (the ops below are two dozen dataclasses, about 0.15 MB
resident).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Union

from edge.printer.escpos import (CODE_PAGES, CR, DLE, ESC, GS, LF, MAX_BUFFERED,
                                 MAX_GS_K_LENGTH, QR_ERROR_LEVELS, Alignment, codec_name)

#: ``ESC t n`` page number -> the Python codec the printer then decodes text with.
_CODECS_BY_PAGE = {n: name for name, n in CODE_PAGES.items()}


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
        self._default_codec = codec_name(encoding)
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
