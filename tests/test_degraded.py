"""edge.degraded: every degraded mode and its recovery as a table over the pure policy, the
state fields against the contract's schema, the printer and reader modes against the emulator
over real ptys, and a retained state through a real Mosquitto."""

from __future__ import annotations

import queue
import secrets

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.clock import SYSTEM_CLOCK, ManualClock
from edge.degraded import (DEGRADED, MAX_EXTRA_KEYS, ONLINE, OUT_OF_SERVICE, ServiceMode, decide,
                           state_fields)
from edge.events import DeviceFault, DeviceRecovered
from edge.health import (BROKER, CAMERA, CLOCK, PRINTER, QR_SCANNER, READER, STORE,
                         ComponentHealth, Health, Level, printer_level)
from edge.idcard_worker import IdCardWorker
from edge.keys import generate_private_key
from edge.mqtt import LinkDown, LinkMessage, LinkUp, MqttLink, PublishDone
from edge.printer.escpos import PrinterStatus, TicketLayout
from edge.printing import PrinterHandle
from emulator.idcard import EmulatedReader
from emulator.printer import EmulatedPrinter
from hallkiosk.errors import DeviceError
from mqtt_topics.envelope import Keyring, Signer, verify
from mqtt_topics.schemas import validate_body
from mqtt_topics.topics import KioskTopics
from tests.conftest import wait_for

ALL_PARTS = (READER, PRINTER, QR_SCANNER, CAMERA, BROKER, STORE, CLOCK)
DIRECT = "Please use kiosk 3, next to the entrance"
SERVICES = ("A", "B", "C")
LAYOUT = TicketLayout(hall_name="Service Hall North", service_name="Passports",
                      ticket_number="A-07-0001", issued_at="2026-11-12 09:41", waiting_ahead=0,
                      qr_data="HK1:A-07-0001:00")


def parts(**levels) -> dict[str, ComponentHealth]:
    """All parts OK except those given as name=(level, reason); '_' for '-' in names."""
    out = {n: ComponentHealth(n, Level.OK, None, 0.0) for n in ALL_PARTS}
    for key, (level, reason) in levels.items():
        name = key.replace("_", "-")
        out[name] = ComponentHealth(name, Level(level), reason, 0.0)
    return out


def body(mode: ServiceMode, services=SERVICES) -> dict:
    fields = state_fields(mode, services)
    full = {"session": 1, "agent_version": "0.1.0", "since_ms": 1_795_000_000_000, **fields}
    return validate_body("state", full)


# (case, parts, status, offers, card, qr, reason) -- each mode of issue 6, and normal service.
MODES = [
    ("all well", parts(), ONLINE, True, True, True, None),
    ("paper out", parts(ticket_printer=("down", "paper_out")), OUT_OF_SERVICE, False, False, False,
     "no tickets: ticket-printer down (paper_out)"),
    ("cover open", parts(ticket_printer=("down", "cover_open")), OUT_OF_SERVICE, False, False,
     False, "no tickets: ticket-printer down (cover_open)"),
    ("printer offline", parts(ticket_printer=("down", "offline")), OUT_OF_SERVICE, False, False,
     False, "no tickets: ticket-printer down (offline)"),
    ("printer unplugged", parts(ticket_printer=("down", "gone")), OUT_OF_SERVICE, False, False,
     False, "no tickets: ticket-printer down (gone)"),
    ("paper near end", parts(ticket_printer=("degraded", "paper_near_end")), DEGRADED, True, True,
     True, "ticket-printer degraded (paper_near_end)"),
    ("reader down: QR only", parts(idcard_reader=("down", "gone")), DEGRADED, True, False, True,
     "QR codes only: idcard-reader down (gone)"),
    ("scanner down, camera still reads QR", parts(qr_scanner=("down", "gone")), DEGRADED, True,
     True, True, "qr-scanner down (gone)"),
    ("camera and scanner down: card only", parts(qr_scanner=("down", "gone"), qr_camera=("down", "gone")),
     DEGRADED, True, True, False, "ID cards only: qr-camera down (gone); qr-scanner down (gone)"),
    ("nothing identifies a citizen",
     parts(idcard_reader=("down", "gone"), qr_scanner=("down", "gone"), qr_camera=("down", "timeout")),
     OUT_OF_SERVICE, False, False, False,
     "no tickets: idcard-reader down (gone); qr-scanner down (gone); qr-camera down (timeout)"),
    ("broker unreachable: keep issuing", parts(broker=("down", "unreachable")), ONLINE, True, True,
     True, None),
    ("store unusable", parts(store=("down", "disk full")), OUT_OF_SERVICE, False, False, False,
     "no tickets: store down (disk full)"),
    ("clock not trusted", parts(clock=("degraded", "not synchronised")), DEGRADED, True, True, True,
     "clock degraded (not synchronised)"),
    ("printer down outranks the reader in the reason",
     parts(idcard_reader=("down", "gone"), ticket_printer=("down", "paper_out")), OUT_OF_SERVICE,
     False, False, False, "no tickets: ticket-printer down (paper_out); idcard-reader down (gone)"),
]


