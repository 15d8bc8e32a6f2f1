"""Hot-plug against the emulator over real ptys: the ID-card reader's worker and the ticket
printer's handle lose their device (the pty and its path vanish, as a pulled USB cable does)
and get it back (a new pty at the same path). Recovery must come within 2 s of the replug.

The measured replug-to-DeviceRecovered times are printed (``pytest -s``) and attached to the
test report as ``user_properties``.
"""

from __future__ import annotations

import queue
import threading
import time

import pytest

from edge.clock import SYSTEM_CLOCK
from edge.events import CardRead, DeviceFault, DeviceRecovered
from edge.idcard_worker import IdCardWorker
from edge.printer.escpos import TicketLayout
from edge.printing import PrinterHandle
from edge.serialdev import open_serial
from emulator.idcard import Card, EmulatedReader
from emulator.printer import EmulatedPrinter
from hallkiosk.errors import DeviceGone
from tests.conftest import wait_for

#: The issue's figure: the device works again within 2 s of being plugged back in.
RECOVERY_LIMIT_S = 2.0
STATUS_COMMAND = (0x11, 0xFF)       # the SAM check IdCardReader.init() starts with

LAYOUT = TicketLayout(hall_name="Service Hall North", service_name="Passports",
                      ticket_number="A-07-0001", issued_at="2026-11-12 09:41", waiting_ahead=0,
                      qr_data="HK1:A-07-0001:00")


class Recorder:
    """The worker's sink: keeps events in order and lets the test wait for one kind."""

    def __init__(self) -> None:
        self.events: list[object] = []
        self._cond = threading.Condition()

    def __call__(self, event: object) -> None:
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    def wait(self, kind: type, count: int = 1, timeout_s: float = 10.0) -> object:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                found = [e for e in self.events if isinstance(e, kind)]
                if len(found) >= count:
                    return found[count - 1]
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no {count} x {kind.__name__} within {timeout_s} s; "
                                         f"saw {self.kinds()}")
                self._cond.wait(remaining)

    def kinds(self) -> list[str]:
        return [type(e).__name__ for e in self.events]


class CountingOpener:
    """open_serial, counting attempts, so a test can wait until the backoff has grown."""

    def __init__(self) -> None:
        self.attempts = 0

    def __call__(self, url, **kwargs):
        self.attempts += 1
        return open_serial(url, **kwargs)


@pytest.fixture
def reader_emu(tmp_path):
    emu = EmulatedReader(tmp_path / "dev" / "idcard")
    yield emu
    emu.close()


@pytest.fixture
def printer_emu(tmp_path):
    emu = EmulatedPrinter(tmp_path / "dev" / "printer")
    yield emu
    emu.close()


def _start_worker(emu, sink, opener, **kwargs) -> IdCardWorker:
    worker = IdCardWorker(emu.path, sink=sink, poll_interval_s=0.1, timeout_s=0.3,
                          open_port=opener, **kwargs)
    worker.start()
    wait_for(lambda: worker.healthy, 5, "the reader worker to open its port")
    return worker


def _replug_and_time(emu, rec: Recorder, n: int) -> float:
    emu.replug()
    started = time.monotonic()
    rec.wait(DeviceRecovered, count=n, timeout_s=10)
    return time.monotonic() - started


def _record(request, name: str, seconds: float) -> None:
    request.node.user_properties.append((name, round(seconds, 3)))
    print(f"\n{request.node.name}: {name} = {seconds * 1000:.0f} ms")


def test_reader_unplug_fault_then_recovery_within_2s(reader_emu, request):
    rec, opener = Recorder(), CountingOpener()
    worker = _start_worker(reader_emu, rec, opener)
    try:
        reader_emu.present(Card.valid())
        rec.wait(CardRead)

        reader_emu.unplug()
        fault = rec.wait(DeviceFault)
        assert (fault.device, fault.fault) == ("idcard-reader", "gone")
        # Let the cable stay out long enough for the backoff to grow past its first steps.
        attempts = opener.attempts
        wait_for(lambda: opener.attempts >= attempts + 3, 10, "three failed reopen attempts")
        assert not worker.healthy

        inits_before = reader_emu.commands.count(STATUS_COMMAND)
        took = _replug_and_time(reader_emu, rec, 1)
        _record(request, "replug_to_recovered_s", took)
        assert took < RECOVERY_LIMIT_S
        assert rec.kinds().count("DeviceFault") == 1, "one fault per outage, not one per retry"
        assert reader_emu.commands.count(STATUS_COMMAND) > inits_before, "re-initialised"

        # The device works again: the card still on the reader was power-cycled with it.
        reader_emu.present(Card.valid())
        rec.wait(CardRead, count=2)
    finally:
        worker.stop()
    assert not worker.is_alive()


def test_recovery_beats_a_long_backoff(reader_emu, request):
    """With a 3 s minimum backoff, only watching the path can recover within 2 s."""
    rec, opener = Recorder(), CountingOpener()
    worker = _start_worker(reader_emu, rec, opener, backoff_min_s=3.0, backoff_max_s=10.0)
    try:
        reader_emu.unplug()
        rec.wait(DeviceFault)
        attempts = opener.attempts
        wait_for(lambda: opener.attempts > attempts, 10, "a failed reopen attempt")
        took = _replug_and_time(reader_emu, rec, 1)
        _record(request, "replug_to_recovered_s", took)
        assert took < RECOVERY_LIMIT_S
    finally:
        worker.stop()


