"""Cell sensor node: the shared framing, the firmware's logic under CPython with a stateful
``machine`` double, the firmware toolchain (mpy-cross, mypy against the RP2 stubs), and the
host worker against the emulated node over real ptys."""

from __future__ import annotations

import binascii
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import serial
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from boards.firmware import cellnode as wire
from edge.cells.node import (Ack, CellNode, CellNodeWorker, Heartbeat, Hello, NodeDecoder, NodeError,
                             NodeInfo, State, cmd_cell_node, encode_command)
from edge.cells.occupancy import SensorAvailability, SensorReading
from edge.events import DeviceFault, DeviceRecovered
from tests.conftest import wait_for
from emulator.cells import (FIRMWARE_PATH, EmulatedNode, EventLog, FakeMachine, FakeUtime,
                            MachineReset, load_firmware)

SETTINGS = settings(max_examples=200, deadline=None)
FIELD_CHARS = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) not in "$*,")


# -- framing ------------------------------------------------------------------------------------
def test_crc_check_value_and_documented_vectors():
    assert wire.crc16(b"123456789") == 0x29B1
    assert wire.encode("PING", 0) == b"$HK1,PING,0*573B\n"
    assert (wire.encode("HELLO", 0, ("1.0.0", "e66038b7136d2a2f", "5d1c09a2", 0))
            == b"$HK1,HELLO,0,1.0.0,e66038b7136d2a2f,5d1c09a2,0*C036\n")
    assert wire.encode("HB", 7, (42, 1, 0)) == b"$HK1,HB,7,42,1,0*7394\n"


@SETTINGS
@given(st.binary(max_size=200))
def test_crc_matches_an_independent_implementation(data):
    # binascii.crc_hqx is CRC-CCITT (poly 0x1021, not reflected) with a caller-chosen init.
    assert wire.crc16(data) == binascii.crc_hqx(data, 0xFFFF)


frames = st.tuples(st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=1, max_size=6),
                   st.integers(0, 0xFFFF),
                   st.lists(st.text(FIELD_CHARS, max_size=12), max_size=4))


def _encode_or_skip(kind, seq, fields):
    try:
        return wire.encode(kind, seq, tuple(fields))
    except ValueError:
        assume(False)


@SETTINGS
@given(frames, st.booleans())
def test_frames_round_trip(frame, crlf):
    kind, seq, fields = frame
    data = _encode_or_skip(kind, seq, fields)
    if crlf:
        data = data[:-1] + b"\r\n"
    assert wire.LineReader().feed(data) == [(kind, seq, list(fields))]


@SETTINGS
@given(st.lists(frames, min_size=1, max_size=5),
       st.lists(st.binary(max_size=30).map(lambda b: b.replace(b"$", b"")), min_size=6, max_size=6),
       st.integers(1, 17))
def test_frames_are_found_between_noise_in_any_chunking(frame_list, noise, chunk):
    stream = bytearray(noise[0])
    expected = []
    for i, (kind, seq, fields) in enumerate(frame_list):
        stream += _encode_or_skip(kind, seq, fields) + noise[i + 1]
        expected.append((kind, seq, list(fields)))
    reader = wire.LineReader()
    found = []
    for i in range(0, len(stream), chunk):
        found += reader.feed(bytes(stream[i:i + chunk]))
    # Noise lines end in LF but never start with "$": they are counted, never frames.
    assert [f for f in found if not isinstance(f, str)] == expected


@SETTINGS
@given(frames, st.data())
def test_a_single_bit_flip_is_never_accepted_as_the_frame(frame, data):
    kind, seq, fields = frame
    raw = bytearray(_encode_or_skip(kind, seq, fields))
    pos = data.draw(st.integers(1, len(raw) - 2))       # between "$" and LF
    bit = data.draw(st.integers(0, 7))
    # Upper and lower case CRC digits are both accepted: that flip changes no value.
    assume(not (pos >= len(raw) - 5 and chr(raw[pos]) in "ABCDEF" and bit == 5))
    raw[pos] ^= 1 << bit
    assert (kind, seq, list(fields)) not in wire.LineReader().feed(bytes(raw) + b"\n")


