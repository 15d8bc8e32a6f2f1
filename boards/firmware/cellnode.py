"""hallkiosk cell sensor node: MicroPython firmware for a Raspberry Pi Pico (RP2040).

Reads one privacy cell's PIR and door reed switch and reports them to the kiosk over the
Pico's USB serial (CDC, the same port as the REPL) as framed text lines. The protocol
(frames, CRC, commands, recovery) is specified in docs/cell-node-protocol.md.

Wiring (defaults below, GP numbers):
    PIR output       -> GP14, input with pull-down: an unplugged PIR reads "no motion".
    door reed switch -> between GP15 and GND, input with pull-up: door closed = magnet on
                        the switch = contact closed = 0.
    status LED       -> the board's own "LED" (GP25 on a Pico, the CYW43 pin on a Pico W):
                        it mirrors the PIR, so an installer can walk-test the sensor.

Deploy: ``mpremote cp boards/firmware/cellnode.py :main.py`` (MicroPython runs main.py
after boot with ``__name__ == "__main__"``).

The same file runs under CPython, which is how it is tested and emulated: the framing code
is shared with the kiosk's driver (edge/cells/node.py), and a host supplies ``machine`` and
``utime`` test doubles with :func:`bind` (nothing is patched into ``sys.modules``).
Hence the MicroPython subset: no dataclasses, no ``typing`` at run time (annotations are
ignored by MicroPython's compiler), no f-strings, integers and bytes only.
"""

import os
import sys

if sys.implementation.name == "micropython":
    import machine
    import micropython
    import select
    import utime

FW_VERSION = "1.0.0"
#: Protocol tag opening every frame; bumped only for an incompatible change.
PROTO = "HK1"

PIR_PIN = 14
DOOR_PIN = 15
LED_PIN = "LED"

#: Heartbeat period, ms. The host declares the node lost after 3.5 periods of silence.
HB_MS = 1000
#: A new door level counts once it has been stable this long, ms (reed switches bounce
#: for a few ms; a person cannot open and shut a door in 50 ms).
DEBOUNCE_MS = 50
#: Main loop period, ms: how long the loop waits for host bytes before sampling the pins.
LOOP_MS = 10
#: Delay between acknowledging RESET and resetting, ms, so the ACK leaves the USB buffer.
RESET_DELAY_MS = 100
#: Longest frame on the wire, bytes, "$" to "\n" included. Longer lines are dropped.
MAX_LINE = 96
#: Most bytes read from the host per loop iteration (bounds the work per step).
MAX_RX_PER_LOOP = 64

# Bytes that may never appear inside a field: they delimit frames and fields.
_DELIMS = b"$*,\r\n"


def crc16(data: bytes, crc: int = 0xFFFF) -> int:
    """CRC-16/CCITT-FALSE: polynomial 0x1021, init 0xFFFF, no reflection, no final XOR.

    Check value: crc16(b"123456789") == 0x29B1. Bitwise rather than table driven: a 512-byte
    table costs more RAM than the few hundred bytes a second this node sends are worth.
    """
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            if crc & 0x8000:
                crc = ((crc << 1) ^ 0x1021) & 0xFFFF
            else:
                crc = (crc << 1) & 0xFFFF
    return crc


def encode(kind: str, seq: int, fields: tuple = ()) -> bytes:
    """One frame: ``$HK1,<kind>,<seq>[,<field>...]*<CRC>\\n``.

    The CRC covers every byte between ``$`` and ``*``, as 4 upper-case hex digits. Fields are
    ASCII text without ``$ * ,`` CR or LF; ints are written in decimal. Raises ValueError for
    a field that breaks those rules or a frame longer than MAX_LINE.
    """
    parts = [PROTO, kind, str(seq & 0xFFFF)]
    for value in fields:
        text = str(value)
        for ch in text:
            if ch.encode() in _DELIMS or not " " <= ch <= "~":
                raise ValueError("bad character in field")
        parts.append(text)
    body = ",".join(parts).encode()
    frame = b"$" + body + b"*" + ("%04X" % crc16(body)).encode() + b"\n"
    if len(frame) > MAX_LINE:
        raise ValueError("frame too long")
    return frame


#: Parse outcomes that are not frames (see LineReader.feed).
ERR_CRC = "crc"
ERR_FORMAT = "format"
ERR_LONG = "long"


def _is_hex_digit(byte: int) -> bool:
    return 0x30 <= byte <= 0x39 or 0x41 <= byte <= 0x46 or 0x61 <= byte <= 0x66


