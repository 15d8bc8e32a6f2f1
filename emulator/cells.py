"""An emulated privacy cell: PIR and door on gpiozero's MockFactory, an LD2410 radar on a pty,
and a Pico cell node on a pty running the real firmware under CPython.

Scripting, for tests and the demo::

    cell = EmulatedCell("c1", workdir, factory=factory, pir_pin=17, door_pin=27,
                        radar=True, node=True)
    cell.enter()          # door opens, someone moves in, door shuts
    cell.sit_still()      # the PIRs stop seeing them, the radar still does
    cell.leave()
    cell.stick("pir", True); cell.radar.unplug(); cell.node.inject_garbage(); cell.node.crash()

The node model loads its own copy of boards/firmware/cellnode.py, binds :class:`FakeMachine`
and :class:`FakeUtime` to it (no ``sys.modules`` patching) and runs ``Node.step`` every 10 ms,
as the Pico's main loop does. ``FakeMachine`` is the stateful ``machine`` test double: pins
keep their mode, pull and level, ``reset()`` behaves like a hardware reset.

Devices on ptys write without blocking: when nobody reads the port, bytes are dropped, as a
UART or a CDC port with no host loses them (a full pty would otherwise stall the model).
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import threading
import time
from pathlib import Path

from edge.cells.ld2410 import (CMD_ENABLE_CONFIG, CMD_END_CONFIG, CMD_READ_FIRMWARE, CommandFrame,
                               Ld2410Decoder, Report, TargetState, encode_ack, encode_report)
from emulator.pty import PtyDevice

FIRMWARE_PATH = Path(__file__).resolve().parent.parent / "boards" / "firmware" / "cellnode.py"

# MicroPython's ticks wrap at 2**30 on every port (utime docs: TICKS_PERIOD).
TICKS_PERIOD = 1 << 30
_module_ids = itertools.count(1)


# -- what devices report -------------------------------------------------------------------------
class EventLog:
    """A sink for device workers (``sink=log.put``) that keeps every event and lets a test
    wait for one with a deadline (a Condition, no polling)."""

    def __init__(self) -> None:
        self.events: list[object] = []
        self._cond = threading.Condition()

    def put(self, event: object) -> None:
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    def wait(self, predicate, timeout_s: float = 5.0, *, after: int = 0, what: str = "an event"):
        """The first event at index >= ``after`` matching ``predicate``; AssertionError (listing
        what came) when none arrives within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                for ev in self.events[after:]:
                    if predicate(ev):
                        return ev
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}; got "
                                         f"{self.events[after:][-20:]}")
                self._cond.wait(remaining)

    def mark(self) -> int:
        """Index to pass as ``after`` to wait only for events from now on."""
        with self._cond:
            return len(self.events)

    def of_type(self, cls) -> list:
        with self._cond:
            return [e for e in self.events if isinstance(e, cls)]


# -- the MCU test doubles -------------------------------------------------------------------------
class MachineReset(Exception):
    """Raised by FakeMachine.reset(): the real one never returns either."""


