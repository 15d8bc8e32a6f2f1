"""Privacy-cell occupancy: the pure state machine (timings, OR/AND, sessions, stuck and flapping
sensors), the door debouncer, the Cell controller and its notices, the GPIO sensors and the
indicator on MockFactory, and a whole emulated cell (GPIO, radar and node on ptys)."""

from __future__ import annotations

import queue
import threading

import pytest
from gpiozero.pins.mock import MockFactory
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.cells import Cell, CellUpdate, ContactEdge, Notice
from edge.cells.debounce import Debouncer
from edge.cells.indicator import CellIndicator
from edge.cells.ld2410 import RadarWorker
from edge.cells.node import CellNodeWorker, NodeInfo
from edge.cells.occupancy import (CellState, Indication, OccupancyMachine, SensorAvailability, SensorFault,
                                  SensorKind, SensorReading, SensorRecovered, Timings, Transition)
from edge.cells.sensors import CellGpioSensors
from edge.clock import SYSTEM_CLOCK, ManualClock
from emulator.cells import EmulatedCell, EventLog
from mqtt_topics.schemas import validate_body
from tests.conftest import wait_for

SETTINGS = settings(max_examples=200, deadline=None)
MOTION, PRESENCE, DOOR = SensorKind.MOTION, SensorKind.PRESENCE, SensorKind.DOOR
V, O, L = CellState.VACANT, CellState.OCCUPIED, CellState.LEAVING


def machine(clock, **sensors):
    return OccupancyMachine("c1", sensors or {"pir": MOTION}, clock=clock)


def states(outputs):
    return [(o.old, o.new, o.reason) for o in outputs if isinstance(o, Transition)]


def run_to_deadline(m, clock):
    deadline = m.next_deadline()
    assert deadline is not None
    clock.advance(max(0.0, deadline - clock.monotonic()))
    return m.tick()


# -- the state machine -------------------------------------------------------------------------------
def test_presence_must_last_the_minimum_before_the_cell_is_occupied():
    clock = ManualClock()
    m = machine(clock)
    assert m.update("pir", True) == []
    assert m.next_deadline() == pytest.approx(clock.monotonic() + 0.8)
    clock.advance(0.5)
    m.update("pir", False)                       # a glitch, not a person
    assert m.next_deadline() is None and m.state is V
    m.update("pir", True)
    assert states(run_to_deadline(m, clock)) == [(V, O, "presence")]


def test_absence_starts_the_hold_and_presence_during_it_returns():
    clock = ManualClock()
    m = machine(clock)
    m.update("pir", True)
    run_to_deadline(m, clock)
    assert states(m.update("pir", False)) == [(O, L, "absence")]
    clock.advance(30)
    assert states(m.update("pir", True)) == [(L, O, "presence_returned")]
    m.update("pir", False)
    start = clock.monotonic()
    assert states(run_to_deadline(m, clock)) == [(L, V, "hold_expired")]
    assert clock.monotonic() - start == pytest.approx(60.0)   # PIR only: the long hold
    assert m.indication is Indication.FREE


def test_a_radar_shortens_the_hold_and_any_sensor_keeps_the_cell_occupied():
    clock = ManualClock()
    m = machine(clock, pir=MOTION, radar=PRESENCE)
    m.update("pir", True)
    m.update("radar", True)
    run_to_deadline(m, clock)
    assert m.state is O
    assert m.update("pir", False) == []          # the radar still sees them: OR for presence
    assert states(m.update("radar", False)) == [(O, L, "absence")]     # AND for absence
    start = clock.monotonic()
    run_to_deadline(m, clock)
    assert m.state is V and clock.monotonic() - start == pytest.approx(20.0)


def test_a_door_edge_is_brief_presence_and_its_position_is_none():
    clock = ManualClock()
    m = machine(clock, door=DOOR)
    m.update("door", True)                       # first report: a level, not an edge
    assert m.next_deadline() is None
    m.update("door", False)                      # opened
    assert states(run_to_deadline(m, clock)) == [(V, O, "presence")]
    assert states(run_to_deadline(m, clock)) == [(O, L, "absence")]    # pulse over after 2 s
    run_to_deadline(m, clock)
    assert m.state is V                          # a door left open is not a person


