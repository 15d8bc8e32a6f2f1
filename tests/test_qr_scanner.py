"""The GM65-class scanner: the pure framer (fuzzed), and QrScannerWorker against
EmulatedQrScanner over a real pty, opened the way the agent opens it."""

from __future__ import annotations

import queue
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.events import DeviceFault, DeviceRecovered
from edge.qr import QrScanned, QrUnreadable
from edge.qr.codes import QrRefused, parse_qr
from edge.qr.scanner import (
    TERMINATORS,
    TRIGGER_ACK,
    TRIGGER_COMMAND,
    QrScannerWorker,
    ScanFramer,
    UnterminatedFrame,
)
from emulator.booking import BookingService
from emulator.qrscanner import EmulatedQrScanner
from hallkiosk.errors import FrameTooLong

HALL = "citizen-home"
NOW_S = 1_795_000_000
BOOKING = BookingService(HALL)
CODE = BOOKING.appointment("A", start_s=NOW_S, appointment_id="BK-000007")


# -- the framer (pure) --------------------------------------------------------------------------
@pytest.mark.parametrize("terminator", ["CR", "LF", "CRLF", "TAB"])
def test_terminated_frames(terminator):
    t = TERMINATORS[terminator]
    f = ScanFramer(terminator=terminator)
    assert f.feed(b"ONE" + t + b"TWO" + t + b"THR", 0.0) == [b"ONE", b"TWO"]
    assert f.feed(b"EE" + t, 0.01) == [b"THREE"]
    assert f.pop_errors() == [] and f.deadline() is None


def test_crlf_split_between_reads():
    f = ScanFramer(terminator="CRLF")
    assert f.feed(b"CODE\r", 0.0) == []
    assert f.feed(b"\nNEXT\r\n", 0.01) == [b"CODE", b"NEXT"]


def test_lone_cr_inside_a_crlf_frame_is_data():
    f = ScanFramer(terminator="CRLF")
    assert f.feed(b"A\rB\r\n", 0.0) == [b"A\rB"]


def test_empty_frames_are_dropped():
    f = ScanFramer(terminator="CR")
    assert f.feed(b"\r\r\rX\r", 0.0) == [b"X"]


def test_idle_gap_framing_without_terminator():
    f = ScanFramer(terminator="NONE", idle_gap_s=0.08)
    assert f.feed(b"HKA1.", 0.00) == []
    assert f.feed(b"AAAA", 0.05) == []                  # still within the burst
    assert f.poll(0.12) == []
    assert f.deadline() == pytest.approx(0.13)
    assert f.poll(0.13) == [b"HKA1.AAAA"]
    assert f.feed(b"NEXT", 1.0) == []
    assert f.feed(b"AFTER", 1.2) == [b"NEXT"]           # the gap before new bytes ends a frame
    assert f.poll(1.3) == [b"AFTER"]


def test_oversized_frame_is_dropped_and_the_framer_resynchronises():
    f = ScanFramer(terminator="CR", max_len=16)
    assert f.feed(b"X" * 10, 0.0) == []
    assert f.feed(b"X" * 10, 0.0) == []                 # 20 > 16: dropping
    assert f.feed(b"X" * 1000, 0.0) == []               # memory stays bounded while dropping
    assert len(f._buf) <= 16
    assert f.feed(b"XX\rGOOD\r", 0.0) == [b"GOOD"]
    errors = f.pop_errors()
    assert len(errors) == 1 and isinstance(errors[0], FrameTooLong)
    assert "XX" not in str(errors[0])


def test_oversized_frame_inside_one_read():
    f = ScanFramer(terminator="LF", max_len=4)
    assert f.feed(b"12345\nok\n", 0.0) == [b"ok"]
    assert [type(e) for e in f.pop_errors()] == [FrameTooLong]


def test_oversized_frame_without_terminator():
    f = ScanFramer(terminator="NONE", max_len=8)
    f.feed(b"0123456789", 0.0)
    assert f.poll(1.0) == []
    assert [type(e) for e in f.pop_errors()] == [FrameTooLong]
    f.feed(b"short", 2.0)
    assert f.poll(3.0) == [b"short"]


def test_unterminated_frame_goes_stale_and_is_reported():
    f = ScanFramer(terminator="CR", stale_s=0.5)
    f.feed(b"HALF-A-CODE", 0.0)
    assert f.poll(0.4) == [] and f.pop_errors() == []
    assert f.poll(0.5) == []
    errors = f.pop_errors()
    assert [type(e) for e in errors] == [UnterminatedFrame]
    assert "HALF" not in str(errors[0])
    assert f.feed(b"WHOLE\r", 1.0) == [b"WHOLE"]


@pytest.mark.parametrize("terminator", ["CR", "CRLF", "NONE"])
def test_trigger_acknowledgement_is_not_a_payload(terminator):
    t = TERMINATORS[terminator]
    f = ScanFramer(terminator=terminator)
    got = f.feed(TRIGGER_ACK[:3], 0.0) + f.feed(TRIGGER_ACK[3:] + b"CODE" + t, 0.01)
    got += f.poll(1.0)
    assert got == [b"CODE"]
    # An acknowledgement alone (the module found no code before its timeout) is no error.
    got = f.feed(TRIGGER_ACK, 2.0) + f.poll(3.0)
    assert got == [] and f.pop_errors() == [] and f.acks == 2


def test_bad_framer_settings():
    for kwargs in (dict(terminator="ETX"), dict(idle_gap_s=0), dict(max_len=0),
                   dict(idle_gap_s=0.5, stale_s=0.1)):
        with pytest.raises(ValueError):
            ScanFramer(**kwargs)


