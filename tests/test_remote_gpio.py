"""A spawned agent's GPIO driven from the emulator (edge.gpio's mock-pin socket): how the
hall run presses the buttons of real agent processes."""

from __future__ import annotations

import signal

import pytest

from emulator.gpio import RemoteGpioError, RemotePins
from emulator.idcard import Card
from tests.conftest import wait_for


@pytest.mark.e2e
def test_citizen_chooses_a_service_on_a_spawned_agent(hall):
    consumer = hall.start_consumer()
    kiosk = hall.add_kiosk("k21", remote_gpio=True)
    assert kiosk.buttons.press("B") is None      # no agent yet: recorded, no error
    proc = kiosk.spawn_agent()
    try:
        wait_for(lambda: kiosk.reader.commands, 20, "agent polling the reader")
        kiosk.factory.resync()
        kiosk.reader.present(Card.valid())
        # The citizen sees the service buttons blink (CHOOSING), then presses one.
        wait_for(lambda: kiosk.leds.state("B"), 10, "service LED B lit")
        kiosk.buttons.press("B")
        assert kiosk.printer.wait_for_tickets(1, 10)
        assert kiosk.printer.tickets[0].text.count("B-") >= 1
        wait_for(lambda: consumer.ledger.count() == 1, 20, "ticket in the ledger")
        assert consumer.ledger.rows()[0].ticket_id.startswith("B-")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0


def test_pins_of_no_agent_are_recorded_and_queries_fail(tmp_path):
    pins = RemotePins(tmp_path / "none.sock", timeout_s=0.2)
    try:
        assert pins.drive(17, False) is False
        assert pins.levels == {17: False}
        with pytest.raises(RemoteGpioError, match="no agent"):
            pins.pin(17).state
    finally:
        pins.close()


def test_bad_requests_are_answered_not_fatal(tmp_path):
    from gpiozero.pins.mock import MockFactory

    from edge.gpio import serve_mock_pins

    path = tmp_path / "gpio.sock"
    factory = MockFactory()
    serve_mock_pins(factory, str(path))
    pins = RemotePins(path)
    try:
        with pytest.raises(RemoteGpioError, match="pin"):
            pins.request("X", 17)
        with pytest.raises(RemoteGpioError):
            pins.request("L", 999)
        assert pins.drive(5, True) is True
        assert factory.pin(5).state and pins.pin(5).state
        pins.pin(5).drive_low()
        assert not factory.pin(5).state
    finally:
        pins.close()


def test_a_socket_path_too_long_is_refused(tmp_path):
    with pytest.raises(RemoteGpioError, match="longer"):
        RemotePins(tmp_path / ("x" * 120))
