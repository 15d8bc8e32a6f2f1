"""HLK-LD2410 24 GHz mmWave presence radar over UART: pure frame codec, driver and worker.

Wire format (HLK-LD2410 serial protocol; PROTOCOLS.md "Booth occupancy"), 256000 8N1,
little-endian integers:

    report  F4 F3 F2 F1 | len(2) | type(1) AA | target(9) | [engineering data] | 55 00 | F8 F7 F6 F5
            type 02 = basic (len 13), 01 = engineering (per-gate energies follow the target)
            target = state(1) moveDist_cm(2) moveEnergy(1) stillDist_cm(2) stillEnergy(1)
                     detectDist_cm(2); state 0 nobody, 1 moving, 2 still, 3 both
    command FD FC FB FA | len(2) | word(2) | value... | 04 03 02 01        (host -> radar)
    ack     FD FC FB FA | len(2) | word|0x0100 (2) | status(2, 0 = ok) | data... | 04 03 02 01

The radar streams reports (about ten a second) from power-up and stops while in
configuration mode (between the "enable" and "end configuration" commands).

The decoder is pure (bytes in, frames out) and shared with the emulator's side of the wire.
It resynchronises on the next header after garbage or a frame with a bad tail or length, and
never holds more than one maximal frame of input. The driver is handed an open port
(pyserial-like, with a finite read timeout); the worker keeps it open through
edge.serialdev.SerialWorker and reports presence changes as occupancy SensorReadings.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

from edge.cells.occupancy import SensorAvailability, SensorReading
from edge.clock import SYSTEM_CLOCK, Clock
from edge.serialdev import SerialWorker
from hallkiosk.errors import DeviceGone, DeviceTimeout

log = logging.getLogger("hallkiosk.cells.radar")

REPORT_HEAD = b"\xf4\xf3\xf2\xf1"
REPORT_TAIL = b"\xf8\xf7\xf6\xf5"
CMD_HEAD = b"\xfd\xfc\xfb\xfa"
CMD_TAIL = b"\x04\x03\x02\x01"
BAUDRATE = 256000

#: Largest data length accepted in any frame. The longest the radar sends is the
#: engineering report (35 bytes); a longer length field means we are not on a frame.
MAX_DATA = 64
_OVERHEAD = 4 + 2 + 4
MAX_FRAME = _OVERHEAD + MAX_DATA

REPORT_BASIC = 0x02
REPORT_ENGINEERING = 0x01
_REPORT_HEAD_BYTE = 0xAA
_REPORT_TAIL_BYTES = b"\x55\x00"
_TARGET = struct.Struct("<BHBHBH")   # state, move cm, move energy, still cm, still energy, detect cm

# Command words (the ACK echoes the word with 0x0100 set).
CMD_ENABLE_CONFIG = 0x00FF   # value 0x0001; ACK data: protocol version(2), buffer size(2)
CMD_END_CONFIG = 0x00FE
CMD_READ_FIRMWARE = 0x00A0   # ACK data: firmware type(2), major(2), minor(4)
ACK_BIT = 0x0100


class TargetState(IntEnum):
    NONE = 0
    MOVING = 1
    STILL = 2
    BOTH = 3


@dataclass(frozen=True, slots=True)
class Report:
    """One target report. Distances in cm, energies 0-100 (the radar's own scale)."""
    state: int
    move_cm: int
    move_energy: int
    still_cm: int
    still_energy: int
    detect_cm: int
    engineering: bool = False

    @property
    def present(self) -> bool:
        """Someone moving or still. The radar applies its own gate thresholds and its
        "unmanned duration" before it reports state 0."""
        return self.state != TargetState.NONE


@dataclass(frozen=True, slots=True)
class CommandFrame:
    """A command (host -> radar) or, with ``ack``, its acknowledgement (radar -> host).
    ``word`` is the command word without the ACK bit; ``status`` is None for a command."""
    word: int
    data: bytes
    ack: bool
    status: int | None = None


Frame = Report | CommandFrame


# -- encoding (the driver's commands, the emulator's reports and ACKs) -----------------------
def _frame(head: bytes, data: bytes, tail: bytes) -> bytes:
    if len(data) > MAX_DATA:
        raise ValueError(f"LD2410 frame data of {len(data)} bytes exceeds {MAX_DATA}")
    return head + struct.pack("<H", len(data)) + data + tail


def encode_command(word: int, value: bytes = b"") -> bytes:
    return _frame(CMD_HEAD, struct.pack("<H", word) + value, CMD_TAIL)


def encode_ack(word: int, status: int = 0, data: bytes = b"") -> bytes:
    return _frame(CMD_HEAD, struct.pack("<HH", word | ACK_BIT, status) + data, CMD_TAIL)


def encode_report(report: Report, gate_energies: bytes = b"") -> bytes:
    target = _TARGET.pack(report.state, report.move_cm, report.move_energy, report.still_cm,
                          report.still_energy, report.detect_cm)
    if report.engineering:
        # Engineering mode: max move gate, max still gate, then per-gate energies.
        body = bytes([REPORT_ENGINEERING, _REPORT_HEAD_BYTE]) + target + gate_energies
    else:
        body = bytes([REPORT_BASIC, _REPORT_HEAD_BYTE]) + target
    return _frame(REPORT_HEAD, body + _REPORT_TAIL_BYTES, REPORT_TAIL)


def parse_firmware_version(ack: CommandFrame) -> str:
    """``V<major>.<minor:02x>.<build:08x>`` from a CMD_READ_FIRMWARE ACK, e.g. V1.07.22091516."""
    if ack.word != CMD_READ_FIRMWARE or len(ack.data) < 8:
        raise ValueError("not a firmware version ACK")
    _fw_type, major, build = struct.unpack_from("<HHI", ack.data)
    return f"V{major >> 8}.{major & 0xFF:02x}.{build:08x}"


# -- decoding ---------------------------------------------------------------------------------
class Ld2410Decoder:
    """Streaming decoder. ``to_radar=False`` (the host's side) yields Reports and ACKs;
    ``to_radar=True`` (the emulator's side) yields commands.

    Nothing raises on bad input: garbage is skipped and counted in ``garbage_bytes``, frames
    whose tail, length or content is wrong in ``bad_frames``.
    """

    def __init__(self, *, to_radar: bool = False) -> None:
        self.to_radar = to_radar
        self._heads = (CMD_HEAD,) if to_radar else (REPORT_HEAD, CMD_HEAD)
        self._buf = bytearray()
        self.garbage_bytes = 0
        self.bad_frames = 0

    def reset(self) -> None:
        self._buf.clear()

    def feed(self, data: bytes) -> list[Frame]:
        out: list[Frame] = []
        buf = self._buf
        buf += data
        while True:
            start = self._find_head(buf)
            if start < 0:
                # Keep a possible partial header (at most 3 bytes) for the next feed.
                keep = self._partial_head_len(buf)
                self.garbage_bytes += len(buf) - keep
                del buf[:len(buf) - keep]
                break
            if start:
                self.garbage_bytes += start
                del buf[:start]
            if len(buf) < 6:
                break
            length = buf[4] | buf[5] << 8
            head = bytes(buf[:4])
            tail = REPORT_TAIL if head == REPORT_HEAD else CMD_TAIL
            if length > MAX_DATA:
                self._skip_bad(buf)
                continue
            end = 6 + length + 4
            if len(buf) < end:
                break
            if buf[end - 4:end] != tail:
                self._skip_bad(buf)
                continue
            frame = self._decode(head, bytes(buf[6:6 + length]))
            del buf[:end]
            if frame is None:
                self.bad_frames += 1
            else:
                out.append(frame)
        return out

    def _find_head(self, buf: bytearray) -> int:
        found = [i for i in (buf.find(h) for h in self._heads) if i >= 0]
        return min(found) if found else -1

    def _partial_head_len(self, buf: bytearray) -> int:
        for n in (3, 2, 1):
            if len(buf) >= n and any(h.startswith(bytes(buf[-n:])) for h in self._heads):
                return n
        return 0

    def _skip_bad(self, buf: bytearray) -> None:
        # Not a frame after all (a header pattern inside garbage): resume the search one
        # byte further, so a real header overlapping this one is still found.
        self.bad_frames += 1
        self.garbage_bytes += 1
        del buf[:1]

    def _decode(self, head: bytes, data: bytes) -> Frame | None:
        if head == REPORT_HEAD:
            return _decode_report(data)
        if len(data) < 2:
            return None
        word = data[0] | data[1] << 8
        if self.to_radar:
            if word & ACK_BIT:
                return None
            return CommandFrame(word, data[2:], ack=False)
        if not word & ACK_BIT or len(data) < 4:
            return None
        status = data[2] | data[3] << 8
        return CommandFrame(word & ~ACK_BIT, data[4:], ack=True, status=status)


def _decode_report(data: bytes) -> Report | None:
    if len(data) < 2 + _TARGET.size + 2 or data[1] != _REPORT_HEAD_BYTE or data[-2:] != _REPORT_TAIL_BYTES:
        return None
    kind = data[0]
    if kind == REPORT_BASIC:
        if len(data) != 2 + _TARGET.size + 2:
            return None
    elif kind != REPORT_ENGINEERING:
        return None
    state, move_cm, move_energy, still_cm, still_energy, detect_cm = _TARGET.unpack_from(data, 2)
    if state > TargetState.BOTH:
        return None
    return Report(state, move_cm, move_energy, still_cm, still_energy, detect_cm,
                  engineering=kind == REPORT_ENGINEERING)


# -- driver -----------------------------------------------------------------------------------
def _port_label(port: object) -> str:
    for attr in ("port", "name"):
        value = getattr(port, attr, None)
        if value:
            return str(value)
    return "an unnamed port"


class Ld2410:
    """An LD2410 on an open port (the caller owns and closes it). ``timeout_s`` bounds each
    command exchange on the injected clock; the port's read timeout must be finite."""

    def __init__(self, port, *, name: str = "radar", timeout_s: float = 1.0,
                 clock: Clock = SYSTEM_CLOCK) -> None:
        port_timeout = getattr(port, "timeout", 0.05)
        if port_timeout is None or port_timeout <= 0:
            raise ValueError(f"{name}: the port needs a finite, positive read timeout, got {port_timeout!r}")
        self.port = port
        self.name = name
        self.timeout_s = timeout_s
        self.clock = clock
        self.decoder = Ld2410Decoder()
        self._pending: list[Report] = []

    @property
    def where(self) -> str:
        return f"{self.name} on {_port_label(self.port)}"

    def _read(self) -> list[Frame]:
        try:
            data = self.port.read(MAX_FRAME * 4)
        except Exception as exc:  # SerialException, OSError, termios.error: the port is gone
            raise DeviceGone(f"{self.where}: read failed: {exc}") from exc
        return self.decoder.feed(data) if data else []

    def command(self, word: int, value: bytes = b"") -> CommandFrame:
        """Send one command and wait for its ACK. Raises DeviceTimeout, or DeviceGone."""
        try:
            self.port.write(encode_command(word, value))
        except Exception as exc:
            raise DeviceGone(f"{self.where}: write failed: {exc}") from exc
        deadline = self.clock.monotonic() + self.timeout_s
        while self.clock.monotonic() < deadline:
            for frame in self._read():
                if isinstance(frame, Report):
                    self._pending.append(frame)
                elif frame.ack and frame.word == word:
                    return frame
        raise DeviceTimeout(f"{self.where}: no ACK for command 0x{word:04x} in {self.timeout_s:g} s")

    def firmware_version(self) -> str:
        """Enter configuration mode, read the firmware version, leave configuration mode."""
        self.command(CMD_ENABLE_CONFIG, b"\x01\x00")
        try:
            ack = self.command(CMD_READ_FIRMWARE)
        finally:
            self.command(CMD_END_CONFIG)
        if ack.status:
            raise DeviceTimeout(f"{self.where}: firmware query refused (status {ack.status})")
        return parse_firmware_version(ack)

    def reports(self) -> list[Report]:
        """Reports received since the last call (waits at most one port read timeout)."""
        pending, self._pending = self._pending, []
        return pending + [f for f in self._read() if isinstance(f, Report)]


class RadarWorker(SerialWorker):
    """Keeps a cell's radar open and turns its reports into occupancy inputs.

    Emits ``SensorAvailability(cell, sensor, True)`` once attached, ``SensorReading`` on each
    presence change (and the first report after each attach), and
    ``SensorAvailability(..., False)`` when the radar goes (unplugged, or silent for
    ``silence_timeout_s``), next to the SerialWorker's DeviceFault/DeviceRecovered.
    ``last_report`` holds the latest report for telemetry (distances, energies).
    """

    def __init__(self, url: str, *, cell: str, sink: Callable[[object], None],
                 sensor: str = "radar", device: str | None = None, clock: Clock = SYSTEM_CLOCK,
                 silence_timeout_s: float = 2.0, command_timeout_s: float = 1.0,
                 query_version: bool = True, **kwargs) -> None:
        self.device = device or f"radar.{cell}"
        kwargs.setdefault("baudrate", BAUDRATE)
        super().__init__(url, sink=sink, **kwargs)
        self.cell = cell
        self.sensor = sensor
        self.clock = clock
        self.silence_timeout_s = silence_timeout_s
        self.command_timeout_s = command_timeout_s
        self.query_version = query_version
        self.firmware: str | None = None
        self.last_report: Report | None = None

    def attach(self, port) -> Ld2410:
        radar = Ld2410(port, name=self.device, timeout_s=self.command_timeout_s, clock=self.clock)
        if self.query_version:
            try:
                self.firmware = radar.firmware_version()
                log.info("%s: firmware %s", radar.where, self.firmware)
            except DeviceTimeout as exc:
                # Reports are what matters; a module that ignores commands still works.
                log.info("%s: no firmware version (%s)", radar.where, exc)
        return radar

    def serve(self, radar: Ld2410) -> None:
        self._emit(SensorAvailability(self.cell, self.sensor, True))
        present: bool | None = None
        last_seen = self.clock.monotonic()
        try:
            while not self.stopping.is_set():
                reports = radar.reports()
                now = self.clock.monotonic()
                if reports:
                    last_seen = now
                    self.last_report = reports[-1]
                    if reports[-1].present != present:
                        present = reports[-1].present
                        self._emit(SensorReading(self.cell, self.sensor, present))
                elif now - last_seen > self.silence_timeout_s:
                    raise DeviceTimeout(f"{radar.where}: no report for {self.silence_timeout_s:g} s")
        finally:
            self._emit(SensorAvailability(self.cell, self.sensor, False, f"{self.device} lost"))
