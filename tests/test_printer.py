"""TicketPrinter against EmulatedPrinter over a real pty (pyserial on both ends as on a kiosk)."""

from __future__ import annotations

import time

import pytest
import serial
from PIL import Image

from edge.printer.escpos import TicketLayout, encode_asb
from edge.printer.printer import PrinterNotReady, TicketPrinter
from emulator.printer import PAPER_DOTS, EmulatedPrinter
from hallkiosk.errors import DeviceError, DeviceGone, DeviceRefused, DeviceTimeout

LAYOUT = TicketLayout(hall_name="Service Hall North", service_name="Passports",
                      ticket_number="A-07-0123", issued_at="2026-11-12 09:41", waiting_ahead=4,
                      qr_data="HK1:A-07-0123:7f3a9c")

TIMEOUT_S = 0.3


@pytest.fixture
def emu(tmp_path):
    device = EmulatedPrinter(tmp_path / "dev" / "printer", out_dir=tmp_path / "out")
    yield device
    device.close()


def _open(emu):
    return serial.serial_for_url(emu.path, timeout=0.05)


@pytest.fixture
def port(emu):
    p = _open(emu)
    yield p
    p.close()


@pytest.fixture
def printer(port):
    with TicketPrinter(port, timeout_s=TIMEOUT_S) as p:
        yield p


def test_print_a_ticket_and_find_it(emu, printer, port):
    after = printer.print_ticket(LAYOUT)
    assert after.ok_to_print and after.answered >= {1, 2, 4}
    assert emu.wait_for_tickets(1, timeout_s=5)
    [ticket] = emu.tickets
    assert ticket.qr_codes == ["HK1:A-07-0123:7f3a9c"]
    texts = [line.text for line in ticket.lines]
    assert "Service Hall North" in texts and "4 people waiting ahead" in texts
    number = next(line for line in ticket.lines if line.text == "A-07-0123")
    assert (number.width, number.height) == (4, 4)
    assert "A-07-0123" in ticket.text and "2026-11-12 09:41" in ticket.text
    centred = next(line for line in ticket.text.splitlines() if "Passports" in line)
    assert centred.startswith(" " * 10)
    assert ticket.png_path is not None and ticket.png_path.name == "ticket-0001.png"
    assert ticket.png_path.with_suffix(".txt").read_text(encoding="utf-8") == ticket.text
    with Image.open(ticket.png_path) as img:
        img.verify()
    with Image.open(ticket.png_path) as img:
        assert img.width == PAPER_DOTS and img.height > 400
        from pyzbar.pyzbar import ZBarSymbol, decode
        assert [d.data for d in decode(img, symbols=[ZBarSymbol.QRCODE])] == [b"HK1:A-07-0123:7f3a9c"]
    assert port.is_open           # the driver never closes what it was handed


def test_two_tickets_are_two_tickets(emu, printer):
    printer.print_ticket(LAYOUT)
    printer.print_ticket(TicketLayout("H", "Driving licences", "B-01-0001", "t", 0, "q2"))
    assert emu.wait_for_tickets(2, timeout_s=5)
    assert [t.qr_codes for t in emu.tickets] == [["HK1:A-07-0123:7f3a9c"], ["q2"]]
    assert "0 people waiting ahead" in emu.tickets[1].text


def test_paper_near_end_prints_and_is_reported(emu, printer):
    emu.set_paper("near_end")
    status = printer.print_ticket(LAYOUT)
    assert status.paper_near_end and status.warnings == ("paper_near_end",)
    assert status.ok_to_print
    assert len(emu.tickets) == 1      # the ticket was registered before the status answer


@pytest.mark.parametrize("script,fault", [
    (lambda e: e.set_paper("out"), "paper_out"),
    (lambda e: e.set_cover_open(True), "cover_open"),
    (lambda e: e.set_offline(True), "offline"),
    (lambda e: e.set_error("cutter"), "cutter_error"),
])
def test_not_ready_printer_refuses_and_prints_nothing(emu, printer, script, fault):
    script(emu)
    with pytest.raises(PrinterNotReady) as info:
        printer.print_ticket(LAYOUT)
    assert isinstance(info.value, DeviceRefused)
    assert fault in info.value.status.faults and "offline" in info.value.status.faults
    assert "ticket-printer" in str(info.value) and emu.path in str(info.value)
    assert emu.tickets == [] and emu.discarded_jobs == 0     # nothing was even sent


