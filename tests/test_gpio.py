"""Front panel on gpiozero's MockFactory: stateful pins, not call counting."""

from __future__ import annotations

import queue

import pytest
from gpiozero.pins.mock import MockFactory

from edge.events import ButtonPressed
from edge.gpio import Indication, ServicePanel, make_pin_factory
from tests.conftest import wait_for


@pytest.fixture
def panel():
    factory = MockFactory()
    q: queue.Queue = queue.Queue()
    p = ServicePanel({"A": 5, "B": 6}, {"A": 12, "B": 16}, 23, sink=q.put, pin_factory=factory)
    yield p, factory, q
    p.close()


def test_press_queues_an_event(panel):
    p, factory, q = panel
    factory.pin(6).drive_low()
    assert q.get(timeout=2) == ButtonPressed("B")
    factory.pin(6).drive_high()
    assert q.empty()


def test_indications_drive_the_leds(panel):
    p, factory, q = panel
    p.show(Indication.READY)
    assert factory.pin(23).state and not factory.pin(12).state and not factory.pin(16).state
    p.show(Indication.ISSUING, ("B",))
    assert factory.pin(16).state and not factory.pin(12).state
    p.show(Indication.CHOOSE, ("A",))
    # Blinking: the pin changes state by itself over time.
    seen = set()
    wait_for(lambda: seen.add(factory.pin(12).state) or len(seen) == 2, timeout_s=3, what="blink")


def test_a_failing_sink_does_not_raise_into_gpiozero():
    factory = MockFactory()

    def sink(ev):
        raise RuntimeError("queue gone")

    p = ServicePanel({"A": 5}, {}, None, sink=sink, pin_factory=factory)
    factory.pin(5).drive_low()     # must not raise here nor kill gpiozero's thread
    factory.pin(5).drive_high()
    p.close()
    p.close()                      # safe twice


def test_unknown_pin_factory_is_refused():
    with pytest.raises(ValueError):
        make_pin_factory("bogus")


def test_inputs_start_no_polling_threads():
    """gpiozero's Button and MotionSensor each keep a thread that wakes 10 times a second
    (hold detection, sampling); an idle kiosk must not pay for that (edge.gpio.input_pin)."""
    import threading

    from edge.cells.sensors import CellGpioSensors
    from edge.staffcall import StaffCallPanel

    factory = MockFactory()
    before = threading.active_count()
    panel = ServicePanel({"A": 5, "B": 6, "C": 13}, {}, None, sink=lambda ev: None,
                         pin_factory=factory)
    staff = StaffCallPanel({"kiosk": (19, None), "c1": (26, "c1")}, None, sink=lambda ev: None,
                           pin_factory=factory)
    cell = CellGpioSensors("c1", sink=lambda ev: None, pir_pin=20, door_pin=21,
                           pin_factory=factory)
    cell.start()
    try:
        assert threading.active_count() == before
    finally:
        cell.close()
        staff.close()
        panel.close()