def test_a_session_occupies_at_once_and_holds_a_still_citizen():
    clock = ManualClock()
    m = machine(clock, pir=MOTION, door=DOOR)
    m.update("door", True)
    assert states(m.set_session(True)) == [(V, O, "session")]
    m.update("pir", True)
    m.update("pir", False)                       # sits still: the PIR loses them
    clock.advance(3600)
    assert m.tick() == [] and m.state is O
    assert states(m.set_session(False)) == [(O, L, "absence")]


def test_leaving_through_the_door_mid_session_lets_the_cell_become_vacant():
    clock = ManualClock()
    m = machine(clock, pir=MOTION, door=DOOR)
    m.update("door", True)
    m.set_session(True)
    m.update("pir", True)
    m.update("door", False)                      # the citizen walks out ...
    m.update("pir", False)
    clock.advance(1)
    m.update("door", True)                       # ... and the door shuts behind them
    assert not m.session_claim
    assert states(run_to_deadline(m, clock)) == [(O, L, "absence")]
    assert states(run_to_deadline(m, clock)) == [(L, V, "hold_expired")]
    assert m.session_active                      # the agent ends it on VACANT


def test_after_a_door_edge_a_sensor_seeing_the_citizen_restores_the_session_claim():
    clock = ManualClock()
    m = machine(clock, pir=MOTION, door=DOOR)
    m.update("door", True)
    m.set_session(True)
    m.update("door", False)
    m.update("door", True)
    assert not m.session_claim
    m.update("pir", True)                        # still there: they opened the door to talk
    assert m.session_claim
    m.update("pir", False)
    clock.advance(600)
    assert m.tick() == [] and m.state is O


def test_a_pir_stuck_high_is_a_fault_and_stops_voting():
    clock = ManualClock()
    m = machine(clock, pir=MOTION, door=DOOR)
    m.update("door", True)
    m.update("pir", True)
    run_to_deadline(m, clock)
    out = run_to_deadline(m, clock)
    assert clock.monotonic() == pytest.approx(1000 + 1800)      # from the PIR's rising edge
    assert SensorFault("c1", "pir", "stuck", "presence for 1800 s with nothing to confirm it") in out
    assert states(out) == [(O, L, "absence")]
    assert m.indication is Indication.FAULT and m.faults == {"pir": ("stuck",)}
    run_to_deadline(m, clock)
    assert m.state is V
    assert m.update("pir", False) == [SensorRecovered("c1", "pir", "stuck")]
    assert m.indication is Indication.FREE


def test_corroboration_restarts_the_stuck_window():
    clock = ManualClock()
    m = machine(clock, pir=MOTION, radar=PRESENCE, door=DOOR)
    m.update("door", True)
    m.update("radar", False)
    m.update("radar", True)                      # radar sees someone for 20 min
    clock.advance(1200)
    m.update("pir", True)                        # the PIR confirms it
    m.update("pir", False)
    clock.advance(1799)
    assert not [o for o in m.tick() if isinstance(o, SensorFault)]
    m.set_session(True)                          # a session confirms it too
    m.set_session(False)
    clock.advance(1799)
    assert not [o for o in m.tick() if isinstance(o, SensorFault)]
    clock.advance(1)
    assert SensorFault("c1", "radar", "stuck", "presence for 1800 s with nothing to confirm it") in m.tick()


def test_a_flapping_sensor_is_a_fault_until_it_calms_down():
    clock = ManualClock()
    m = machine(clock, pir=MOTION)
    m.update("pir", False)
    outputs = []
    for i in range(41):
        clock.advance(1)
        outputs += m.update("pir", i % 2 == 0)
    faults = [o for o in outputs if isinstance(o, SensorFault)]
    assert [f.fault for f in faults] == ["flapping"]
    assert m.faults == {"pir": ("flapping",)} and m.indication is Indication.FAULT
    out = []
    while not out:
        out = run_to_deadline(m, clock)
        out = [o for o in out if isinstance(o, SensorRecovered)]
    assert out == [SensorRecovered("c1", "pir", "flapping")]


