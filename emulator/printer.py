"""An emulated ESC/POS ticket printer on a pty, keeping every ticket it printed.

The agent's TicketPrinter talks to ``printer.path`` exactly as to a USB printer. The model
parses the stream with the same EscPosParser the project fuzzes, answers ``DLE EOT n`` from
its state, pushes ASB blocks when the host enabled them (``GS a n``), and turns every job
ended by a cut into a PrintedTicket: text lines with their size, alignment and weight, QR
payloads, a plain-text rendering, and (with ``out_dir``) a PNG a person can look at.

Scripting: ``set_paper("ok"|"near_end"|"out")``, ``set_cover_open()``, ``set_offline()``,
``set_error()``, ``set_silent()``. A job that meets a not-ready printer (offline, cover
open, paper out, error) is discarded and counted in ``discarded_jobs``, never printed.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from edge.printer.escpos import LINE_COLUMNS, Alignment, PrinterStatus, encode_asb, encode_status
from edge.printer.parser import (AsbEnable, Cut, EscPosParser, Feed, Init, Oversized, QrErrorLevel,
                                 QrModel, QrModuleSize, QrPrint, QrStore, StatusRequest, Text,
                                 Unknown)
from emulator.pty import PtyDevice

PAPER_DOTS = 576            # 80 mm paper at 203 dpi
MARGIN_DOTS = 16
CHAR_DOTS = 24              # Font A is 12 x 24 dots; a size-1 line is 24 dots high
LINE_PITCH_DOTS = 30        # Epson's default line spacing
PAPER_STATES = ("ok", "near_end", "out")
ERROR_KINDS = ("mechanical", "cutter", "unrecoverable", "auto_recoverable")


@dataclass(frozen=True, slots=True)
class TextRun:
    text: str
    width: int
    height: int
    bold: bool


@dataclass(frozen=True, slots=True)
class PrintedLine:
    """One printed line. ``runs`` is empty for a blank line (fed, nothing printed);
    ``height`` is the magnification the line was fed at."""

    align: Alignment
    runs: tuple[TextRun, ...]
    height: int = 1

    @property
    def text(self) -> str:
        return "".join(run.text for run in self.runs)

    @property
    def width(self) -> int:
        return max((run.width for run in self.runs), default=1)

    @property
    def bold(self) -> bool:
        return bool(self.runs) and all(run.bold for run in self.runs)


@dataclass(frozen=True, slots=True)
class PrintedQr:
    data: str = field(repr=False)
    module_dots: int
    error: str
    align: Alignment
    model: int = 2


@dataclass(frozen=True, slots=True)
class PrintedTicket:
    """One ticket as cut off the roll. ``items`` keeps lines and QR codes in paper order."""

    number: int
    items: tuple[PrintedLine | PrintedQr, ...]
    text: str
    png_path: Path | None

    @property
    def lines(self) -> tuple[PrintedLine, ...]:
        return tuple(item for item in self.items if isinstance(item, PrintedLine))

    @property
    def qr_codes(self) -> list[str]:
        return [item.data for item in self.items if isinstance(item, PrintedQr)]


class EmulatedPrinter(PtyDevice):
    """ESC/POS printer model. ``tickets`` and ``discarded_jobs`` are what it did;
    ``wait_for_tickets(n, timeout_s)`` blocks on a condition until n tickets exist."""

    kind = "ticket-printer"

    def __init__(self, path: str | os.PathLike[str], *, out_dir: Path | None = None,
                 encoding: str = "cp437") -> None:
        # Everything on_bytes touches exists before the pty (and its thread) does.
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.encoding = encoding
        self._cond = threading.Condition(threading.RLock())
        self._tickets: list[PrintedTicket] = []
        # Cut tickets are rendered (text, PNG) on a thread of their own: a real printer
        # answers DLE EOT in real time while it is still printing, so the status request that
        # follows a ticket must not wait for this emulator's PNG. ``tickets`` waits for the
        # renders under way, so a reader never misses a ticket that was already cut.
        self._rendering = 0
        self._render_queue: queue.SimpleQueue[tuple[int, tuple]] = queue.SimpleQueue()
        self._renderer: threading.Thread | None = None
        self._discarded = 0
        self.unknown_commands = 0
        self._paper = "ok"          # physical state: survives a power cycle
        self._cover_open = False
        self._power_on()
        super().__init__(path)

    def _power_on(self) -> None:
        self._parser = EscPosParser(self.encoding)
        self._offline = False
        self._silent = False
        self._error: str | None = None
        self._asb_mask = 0
        self._last_asb: bytes | None = None
        self._reset_job()

    def _reset_job(self) -> None:
        self._items: list[PrintedLine | PrintedQr] = []
        self._runs: list[list] = []          # [text, width, height, bold], merged while equal
        self._line_align = Alignment.LEFT
        self._cols = 0
        self._spoiled = False
        self._reset_qr()

    def _reset_qr(self) -> None:
        # Epson power-on defaults: model 2, 3-dot modules, level L, nothing stored.
        self._qr_model, self._qr_module, self._qr_error = 2, 3, "L"
        self._qr_data: bytes | None = None

    # -- what the printer did --------------------------------------------------------
    @property
    def tickets(self) -> list[PrintedTicket]:
        with self._cond:
            self._cond.wait_for(lambda: self._rendering == 0, timeout=30)
            return list(self._tickets)

    @property
    def discarded_jobs(self) -> int:
        with self._cond:
            return self._discarded

    def wait_for_tickets(self, n: int, timeout_s: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: len(self._tickets) >= n, timeout=timeout_s)

    @property
    def status(self) -> PrinterStatus:
        """The state the printer reports (all four real-time bytes)."""
        with self._cond:
            paper_out = self._paper == "out"
            err = self._error
            return PrinterStatus(
                online=not (self._offline or self._cover_open or paper_out or err),
                cover_open=self._cover_open, stopped_by_paper_end=paper_out, error=err is not None,
                mechanical_error=err == "mechanical", cutter_error=err == "cutter",
                unrecoverable=err == "unrecoverable", auto_recoverable=err == "auto_recoverable",
                paper_near_end=self._paper != "ok", paper_out=paper_out,
                answered=frozenset((1, 2, 3, 4)))

    # -- scripting -------------------------------------------------------------------
    def set_paper(self, state: str) -> None:
        if state not in PAPER_STATES:
            raise ValueError(f"paper state must be one of {PAPER_STATES}, not {state!r}")
        self._change(lambda: setattr(self, "_paper", state))

    def set_cover_open(self, is_open: bool = True) -> None:
        self._change(lambda: setattr(self, "_cover_open", bool(is_open)))

    def set_offline(self, offline: bool = True) -> None:
        self._change(lambda: setattr(self, "_offline", bool(offline)))

    def set_error(self, kind: str | None) -> None:
        """Raise an error of ``kind`` (one of ERROR_KINDS), or clear it with None."""
        if kind is not None and kind not in ERROR_KINDS:
            raise ValueError(f"error kind must be one of {ERROR_KINDS} or None, not {kind!r}")
        self._change(lambda: setattr(self, "_error", kind))

    def set_silent(self, silent: bool = True) -> None:
        """A hung firmware: still swallows data, answers nothing, pushes nothing."""
        with self._cond:
            self._silent = bool(silent)

    def _change(self, mutate) -> None:
        # Pushes are written under the state lock, so blocks leave in the order the
        # states they describe happened (the device thread writes under it too).
        with self._cond:
            mutate()
            block = self._asb_block()
            if block:
                self.write(block)

    def _asb_block(self) -> bytes:
        """The ASB block to push now, if enabled and the status changed since the last one."""
        if not self._asb_mask or self._silent:
            return b""
        block = encode_asb(self.status)
        if block == self._last_asb:
            return b""
        self._last_asb = block
        return block

    def reply_to_status(self, n: int) -> bytes:
        """Bytes sent for ``DLE EOT n``. Tests may override it to script odd firmware."""
        return bytes((encode_status(n, self.status),))

    def on_replug(self) -> None:
        """A power cycle: modes, ASB, the job in progress and any error are reset; paper
        and cover are physical and stay as they were. Printed tickets are kept."""
        with self._cond:
            self._power_on()

    # -- the device thread -------------------------------------------------------------
    def on_bytes(self, data: bytes) -> None:
        replies = bytearray()
        with self._cond:
            for op in self._parser.feed(data):
                replies += self._apply(op)
            if replies:
                self.write(bytes(replies))

    def _ready(self) -> bool:
        return not (self._offline or self._cover_open or self._paper == "out" or self._error)

    def _apply(self, op) -> bytes:
        if isinstance(op, StatusRequest):
            return b"" if self._silent else self.reply_to_status(op.n)
        if isinstance(op, AsbEnable):
            self._asb_mask = op.mask
            self._last_asb = None       # enabling sends the current status at once
            return self._asb_block()
        if isinstance(op, (Unknown, Oversized)):
            self.unknown_commands += 1
            return b""
        if self._spoiled or not self._ready():
            # A printer that is not ready takes nothing from this job; it ends at the cut.
            self._spoiled = True
            if isinstance(op, Cut):
                self._discarded += 1
                self._reset_job()
                self._cond.notify_all()
            return b""
        if isinstance(op, Text):
            self._add_text(op)
        elif isinstance(op, Feed):
            self._feed(op.lines)
        elif isinstance(op, Init):
            self._runs, self._cols = [], 0      # ESC @ clears the unprinted line
            self._reset_qr()
        elif isinstance(op, QrModel):
            self._qr_model = op.model
        elif isinstance(op, QrModuleSize):
            self._qr_module = op.dots
        elif isinstance(op, QrErrorLevel):
            self._qr_error = op.level
        elif isinstance(op, QrStore):
            self._qr_data = op.data
        elif isinstance(op, QrPrint):
            self._print_qr()
        elif isinstance(op, Cut):
            self._cut()
        return b""

    def _add_text(self, op: Text) -> None:
        style = op.style
        for ch in op.text:
            if self._cols + style.width > LINE_COLUMNS and self._cols:
                self._end_line()            # the printer wraps at the right margin
            if not self._runs:
                self._line_align = style.align
            key = [style.width, style.height, style.bold]
            if self._runs and self._runs[-1][1:] == key:
                self._runs[-1][0] += ch
            else:
                self._runs.append([ch, *key])
            self._cols += style.width

    def _end_line(self, height: int | None = None) -> None:
        runs = tuple(TextRun(*run) for run in self._runs)
        if height is None:
            height = max((run.height for run in runs), default=self._parser.style.height)
        self._items.append(PrintedLine(self._line_align if runs else Alignment.LEFT, runs, height))
        self._runs, self._cols = [], 0

    def _feed(self, lines: int) -> None:
        # Print the line buffer and feed `lines` lines: LF (1) ends the line; ESC d n adds
        # n-1 blank lines after it; ESC d 0 only prints what is buffered.
        if lines == 0:
            if self._runs:
                self._end_line()
            return
        self._end_line()
        for _ in range(lines - 1):
            self._end_line(height=1)

    def _print_qr(self) -> None:
        if not self._qr_data:
            return                          # fn 81 with nothing stored prints nothing
        if self._runs:
            self._end_line()
        self._items.append(PrintedQr(self._qr_data.decode("utf-8", errors="replace"), self._qr_module,
                                     self._qr_error, self._parser.style.align, self._qr_model))

    def _cut(self) -> None:
        if self._runs:
            self._end_line()
        items = tuple(self._items)
        self._reset_job()
        if not items:
            return                          # a cut of blank paper is not a ticket
        number = len(self._tickets) + self._rendering + 1
        self._rendering += 1
        if self._renderer is None:
            self._renderer = threading.Thread(target=self._render_loop, daemon=True,
                                              name="printer-render")
            self._renderer.start()
        self._render_queue.put((number, items))

    def _render_loop(self) -> None:
        while True:
            number, items = self._render_queue.get()      # one thread: tickets stay in order
            text = render_text(items)
            png_path = None
            if self.out_dir is not None:
                try:
                    self.out_dir.mkdir(parents=True, exist_ok=True)
                    (self.out_dir / f"ticket-{number:04d}.txt").write_text(text, encoding="utf-8")
                    png_path = self.out_dir / f"ticket-{number:04d}.png"
                    render_png(items).save(png_path)
                except Exception:
                    logging.getLogger("emulator.printer").exception("ticket %d: render failed",
                                                                    number)
                    png_path = None
            with self._cond:
                self._tickets.append(PrintedTicket(number, items, text, png_path))
                self._rendering -= 1
                self._cond.notify_all()


# -- rendering ---------------------------------------------------------------------------
def _place(s: str, align: Alignment, columns: int = LINE_COLUMNS) -> str:
    if align == Alignment.CENTER:
        return s.center(columns).rstrip()
    if align == Alignment.RIGHT:
        return s.rjust(columns)
    return s


def render_text(items) -> str:
    """Plain text, one line per printed line, placed within 42 columns as aligned on paper.
    Large characters are not widened, so the text stays searchable."""
    out = []
    for item in items:
        if isinstance(item, PrintedQr):
            out.append(_place("[QR]", item.align))
        else:
            out.append(_place(item.text, item.align))
    return "\n".join(out) + "\n"


_fonts: dict[int, object] = {}
_fonts_lock = threading.Lock()


def _font(px: int):
    from PIL import ImageFont

    with _fonts_lock:
        font = _fonts.get(px)
        if font is None:
            font = _fonts[px] = ImageFont.load_default(size=px)
        return font


def _fold_for_font(s: str) -> str:
    """Pillow's built-in font draws ASCII only (measured: 95 ASCII glyphs plus a handful of
    symbols), so accented letters are drawn as their base letter ("Bürgeramt" as
    "Burgeramt") and anything else as "?". The .txt rendering keeps the real text."""
    out = []
    for ch in s:
        if ord(ch) < 0x7F:
            out.append(ch)
            continue
        base = "".join(c for c in unicodedata.normalize("NFKD", ch) if not unicodedata.combining(c))
        out.append(base if base and base.isascii() else {"ß": "ss"}.get(ch, "?"))
    return "".join(out)


def _render_run(run: TextRun):
    from PIL import Image, ImageDraw

    px = CHAR_DOTS * run.height
    font = _font(px)
    stroke = 1 if run.bold else 0
    text = _fold_for_font(run.text)
    right = font.getbbox(text, stroke_width=stroke)[2]
    img = Image.new("L", (max(1, right + stroke), px + px // 4), 255)
    ImageDraw.Draw(img).text((0, 0), text, font=font, fill=0, stroke_width=stroke, stroke_fill=0)
    if run.width != run.height:         # magnified unevenly: stretch what the font drew
        img = img.resize((max(1, img.width * run.width // run.height), img.height))
    return img


def _render_line(line: PrintedLine):
    from PIL import Image

    pitch = max(LINE_PITCH_DOTS, CHAR_DOTS * line.height + 6)
    img = Image.new("L", (PAPER_DOTS, pitch), 255)
    if not line.runs:
        return img
    parts = [_render_run(run) for run in line.runs]
    strip = Image.new("L", (sum(p.width for p in parts), max(p.height for p in parts)), 255)
    x = 0
    for part in parts:                  # runs share a baseline at the bottom of the cell
        strip.paste(part, (x, strip.height - part.height))
        x += part.width
    usable = PAPER_DOTS - 2 * MARGIN_DOTS
    if strip.width > usable:            # the real printer wrapped by columns; keep it legible
        strip = strip.resize((usable, strip.height))
    img = Image.new("L", (PAPER_DOTS, max(pitch, strip.height)), 255)
    img.paste(strip, (_x_for(line.align, strip.width), 0))
    return img


def _x_for(align: Alignment, width: int) -> int:
    if align == Alignment.CENTER:
        return (PAPER_DOTS - width) // 2
    if align == Alignment.RIGHT:
        return PAPER_DOTS - MARGIN_DOTS - width
    return MARGIN_DOTS


def _render_qr(qr: PrintedQr):
    import numpy as np
    import segno
    from PIL import Image, ImageDraw

    try:
        symbol = segno.make(qr.data.encode("utf-8"), error=qr.error.lower(), micro=qr.model == 3,
                            boost_error=False)
    except ValueError:
        img = Image.new("L", (PAPER_DOTS, LINE_PITCH_DOTS), 255)
        ImageDraw.Draw(img).text((MARGIN_DOTS, 0), "[QR data does not fit]", font=_font(CHAR_DOTS), fill=0)
        return img
    modules = np.array([list(row) for row in symbol.matrix], dtype=np.uint8)
    dots = modules.repeat(qr.module_dots, axis=0).repeat(qr.module_dots, axis=1)
    code = Image.fromarray((255 - dots * 255).astype(np.uint8), "L")
    quiet = 4 * qr.module_dots
    img = Image.new("L", (PAPER_DOTS, code.height + 2 * quiet), 255)
    x = _x_for(qr.align, code.width)
    img.paste(code, (max(0, x), quiet))
    return img


def render_png(items):
    """A receipt image: white paper 576 dots wide, text at its magnification, QR codes,
    and a dashed line where the cutter cut."""
    from PIL import Image, ImageDraw

    parts = [_render_qr(item) if isinstance(item, PrintedQr) else _render_line(item) for item in items]
    top, cut_gap = 24, 24
    height = top + sum(p.height for p in parts) + cut_gap + 2
    paper = Image.new("L", (PAPER_DOTS, height), 255)
    y = top
    for part in parts:
        paper.paste(part, (0, y))
        y += part.height
    y += cut_gap
    draw = ImageDraw.Draw(paper)
    for x in range(0, PAPER_DOTS, 16):
        draw.line([(x, y), (x + 8, y)], fill=0, width=2)
    return paper