@pytest.mark.parametrize("case, p, status, offers, card, qr, reason", MODES, ids=[m[0] for m in MODES])
def test_each_mode(case, p, status, offers, card, qr, reason):
    mode = decide(p, direct_to=DIRECT)
    assert (mode.status, mode.offers_tickets, mode.card_ok, mode.qr_ok, mode.reason) == \
        (status, offers, card, qr, reason)
    assert mode.direct_to == (None if offers else DIRECT)
    b = body(mode)
    assert b["status"] == status and b["reason"] == reason
    assert b["services"] == (list(SERVICES) if offers else [])
    assert b["extra"]["tickets"] is offers and b["extra"]["card"] is card and b["extra"]["qr"] is qr
    assert ("direct_to" in b["extra"]) is (not offers)


@pytest.mark.parametrize("case, p", [(m[0], m[1]) for m in MODES if m[2] != ONLINE],
                         ids=[m[0] for m in MODES if m[2] != ONLINE])
def test_each_mode_recovers_by_itself(case, p):
    """Recovery is not a rule of its own: the same parts reporting OK give normal service."""
    assert not decide(p, direct_to=DIRECT).normal
    healed = {n: ComponentHealth(n, Level.OK, None, 1.0) for n in p}
    mode = decide(healed, direct_to=DIRECT)
    assert mode.normal and mode.offers_tickets and mode.card_ok and mode.qr_ok
    assert mode == decide(parts(), direct_to=DIRECT)


def test_absent_parts_are_configuration_not_degradation():
    """A kiosk built without camera and scanner offers card only and is fully online."""
    p = {n: ComponentHealth(n, Level.OK, None, 0.0) for n in (READER, PRINTER, BROKER, STORE)}
    mode = decide(p)
    assert (mode.status, mode.card_ok, mode.qr_ok, mode.reason) == (ONLINE, True, False, None)
    p[READER] = ComponentHealth(READER, Level.DOWN, "gone", 0.0)
    mode = decide(p, direct_to=DIRECT)
    assert (mode.status, mode.offers_tickets) == (OUT_OF_SERVICE, False)
    assert mode.reason == "no tickets: idcard-reader down (gone)"
    assert decide({}).reason == "no tickets: no identification device"


def test_an_explicit_hold_wins_and_names_itself():
    mode = decide(parts(), direct_to=DIRECT, out_of_service="shutting down")
    assert (mode.status, mode.offers_tickets, mode.reason, mode.direct_to) == \
        (OUT_OF_SERVICE, False, "shutting down", DIRECT)
    mode = decide(parts(ticket_printer=("down", "paper_out")), out_of_service="maintenance\nby ops")
    assert mode.reason == "maintenance by ops: ticket-printer down (paper_out)"
    assert body(mode)["services"] == []


def test_the_walk_through_a_printer_running_out_and_being_refilled():
    """Health fed as the agent would (polled printer status, device events), decided after
    each change: online -> degraded -> out_of_service -> online."""
    clock = ManualClock()
    h = Health((READER, PRINTER, BROKER, STORE), clock=clock)
    seen = []

    def poll(status):
        if h.report(PRINTER, *printer_level(status)):
            seen.append(decide(h.snapshot(), direct_to=DIRECT).status)

    answered = frozenset({1, 2, 4})
    poll(PrinterStatus(answered=answered))
    poll(PrinterStatus(paper_near_end=True, answered=answered))
    poll(PrinterStatus(paper_near_end=True, paper_out=True, answered=answered))
    poll(PrinterStatus(paper_near_end=True, paper_out=True, answered=answered))   # unchanged
    if h.apply(DeviceFault(READER, "gone", "unplugged")):
        seen.append(decide(h.snapshot()).reason)
    if h.apply(DeviceRecovered(READER)):
        seen.append(decide(h.snapshot()).reason)
    poll(PrinterStatus(answered=answered))
    assert seen == [DEGRADED, OUT_OF_SERVICE,
                    "no tickets: ticket-printer down (paper_out); idcard-reader down (gone)",
                    "no tickets: ticket-printer down (paper_out)", ONLINE]


def test_state_fields_bounds():
    long = "x" * 400
    many = {f"part-{i:02d}": ComponentHealth(f"part-{i:02d}", Level.DOWN, long, 0.0) for i in range(40)}
    many["bad name!"] = ComponentHealth("bad name!", Level.DOWN, "r", 0.0)
    mode = decide({**parts(), **many}, direct_to=long)
    b = body(mode)
    assert len(b["reason"]) == 256 and len(b["extra"]) <= MAX_EXTRA_KEYS
    assert "bad name!" not in b["extra"]
    assert state_fields(decide(parts()), ["A", "A", "B"])["services"] == ["A", "B"]