def test_an_unavailable_sensor_is_a_fault_and_does_not_vote():
    clock = ManualClock()
    m = machine(clock, radar=PRESENCE)
    m.update("radar", True)
    run_to_deadline(m, clock)
    out = m.set_available("radar", False, "radar.c1 lost")
    assert out[0] == SensorFault("c1", "radar", "unavailable", "radar.c1 lost")
    assert states(out) == [(O, L, "absence")] and m.levels() == {"radar": None}
    assert m.update("radar", True)[0] == SensorRecovered("c1", "radar", "unavailable")
    assert m.state is O


def test_caller_mistakes_raise_at_once():
    with pytest.raises(ValueError, match="no sensor named 'radar'"):
        machine(ManualClock()).update("radar", True)
    with pytest.raises(ValueError, match="hold_s"):
        Timings(hold_s=-1)
    with pytest.raises(ValueError, match="flap_max_changes"):
        Timings(flap_max_changes=1)


ops = st.lists(st.one_of(
    st.tuples(st.just("update"), st.sampled_from(["pir", "radar", "door"]), st.booleans()),
    st.tuples(st.just("avail"), st.sampled_from(["pir", "radar", "door"]), st.booleans()),
    st.tuples(st.just("session"), st.booleans()),
    st.tuples(st.just("wait"), st.floats(0, 120)),
    st.tuples(st.just("deadline"),)), max_size=60)


@SETTINGS
@given(ops)
def test_invariants_hold_for_any_history(history):
    clock = ManualClock()
    timings = Timings(stuck_after_s=300, flap_window_s=30, flap_max_changes=6)
    m = OccupancyMachine("c1", {"pir": MOTION, "radar": PRESENCE, "door": DOOR}, clock=clock, timings=timings)
    allowed = {(V, O), (O, L), (L, O), (L, V)}
    leaving_since = None
    for op in history:
        if op[0] == "update":
            out = m.update(op[1], op[2])
        elif op[0] == "avail":
            out = m.set_available(op[1], op[2])
        elif op[0] == "session":
            out = m.set_session(op[1])
        elif op[0] == "wait":
            clock.advance(op[1])
            out = m.tick()
        else:
            deadline = m.next_deadline()
            if deadline is None:
                continue
            clock.advance(max(0.0, deadline - clock.monotonic()))
            out = m.tick()
        for t in (o for o in out if isinstance(o, Transition)):
            assert (t.old, t.new) in allowed
            if t.new is L:
                leaving_since = clock.monotonic()
            if t.new is V:
                # Advancing the clock by (deadline - now) lands within a rounding error of
                # the deadline (hypothesis found 19.999999999999886 for a 20 s hold).
                assert clock.monotonic() - leaving_since >= timings.hold_s - 1e-9
        # Never vacant while someone is evidently there, never occupied with nobody for a hold.
        if m.state is V:
            assert not m.session_claim
            assert not (m.presence() and m.next_deadline() is None)
        if m.presence():
            assert m.state is not L
        if m.state is L:
            assert m.next_deadline() is not None
        deadline = m.next_deadline()
        assert deadline is None or deadline >= clock.monotonic() - 1e-9


# -- the debouncer -------------------------------------------------------------------------------------
def test_debouncer_ignores_bounces_and_follows_a_settled_level():
    clock = ManualClock()
    d = Debouncer(True, clock=clock, settle_s=0.05)
    for level in (False, True, False, True):     # contact chatter, 5 ms apart
        assert d.feed(level) is None
        clock.advance(0.005)
    assert d.next_deadline() is None and d.stable is True
    d.feed(False)
    clock.advance(0.049)
    assert d.poll() is None
    clock.advance(0.001)
    assert d.poll() is False and d.stable is False
    assert d.edges == 5


@SETTINGS
@given(st.lists(st.tuples(st.booleans(), st.floats(0, 0.2)), max_size=40))
def test_debouncer_adopts_exactly_the_levels_that_held_for_the_settle_time(edges):
    clock = ManualClock()
    d = Debouncer(False, clock=clock, settle_s=0.05)
    raw, raw_since = False, clock.monotonic()
    for level, wait in edges:
        if level != raw:
            raw, raw_since = level, clock.monotonic()
        assert d.feed(level) is None             # a fresh edge never settles at once
        clock.advance(wait)
        before = d.stable
        got = d.poll()
        if got is not None:
            assert got == raw != before and clock.monotonic() - raw_since >= 0.05 - 1e-6
        else:
            assert d.stable == before
            assert raw == before or clock.monotonic() - raw_since < 0.05 + 1e-6


