"""edge.health: the pure health model and the watchdog decision, with a manual clock; then the
broker-link probe against a real Mosquitto that is frozen (SIGSTOP) and thawed."""

from __future__ import annotations

import os
import queue
import signal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.clock import ManualClock
from edge.events import DeviceFault, DeviceRecovered
from edge.health import (BROKER, CAMERA, CLOCK, MAIN_LOOP, PRINTER, QR_SCANNER, READER, STORE,
                         Health, Level, PollSchedule, printer_level)
from edge.mqtt import LinkDown, LinkMessage, LinkUp, MqttLink, PublishDone
from edge.printer.escpos import PrinterStatus
from hallkiosk.errors import DeviceError, DeviceGone, DeviceTimeout
from tests.conftest import wait_for


@pytest.fixture
def clock():
    return ManualClock()


@pytest.fixture
def health(clock):
    h = Health(clock=clock, loop_stall_s=5, link_probe_interval_s=60, link_probe_timeout_s=90)
    h.loop_tick()
    return h


def test_parts_start_ok_and_the_loop_must_have_turned(clock):
    h = Health(clock=clock)
    assert {n: c.level for n, c in h.snapshot().items()} == {
        READER: Level.OK, PRINTER: Level.OK, BROKER: Level.OK, STORE: Level.OK, CLOCK: Level.OK,
        MAIN_LOOP: Level.DOWN}
    assert not h.watchdog_ok()
    assert h.watchdog_problems() == ("main loop not started",)
    h.loop_tick()
    assert h.watchdog_ok() and h.get(MAIN_LOOP).level is Level.OK


def test_a_stalled_loop_withholds_the_watchdog(health, clock):
    clock.advance(5)
    assert health.watchdog_ok()
    clock.advance(0.01)
    assert not health.watchdog_ok()
    assert health.get(MAIN_LOOP).reason == "stalled"
    health.loop_tick()
    assert health.watchdog_ok()


@pytest.mark.parametrize("event", [
    DeviceFault(PRINTER, "gone", "/dev/x: gone"),
    DeviceFault(READER, "init_failed", "/dev/y: no answer"),
    DeviceFault(CAMERA, "gone", "camera vanished"),
    DeviceFault(QR_SCANNER, "gone", "/dev/z: EIO"),
    LinkDown("connect to 127.0.0.1:1883 failed"),
])
def test_peripherals_and_broker_down_never_restart_us(health, event):
    assert health.apply(event) is True
    assert health.watchdog_ok(), "a degraded mode is not a reason to restart"


def test_device_fault_and_recovery_change_the_part_once(health, clock):
    assert health.apply(DeviceFault(READER, "gone", "detail with /dev path")) is True
    assert health.apply(DeviceFault(READER, "gone", "again")) is False
    down = health.get(READER)
    assert (down.level, down.reason, down.since_mono) == (Level.DOWN, "gone", clock.monotonic())
    clock.advance(3)
    assert health.apply(DeviceRecovered(READER)) is True
    assert health.get(READER).level is Level.OK and health.get(READER).reason is None
    assert health.apply(DeviceRecovered(READER)) is False


def test_an_unknown_part_is_added_on_its_first_report(health):
    assert health.apply(DeviceFault("cell-node", "gone", "x")) is True
    assert health.get("cell-node").level is Level.DOWN


def test_main_loop_is_not_reportable(health, clock):
    with pytest.raises(ValueError):
        health.report(MAIN_LOOP, Level.OK)
    with pytest.raises(ValueError):
        Health((MAIN_LOOP,), clock=clock)
    with pytest.raises(ValueError):
        Health(clock=clock, loop_stall_s=0)


def test_a_dead_watched_thread_withholds_the_watchdog(health):
    alive = {"reader": True}
    health.watch_thread("idcard-reader-worker", lambda: alive["reader"])
    health.watch_thread("broken-check", lambda: 1 / 0)      # a failing check counts as dead
    assert health.watchdog_problems() == ("thread broken-check died",)
    health.unwatch_thread("broken-check")
    assert health.watchdog_ok()
    alive["reader"] = False
    assert health.watchdog_problems() == ("thread idcard-reader-worker died",)
    health.unwatch_thread("idcard-reader-worker")           # stopped on purpose (shutdown)
    assert health.watchdog_ok()


def test_link_probe_cycle(health, clock):
    assert not health.probe_due() and health.next_probe_deadline() is None    # not connected
    health.apply(LinkUp(session_present=False))
    assert not health.probe_due()
    assert health.next_probe_deadline() == clock.monotonic() + 60
    clock.advance(60)
    assert health.probe_due()
    health.probe_sent(17)
    assert not health.probe_due()
    assert health.next_probe_deadline() == clock.monotonic() + 90
    clock.advance(89)
    health.loop_tick()
    assert health.watchdog_ok() and not health.link_stalled()
    clock.advance(1)
    health.loop_tick()
    assert health.link_stalled()
    assert health.watchdog_problems() == ("broker link connected but silent for more than 90 s",)
    health.apply(PublishDone(17, True, "Success"))
    assert health.watchdog_ok() and not health.probe_due()


def test_any_link_traffic_answers_the_probe_and_link_down_forgets_it(health, clock):
    health.apply(LinkUp(session_present=True))
    health.probe_sent(1)
    health.apply(LinkMessage("hall/h/kiosk/k/ticket/ack", b"{}", 1, False))
    clock.advance(200)
    health.loop_tick()
    assert not health.link_stalled()
    health.probe_sent(2)
    health.apply(LinkDown("keepalive timeout"))
    clock.advance(200)
    health.loop_tick()
    assert health.watchdog_ok() and health.get(BROKER).level is Level.DOWN
    health.probe_sent(3)                       # while down: ignored
    assert not health.link_stalled() and not health.probe_due()