_LEVEL = st.sampled_from(list(Level))
_REASON = st.one_of(st.none(), st.text(max_size=300))


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(ALL_PARTS + ("cell-node", "booth-sensor")),
                       st.tuples(_LEVEL, _REASON)),
       st.one_of(st.none(), st.text(max_size=300)), st.one_of(st.none(), st.text(max_size=50)))
def test_policy_invariants(levels, direct_to, hold):
    p = {n: ComponentHealth(n, lv, r, 0.0) for n, (lv, r) in levels.items()}
    mode = decide(p, direct_to=direct_to, out_of_service=hold)
    down = {n for n, (lv, _) in levels.items() if lv is Level.DOWN}
    can_identify = (READER in levels and READER not in down) or any(
        n in levels and n not in down for n in (QR_SCANNER, CAMERA))
    offers = hold is None and not down & {PRINTER, STORE} and can_identify
    assert mode.offers_tickets is bool(offers)
    assert (mode.status == OUT_OF_SERVICE) is (not offers)
    service_parts_ok = all(lv is Level.OK for n, (lv, _) in levels.items() if n != BROKER)
    assert (mode.status == ONLINE) is bool(offers and service_parts_ok)
    assert (mode.reason is None) is (mode.status == ONLINE)
    if not offers:
        assert not mode.card_ok and not mode.qr_ok
    body(mode)                                   # always a valid contract body


# -- through a real broker ------------------------------------------------------------------
@pytest.mark.integration
def test_degraded_state_is_retained_and_verifies(broker, tmp_path):
    """A kiosk's degraded state, sealed and published retained, is what a dashboard that
    subscribes later receives, verifies and reads; then the recovery replaces it."""
    key = generate_private_key(tmp_path / "device.key")
    keyring = Keyring()
    keyring.add(key.public_key(), owner="k07", roles=("kiosk",))
    topics = KioskTopics("hall-01", "k07")
    seqs = iter(range(1, 1000))
    signer = Signer(key, sender="k07", boot_id=secrets.token_hex(16), next_seq=lambda: next(seqs))
    kiosk_events: queue.Queue = queue.Queue()
    kiosk = MqttLink(client_id="k07", host="127.0.0.1", port=broker.port, sink=kiosk_events.put)
    kiosk.start()
    dash = None
    try:
        assert kiosk.wait_connected(10)
        mode = decide(parts(idcard_reader=("down", "gone")), direct_to=DIRECT)
        state = {"session": 1, "agent_version": "0.1.0", "since_ms": 1, **state_fields(mode, SERVICES)}
        mid = kiosk.publish(topics.state, signer.seal(topics.state, "state", state), qos=1,
                            retain=True)
        # The dashboard subscribes only once the broker holds the state (PUBACK), so what it
        # gets is the retained copy and not the live publish.
        while True:
            ev = kiosk_events.get(timeout=10)
            if isinstance(ev, PublishDone) and ev.mid == mid:
                assert ev.ok
                break

        got: queue.Queue = queue.Queue()
        dash = MqttLink(client_id="dashboard", host="127.0.0.1", port=broker.port,
                        sink=lambda ev: got.put(ev) if isinstance(ev, LinkMessage) else None,
                        subscriptions=((topics.state, 1),))
        dash.start()
        msg = got.get(timeout=10)
        assert msg.retain
        v = verify(msg.payload, msg.topic, keyring, expect_type="state", require_role="kiosk")
        assert v.body["status"] == DEGRADED
        assert v.body["reason"] == "QR codes only: idcard-reader down (gone)"
        assert v.body["extra"]["card"] is False and v.body["extra"]["qr"] is True
        assert v.body["extra"]["idcard-reader"] == "down"

        healed = {**state, **state_fields(decide(parts()), SERVICES)}
        kiosk.publish(topics.state, signer.seal(topics.state, "state", healed), qos=1, retain=True)
        msg = got.get(timeout=10)
        v = verify(msg.payload, msg.topic, keyring, expect_type="state")
        assert (v.body["status"], v.body["reason"], v.body["services"]) == (ONLINE, None, list(SERVICES))
    finally:
        if dash is not None:
            dash.stop()
        kiosk.stop()


def test_link_events_move_the_broker_part_but_not_the_service():
    h = Health(clock=ManualClock())
    assert h.apply(LinkDown("unreachable")) is True
    assert h.get(BROKER).level is Level.DOWN
    assert decide(h.snapshot()).offers_tickets and decide(h.snapshot()).normal
    assert h.apply(LinkUp(False)) is True
    assert h.get(BROKER).level is Level.OK


