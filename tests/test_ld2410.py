"""LD2410 radar: the pure frame codec (vectors, resync, bounds, fuzz), and the driver and worker
against the emulated radar over real ptys (firmware query, presence, silence, unplug, garbage)."""

from __future__ import annotations

import pytest
import serial
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.cells.ld2410 import (CMD_ENABLE_CONFIG, CMD_END_CONFIG, CMD_READ_FIRMWARE, MAX_FRAME, CommandFrame,
                               Ld2410, Ld2410Decoder, RadarWorker, Report, TargetState, encode_ack,
                               encode_command, encode_report, parse_firmware_version)
from edge.cells.occupancy import SensorAvailability, SensorReading
from edge.events import DeviceFault, DeviceRecovered
from emulator.cells import EmulatedRadar, EventLog
from hallkiosk.errors import DeviceTimeout

SETTINGS = settings(max_examples=200, deadline=None)

# Built by hand from the vendor's layout, independently of encode_*.
BASIC_STILL_90CM = bytes.fromhex("f4f3f2f1 0d00 02aa 02 0000 00 5a00 3c 5a00 5500 f8f7f6f5")
ENABLE_CONFIG_CMD = bytes.fromhex("fdfcfbfa 0400 ff00 0100 04030201")
ENABLE_CONFIG_ACK = bytes.fromhex("fdfcfbfa 0800 ff01 0000 0100 4000 04030201")
FIRMWARE_ACK = bytes.fromhex("fdfcfbfa 0c00 a001 0000 0000 0701 16150922 04030201")

reports = st.builds(Report, st.integers(0, 3), st.integers(0, 0xFFFF), st.integers(0, 100),
                    st.integers(0, 0xFFFF), st.integers(0, 100), st.integers(0, 0xFFFF), st.just(False))
acks = st.builds(lambda w, s, d: CommandFrame(w, d, ack=True, status=s),
                 st.integers(0, 0xFEFF).filter(lambda w: not w & 0x0100), st.integers(0, 0xFFFF),
                 st.binary(max_size=20))


def _encode(frame) -> bytes:
    if isinstance(frame, Report):
        return encode_report(frame)
    return encode_ack(frame.word, frame.status, frame.data)


# -- codec -----------------------------------------------------------------------------------------
def test_vectors():
    assert Ld2410Decoder().feed(BASIC_STILL_90CM) == [Report(TargetState.STILL, 0, 0, 90, 60, 90)]
    assert encode_report(Report(2, 0, 0, 90, 60, 90)) == BASIC_STILL_90CM
    assert encode_command(CMD_ENABLE_CONFIG, b"\x01\x00") == ENABLE_CONFIG_CMD
    assert Ld2410Decoder().feed(ENABLE_CONFIG_ACK) == [CommandFrame(CMD_ENABLE_CONFIG, b"\x01\x00\x40\x00",
                                                                    ack=True, status=0)]
    [ack] = Ld2410Decoder().feed(FIRMWARE_ACK)
    assert parse_firmware_version(ack) == "V1.07.22091516"
    assert Ld2410Decoder(to_radar=True).feed(ENABLE_CONFIG_CMD) == [CommandFrame(CMD_ENABLE_CONFIG, b"\x01\x00",
                                                                                  ack=False)]


def test_engineering_reports_decode_their_target_part():
    frame = encode_report(Report(3, 150, 70, 80, 40, 150, engineering=True), gate_energies=bytes(22))
    assert Ld2410Decoder().feed(frame) == [Report(3, 150, 70, 80, 40, 150, engineering=True)]


@SETTINGS
@given(st.lists(st.one_of(reports, acks), min_size=1, max_size=6),
       st.lists(st.binary(max_size=40), min_size=7, max_size=7), st.integers(1, 29))
def test_frames_are_found_between_garbage_in_any_chunking(frames, garbage, chunk):
    # Garbage may hold anything except a whole frame header, which would open a frame.
    garbage = [g.replace(b"\xf4\xf3\xf2\xf1", b"").replace(b"\xfd\xfc\xfb\xfa", b"") for g in garbage]
    stream = bytearray(garbage[0])
    for i, f in enumerate(frames):
        stream += _encode(f) + garbage[i + 1]
    dec = Ld2410Decoder()
    found = []
    for i in range(0, len(stream), chunk):
        found += dec.feed(bytes(stream[i:i + chunk]))
    assert found == frames


@SETTINGS
@given(st.lists(st.binary(max_size=200), max_size=20))
def test_the_decoder_survives_anything_in_bounded_memory(chunks):
    dec = Ld2410Decoder()
    for c in chunks:
        for frame in dec.feed(c):
            assert isinstance(frame, (Report, CommandFrame))
        assert len(dec._buf) < MAX_FRAME


def test_a_false_header_with_a_huge_length_does_not_swallow_the_next_frame():
    dec = Ld2410Decoder()
    assert dec.feed(b"\xf4\xf3\xf2\xf1\xff\x7f" + BASIC_STILL_90CM) == [Report(2, 0, 0, 90, 60, 90)]
    assert dec.bad_frames == 1


def test_a_frame_with_a_wrong_tail_is_dropped_and_the_next_is_kept():
    broken = BASIC_STILL_90CM[:-1] + b"\x00"
    dec = Ld2410Decoder()
    assert dec.feed(broken + BASIC_STILL_90CM) == [Report(2, 0, 0, 90, 60, 90)]
    assert dec.bad_frames >= 1


