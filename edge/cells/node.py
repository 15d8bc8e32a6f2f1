"""Host side of the cell sensor node (a Pico running boards/firmware/cellnode.py).

Protocol: docs/cell-node-protocol.md. The framing (CRC-16/CCITT-FALSE, ``$HK1,...*CRC``
lines, the resynchronising line reader) is imported from the firmware itself, so both ends
run the same code; this module adds typed messages, the driver and the reconnecting worker.

Wiring: the worker is handed a pyserial URL (``/dev/serial/by-id/usb-MicroPython_...``, an
emulator's pty) and a ``sink`` (the agent's event queue). It reports:

- ``NodeInfo`` after each handshake (firmware version, board id, whether the node rebooted);
- ``SensorAvailability(cell, name, True/False)`` for the node's sensors when it comes and goes;
- ``SensorReading(cell, name, value)`` when the PIR or the (node-debounced) door changes;
- DeviceFault / DeviceRecovered through SerialWorker (device ``cell-node.<cell>``).

Opening the Pico's CDC port does not reset it, so the host cannot wait for a boot banner:
it sends PING and the node answers HELLO + STATE. If nothing answers (the firmware crashed
into the REPL, or was stopped), the host sends Ctrl-C Ctrl-D, which soft-resets MicroPython
and runs main.py again, and waits for the boot HELLO. The running firmware has Ctrl-C
disabled, so those two bytes are mere line noise to it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from boards.firmware import cellnode as wire
from edge.cells.occupancy import SensorAvailability, SensorReading
from edge.clock import SYSTEM_CLOCK, Clock
from edge.serialdev import SerialWorker
from hallkiosk.errors import DeviceGone, DeviceTimeout, ProtocolError

log = logging.getLogger("hallkiosk.cells.node")

#: Bytes that bring a MicroPython REPL back to main.py: Ctrl-C (interrupt), Ctrl-D (soft reset).
REVIVE = b"\r\x03\x03\x04"
#: Node -> host types and how many fields each carries after the sequence number.
_FIELDS = {"HELLO": 4, "STATE": 2, "HB": 3, "ACK": 1, "ERR": 1}


# -- messages ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Hello:
    seq: int
    fw_version: str
    uid: str
    boot_id: str
    uptime_s: int


@dataclass(frozen=True, slots=True)
class State:
    seq: int
    motion: bool
    door_closed: bool


@dataclass(frozen=True, slots=True)
class Heartbeat:
    seq: int
    uptime_s: int
    motion: bool
    door_closed: bool


@dataclass(frozen=True, slots=True)
class Ack:
    seq: int
    command: str


@dataclass(frozen=True, slots=True)
class NodeError:
    """The node refused a host frame: ``code`` is crc, format, long or unknown."""
    seq: int
    code: str


NodeMessage = Hello | State | Heartbeat | Ack | NodeError


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """Event: a node answered the handshake, or announced a boot. ``rebooted``: it restarted
    since the host last saw it (another boot id), or it is another board."""
    cell: str
    fw_version: str
    uid: str
    rebooted: bool


def _flag(text: str) -> bool:
    if text == "1":
        return True
    if text == "0":
        return False
    raise ProtocolError(f"expected 0 or 1, got {text[:8]!r}")


def _uint(text: str) -> int:
    # str.isdigit() also accepts non-ASCII digits; the wire only carries ASCII ones.
    if not 1 <= len(text) <= 10 or not all("0" <= ch <= "9" for ch in text):
        raise ProtocolError(f"expected a decimal number, got {text[:12]!r}")
    return int(text)


def to_message(kind: str, seq: int, fields: list[str]) -> NodeMessage:
    """Type one parsed node frame. Raises ProtocolError for an unknown type or bad fields."""
    expected = _FIELDS.get(kind)
    if expected is None:
        raise ProtocolError(f"unknown node frame type {kind[:16]!r}")
    if len(fields) != expected:
        raise ProtocolError(f"{kind} frame with {len(fields)} fields, expected {expected}")
    if kind == "HELLO":
        return Hello(seq, fields[0], fields[1], fields[2], _uint(fields[3]))
    if kind == "STATE":
        return State(seq, _flag(fields[0]), _flag(fields[1]))
    if kind == "HB":
        return Heartbeat(seq, _uint(fields[0]), _flag(fields[1]), _flag(fields[2]))
    if kind == "ACK":
        return Ack(seq, fields[0])
    return NodeError(seq, fields[0])


class NodeDecoder:
    """Bytes from the node in, typed messages out. Never raises on bad input: it counts
    ``crc_errors``, ``format_errors`` (torn, oversized or ill-typed frames) and ``noise``
    (bytes outside frames, e.g. a REPL traceback). Holds at most one line."""

    def __init__(self) -> None:
        self._reader = wire.LineReader()
        self.crc_errors = 0
        self.format_errors = 0

    @property
    def noise(self) -> int:
        return self._reader.noise

    def reset(self) -> None:
        self._reader.reset()

    def feed(self, data: bytes) -> list[NodeMessage]:
        out: list[NodeMessage] = []
        for item in self._reader.feed(data):
            if item == wire.ERR_CRC:
                self.crc_errors += 1
            elif isinstance(item, str):
                self.format_errors += 1
            else:
                try:
                    out.append(to_message(*item))
                except ProtocolError:
                    self.format_errors += 1
        return out


def encode_command(command: str, seq: int) -> bytes:
    """A host -> node frame: PING, RESET or STOP (see docs/cell-node-protocol.md)."""
    if command not in ("PING", "RESET", "STOP"):
        raise ValueError(f"unknown cell node command {command!r}")
    return wire.encode(command, seq)


# -- driver ------------------------------------------------------------------------------------
def _port_label(port: object) -> str:
    for attr in ("port", "name"):
        value = getattr(port, attr, None)
        if value:
            return str(value)
    return "an unnamed port"


class CellNode:
    """A node on an open port (the caller owns and closes it). The port's read timeout sets
    how often deadlines are checked and must be finite."""

    def __init__(self, port, *, name: str = "cell-node", clock: Clock = SYSTEM_CLOCK) -> None:
        port_timeout = getattr(port, "timeout", 0.05)
        if port_timeout is None or port_timeout <= 0:
            raise ValueError(f"{name}: the port needs a finite, positive read timeout, got {port_timeout!r}")
        self.port = port
        self.name = name
        self.clock = clock
        self.decoder = NodeDecoder()
        self._seq = 0
        self.last_seq: int | None = None
        #: Node frames that did not follow the previous one (lost or corrupted lines).
        self.lost_frames = 0

    @property
    def where(self) -> str:
        return f"{self.name} on {_port_label(self.port)}"

    def send(self, command: str) -> None:
        self._write(encode_command(command, self._seq))
        self._seq = (self._seq + 1) & 0xFFFF

    def _write(self, data: bytes) -> None:
        try:
            self.port.write(data)
            self.port.flush()
        except Exception as exc:  # SerialException, OSError (EIO after an unplug), termios.error
            raise DeviceGone(f"{self.where}: write failed: {exc}") from exc

    def read(self) -> list[NodeMessage]:
        """Messages received within one port read timeout."""
        try:
            data = self.port.read(256)
        except Exception as exc:
            raise DeviceGone(f"{self.where}: read failed: {exc}") from exc
        messages = self.decoder.feed(data) if data else []
        for m in messages:
            if isinstance(m, Hello) and m.seq == 0:
                self.last_seq = 0
                continue
            if self.last_seq is not None and m.seq != (self.last_seq + 1) & 0xFFFF:
                self.lost_frames += (m.seq - self.last_seq - 1) & 0xFFFF
            self.last_seq = m.seq
        return messages

    def handshake(self, timeout_s: float) -> tuple[Hello, State | None, list[NodeMessage]]:
        """PING; if no HELLO within ``timeout_s``, revive the firmware and wait again for its
        boot HELLO. Returns the HELLO, the first STATE after it (None if it did not come in
        time) and any other messages received. Raises DeviceTimeout."""
        try:
            self.port.reset_input_buffer()
        except Exception as exc:
            raise DeviceGone(f"{self.where}: cannot flush input: {exc}") from exc
        self.decoder.reset()
        self.send("PING")
        found = self._await_hello(timeout_s)
        if found is None:
            log.warning("%s: no answer to PING; sending Ctrl-C Ctrl-D to restart the firmware", self.where)
            self._write(REVIVE)
            found = self._await_hello(timeout_s)
        if found is None:
            raise DeviceTimeout(f"{self.where}: no HELLO within {timeout_s:g} s, even after a soft reset")
        return found

    def _await_hello(self, timeout_s: float):
        deadline = self.clock.monotonic() + timeout_s
        hello: Hello | None = None
        others: list[NodeMessage] = []
        while self.clock.monotonic() < deadline:
            for m in self.read():
                if isinstance(m, Hello):
                    hello = m
                elif hello is not None and isinstance(m, State):
                    return hello, m, others
                else:
                    others.append(m)
        if hello is not None:
            return hello, None, others
        return None


class CellNodeWorker(SerialWorker):
    """Keeps a cell's node open; see the module docstring for what it reports.

    ``names`` maps the node's inputs ("pir", "door") to the cell's sensor names. The node
    is declared lost when no valid frame arrives for ``heartbeat_timeout_s`` (3.5 heartbeat
    periods of the firmware's 1 s by default), which raises inside ``serve`` and so goes
    through SerialWorker's close, back off and reopen.
    """

    def __init__(self, url: str, *, cell: str, sink: Callable[[object], None],
                 names: Mapping[str, str] | None = None, device: str | None = None,
                 clock: Clock = SYSTEM_CLOCK, hello_timeout_s: float = 2.0,
                 heartbeat_timeout_s: float = 3.5, **kwargs) -> None:
        self.device = device or f"cell-node.{cell}"
        super().__init__(url, sink=sink, **kwargs)
        self.cell = cell
        names = dict(names or {"pir": "pir", "door": "door"})
        unknown = set(names) - {"pir", "door"}
        if unknown:
            raise ValueError(f"{self.device}: the node has inputs pir and door, not {sorted(unknown)}")
        self.names = names
        self.clock = clock
        self.hello_timeout_s = hello_timeout_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.info: NodeInfo | None = None
        self.reboots = 0
        self._node: CellNode | None = None
        self._seen: tuple[str, str] | None = None
        self._done = {"lost_frames": 0, "crc_errors": 0, "format_errors": 0}

    @property
    def stats(self) -> dict[str, int]:
        """Counters since the worker started, for telemetry (ints, as the contract wants)."""
        current = self._counters(self._node)
        return {"reboots": self.reboots, **{k: v + current[k] for k, v in self._done.items()}}

    @staticmethod
    def _counters(node: CellNode | None) -> dict[str, int]:
        if node is None:
            return {"lost_frames": 0, "crc_errors": 0, "format_errors": 0}
        return {"lost_frames": node.lost_frames, "crc_errors": node.decoder.crc_errors,
                "format_errors": node.decoder.format_errors}

    def attach(self, port) -> tuple[CellNode, Hello, State | None, list[NodeMessage]]:
        node = CellNode(port, name=self.device, clock=self.clock)
        hello, state, others = node.handshake(self.hello_timeout_s)
        self._node = node
        return node, hello, state, others

    def serve(self, attached) -> None:
        node, hello, state, others = attached
        levels: dict[str, bool] = {}
        for sensor in self.names.values():
            self._emit(SensorAvailability(self.cell, sensor, True))
        self._on_hello(hello)
        try:
            # ``others`` came before the HELLO's STATE (or, without one, in order after it).
            self._handle(node, others, levels)
            if state is not None:
                self._levels(levels, state.motion, state.door_closed)
            last_valid = self.clock.monotonic()
            while not self.stopping.is_set():
                messages = node.read()
                now = self.clock.monotonic()
                if messages:
                    last_valid = now
                    self._handle(node, messages, levels)
                elif now - last_valid > self.heartbeat_timeout_s:
                    raise DeviceTimeout(f"{node.where}: no frame for {self.heartbeat_timeout_s:g} s "
                                        "(heartbeat lost)")
        finally:
            for key, value in self._counters(node).items():
                self._done[key] += value
            self._node = None
            for sensor in self.names.values():
                self._emit(SensorAvailability(self.cell, sensor, False, f"{self.device} lost"))

    def _handle(self, node: CellNode, messages: list[NodeMessage], levels: dict[str, bool]) -> None:
        for m in messages:
            if isinstance(m, (State, Heartbeat)):
                self._levels(levels, m.motion, m.door_closed)
            elif isinstance(m, Hello):
                # A boot HELLO mid-stream: the node restarted (watchdog, power glitch).
                self._on_hello(m)
                levels.clear()
            elif isinstance(m, NodeError):
                log.info("%s: node refused a frame (%s)", node.where, m.code)

    def _on_hello(self, hello: Hello) -> None:
        rebooted = self._seen is not None and self._seen != (hello.uid, hello.boot_id)
        if rebooted:
            self.reboots += 1
        self._seen = (hello.uid, hello.boot_id)
        self.info = NodeInfo(self.cell, hello.fw_version, hello.uid, rebooted)
        self._emit(self.info)

    def _levels(self, levels: dict[str, bool], motion: bool, door_closed: bool) -> None:
        for source, value in (("pir", motion), ("door", door_closed)):
            sensor = self.names.get(source)
            if sensor is not None and levels.get(sensor) != value:
                levels[sensor] = value
                self._emit(SensorReading(self.cell, sensor, value))


# -- command line (field engineers: is the node there, which firmware, reset it) -----------------
def add_parser(sub) -> None:
    """``hallkiosk cell-node --port URL [info|reset|stop]``."""
    p = sub.add_parser("cell-node", help="talk to a cell sensor node: show its firmware and "
                                         "sensors, reset it, or stop it (REPL for maintenance)")
    p.add_argument("--port", required=True, help="pyserial URL, e.g. /dev/serial/by-id/usb-MicroPython_...")
    p.add_argument("action", nargs="?", choices=("info", "reset", "stop"), default="info")
    p.add_argument("--timeout-s", type=float, default=2.0, help="answer timeout (default 2 s)")
    p.set_defaults(func=cmd_cell_node)


def cmd_cell_node(args) -> int:
    from edge.serialdev import open_serial
    from hallkiosk.errors import DeviceError

    try:
        port = open_serial(args.port)
    except DeviceError as exc:
        print(f"cell-node: {exc}")
        return 2
    try:
        node = CellNode(port, name="cell-node")
        hello, state, _ = node.handshake(args.timeout_s)
        print(f"cell node on {args.port}: firmware {hello.fw_version}, board {hello.uid}, "
              f"up {hello.uptime_s} s")
        if state is not None:
            print(f"  motion={int(state.motion)} door_closed={int(state.door_closed)}")
        if args.action == "info":
            return 0
        command = args.action.upper()
        node.send(command)
        deadline = node.clock.monotonic() + args.timeout_s
        while node.clock.monotonic() < deadline:
            if any(isinstance(m, Ack) and m.command == command for m in node.read()):
                print(f"  {command} acknowledged")
                return 0
        print(f"  no ACK for {command} within {args.timeout_s:g} s")
        return 1
    except DeviceError as exc:
        print(f"cell-node: {exc}")
        return 1
    finally:
        port.close()