class FakeMachine:
    """A stateful stand-in for MicroPython's ``machine`` module (the parts the firmware uses).

    ``drive(pin, level)`` is the outside world on an input pin (None: nothing connected, the
    pull decides); ``level(pin)`` is what the pin reads or outputs now. Pins are keyed by the
    id the firmware used (an int or "LED").
    """

    def __init__(self, uid: bytes = bytes.fromhex("e66038b7136d2a2f")) -> None:
        self.uid = uid
        self.resets = 0
        self.driven: dict[object, int | None] = {}
        self.modes: dict[object, int] = {}
        self.pulls: dict[object, int | None] = {}
        self.outputs: dict[object, int] = {}
        self.Pin = self._pin_class()

    def _pin_class(self):
        board = self

        class Pin:
            IN = 0
            OUT = 1
            PULL_UP = 1
            PULL_DOWN = 2

            def __init__(self, pin_id, mode: int = -1, pull: int | None = None, *, value=None) -> None:
                self.id = pin_id
                if mode != -1:
                    board.modes[pin_id] = mode
                board.pulls[pin_id] = pull
                if value is not None:
                    board.outputs[pin_id] = 1 if value else 0

            def value(self, x=None):
                if x is None:
                    return board.level(self.id)
                board.outputs[self.id] = 1 if x else 0
                return None

            def on(self) -> None:
                self.value(1)

            def off(self) -> None:
                self.value(0)

        return Pin

    def drive(self, pin_id, level: int | None) -> None:
        self.driven[pin_id] = None if level is None else (1 if level else 0)

    def level(self, pin_id) -> int:
        if self.modes.get(pin_id) == self.Pin.OUT:
            return self.outputs.get(pin_id, 0)
        driven = self.driven.get(pin_id)
        if driven is not None:
            return driven
        return 1 if self.pulls.get(pin_id) == self.Pin.PULL_UP else 0

    def unique_id(self) -> bytes:
        return self.uid

    def reset(self) -> None:
        self.resets += 1
        raise MachineReset()


class FakeUtime:
    """``utime`` with MicroPython's wrapping millisecond ticks. Time comes from ``now_s``
    (default: time.monotonic) or, with ``manual=True``, only from :meth:`advance`.
    ``start_ms`` lets a test start just before the wrap."""

    def __init__(self, *, start_ms: int = 0, manual: bool = False, now_s=time.monotonic) -> None:
        self._manual = manual
        self._now_s = now_s
        self._origin = now_s()
        self._start = start_ms
        self._manual_ms = 0

    def _elapsed_ms(self) -> int:
        if self._manual:
            return self._manual_ms
        return int((self._now_s() - self._origin) * 1000)

    def advance(self, ms: int) -> None:
        self._manual_ms += ms

    def ticks_ms(self) -> int:
        return (self._start + self._elapsed_ms()) % TICKS_PERIOD

    @staticmethod
    def ticks_add(ticks: int, delta: int) -> int:
        return (ticks + delta) % TICKS_PERIOD

    @staticmethod
    def ticks_diff(a: int, b: int) -> int:
        half = TICKS_PERIOD // 2
        return ((a - b + half) % TICKS_PERIOD) - half

    def sleep_ms(self, ms: int) -> None:
        if self._manual:
            self._manual_ms += ms
        else:
            time.sleep(ms / 1000)


def load_firmware(machine: FakeMachine, utime: FakeUtime):
    """A fresh copy of the firmware module, bound to these doubles (one per emulated node, so
    two nodes never share module state). Not registered in ``sys.modules``."""
    spec = importlib.util.spec_from_file_location(f"_hallkiosk_cellnode_{next(_module_ids)}", FIRMWARE_PATH)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load the cell node firmware from {FIRMWARE_PATH}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.bind(machine, utime)
    return module


class _NoBlockPty(PtyDevice):
    """A PtyDevice whose model writes without blocking (uses the base's lock and master fd)."""

    def send(self, data: bytes) -> None:
        """Write what the pty takes now and drop the rest (a line nobody reads loses data)."""
        with self._lock:
            master = self._master
            if master is None:
                return
            try:
                os.write(master, data)
            except (BlockingIOError, OSError):
                pass


# -- the cell node ---------------------------------------------------------------------------------
_TRACEBACK = (b"Traceback (most recent call last):\r\n  File \"main.py\", line 1, in <module>\r\n"
              b"MemoryError: memory allocation failed\r\nMicroPython v1.29.0 on 2026-08-29; "
              b"Raspberry Pi Pico with RP2040\r\nType \"help()\" for more information.\r\n>>> ")