def parse_line(line: bytes):
    """Parse one line (``$`` to before ``\\n``, a trailing CR allowed).

    Returns ``(kind, seq, fields)`` with ``fields`` a list of str, or one of the error codes
    ERR_CRC / ERR_FORMAT as a str. Byte checks compare integers, which behaves the same on
    MicroPython and CPython.
    """
    if line.endswith(b"\r"):
        line = line[:-1]
    star = line.rfind(b"*")
    if not line.startswith(b"$") or star < 0 or len(line) - star != 5:
        return ERR_FORMAT
    for byte in line[star + 1:]:
        if not _is_hex_digit(byte):
            return ERR_FORMAT
    body = line[1:star]
    for byte in body:
        if byte < 0x20 or byte > 0x7E or byte == 0x24 or byte == 0x2A:  # printable, no "$" "*"
            return ERR_FORMAT
    if crc16(body) != int(line[star + 1:].decode(), 16):
        return ERR_CRC
    parts = body.decode().split(",")
    if len(parts) < 3 or parts[0] != PROTO or not parts[1]:
        return ERR_FORMAT
    seq_text = parts[2]
    if not 1 <= len(seq_text) <= 5:
        return ERR_FORMAT
    for ch in seq_text:
        if not "0" <= ch <= "9":
            return ERR_FORMAT
    seq = int(seq_text)
    if seq > 0xFFFF:
        return ERR_FORMAT
    return (parts[1], seq, parts[3:])


class LineReader:
    """Splits a byte stream into frames, with resynchronisation and a bound on memory.

    ``feed(data)`` returns a list whose items are frames ``(kind, seq, fields)`` or error
    codes (ERR_CRC, ERR_FORMAT, ERR_LONG). A ``$`` always starts a new frame, because it
    cannot occur inside one: a frame torn by a reconnect is dropped (ERR_FORMAT) at the next
    ``$``. Bytes outside frames (a REPL banner, a traceback, line noise) are only counted in
    ``noise``. Never holds more than MAX_LINE bytes.
    """

    def __init__(self) -> None:
        self.buf = bytearray()
        self.in_frame = False
        self.overflow = False
        self.noise = 0

    def reset(self) -> None:
        self.buf = bytearray()
        self.in_frame = False
        self.overflow = False

    def feed(self, data: bytes) -> list:
        out = []
        for byte in data:
            if byte == 0x24:  # "$": start of a frame, whatever came before
                if self.in_frame and (self.buf or self.overflow):
                    out.append(ERR_LONG if self.overflow else ERR_FORMAT)
                self.buf = bytearray(b"$")
                self.in_frame = True
                self.overflow = False
            elif not self.in_frame:
                self.noise += 1
            elif byte == 0x0A:  # "\n": end of the frame
                out.append(ERR_LONG if self.overflow else parse_line(bytes(self.buf)))
                self.buf = bytearray()
                self.in_frame = False
                self.overflow = False
            elif self.overflow:
                pass
            elif len(self.buf) >= MAX_LINE - 1:
                # Keep nothing more of an oversized line; it is reported when it ends.
                self.buf = bytearray()
                self.overflow = True
            else:
                self.buf.append(byte)
        return out


def _hex(data: bytes) -> str:
    return "".join("%02x" % b for b in data)


def bind(machine_module, utime_module) -> None:
    """Host seam: use ``machine_module`` / ``utime_module`` as this module's ``machine`` and
    ``utime``. Only for CPython hosts (tests, emulator), which load their own copy of this
    file per emulated node; on the Pico the real modules are imported above."""
    global machine, utime
    machine = machine_module
    utime = utime_module