def test_repeated_unplugs_each_recover(reader_emu, request):
    rec, opener = Recorder(), CountingOpener()
    worker = _start_worker(reader_emu, rec, opener)
    times = []
    try:
        for cycle in range(1, 4):
            reader_emu.unplug()
            rec.wait(DeviceFault, count=cycle)
            times.append(_replug_and_time(reader_emu, rec, cycle))
        _record(request, "worst_replug_to_recovered_s", max(times))
        assert max(times) < RECOVERY_LIMIT_S
        assert rec.kinds().count("DeviceFault") == 3 and rec.kinds().count("DeviceRecovered") == 3
    finally:
        worker.stop()


def test_reader_absent_at_start_is_a_fault_then_a_recovery(reader_emu, request):
    reader_emu.unplug()
    rec = Recorder()
    worker = IdCardWorker(reader_emu.path, sink=rec, poll_interval_s=0.1, timeout_s=0.3)
    worker.start()
    try:
        assert rec.wait(DeviceFault).fault == "gone"
        took = _replug_and_time(reader_emu, rec, 1)
        _record(request, "replug_to_recovered_s", took)
        assert took < RECOVERY_LIMIT_S
    finally:
        worker.stop()


def test_stop_is_prompt_while_waiting_for_the_device(reader_emu):
    reader_emu.unplug()
    rec = Recorder()
    worker = IdCardWorker(reader_emu.path, sink=rec, backoff_min_s=30, backoff_max_s=60)
    worker.start()
    rec.wait(DeviceFault)
    started = time.monotonic()
    worker.stop(timeout_s=3)
    assert not worker.is_alive() and time.monotonic() - started < 1.0


def test_a_url_port_keeps_the_plain_backoff():
    """socket:// has no path to watch; the worker still backs off and stops cleanly."""
    rec = Recorder()
    opener = CountingOpener()
    worker = IdCardWorker("socket://127.0.0.1:9", sink=rec, open_port=opener,
                          backoff_min_s=0.05, backoff_max_s=0.1)
    worker.start()
    try:
        assert rec.wait(DeviceFault).fault == "gone"
        wait_for(lambda: opener.attempts >= 3, 5, "retries on the plain backoff")
    finally:
        worker.stop()


# -- the printer: opened lazily by the main loop --------------------------------------------
def test_printer_handle_recovers_on_the_next_call(printer_emu):
    handle = PrinterHandle(printer_emu.path, timeout_s=0.5, encoding="cp437", clock=SYSTEM_CLOCK)
    try:
        assert handle.status().ok_to_print
        printer_emu.unplug()
        with pytest.raises(DeviceGone):
            handle.status()
        with pytest.raises(DeviceGone):         # still unplugged: the reopen fails too
            handle.status()
        printer_emu.replug()
        started = time.monotonic()
        assert handle.status().ok_to_print
        assert time.monotonic() - started < RECOVERY_LIMIT_S
        handle.print_ticket(LAYOUT)
        assert printer_emu.wait_for_tickets(1, timeout_s=5)
    finally:
        handle.close()


def test_printer_replugged_between_calls_costs_nothing(printer_emu):
    """Nobody asked while the cable was out: the handle still holds the dead port. A status
    query finds it dead, reopens the port and asks again, so the first call after the replug
    already answers; a second unplug with nothing behind it still fails clearly."""
    handle = PrinterHandle(printer_emu.path, timeout_s=0.5, encoding="cp437", clock=SYSTEM_CLOCK)
    try:
        assert handle.status().ok_to_print
        printer_emu.unplug()
        printer_emu.replug()
        assert handle.status().ok_to_print
        printer_emu.unplug()
        with pytest.raises(DeviceGone):
            handle.status()
        printer_emu.replug()
        assert handle.status().ok_to_print
    finally:
        handle.close()


def test_printer_physical_state_survives_its_power_cycle(printer_emu):
    """Paper out is physical: unplugging does not refill the printer."""
    handle = PrinterHandle(printer_emu.path, timeout_s=0.5, encoding="cp437", clock=SYSTEM_CLOCK)
    try:
        printer_emu.set_paper("out")
        assert "paper_out" in handle.status().faults
        printer_emu.unplug()
        printer_emu.replug()
        assert "paper_out" in handle.status().faults
        printer_emu.set_paper("ok")
        assert handle.status().ok_to_print
    finally:
        handle.close()


def test_the_worker_sink_is_a_plain_queue_put(reader_emu):
    """The agent hands ``events.put``; a worker's events arrive on the queue in order."""
    q: queue.Queue = queue.Queue()
    worker = IdCardWorker(reader_emu.path, sink=q.put, poll_interval_s=0.1, timeout_s=0.3)
    worker.start()
    try:
        wait_for(lambda: worker.healthy, 5, "worker open")
        reader_emu.unplug()
        assert isinstance(q.get(timeout=5), DeviceFault)
        reader_emu.replug()
        assert isinstance(q.get(timeout=RECOVERY_LIMIT_S + 1), DeviceRecovered)
    finally:
        worker.stop()