class EmulatedNode(_NoBlockPty):
    """The Pico node on a pty. ``machine`` is its FakeMachine (drive its pins), ``commands``
    the host frames it accepted, ``boots`` how often the firmware started.

    Faults: ``unplug()``/``replug()`` (USB cable), ``set_silent(True)`` (firmware hangs: no
    output, no answers), ``inject_garbage()``, ``crash()`` (firmware dies into the REPL:
    only Ctrl-D, a soft reset, brings it back).
    """

    kind = "cell-node"

    def __init__(self, path, *, hb_ms: int = 1000, pir_pin: int = 14, door_pin: int = 15,
                 start_ms: int = 0, door_closed: bool = True, motion: bool = False) -> None:
        self.hb_ms = hb_ms
        self.pir_pin = pir_pin
        self.door_pin = door_pin
        self.machine = FakeMachine()
        self.utime = FakeUtime(start_ms=start_ms)
        self.commands: list[str] = []
        self.boots = 0
        self.silent = False
        self.in_repl = False
        self._rx = bytearray()
        self._rx_lock = threading.Lock()
        self._stop = threading.Event()
        self.set_motion(motion)
        self.set_door_closed(door_closed)
        self._boot()
        super().__init__(path)
        self._loop = threading.Thread(target=self._main_loop, name="emu-cell-node-loop", daemon=True)
        self._loop.start()

    def _boot(self) -> None:
        self.firmware = load_firmware(self.machine, self.utime)
        self.node = self.firmware.Node(hb_ms=self.hb_ms, pir_pin=self.pir_pin, door_pin=self.door_pin)
        self._cmd_reader = self.firmware.LineReader()
        self.boots += 1
        self.in_repl = False

    # -- scripting -----------------------------------------------------------------------------
    def set_motion(self, motion: bool) -> None:
        self.machine.drive(self.pir_pin, 1 if motion else 0)

    def set_door_closed(self, closed: bool) -> None:
        # Reed switch to ground with the pull-up: closed contact reads 0.
        self.machine.drive(self.door_pin, 0 if closed else 1)

    def set_silent(self, silent: bool = True) -> None:
        self.silent = silent

    def inject_garbage(self, data: bytes = b"\x00\xff$HK1,ST\x13\x10garbage*12\n$$\r\n\xfe") -> None:
        self.send(data)

    def crash(self) -> None:
        """The firmware dies with a traceback and MicroPython sits at the REPL prompt."""
        self.in_repl = True
        self.send(_TRACEBACK)

    def on_bytes(self, data: bytes) -> None:
        with self._rx_lock:
            if len(self._rx) < 4096:
                self._rx += data

    def on_replug(self) -> None:
        with self._rx_lock:
            self._rx.clear()
        self._boot()  # USB power comes back with the cable: a cold boot

    # -- the main loop, as on the Pico ------------------------------------------------------------
    def _main_loop(self) -> None:
        loop_s = self.firmware.LOOP_MS / 1000
        while not self._stop.wait(loop_s):
            with self._rx_lock:
                rx = bytes(self._rx)
                self._rx.clear()
            if not self.plugged:
                continue
            if self.in_repl or self.node.stopped:
                self._repl(rx)
                continue
            try:
                out = self.node.step(rx)
            except MachineReset:
                # A hardware reset drops the USB device: the host sees an unplug, then a
                # new port with a freshly booted node.
                self.unplug()
                self.replug()
                continue
            self._record(rx)
            if out and not self.silent:
                self.send(out)

    def _record(self, rx: bytes) -> None:
        if rx:
            for item in self._cmd_reader.feed(rx):
                if not isinstance(item, str):
                    self.commands.append(item[0])

    def _repl(self, rx: bytes) -> None:
        if b"\x04" in rx:  # Ctrl-D at the REPL: soft reset, main.py runs again
            self.send(b"MPY: soft reboot\r\n")
            self._boot()

    def close(self) -> None:
        self._stop.set()
        if getattr(self, "_loop", None) is not None and self._loop is not threading.current_thread():
            self._loop.join(2)
        super().close()