class Node:
    """The node's logic: sample pins, debounce the door, build frames, obey host commands.

    ``step(rx)`` is one iteration of the main loop: ``rx`` is what the host sent since the
    last step; the return value is the bytes to write to the host. Times come from
    ``utime.ticks_ms()`` (wrapping ticks, compared only with ticks_diff).
    """

    def __init__(self, hb_ms: int = HB_MS, pir_pin: int = PIR_PIN, door_pin: int = DOOR_PIN,
                 led_pin: str = LED_PIN, debounce_ms: int = DEBOUNCE_MS) -> None:
        self.pir = machine.Pin(pir_pin, machine.Pin.IN, machine.Pin.PULL_DOWN)
        self.door = machine.Pin(door_pin, machine.Pin.IN, machine.Pin.PULL_UP)
        self.led = machine.Pin(led_pin, machine.Pin.OUT)
        self.uid = _hex(machine.unique_id())
        # A fresh random id per boot: the host tells a restarted node from a reconnected one
        # by it (sequence numbers and uptimes are ambiguous after a quick restart).
        self.boot_id = _hex(os.urandom(4))
        self.hb_ms = hb_ms
        self.debounce_ms = debounce_ms
        self.reader = LineReader()
        self.out = bytearray()
        self.seq = 0
        self.stopped = False
        self.reset_pending = False
        self.errors = 0
        now = utime.ticks_ms()
        self.reset_at = now
        self.last_tick = now
        self.uptime_ms = 0
        self.next_hb = utime.ticks_add(now, hb_ms)
        self.motion = self.pir.value()
        self.door_closed = 1 if self.door.value() == 0 else 0
        self.door_raw = self.door_closed
        self.door_raw_since = now
        self.led.value(self.motion)
        # Boot announcement: seq 0 + HELLO tells the host that the node (re)started.
        self.send_hello()
        self.send_state()

    def send(self, kind: str, fields: tuple = ()) -> None:
        self.out += encode(kind, self.seq, fields)
        self.seq = (self.seq + 1) & 0xFFFF

    def send_hello(self) -> None:
        self.send("HELLO", (FW_VERSION, self.uid, self.boot_id, self.uptime_ms // 1000))

    def send_state(self) -> None:
        self.send("STATE", (self.motion, self.door_closed))

    def step(self, rx: bytes = b"") -> bytes:
        now = utime.ticks_ms()
        self.uptime_ms += utime.ticks_diff(now, self.last_tick)
        self.last_tick = now
        if rx:
            for item in self.reader.feed(rx):
                self.command(item, now)
        self.sample(now)
        if utime.ticks_diff(now, self.next_hb) >= 0:
            self.send("HB", (self.uptime_ms // 1000, self.motion, self.door_closed))
            self.next_hb = utime.ticks_add(self.next_hb, self.hb_ms)
            if utime.ticks_diff(now, self.next_hb) >= 0:
                # The loop stalled for more than a period: restart the rhythm, do not burst.
                self.next_hb = utime.ticks_add(now, self.hb_ms)
        if self.reset_pending and utime.ticks_diff(now, self.reset_at) >= 0:
            machine.reset()
        out = bytes(self.out)
        self.out = bytearray()
        return out

    def sample(self, now) -> None:  # now: a ticks_ms() value
        changed = False
        motion = self.pir.value()
        if motion != self.motion:
            self.motion = motion
            self.led.value(motion)
            changed = True
        raw = 1 if self.door.value() == 0 else 0
        if raw != self.door_raw:
            self.door_raw = raw
            self.door_raw_since = now
        elif raw != self.door_closed and utime.ticks_diff(now, self.door_raw_since) >= self.debounce_ms:
            self.door_closed = raw
            changed = True
        if changed:
            self.send_state()

    def command(self, item, now) -> None:  # item: a LineReader.feed() result
        if isinstance(item, str):
            self.errors += 1
            self.send("ERR", (item,))
            return
        kind = item[0]
        if kind == "PING":
            self.send_hello()
            self.send_state()
        elif kind == "RESET":
            self.send("ACK", ("RESET",))
            self.reset_at = utime.ticks_add(now, RESET_DELAY_MS)
            self.reset_pending = True
        elif kind == "STOP":
            self.send("ACK", ("STOP",))
            self.stopped = True
        else:
            self.errors += 1
            self.send("ERR", ("unknown",))


def main() -> None:
    # The host's bytes arrive on the REPL's port: a stray 0x03 must not raise
    # KeyboardInterrupt in the loop. STOP gives the REPL back for maintenance.
    micropython.kbd_intr(-1)
    node = Node()
    poller = select.poll()
    poller.register(sys.stdin, select.POLLIN)
    rx_stream = sys.stdin.buffer
    # The binary stream: the text one turns "\n" into "\r\n" on some ports.
    tx_stream = sys.stdout.buffer
    try:
        while not node.stopped:
            rx = b""
            if poller.poll(LOOP_MS):
                # poll() said a byte is ready, so read(1) does not block; read no more than
                # is ready, and no more than MAX_RX_PER_LOOP, before sampling the pins again.
                while len(rx) < MAX_RX_PER_LOOP and poller.poll(0):
                    rx += rx_stream.read(1)
            tx_stream.write(node.step(rx))
    finally:
        micropython.kbd_intr(3)


if __name__ == "__main__":
    main()