def test_summary_lists_worst_first(health):
    assert health.summary() == "all parts ok"
    health.degraded(CLOCK, "not synchronised")
    health.down(PRINTER, "paper_out")
    assert health.summary() == "ticket-printer down (paper_out); clock degraded (not synchronised)"


@pytest.mark.parametrize("status, error, expected", [
    (PrinterStatus(answered=frozenset({1, 2, 4})), None, (Level.OK, None)),
    (PrinterStatus(paper_near_end=True, answered=frozenset({1, 2, 4})), None,
     (Level.DEGRADED, "paper_near_end")),
    (PrinterStatus(paper_out=True, answered=frozenset({1, 2, 4})), None, (Level.DOWN, "paper_out")),
    (PrinterStatus(cover_open=True, answered=frozenset({1, 2, 4})), None, (Level.DOWN, "cover_open")),
    (PrinterStatus(online=False, answered=frozenset({1, 2, 4})), None, (Level.DOWN, "offline")),
    (PrinterStatus(), None, (Level.DOWN, "status unknown")),
    (None, None, (Level.DOWN, "no status")),
    (None, DeviceTimeout("printer on /dev/p: no answer"), (Level.DOWN, "timeout")),
    (None, DeviceGone("printer on /dev/p: EIO"), (Level.DOWN, "gone")),
    (None, DeviceError("printer on /dev/p: odd"), (Level.DOWN, "failed")),
])
def test_printer_level(status, error, expected):
    assert printer_level(status, error) == expected


def test_poll_schedule_polls_faster_while_down(clock):
    s = PollSchedule(ok_interval_s=30, down_interval_s=2, clock=clock)
    assert s.due()
    s.polled(Level.DOWN)
    assert not s.due() and s.next_deadline() == clock.monotonic() + 2
    clock.advance(2)
    assert s.due()
    s.polled(Level.OK)
    clock.advance(29.9)
    assert not s.due()
    s.poll_soon()
    assert s.due()
    with pytest.raises(ValueError):
        PollSchedule(ok_interval_s=0, clock=clock)


_EVENTS = st.one_of(
    st.builds(DeviceFault, st.sampled_from([READER, PRINTER, CAMERA, QR_SCANNER]),
              st.sampled_from(["gone", "timeout", "init_failed"]), st.just("d")),
    st.builds(DeviceRecovered, st.sampled_from([READER, PRINTER, CAMERA, QR_SCANNER])),
    st.builds(LinkUp, st.booleans()),
    st.builds(LinkDown, st.just("r")),
    st.builds(PublishDone, st.integers(1, 9), st.booleans(), st.just("r")),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_EVENTS, st.floats(0, 30), st.booleans()), max_size=40))
def test_only_a_silent_connected_link_or_a_stalled_loop_withholds_the_watchdog(steps):
    clock = ManualClock()
    h = Health(clock=clock, loop_stall_s=5, link_probe_interval_s=60, link_probe_timeout_s=90)
    mid = 0
    for event, dt, probe in steps:
        h.apply(event)
        if probe and h.probe_due():
            mid += 1
            h.probe_sent(mid)
        clock.advance(dt)
        h.loop_tick()
        assert h.watchdog_ok() is (not h.link_stalled())


# -- against a real broker -------------------------------------------------------------------
@pytest.mark.integration
def test_probe_against_a_frozen_and_thawed_broker(broker):
    """SIGSTOP freezes Mosquitto with the TCP connection open: exactly a wedged link, as far
    as the kiosk can tell. The probe goes unanswered; after SIGCONT its PUBACK arrives."""
    clock = ManualClock()
    h = Health(clock=clock, loop_stall_s=5, link_probe_interval_s=60, link_probe_timeout_s=90)
    events: queue.Queue = queue.Queue()
    link = MqttLink(client_id="probe-test", host="127.0.0.1", port=broker.port, sink=events.put,
                    keepalive_s=60)
    link.start()

    def pump(until, timeout_s=10.0):
        def step():
            try:
                ev = events.get(timeout=0.05)
            except queue.Empty:
                return until()
            h.apply(ev)
            return until()
        wait_for(step, timeout_s, "link events")

    try:
        pump(lambda: h.get(BROKER).level is Level.OK and h.link_connected)
        clock.advance(60)
        h.loop_tick()
        assert h.probe_due()
        h.probe_sent(link.publish("hall/h1/kiosk/k1/state", b"probe", qos=1))
        pump(lambda: h.probes_pending == 0)                     # PUBACK came back: answered
        assert h.watchdog_ok()

        os.kill(broker.proc.pid, signal.SIGSTOP)
        try:
            clock.advance(60)
            h.loop_tick()
            assert h.probe_due()
            h.probe_sent(link.publish("hall/h1/kiosk/k1/state", b"probe", qos=1))
            clock.advance(90)
            h.loop_tick()
            assert h.link_stalled() and not h.watchdog_ok()
        finally:
            os.kill(broker.proc.pid, signal.SIGCONT)
        pump(lambda: h.probes_pending == 0)
        h.loop_tick()
        assert h.link_connected, "answered by its PUBACK, not forgotten by a LinkDown"
        assert h.watchdog_ok()
    finally:
        link.stop()