frames_st = st.lists(st.binary(min_size=1, max_size=40).filter(lambda b: b"\r" not in b
                                                               and not b.startswith(TRIGGER_ACK[:1])),
                     min_size=0, max_size=8)


@settings(max_examples=200, deadline=None)
@given(frames_st, st.lists(st.integers(min_value=1, max_value=30), min_size=1, max_size=20))
def test_any_chunking_yields_the_same_frames(frames, cuts):
    stream = b"".join(fr + b"\r" for fr in frames)
    f = ScanFramer(terminator="CR", max_len=40)
    got, pos, i = [], 0, 0
    while pos < len(stream):
        n = cuts[i % len(cuts)]
        got += f.feed(stream[pos:pos + n], 0.0)
        pos, i = pos + n, i + 1
    assert got == frames and f.pop_errors() == []


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=3000), st.sampled_from(list(TERMINATORS)))
def test_arbitrary_line_noise_is_bounded(noise, terminator):
    f = ScanFramer(terminator=terminator, max_len=64)
    out = []
    for i in range(0, len(noise), 97):
        out += f.feed(noise[i:i + 97], i / 1000)
        assert len(f._buf) <= 64 + 1
    out += f.poll(100.0)
    assert all(0 < len(p) <= 64 for p in out)


# -- the worker over a real pty -------------------------------------------------------------------
def next_event(events: queue.Queue, kind: type, timeout_s: float = 5.0):
    deadline = time.monotonic() + timeout_s
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"no {kind.__name__} within {timeout_s} s")
        try:
            ev = events.get(timeout=remaining)
        except queue.Empty:
            continue
        if isinstance(ev, kind):
            return ev


def wait_for(predicate, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.005)


@pytest.fixture
def rig(tmp_path):
    made = []

    def make(terminator="CR", mode="continuous", **worker_kwargs):
        emu = EmulatedQrScanner(tmp_path / "qrscanner", terminator=terminator, mode=mode)
        events: queue.Queue = queue.Queue()
        worker = QrScannerWorker(emu.path, sink=events.put, terminator=terminator,
                                 backoff_min_s=0.05, backoff_max_s=0.2, **worker_kwargs)
        made.append((emu, worker))
        worker.start()
        wait_for(lambda: worker.healthy)
        return emu, worker, events

    yield make
    for emu, worker in made:
        worker.stop()
        emu.close()
        assert not worker.is_alive()


@pytest.mark.parametrize("terminator", ["CR", "CRLF", "TAB", "NONE"])
def test_scans_reach_the_sink(rig, terminator):
    emu, worker, events = rig(terminator=terminator)
    emu.scan(CODE)
    ev = next_event(events, QrScanned)
    assert (ev.payload, ev.source) == (CODE, "scanner")
    emu.scan(b"SECOND")
    assert next_event(events, QrScanned).payload == b"SECOND"
    assert worker.scans == 2


def test_scanned_appointment_parses(rig):
    emu, worker, events = rig()
    emu.scan(CODE)
    appt = parse_qr(next_event(events, QrScanned).payload, booking_keys=BOOKING.keys(),
                    eid_keys={}, hall=HALL, now_ms=NOW_S * 1000)
    assert appt.appointment_id == "BK-000007"


def test_command_trigger_mode(rig):
    emu, worker, events = rig(mode="command", trigger_interval_s=0.05)
    wait_for(lambda: len(emu.commands) >= 1)
    assert emu.commands[0] == TRIGGER_COMMAND
    emu.scan(CODE)                       # held in front; sent at the next trigger, after the ACK
    assert next_event(events, QrScanned).payload == CODE
    assert any(s.startswith(TRIGGER_ACK) for s in emu.sent)


def test_trigger_on_demand(rig):
    emu, worker, events = rig(mode="command")
    emu.scan(CODE)
    assert emu.commands == []
    worker.trigger()
    assert next_event(events, QrScanned).payload == CODE
    assert emu.commands == [TRIGGER_COMMAND]


def test_garbage_on_the_line_is_refused_downstream(rig):
    emu, worker, events = rig()
    emu.inject_garbage()
    payload = next_event(events, QrScanned).payload
    with pytest.raises(QrRefused) as info:
        parse_qr(payload, booking_keys=BOOKING.keys(), eid_keys={}, hall=HALL,
                 now_ms=NOW_S * 1000)
    assert info.value.reason == "wrong_encoding"
    emu.scan(CODE)
    assert next_event(events, QrScanned).payload == CODE


def test_oversized_scan_becomes_an_unreadable_event(rig):
    emu, worker, events = rig(max_len=64)
    emu.scan(b"A" * 500)
    assert next_event(events, QrUnreadable) == QrUnreadable("scanner", "oversized")
    emu.scan(CODE[:60])
    assert next_event(events, QrScanned).payload == CODE[:60]


def test_unplug_and_replug(rig):
    emu, worker, events = rig()
    emu.unplug()
    fault = next_event(events, DeviceFault)
    assert (fault.device, fault.fault) == ("qr-scanner", "gone")
    emu.replug()
    assert next_event(events, DeviceRecovered).device == "qr-scanner"
    wait_for(lambda: worker.healthy)
    emu.scan(CODE)
    assert next_event(events, QrScanned).payload == CODE


def test_worker_refuses_bad_settings_at_construction():
    with pytest.raises(ValueError):
        QrScannerWorker("/dev/null", sink=lambda e: None, terminator="ETX")
    with pytest.raises(ValueError):
        QrScannerWorker("/dev/null", sink=lambda e: None, trigger_interval_s=0)