# -- the LD2410 radar ------------------------------------------------------------------------------
class EmulatedRadar(_NoBlockPty):
    """An LD2410 on a pty: reports every ``interval_s`` (about 10 Hz, like the module), answers
    the configuration commands the driver uses, stops reporting in configuration mode.

    Scripting: ``set_target(TargetState.STILL, still_cm=80)``; faults: ``unplug()``,
    ``set_silent()``, ``inject_garbage()``, ``ignore_commands`` (a module that never ACKs).
    ``commands`` lists the command words received.
    """

    kind = "ld2410"
    FIRMWARE = (0x0107, 0x22091516)

    def __init__(self, path, *, interval_s: float = 0.1) -> None:
        self.interval_s = interval_s
        self.report = Report(TargetState.NONE, 0, 0, 0, 0, 0)
        self.config_mode = False
        self.silent = False
        self.ignore_commands = False
        self.commands: list[int] = []
        self._decoder = Ld2410Decoder(to_radar=True)
        self._stop = threading.Event()
        super().__init__(path)
        self._thread_reports = threading.Thread(target=self._report_loop, name="emu-ld2410-reports", daemon=True)
        self._thread_reports.start()

    def set_target(self, state: int, *, move_cm: int = 120, move_energy: int = 60, still_cm: int = 90,
                   still_energy: int = 45) -> None:
        state = TargetState(state)
        moving = state in (TargetState.MOVING, TargetState.BOTH)
        still = state in (TargetState.STILL, TargetState.BOTH)
        self.report = Report(state, move_cm if moving else 0, move_energy if moving else 0,
                             still_cm if still else 0, still_energy if still else 0,
                             max(move_cm if moving else 0, still_cm if still else 0))

    def set_silent(self, silent: bool = True) -> None:
        self.silent = silent

    def inject_garbage(self, data: bytes = b"\xf4\xf3\xf2\xf1\xff\x7f\x00\xfd\xfc\xfb\xfa\x02\x00\x13") -> None:
        self.send(data)

    def on_bytes(self, data: bytes) -> None:
        for frame in self._decoder.feed(data):
            if isinstance(frame, CommandFrame):
                self._command(frame)

    def _command(self, cmd: CommandFrame) -> None:
        self.commands.append(cmd.word)
        if self.ignore_commands:
            return
        if cmd.word == CMD_ENABLE_CONFIG:
            self.config_mode = True
            self.send(encode_ack(cmd.word, 0, b"\x01\x00\x40\x00"))  # protocol 1, buffer 64
        elif cmd.word == CMD_END_CONFIG:
            self.config_mode = False
            self.send(encode_ack(cmd.word, 0))
        elif cmd.word == CMD_READ_FIRMWARE and self.config_mode:
            major, build = self.FIRMWARE
            self.send(encode_ack(cmd.word, 0, b"\x00\x00" + major.to_bytes(2, "little")
                                 + build.to_bytes(4, "little")))
        else:
            self.send(encode_ack(cmd.word, 1))  # refused (outside config mode, or unknown)

    def on_replug(self) -> None:
        self.config_mode = False
        self._decoder.reset()

    def _report_loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            if self.plugged and not self.config_mode and not self.silent:
                self.send(encode_report(self.report))

    def close(self) -> None:
        self._stop.set()
        self._thread_reports.join(2)
        super().close()


