"""End to end for the kiosk's other peripherals: appointment QR codes (camera and scanner),
forged codes, a citizen's e-ID code, the privacy cell (enter, session, leave -> wiped) and
the staff call (press -> event and LED, ops ack -> cleared). Real broker over mTLS, devices
on real ptys and the MockFactory, codes signed with real keys."""

from __future__ import annotations

import json
import time

import pytest

from emulator.booking import forge
from emulator.idcard import Card
from provisioning.opsclient import OpsClient
from tests.conftest import wait_for
from tests.test_e2e_ticket import Recorder, _event_names, _last_state

pytestmark = pytest.mark.e2e


def _events(rec, name: str) -> list[dict]:
    out = []
    for m in rec.of_kind("/event"):
        body = json.loads(m.payload)["body"]
        if body["name"] == name:
            out.append(body)
    return out


def test_appointment_qr_gives_a_priority_ticket_once(hall):
    rec = Recorder(hall, f"hall/{hall.hall_id}/#")
    consumer = hall.start_consumer()
    kiosk = hall.add_kiosk("q1", qr=True)
    agent = kiosk.start_agent()
    wait_for(lambda: _last_state(rec)["status"] == "online", what="online")

    code = hall.booking.appointment("B", start_s=int(time.time()) + 600)
    kiosk.camera.show(code)
    assert kiosk.printer.wait_for_tickets(1, 10)
    kiosk.camera.hide()
    assert "B-01-0001" in kiosk.printer.tickets[0].text
    assert "Appointment" in kiosk.printer.tickets[0].text
    wait_for(lambda: consumer.ledger.count() == 1, what="ticket in the ledger")
    row = consumer.ledger.rows()[0]
    assert row.priority == "appointment" and row.service == "B"
    # The same code on the scanner (no camera repeat window there): refused, used once.
    kiosk.scanner.scan(code)
    wait_for(lambda: any(e["detail"]["reason"] == "already_used" for e in _events(rec, "qr_refused")),
             what="already_used refusal")
    assert len(kiosk.printer.tickets) == 1
    wait_for(lambda: agent.store.depth() == 0, what="outbox empty")


def test_forged_expired_and_foreign_codes_are_refused_with_a_reason(hall):
    rec = Recorder(hall, f"hall/{hall.hall_id}/#")
    kiosk = hall.add_kiosk("q2", qr=True)
    kiosk.start_agent()
    wait_for(lambda: _last_state(rec)["status"] == "online", what="online")
    now = int(time.time())
    cases = {
        "forged": forge(hall.booking.appointment("A", start_s=now + 600)),
        "expired": hall.booking.appointment("A", start_s=now - 7200, minutes=30),
        "wrong_hall": hall.booking.appointment("A", start_s=now + 600, hall="other-hall"),
        "unknown_format": b"https://example.invalid/?q=' OR 1=1 --",
        "oversized": b"HKA1." + b"A" * 4000,
    }
    for payload in cases.values():
        kiosk.scanner.scan(payload)
    wait_for(lambda: len(_events(rec, "qr_refused")) + len(_events(rec, "qr_unreadable")) >= len(cases),
             what="every refusal")
    reasons = {e["detail"]["reason"] for e in _events(rec, "qr_refused")}
    reasons |= {e["detail"]["reason"] for e in _events(rec, "qr_unreadable")}
    assert {"forged", "expired", "wrong_hall", "unknown_format"} <= reasons
    assert reasons & {"oversized", "malformed"}
    assert kiosk.printer.tickets == []
    for m in rec.messages:                     # QR content is never echoed
        assert b"OR 1=1" not in m.payload


def test_citizen_eid_qr_identifies_like_a_card(hall):
    consumer = hall.start_consumer()
    kiosk = hall.add_kiosk("q3", qr=True, services=(("A", "Citizen card", "A"),))
    agent = kiosk.start_agent()
    wait_for(lambda: agent.link.connected, what="connected")
    card = Card.valid()
    kiosk.scanner.scan(hall.eid.code(card.id_number, now_s=int(time.time())))
    assert kiosk.printer.wait_for_tickets(1, 10)
    kiosk.reader.present(card)                  # the same person by card: the same hash
    assert kiosk.printer.wait_for_tickets(2, 10)
    wait_for(lambda: consumer.ledger.count() == 2, what="both tickets")
    import sqlite3
    db = sqlite3.connect(hall.dir / "ledger" / "ledger.sqlite")
    hashes = [r[0] for r in db.execute("SELECT citizen FROM tickets ORDER BY ledger_id")]
    db.close()
    assert hashes[0] == hashes[1] and len(hashes[0]) == 64


def test_leaving_the_cell_ends_the_session_and_wipes_it(hall):
    rec = Recorder(hall, f"hall/{hall.hall_id}/#")
    kiosk = hall.add_kiosk("c5", cell="cell-05", cell_hold_s=5)
    agent = kiosk.start_agent()
    wait_for(lambda: _last_state(rec)["status"] == "online", what="online")
    kiosk.cell.enter()
    wait_for(lambda: _last_state(rec).get("extra", {}).get("cell.cell-05") == "occupied",
             what="cell occupied in the retained state")
    assert kiosk.factory.pin(22).state                      # indicator: occupied
    card = Card.valid()
    kiosk.reader.present(card)
    wait_for(lambda: agent.machine.session is not None, what="session started")
    held = agent.machine.session.card
    kiosk.cell.leave()
    wait_for(lambda: agent.machine.session is None, timeout_s=30, what="session ended by vacancy")
    assert held.wiped
    wait_for(lambda: _events(rec, "session_ended"), what="session_ended event")
    wait_for(lambda: _last_state(rec).get("extra", {}).get("cell.cell-05") == "vacant",
             what="cell vacant in the retained state")
    assert not kiosk.factory.pin(22).state
    names = _event_names(rec)
    assert "cell.state" in names
    assert kiosk.printer.tickets == []


def test_staff_call_is_raised_once_and_cleared_by_ops(hall, tmp_path):
    rec = Recorder(hall, f"hall/{hall.hall_id}/#")
    kiosk = hall.add_kiosk("s1", cell="cell-07")
    kiosk.start_agent()
    wait_for(lambda: _last_state(rec)["status"] == "online", what="online")
    led = kiosk.board.staff_call_led
    for _ in range(5):                                      # an anxious citizen
        kiosk.staff_button.press("staff")
    wait_for(lambda: _events(rec, "staff_call.raised"), what="call raised")
    raised = _events(rec, "staff_call.raised")
    assert len(raised) == 1 and raised[0]["detail"]["cell"] == "cell-07"
    wait_for(lambda: kiosk.factory.pin(led).state, what="call-pending LED on")
    assert len(_events(rec, "staff_call.repeated")) <= 1    # no flood

    with OpsClient(ops_id="ops", hall=hall.hall_id, key=hall.pki["ops"].key, keyring=hall.keyring,
                   tls=hall.tls_for("ops"), host="127.0.0.1", port=hall.broker.port,
                   state_dir=tmp_path / "ops") as ops:
        _, _, nonce = ops.send("s1", "staff_call_ack", {"call": raised[0]["detail"]["call"]})
        results = ops.wait_result(nonce, count=2)
    assert [r.body["status"] for r in results] == ["accepted", "done"]
    wait_for(lambda: _events(rec, "staff_call.acked"), what="acked event")
    wait_for(lambda: not kiosk.factory.pin(led).state, what="LED cleared")