# -- against the emulator over real ptys ----------------------------------------------------
def _poll_printer(handle: PrinterHandle, h: Health) -> ServiceMode:
    """What the agent does on each printer poll: status (or the error) -> health -> mode."""
    try:
        level, reason = printer_level(handle.status())
    except DeviceError as exc:
        level, reason = printer_level(error=exc)
    h.report(PRINTER, level, reason)
    return decide(h.snapshot(), direct_to=DIRECT)


@pytest.fixture
def printer_emu(tmp_path):
    emu = EmulatedPrinter(tmp_path / "dev" / "printer")
    yield emu
    emu.close()


PRINTER_FAULTS = [
    ("paper out", lambda e: e.set_paper("out"), lambda e: e.set_paper("ok"), "paper_out"),
    ("cover open", lambda e: e.set_cover_open(True), lambda e: e.set_cover_open(False), "cover_open"),
    ("offline", lambda e: e.set_offline(True), lambda e: e.set_offline(False), "offline"),
    ("silent firmware", lambda e: e.set_silent(True), lambda e: e.set_silent(False), "timeout"),
    ("unplugged", lambda e: e.unplug(), lambda e: e.replug(), "gone"),
]


@pytest.mark.parametrize("case, break_it, mend_it, word", PRINTER_FAULTS,
                         ids=[f[0] for f in PRINTER_FAULTS])
def test_printer_fault_stops_tickets_and_recovery_restores_them(printer_emu, case, break_it,
                                                                 mend_it, word):
    h = Health((READER, PRINTER, BROKER, STORE))
    handle = PrinterHandle(printer_emu.path, timeout_s=0.3, encoding="cp437", clock=SYSTEM_CLOCK)
    try:
        assert _poll_printer(handle, h).normal
        break_it(printer_emu)
        mode = _poll_printer(handle, h)
        assert (mode.status, mode.offers_tickets, mode.direct_to) == (OUT_OF_SERVICE, False, DIRECT)
        assert word in mode.reason and body(mode)["services"] == []
        mend_it(printer_emu)
        # A replugged printer costs the handle one failed call (it still held the dead port);
        # the agent polls every few seconds while the printer is down, so allow a second poll.
        mode = _poll_printer(handle, h)
        if not mode.normal:
            mode = _poll_printer(handle, h)
        assert mode.normal and mode.offers_tickets
        assert state_fields(mode, SERVICES)["services"] == list(SERVICES)
        handle.print_ticket(LAYOUT)
        assert printer_emu.wait_for_tickets(1, timeout_s=5)
    finally:
        handle.close()


def test_paper_near_end_keeps_printing_but_shows(printer_emu):
    h = Health((READER, PRINTER, BROKER, STORE))
    handle = PrinterHandle(printer_emu.path, timeout_s=0.3, encoding="cp437", clock=SYSTEM_CLOCK)
    try:
        printer_emu.set_paper("near_end")
        mode = _poll_printer(handle, h)
        assert (mode.status, mode.offers_tickets) == (DEGRADED, True)
        assert mode.reason == "ticket-printer degraded (paper_near_end)"
        printer_emu.set_paper("ok")
        assert _poll_printer(handle, h).normal
    finally:
        handle.close()


@pytest.mark.parametrize("with_scanner", [False, True], ids=["card-only kiosk", "kiosk with scanner"])
def test_reader_unplug_and_replug(tmp_path, with_scanner):
    """The reader's worker events, fed to Health as the agent does, decide the mode."""
    emu = EmulatedReader(tmp_path / "dev" / "idcard")
    events: queue.Queue = queue.Queue()
    h = Health((READER, PRINTER, BROKER, STORE) + ((QR_SCANNER,) if with_scanner else ()))
    worker = IdCardWorker(emu.path, sink=events.put, poll_interval_s=0.1, timeout_s=0.3)
    worker.start()
    try:
        wait_for(lambda: worker.healthy, 5, "reader worker open")
        emu.unplug()
        assert h.apply(events.get(timeout=5))
        mode = decide(h.snapshot(), direct_to=DIRECT)
        if with_scanner:
            assert (mode.status, mode.offers_tickets, mode.card_ok, mode.qr_ok) == \
                (DEGRADED, True, False, True)
            assert mode.reason == "QR codes only: idcard-reader down (gone)"
        else:
            assert (mode.status, mode.offers_tickets) == (OUT_OF_SERVICE, False)
            assert mode.reason == "no tickets: idcard-reader down (gone)"
        emu.replug()
        assert h.apply(events.get(timeout=3))
        assert decide(h.snapshot(), direct_to=DIRECT).normal
    finally:
        worker.stop()
        emu.close()