@SETTINGS
@given(st.lists(st.binary(max_size=300), max_size=20))
def test_the_line_reader_survives_anything_in_bounded_memory(chunks):
    reader = wire.LineReader()
    for c in chunks:
        for item in reader.feed(c):
            assert isinstance(item, (str, tuple))
        assert len(reader.buf) <= wire.MAX_LINE


def test_torn_and_oversized_frames_are_dropped_and_the_next_frame_is_kept():
    good = wire.encode("HB", 3, (1, 0, 1))
    reader = wire.LineReader()
    assert reader.feed(b"$HK1,STA" + good) == [wire.ERR_FORMAT, ("HB", 3, ["1", "0", "1"])]
    assert reader.feed(b"$" + b"A" * 500 + b"\n" + good) == [wire.ERR_LONG, ("HB", 3, ["1", "0", "1"])]
    assert reader.feed(good[:-5] + b"0000\n") == [wire.ERR_CRC]


def test_field_and_length_rules_are_enforced_when_encoding():
    for bad in ("a,b", "a*b", "$", "line\n", "caf\u00e9"):
        with pytest.raises(ValueError):
            wire.encode("X", 1, (bad,))
    with pytest.raises(ValueError):
        wire.encode("X", 1, ("A" * 100,))
    with pytest.raises(ValueError):
        encode_command("FORMAT", 1)


def test_host_decoder_types_messages_and_counts_bad_ones():
    dec = NodeDecoder()
    msgs = dec.feed(wire.encode("HELLO", 0, ("1.2.3", "ab", "c0ffee00", 5)) + wire.encode("STATE", 1, (1, 0))
                    + wire.encode("HB", 2, (9, 0, 1)) + wire.encode("ACK", 3, ("RESET",))
                    + wire.encode("ERR", 4, ("crc",)) + wire.encode("STATE", 5, (2, 0))
                    + wire.encode("HB", 6, ("-1", 0, 0)) + wire.encode("NEW", 7) + b"junk\n")
    assert msgs == [Hello(0, "1.2.3", "ab", "c0ffee00", 5), State(1, True, False), Heartbeat(2, 9, False, True),
                    Ack(3, "RESET"), NodeError(4, "crc")]
    assert dec.format_errors == 3 and dec.noise == 5


