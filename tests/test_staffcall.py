"""Staff call: one event per call, repeated presses rate-limited, the LED pending until ops acks;
the buttons and LED through gpiozero's MockFactory."""

from __future__ import annotations

import itertools

import pytest
from gpiozero.pins.mock import MockFactory
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.clock import ManualClock
from edge.staffcall import CallNotice, StaffCall, StaffCallPanel, StaffCallPressed
from emulator.cells import EventLog
from mqtt_topics.schemas import validate_body


def make(clock, leds=None, **kwargs):
    ids = (f"call{n}" for n in itertools.count(1))
    return StaffCall(clock=clock, on_pending=(leds.append if leds is not None else None),
                     new_id=lambda: next(ids), **kwargs)


def test_a_press_raises_one_call_and_lights_the_led():
    clock = ManualClock()
    leds = []
    calls = make(clock, leds)
    notice = calls.press("cell", "c1")
    assert notice == CallNotice("staff_call.raised", "warning", "c1",
                                {"call": "call1", "source": "cell", "cell": "c1", "presses": 1})
    assert leds == [True] and calls.pending.call_id == "call1"


def test_repeated_presses_only_count_until_the_repeat_interval():
    clock = ManualClock()
    calls = make(clock)
    calls.press()
    for _ in range(10):
        clock.advance(5.9)
        assert calls.press() is None
    assert calls.suppressed == 10
    clock.advance(1.0)                           # 60 s after the call was published
    notice = calls.press()
    assert notice.name == "staff_call.repeated" and notice.detail["presses"] == 12
    clock.advance(30)
    assert calls.press() is None                 # the next repeat is 60 s after this one


def test_ops_ack_ends_the_call_and_a_stale_ack_is_ignored():
    clock = ManualClock()
    leds = []
    calls = make(clock, leds)
    calls.press("kiosk")
    clock.advance(42.5)
    assert calls.acknowledge("call99", by="ops-1") is None          # another call's ack
    assert calls.pending is not None and leds == [True]
    notice = calls.acknowledge("call1", by="ops-1")
    assert notice == CallNotice("staff_call.acked", "info", "kiosk",
                                {"call": "call1", "by": "ops-1", "waited_s": 42, "presses": 1})
    assert leds == [True, False] and calls.pending is None
    assert calls.acknowledge() is None                              # nothing pending
    assert calls.press().detail["call"] == "call2"                  # a new call


def test_notices_follow_the_contract():
    clock = ManualClock()
    calls = StaffCall(clock=clock)
    notices = [calls.press("kiosk")]
    clock.advance(61)
    notices.append(calls.press("cell", "c1"))
    notices.append(calls.acknowledge(by=None))
    for n in notices:
        validate_body("event", {"name": n.name, "severity": n.severity, "subject": n.subject,
                                "detail": n.detail})


def test_a_failing_led_does_not_break_the_call():
    def broken(pending):
        raise RuntimeError("LED driver gone")

    calls = StaffCall(clock=ManualClock(), on_pending=broken)
    assert calls.press() is not None
    assert calls.acknowledge() is not None


def test_configuration_mistakes_raise():
    with pytest.raises(ValueError):
        StaffCall(clock=ManualClock(), repeat_after_s=0)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.floats(0, 200), st.just("ack")), max_size=80))
def test_a_button_costs_the_hall_at_most_one_event_a_minute_per_call(script):
    clock = ManualClock()
    calls = make(clock)
    start = clock.monotonic()
    published = 0
    raised = 0
    for step in script:
        if step == "ack":
            calls.acknowledge()
            continue
        clock.advance(step)
        notice = calls.press()
        if notice is not None:
            published += 1
            raised += notice.name == "staff_call.raised"
            assert (calls.pending is not None)
    elapsed = clock.monotonic() - start
    # Each call publishes once when raised, then at most once per repeat interval.
    assert published - raised <= elapsed / 60.0 + 1e-9


# -- the GPIO panel ------------------------------------------------------------------------------------
@pytest.fixture
def factory():
    f = MockFactory()
    yield f
    f.reset()


def test_panel_buttons_queue_presses_and_the_led_shows_pending(factory):
    log = EventLog()
    with StaffCallPanel({"kiosk": (26, None), "cell": (25, "c1")}, 24, sink=log.put,
                        pin_factory=factory) as panel:
        calls = StaffCall(clock=ManualClock(), on_pending=panel.show_pending)
        for pin in (25, 26):
            factory.pin(pin).drive_low()         # pressed: switched to ground
            factory.pin(pin).drive_high()
        log.wait(lambda e: e == StaffCallPressed("cell", "c1"), what="cell button")
        log.wait(lambda e: e == StaffCallPressed("kiosk", None), what="kiosk button")
        first = log.of_type(StaffCallPressed)[0]
        assert calls.press(first.source, first.cell) is not None
        assert factory.pin(24).state
        calls.acknowledge()
        assert not factory.pin(24).state
    panel.close()                                # twice is fine


def test_panel_callbacks_never_raise(factory):
    def broken_sink(event):
        raise RuntimeError("queue gone")

    with StaffCallPanel({"kiosk": (26, None)}, None, sink=broken_sink, pin_factory=factory):
        factory.pin(26).drive_low()
        factory.pin(26).drive_high()