def test_reports_with_bad_inner_markers_or_state_are_rejected():
    for pos, value in ((7, 0x00), (17, 0x54), (8, 0x04), (6, 0x07)):   # AA, 55, state, type
        frame = bytearray(BASIC_STILL_90CM)
        frame[pos] = value
        dec = Ld2410Decoder()
        assert dec.feed(bytes(frame)) == [] and dec.bad_frames == 1


def test_the_host_side_ignores_commands_and_the_radar_side_ignores_acks():
    assert Ld2410Decoder().feed(ENABLE_CONFIG_CMD) == []
    assert Ld2410Decoder(to_radar=True).feed(ENABLE_CONFIG_ACK + BASIC_STILL_90CM) == []


def test_oversized_frames_cannot_be_encoded():
    with pytest.raises(ValueError):
        encode_command(CMD_READ_FIRMWARE, bytes(100))


# -- driver and worker over a real pty ----------------------------------------------------------------
@pytest.fixture
def radar(tmp_path):
    r = EmulatedRadar(tmp_path / "dev" / "radar", interval_s=0.05)
    yield r
    r.close()


def test_driver_reads_the_firmware_version_and_reports(radar):
    radar.set_target(TargetState.MOVING, move_cm=130)
    with serial.serial_for_url(radar.path, timeout=0.05) as port:
        drv = Ld2410(port, timeout_s=1.0)
        assert drv.firmware_version() == "V1.07.22091516"
        assert radar.commands == [CMD_ENABLE_CONFIG, CMD_READ_FIRMWARE, CMD_END_CONFIG]
        assert not radar.config_mode
        got = []
        while not got:
            got = drv.reports()
        assert got[-1].state == TargetState.MOVING and got[-1].move_cm == 130 and got[-1].present


def test_driver_times_out_on_a_radar_that_ignores_commands(radar):
    radar.ignore_commands = True
    with serial.serial_for_url(radar.path, timeout=0.05) as port:
        with pytest.raises(DeviceTimeout, match="no ACK for command 0x00ff"):
            Ld2410(port, timeout_s=0.3).command(CMD_ENABLE_CONFIG, b"\x01\x00")


@pytest.fixture
def start_worker():
    workers = []

    def start(path, log, **kwargs) -> RadarWorker:
        kwargs.setdefault("silence_timeout_s", 0.5)
        w = RadarWorker(str(path), cell="c1", sink=log.put, backoff_min_s=0.05, backoff_max_s=0.2,
                        command_timeout_s=0.3, **kwargs)
        w.start()
        workers.append(w)
        return w

    yield start
    for w in workers:
        w.stop()


def _presence(value):
    return lambda e: isinstance(e, SensorReading) and e.sensor == "radar" and e.value is value


def test_worker_reports_presence_changes_only(radar, start_worker):
    log = EventLog()
    worker = start_worker(radar.path, log)
    log.wait(_presence(False), what="first report")
    assert worker.firmware == "V1.07.22091516"
    radar.set_target(TargetState.STILL)
    log.wait(_presence(True), what="a still person")
    radar.set_target(TargetState.BOTH)           # still present: no new reading
    radar.set_target(TargetState.NONE)
    log.wait(_presence(False), after=2, what="nobody")
    readings = log.of_type(SensorReading)
    assert [r.value for r in readings] == [False, True, False]
    assert log.events[0] == SensorAvailability("c1", "radar", True)


def test_a_silent_radar_is_a_fault_until_it_reports_again(radar, start_worker):
    log = EventLog()
    start_worker(radar.path, log)
    log.wait(_presence(False))
    radar.set_silent(True)
    fault = log.wait(lambda e: isinstance(e, DeviceFault), what="silence fault")
    assert fault.device == "radar.c1" and "no report" in fault.detail
    log.wait(lambda e: isinstance(e, SensorAvailability) and not e.available)
    mark = log.mark()
    radar.set_silent(False)
    log.wait(lambda e: isinstance(e, DeviceRecovered), after=mark, what="recovery")
    log.wait(_presence(False), after=mark)


def test_unplug_and_replug(radar, start_worker):
    log = EventLog()
    start_worker(radar.path, log)
    log.wait(_presence(False))
    radar.unplug()
    log.wait(lambda e: isinstance(e, DeviceFault) and e.fault == "gone", what="unplug fault")
    mark = log.mark()
    radar.set_target(TargetState.MOVING)
    radar.replug()
    log.wait(lambda e: isinstance(e, DeviceRecovered), after=mark, what="recovery")
    log.wait(_presence(True), after=mark)


def test_garbage_does_not_disturb_the_worker(radar, start_worker):
    log = EventLog()
    worker = start_worker(radar.path, log)
    log.wait(_presence(False))
    for _ in range(5):
        radar.inject_garbage()
    radar.set_target(TargetState.MOVING)
    log.wait(_presence(True), what="presence after garbage")
    assert not log.of_type(DeviceFault)
    assert worker.last_report is not None


def test_a_radar_that_never_acks_still_works(radar, start_worker):
    radar.ignore_commands = True
    log = EventLog()
    worker = start_worker(radar.path, log)
    log.wait(_presence(False), what="reports without a firmware version")
    assert worker.firmware is None
    assert not log.of_type(DeviceFault)
