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