# -- the Cell controller --------------------------------------------------------------------------------
class FakeIndicator:
    def __init__(self) -> None:
        self.shown = []

    def show(self, indication):
        self.shown.append(indication)


def test_cell_debounces_door_edges_and_reports_without_personal_data():
    clock = ManualClock()
    ind = FakeIndicator()
    cell = Cell("c1", {"pir": "motion", "door": "door"}, clock=clock, indicator=ind)
    assert cell.handle(SensorReading("c2", "pir", True)) is None          # another cell's
    assert cell.handle(object()) is None
    cell.handle(SensorReading("c1", "door", True))
    for closed in (False, True, False):
        assert cell.handle(ContactEdge("c1", "door", closed)).notices == []
    clock.advance(cell.next_deadline() - clock.monotonic())
    assert cell.tick().notices == []                                      # pulse only, min presence pending
    clock.advance(cell.next_deadline() - clock.monotonic())
    update = cell.tick()
    assert update.changed and update.notices == [Notice("cell.state", "info", "c1",
                                                        {"cell": "c1", "state": "occupied",
                                                         "previous": "vacant", "reason": "presence"})]
    assert ind.shown[-1] is Indication.OCCUPIED
    assert cell.state_extra() == {"cell.c1": "occupied", "cell.c1.faults": ""}
    vacated = False
    while not vacated:
        clock.advance(cell.next_deadline() - clock.monotonic())
        vacated = cell.tick().vacated
    assert ind.shown[-1] is Indication.FREE and cell.state is V


def test_cell_notices_follow_the_contract():
    clock = ManualClock()
    cell = Cell("c1", {"pir": "motion", "radar": "presence"}, clock=clock)
    notices = []
    notices += cell.handle(SensorAvailability("c1", "radar", False, "radar.c1 lost")).notices
    notices += cell.handle(SensorReading("c1", "radar", True)).notices
    notices += cell.set_session(True).notices
    notices += cell.handle(NodeInfo("c1", "1.0.0", "e66038b7136d2a2f", True)).notices
    assert {n.name for n in notices} == {"cell.sensor_fault", "cell.sensor_recovered", "cell.state", "cell.node"}
    for n in notices:
        validate_body("event", {"name": n.name, "severity": n.severity, "subject": n.subject, "detail": n.detail})
    telemetry = cell.telemetry()
    assert telemetry["state"] == "occupied" and telemetry["radar"] is True and telemetry["pir"] is None
    body = {"status": "online", "session": 1, "agent_version": "0.1.0", "since_ms": 0, "reason": None,
            "services": [], "extra": cell.state_extra()}
    validate_body("state", body)


def test_cell_ignores_events_from_unconfigured_sensors():
    cell = Cell("c1", {"pir": "motion"}, clock=ManualClock())
    assert cell.handle(SensorReading("c1", "radar", True)) == CellUpdate()


# -- GPIO sensors and the indicator on MockFactory ---------------------------------------------------------
@pytest.fixture
def factory():
    f = MockFactory()
    yield f
    f.reset()


def test_gpio_sensors_report_levels_and_raw_door_edges(factory):
    log = EventLog()
    with CellGpioSensors("c1", sink=log.put, pir_pin=17, door_pin=27, pin_factory=factory) as sensors:
        factory.pin(27).drive_low()              # door shut when the agent starts
        sensors.start()
        assert log.events[:2] == [SensorReading("c1", "pir", False), SensorReading("c1", "door", True)]
        factory.pin(17).drive_high()
        log.wait(lambda e: e == SensorReading("c1", "pir", True), what="motion")
        factory.pin(27).drive_high()
        log.wait(lambda e: e == ContactEdge("c1", "door", False), what="door opened")
        sensors.close()
    sensors.close()                              # twice is fine


def test_gpio_callbacks_never_raise(factory):
    def broken_sink(event):
        raise RuntimeError("queue gone")

    with CellGpioSensors("c1", sink=broken_sink, door_pin=27, pin_factory=factory) as sensors:
        sensors.start()
        factory.pin(27).drive_low()
        factory.pin(27).drive_high()             # would raise in gpiozero's thread if unguarded