# -- the cell ----------------------------------------------------------------------------------------
class EmulatedCell:
    """One cell's sensors, driven by a scripted person. Any of the GPIO PIR, GPIO door, radar
    and node may be fitted; every fitted sensor sees the same person.

    ``factory`` is the MockFactory the agent's gpiozero devices use (needed for GPIO pins).
    ``stick(sensor, level)`` freezes a sensor ("pir", "door", "radar", "node_pir",
    "node_door") whatever the person does; ``unstick(sensor)`` releases it.
    """

    SENSORS = ("pir", "door", "radar", "node_pir", "node_door")

    def __init__(self, cell_id: str, workdir, *, factory=None, pir_pin: int | None = None,
                 door_pin: int | None = None, indicator_pin: int | None = None, radar: bool = False,
                 node: bool = False, node_hb_ms: int = 1000, radar_interval_s: float = 0.1) -> None:
        if (pir_pin is not None or door_pin is not None or indicator_pin is not None) and factory is None:
            raise ValueError("GPIO sensors need the MockFactory the agent uses")
        self.id = cell_id
        self.dir = Path(workdir)
        self.factory = factory
        self.pir_pin = pir_pin
        self.door_pin = door_pin
        self.indicator_pin = indicator_pin
        self.radar = EmulatedRadar(self.dir / "dev" / f"{cell_id}-radar",
                                   interval_s=radar_interval_s) if radar else None
        self.node = EmulatedNode(self.dir / "dev" / f"{cell_id}-node", hb_ms=node_hb_ms) if node else None
        self._stuck: dict[str, bool] = {}
        self.motion = False
        self.still = False
        self.door_closed = True
        self._apply()

    # -- the person ----------------------------------------------------------------------------
    def enter(self, door_open_s: float = 0.3) -> None:
        """Open the door, step in moving, shut the door (``door_open_s``: how long a person
        takes to walk through; it must exceed the door debounce to be seen)."""
        self.open_door()
        self.set_person(motion=True)
        time.sleep(door_open_s)   # a person's pace, not synchronisation
        self.close_door()

    def leave(self, door_open_s: float = 0.3) -> None:
        self.set_person(motion=True)
        self.open_door()
        time.sleep(door_open_s)   # a person's pace, not synchronisation
        self.set_person(motion=False, still=False)
        self.close_door()

    def sit_still(self) -> None:
        """The PIRs stop seeing the person; the radar still does."""
        self.set_person(motion=False, still=True)

    def move(self) -> None:
        self.set_person(motion=True)

    def set_person(self, *, motion: bool, still: bool | None = None) -> None:
        self.motion = motion
        if still is not None:
            self.still = still
        self._apply()

    def open_door(self) -> None:
        self.door_closed = False
        self._apply()

    def close_door(self) -> None:
        self.door_closed = True
        self._apply()

    # -- faults -----------------------------------------------------------------------------------
    def stick(self, sensor: str, level: bool) -> None:
        if sensor not in self.SENSORS:
            raise ValueError(f"unknown sensor {sensor!r}; one of {', '.join(self.SENSORS)}")
        self._stuck[sensor] = level
        self._apply()

    def unstick(self, sensor: str) -> None:
        self._stuck.pop(sensor, None)
        self._apply()

    # -- what the cell shows ----------------------------------------------------------------------
    def indicator_on(self) -> bool:
        if self.factory is None or self.indicator_pin is None:
            raise ValueError(f"cell {self.id} has no indicator pin")
        return bool(self.factory.pin(self.indicator_pin).state)

    def _level(self, sensor: str, value: bool) -> bool:
        return self._stuck.get(sensor, value)

    def _apply(self) -> None:
        if self.factory is not None and self.pir_pin is not None:
            self._drive(self.pir_pin, self._level("pir", self.motion))
        if self.factory is not None and self.door_pin is not None:
            # Reed switch to ground with the pull-up: a shut door closes the contact (low).
            self._drive(self.door_pin, not self._level("door", self.door_closed))
        if self.radar is not None:
            moving = self.motion
            still = self.still and not self.motion
            if "radar" in self._stuck:
                moving, still = self._stuck["radar"], False
            state = (TargetState.BOTH if moving and self.still else TargetState.MOVING if moving
                     else TargetState.STILL if still else TargetState.NONE)
            self.radar.set_target(state)
        if self.node is not None:
            self.node.set_motion(self._level("node_pir", self.motion))
            self.node.set_door_closed(self._level("node_door", self.door_closed))

    def _drive(self, pin_number: int, high: bool) -> None:
        pin = self.factory.pin(pin_number)
        if high:
            pin.drive_high()
        else:
            pin.drive_low()

    def close(self) -> None:
        for dev in (self.radar, self.node):
            if dev is not None:
                dev.close()

    def __enter__(self) -> EmulatedCell:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