# -- the firmware's logic, under CPython ---------------------------------------------------------
class Board:
    """A firmware instance on a FakeMachine with manual time, stepped like the Pico's loop."""

    def __init__(self, start_ms: int = 0, hb_ms: int = 1000) -> None:
        self.machine = FakeMachine(uid=b"\x01\x02\xab")
        self.utime = FakeUtime(start_ms=start_ms, manual=True)
        self.fw = load_firmware(self.machine, self.utime)
        self.machine.drive(wire.DOOR_PIN, 0)                 # door shut
        self.node = self.fw.Node(hb_ms=hb_ms)
        self.decoder = NodeDecoder()

    def step(self, rx: bytes = b"") -> list:
        return self.decoder.feed(self.node.step(rx))

    def run(self, ms: int, every_ms: int = 10) -> list:
        out = []
        for _ in range(ms // every_ms):
            self.utime.advance(every_ms)
            out += self.step()
        return out


def test_firmware_boots_with_hello_and_state():
    b = Board()
    assert b.step() == [Hello(0, wire.FW_VERSION, "0102ab", b.node.boot_id, 0), State(1, False, True)]
    assert len(b.node.boot_id) == 8 and b.node.boot_id != Board().node.boot_id
    assert b.machine.modes[wire.PIR_PIN] == b.machine.Pin.IN
    assert b.machine.pulls[wire.PIR_PIN] == b.machine.Pin.PULL_DOWN
    assert b.machine.pulls[wire.DOOR_PIN] == b.machine.Pin.PULL_UP
    assert b.machine.level("LED") == 0


def test_firmware_heartbeats_every_period_without_bursting_after_a_stall():
    b = Board()
    b.step()
    b.utime.advance(999)
    assert b.step() == []
    b.utime.advance(1)
    assert b.step() == [Heartbeat(2, 1, False, True)]
    hbs = [m for m in b.run(10_000) if isinstance(m, Heartbeat)]
    assert len(hbs) == 10 and hbs[-1].uptime_s == 11
    b.utime.advance(5_000)          # the loop stalled (a long flash write, say)
    assert len([m for m in b.step() if isinstance(m, Heartbeat)]) == 1
    b.utime.advance(999)
    assert b.step() == []
    b.utime.advance(1)
    assert [type(m) for m in b.step()] == [Heartbeat]


def test_firmware_heartbeats_across_the_ticks_wrap():
    b = Board(start_ms=(1 << 30) - 2_500)
    b.step()
    hbs = [m for m in b.run(6_000) if isinstance(m, Heartbeat)]
    assert [h.uptime_s for h in hbs] == [1, 2, 3, 4, 5, 6]


def test_firmware_reports_motion_at_once_and_mirrors_it_on_the_led():
    b = Board()
    b.step()
    b.machine.drive(wire.PIR_PIN, 1)
    b.utime.advance(10)
    assert b.step() == [State(2, True, True)]
    assert b.machine.level("LED") == 1


def test_firmware_debounces_the_door():
    b = Board()
    b.step()
    b.machine.drive(wire.DOOR_PIN, 1)           # door opens ...
    assert b.run(30) == []
    b.machine.drive(wire.DOOR_PIN, 0)           # ... no: a bounce, shut again within 30 ms
    assert b.run(100) == []
    b.machine.drive(wire.DOOR_PIN, 1)           # really opens
    msgs = b.run(40)
    assert msgs == []
    assert b.run(20) == [State(2, False, False)]


def test_firmware_answers_ping_and_refuses_bad_frames():
    b = Board()
    b.step()
    assert b.step(encode_command("PING", 0)) == [Hello(2, wire.FW_VERSION, "0102ab", b.node.boot_id, 0),
                                                 State(3, False, True)]
    bad_crc = encode_command("PING", 1)[:-5] + b"0000\n"
    assert b.step(bad_crc) == [NodeError(4, "crc")]
    assert b.step(wire.encode("FORMAT", 2)) == [NodeError(5, "unknown")]
    assert b.step(b"$" + b"9" * 200 + b"\n") == [NodeError(6, "long")]
    assert b.step(b"\x03\x03\x04 noise without frames\r\n") == []       # Ctrl-C is data here
    assert b.node.errors == 3


def test_firmware_reset_acks_then_resets_the_board():
    b = Board()
    b.step()
    assert b.step(encode_command("RESET", 0)) == [Ack(2, "RESET")]
    b.utime.advance(wire.RESET_DELAY_MS - 10)
    b.step()
    b.utime.advance(10)
    with pytest.raises(MachineReset):
        b.step()
    assert b.machine.resets == 1


def test_firmware_stop_acks_and_ends_the_loop():
    b = Board()
    b.step()
    assert b.step(encode_command("STOP", 0)) == [Ack(2, "STOP")]
    assert b.node.stopped


@SETTINGS
@given(st.lists(st.tuples(st.sampled_from(["pir", "door"]), st.booleans(), st.integers(0, 400)),
                max_size=30))
def test_after_any_history_the_node_converges_to_the_pins(history):
    b = Board()
    b.step()
    levels = {"pir": False, "door": True}
    for pin, level, wait_ms in history:
        levels[pin] = level
        if pin == "pir":
            b.machine.drive(wire.PIR_PIN, 1 if level else 0)
        else:
            b.machine.drive(wire.DOOR_PIN, 0 if level else 1)
        b.run(wait_ms)
    msgs = b.run(1_100)
    last = [m for m in msgs if isinstance(m, (State, Heartbeat))][-1]
    assert (last.motion, last.door_closed) == (levels["pir"], levels["door"])
    assert b.decoder.crc_errors == b.decoder.format_errors == 0


# -- the firmware toolchain -------------------------------------------------------------------------
def test_firmware_compiles_with_mpy_cross(tmp_path):
    out = tmp_path / "cellnode.mpy"
    proc = subprocess.run([sys.executable, "-m", "mpy_cross", "-march=armv6m", "-o", str(out),
                           str(FIRMWARE_PATH)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert out.read_bytes()[:2] == b"M\x06"          # .mpy magic and format version 6


def _stubs_dir() -> Path:
    stubs = Path(os.environ.get("HALLKIOSK_MPY_STUBS", Path(sys.prefix) / "micropython-stubs"))
    if not (stubs / "machine.pyi").is_file() or not (stubs / "stdlib" / "VERSIONS").is_file():
        pytest.fail(f"MicroPython RP2 stubs not found in {stubs}: install them with "
                    f"`pip install --target {stubs} micropython-rp2-stubs==1.29.0.post1`")
    return stubs


def _mypy(path: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    stubs = _stubs_dir()
    config = tmp_path / "mypy.ini"
    # The stubs themselves do not pass mypy; only the firmware's own errors count.
    config.write_text("[mypy]\npython_version = 3.11\nignore_errors = True\ncheck_untyped_defs = True\n"
                      "warn_unused_ignores = True\nwarn_redundant_casts = True\n"
                      "[mypy-cellnode,boards.firmware.cellnode]\nignore_errors = False\n")
    env = dict(os.environ, MYPYPATH=str(stubs))
    return subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(config),
                           "--custom-typeshed-dir", str(stubs), "--no-site-packages",
                           "--cache-dir", str(tmp_path / "mypy-cache"), str(path)],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)


def test_firmware_type_checks_against_the_rp2_stubs(tmp_path):
    proc = _mypy(FIRMWARE_PATH, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The check has teeth: the same file with a misspelt Pin method fails it.
    broken = tmp_path / "cellnode.py"
    text = FIRMWARE_PATH.read_text()
    assert "self.led.value(motion)" in text
    broken.write_text(text.replace("self.led.value(motion)", "self.led.vlue(motion)"))
    proc = _mypy(broken, tmp_path)
    assert proc.returncode == 1 and '"Pin" has no attribute "vlue"' in proc.stdout, proc.stdout


# -- the host worker against the emulated node, over a real pty ---------------------------------------
@pytest.fixture
def node(tmp_path):
    n = EmulatedNode(tmp_path / "dev" / "node", hb_ms=200)
    n.set_door_closed(True)
    yield n
    n.close()


@pytest.fixture
def worker_for():
    workers = []

    def start(path, log: EventLog) -> CellNodeWorker:
        w = CellNodeWorker(str(path), cell="c1", sink=log.put, hello_timeout_s=0.6,
                           heartbeat_timeout_s=0.8, backoff_min_s=0.05, backoff_max_s=0.2)
        w.start()
        workers.append(w)
        return w

    yield start
    for w in workers:
        w.stop()


def _reading(sensor, value):
    return lambda e: isinstance(e, SensorReading) and e.sensor == sensor and e.value == value


def test_worker_reports_the_node_and_its_sensors(node, worker_for):
    log = EventLog()
    worker_for(node.path, log)
    info = log.wait(lambda e: isinstance(e, NodeInfo), what="NodeInfo")
    assert (info.fw_version, info.uid, info.rebooted) == (wire.FW_VERSION, "e66038b7136d2a2f", False)
    log.wait(_reading("door", True), what="door shut")
    log.wait(_reading("pir", False), what="no motion")
    assert {(e.sensor, e.available) for e in log.of_type(SensorAvailability)} == {("pir", True), ("door", True)}
    mark = log.mark()
    node.set_motion(True)
    log.wait(_reading("pir", True), after=mark, what="motion")
    node.set_door_closed(False)
    log.wait(_reading("door", False), after=mark, what="door open")
    assert node.commands == ["PING"]
    assert not log.of_type(DeviceFault)


def test_lost_heartbeat_is_a_fault_and_the_node_recovers(node, worker_for):
    log = EventLog()
    worker_for(node.path, log)
    log.wait(lambda e: isinstance(e, NodeInfo))
    node.set_silent(True)                         # the firmware hangs
    fault = log.wait(lambda e: isinstance(e, DeviceFault), what="heartbeat fault")
    assert fault.device == "cell-node.c1" and "heartbeat" in fault.detail
    log.wait(lambda e: isinstance(e, SensorAvailability) and not e.available)
    mark = log.mark()
    node.set_silent(False)
    log.wait(lambda e: isinstance(e, DeviceRecovered), after=mark, what="recovery")
    log.wait(lambda e: isinstance(e, SensorAvailability) and e.available, after=mark)


def test_unplug_and_replug_report_a_rebooted_node(node, worker_for):
    log = EventLog()
    worker = worker_for(node.path, log)
    log.wait(lambda e: isinstance(e, NodeInfo))
    node.unplug()
    log.wait(lambda e: isinstance(e, DeviceFault) and e.fault == "gone", what="unplug fault")
    mark = log.mark()
    node.replug()
    log.wait(lambda e: isinstance(e, DeviceRecovered), after=mark, what="recovery")
    info = log.wait(lambda e: isinstance(e, NodeInfo), after=mark)
    assert info.rebooted and worker.reboots == 1 and node.boots == 2


def test_garbage_on_the_line_is_skipped(node, worker_for):
    log = EventLog()
    worker = worker_for(node.path, log)
    log.wait(lambda e: isinstance(e, NodeInfo))
    mark = log.mark()
    node.inject_garbage()
    node.set_motion(True)
    log.wait(_reading("pir", True), after=mark, what="motion after garbage")
    assert worker.stats["format_errors"] >= 1
    assert not log.of_type(DeviceFault)


def test_a_crashed_firmware_is_revived_with_a_soft_reset(node, worker_for):
    log = EventLog()
    worker_for(node.path, log)
    log.wait(lambda e: isinstance(e, NodeInfo))
    node.crash()
    log.wait(lambda e: isinstance(e, DeviceFault), what="fault after the crash")
    info = log.wait(lambda e: isinstance(e, NodeInfo) and e.rebooted, timeout_s=8, what="revived node")
    assert info.uid == "e66038b7136d2a2f" and node.boots == 2 and not node.in_repl
    log.wait(lambda e: isinstance(e, DeviceRecovered))


def test_driver_reset_command_reboots_the_node(node):
    with serial.serial_for_url(node.path, timeout=0.05) as port:
        driver = CellNode(port)
        hello, state, _ = driver.handshake(1.0)
        assert state == State(hello.seq + 1, False, True)
        driver.send("RESET")
        deadline = driver.clock.monotonic() + 2
        acks = []
        while not acks and driver.clock.monotonic() < deadline:
            acks = [m for m in driver.read() if isinstance(m, Ack)]
        assert [a.command for a in acks] == ["RESET"]
    wait_for(lambda: node.machine.resets == 1 and node.boots == 2, 3, "the node's reset and reboot")


def test_cli_shows_the_node(node, capsys):
    assert cmd_cell_node(SimpleNamespace(port=node.path, action="info", timeout_s=1.0)) == 0
    out = capsys.readouterr().out
    assert f"firmware {wire.FW_VERSION}" in out and "door_closed=1" in out


def test_emulated_node_runs_its_own_copy_of_the_firmware(tmp_path):
    a = load_firmware(FakeMachine(), FakeUtime(manual=True))
    b = load_firmware(FakeMachine(), FakeUtime(manual=True))
    assert a is not b and a.machine is not b.machine
    assert a.__name__ not in sys.modules