def test_indicator_maps_free_occupied_fault(factory):
    with CellIndicator(22, pin_factory=factory) as ind:
        pin = factory.pin(22)
        ind.show(Indication.OCCUPIED)
        assert pin.state
        ind.show(Indication.FREE)
        assert not pin.state
        ind.show(Indication.FAULT)
        start = len(pin.states)
        wait_for(lambda: len(pin.states) >= start + 3, 3, "the fault blink")
        ind.show(Indication.FAULT)               # same indication: the blink is not restarted
        ind.show(Indication.FREE)
        assert not pin.state


# -- a whole emulated cell ------------------------------------------------------------------------------------
FAST = Timings(min_presence_s=0.1, hold_s=0.6, hold_motion_only_s=1.0, door_pulse_s=0.3)


class CellLoop:
    """The agent's main loop in miniature: one thread owns the Cell, fed by a queue."""

    def __init__(self, cell: Cell) -> None:
        self.cell = cell
        self.events: queue.Queue = queue.Queue()
        self.updates: list[CellUpdate] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def put(self, event) -> None:
        self.events.put(event)

    def _run(self) -> None:
        while not self._stop.is_set():
            deadline = self.cell.next_deadline()
            timeout = 0.2 if deadline is None else max(0.0, min(0.2, deadline - SYSTEM_CLOCK.monotonic()))
            try:
                update = self.cell.handle(self.events.get(timeout=timeout))
                if update is not None:
                    self.updates.append(update)
            except queue.Empty:
                pass
            self.updates.append(self.cell.tick())

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)


def test_an_emulated_cell_end_to_end(tmp_path, factory):
    ecell = EmulatedCell("c1", tmp_path, factory=factory, pir_pin=17, door_pin=27, indicator_pin=22,
                         radar=True, node=True, node_hb_ms=200, radar_interval_s=0.05)
    indicator = CellIndicator(22, pin_factory=factory)
    cell = Cell("c1", {"pir": "motion", "door": "door", "radar": "presence", "node_pir": "motion",
                       "node_door": "door"}, clock=SYSTEM_CLOCK, timings=FAST, indicator=indicator)
    loop = CellLoop(cell)
    gpio = CellGpioSensors("c1", sink=loop.put, pir_pin=17, door_pin=27, pin_factory=factory)
    radar = RadarWorker(ecell.radar.path, cell="c1", sink=loop.put, silence_timeout_s=0.5,
                        command_timeout_s=0.3, backoff_min_s=0.05, backoff_max_s=0.2)
    node = CellNodeWorker(ecell.node.path, cell="c1", sink=loop.put, names={"pir": "node_pir", "door": "node_door"},
                          hello_timeout_s=0.6, heartbeat_timeout_s=0.8, backoff_min_s=0.05, backoff_max_s=0.2)
    try:
        gpio.start()
        radar.start()
        node.start()
        wait_for(lambda: cell.machine.levels()["radar"] is False and cell.machine.levels()["node_door"] is True,
                 5, "all sensors reporting")
        assert cell.state is V and not ecell.indicator_on()

        ecell.enter()
        wait_for(lambda: cell.state is O, 5, "occupied after entering")
        assert ecell.indicator_on()
        ecell.sit_still()                        # PIRs lose them, the radar does not
        wait_for(lambda: cell.machine.levels()["pir"] is False and cell.machine.levels()["node_pir"] is False,
                 3, "PIRs quiet")
        wait_for(lambda: cell.machine.presence() is True and cell.state is O, 1, "still occupied")

        ecell.leave()
        wait_for(lambda: cell.state is V, 5, "vacant after leaving")
        assert any(u.vacated for u in loop.updates)
        assert not ecell.indicator_on()

        ecell.radar.unplug()                     # a lost sensor is a fault on the indicator
        wait_for(lambda: cell.machine.indication is Indication.FAULT, 5, "fault shown")
        ecell.radar.replug()
        wait_for(lambda: cell.machine.indication is Indication.FREE, 5, "fault cleared")
        names = [n.name for u in loop.updates for n in u.notices]
        assert names.count("cell.state") >= 3 and "cell.sensor_fault" in names
    finally:
        loop.stop()
        node.stop()
        radar.stop()
        gpio.close()
        indicator.close()
        ecell.close()