def test_error_status_reads_the_error_cause(emu, printer):
    emu.set_error("unrecoverable")
    status = printer.status()
    assert status.answered == {1, 2, 3, 4}
    assert status.unrecoverable and not status.ok_to_print
    emu.set_error(None)
    assert printer.status().answered == {1, 2, 4}


def test_emulator_discards_a_job_sent_to_a_printer_that_is_not_ready(emu, port):
    from edge.printer.escpos import render_ticket

    emu.set_cover_open(True)
    port.write(render_ticket(LAYOUT))
    port.flush()
    printer = TicketPrinter(port, timeout_s=TIMEOUT_S)
    printer.status()                  # answered after the job was consumed
    assert emu.discarded_jobs == 1 and emu.tickets == []
    emu.set_cover_open(False)
    printer.print_ticket(LAYOUT)
    assert emu.wait_for_tickets(1, timeout_s=5) and emu.discarded_jobs == 1


def test_silent_printer_times_out_and_is_never_ok(emu, printer):
    emu.set_silent(True)
    started = time.monotonic()
    with pytest.raises(DeviceTimeout) as info:
        printer.status()
    elapsed = time.monotonic() - started
    assert TIMEOUT_S * 0.9 <= elapsed < TIMEOUT_S + 2
    assert "ticket-printer" in str(info.value) and emu.path in str(info.value)
    with pytest.raises(DeviceTimeout):
        printer.print_ticket(LAYOUT)
    assert emu.tickets == []
    emu.set_silent(False)
    assert printer.status().ok_to_print


def test_unplug_is_device_gone_and_replug_works_with_a_new_port(emu, printer):
    assert printer.status().ok_to_print
    emu.unplug()
    with pytest.raises(DeviceGone) as info:
        printer.status()
    assert emu.path in str(info.value)
    with pytest.raises(DeviceGone):
        printer.print_ticket(LAYOUT)
    emu.replug()
    with _open(emu) as port2:
        assert TicketPrinter(port2, timeout_s=TIMEOUT_S).print_ticket(LAYOUT).ok_to_print
    assert emu.wait_for_tickets(1, timeout_s=5)


def test_asb_pushes_do_not_confuse_status(emu, printer):
    printer.enable_asb()
    assert printer.status().ok_to_print     # the block pushed on enabling is skipped
    assert printer.last_asb is not None and not printer.last_asb.paper_near_end
    emu.set_paper("near_end")         # pushes a block
    emu.set_cover_open(True)          # and another
    emu.set_cover_open(False)         # and another
    status = printer.status()         # answers follow three unread ASB blocks
    assert status.ok_to_print and status.paper_near_end
    assert printer.last_asb.paper_near_end and not printer.last_asb.cover_open
    emu.set_paper("out")
    assert "paper_out" in printer.status().faults
    assert printer.poll_asb().paper_out


class ChattyPrinter(EmulatedPrinter):
    """Firmware that pushes an ASB block right before every real-time answer."""

    def reply_to_status(self, n: int) -> bytes:
        return encode_asb(self.status) + super().reply_to_status(n)


def test_asb_between_query_and_answer_is_skipped(tmp_path):
    with ChattyPrinter(tmp_path / "chatty") as emu, _open(emu) as port:
        emu.set_paper("near_end")
        printer = TicketPrinter(port, timeout_s=TIMEOUT_S)
        status = printer.print_ticket(LAYOUT)
        assert status.paper_near_end and status.ok_to_print
        assert printer.last_asb is not None
        assert emu.wait_for_tickets(1, timeout_s=5)


def test_garbage_instead_of_status_is_a_timeout_naming_the_cause(tmp_path):
    class WrongBaud(EmulatedPrinter):
        def reply_to_status(self, n: int) -> bytes:
            return b"\xff"

    with WrongBaud(tmp_path / "garbage") as emu, _open(emu) as port:
        with pytest.raises(DeviceTimeout, match="not ESC/POS status"):
            TicketPrinter(port, timeout_s=TIMEOUT_S).status()


def test_closed_driver_and_bad_arguments(port):
    p = TicketPrinter(port, timeout_s=TIMEOUT_S)
    p.close()
    p.close()
    with pytest.raises(DeviceError):
        p.status()
    with pytest.raises(ValueError):
        TicketPrinter(port, timeout_s=0)
    with pytest.raises(ValueError):
        TicketPrinter(port, encoding="no-such-codec")
    assert port.is_open and port.timeout == 0.05


def test_driver_restores_the_port_timeout(printer, port):
    printer.status()
    assert port.timeout == 0.05
