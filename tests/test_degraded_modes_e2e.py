"""Degraded modes end to end (issue 6): each part down -> the mode ops see in the retained
state and what citizens are offered; each recovery -> back to normal by itself."""

from __future__ import annotations

import json
import time

import pytest

from emulator.idcard import Card
from tests.conftest import wait_for
from tests.test_e2e_ticket import Recorder, _event_names, _last_state

pytestmark = pytest.mark.e2e


def test_reader_down_means_qr_only_and_qr_down_means_cards_only(hall):
    rec = Recorder(hall, f"hall/{hall.hall_id}/#")
    hall.start_consumer()
    kiosk = hall.add_kiosk("d1", qr=True, services=(("A", "Citizen card", "A"),))
    kiosk.start_agent()
    wait_for(lambda: _last_state(rec)["status"] == "online", what="online")

    kiosk.reader.unplug()
    wait_for(lambda: _last_state(rec)["status"] == "degraded", what="degraded")
    state = _last_state(rec)
    assert state["reason"].startswith("QR codes only")
    assert state["extra"]["card"] is False and state["extra"]["qr"] is True
    kiosk.scanner.scan(hall.booking.appointment("A", start_s=int(time.time()) + 600))
    assert kiosk.printer.wait_for_tickets(1, 10)          # still serving, by QR
    kiosk.reader.replug()
    wait_for(lambda: _last_state(rec)["status"] == "online", what="reader back: online")

    kiosk.scanner.unplug()
    kiosk.camera.unplug()
    wait_for(lambda: _last_state(rec).get("reason") and
             _last_state(rec)["reason"].startswith("ID cards only"), what="cards only")
    kiosk.reader.present(Card.valid())
    assert kiosk.printer.wait_for_tickets(2, 10)          # still serving, by card
    kiosk.scanner.replug()
    kiosk.camera.replug()
    wait_for(lambda: _last_state(rec)["status"] == "online", timeout_s=15, what="QR back: online")
    faults = [json.loads(m.payload)["body"]["subject"] for m in rec.of_kind("/event")
              if json.loads(m.payload)["body"]["name"] == "device_fault"]
    assert {"idcard-reader", "qr-scanner", "qr-camera"} <= set(faults)
    # The last recovery event and the state that follows from it are separate publishes:
    # the state may land first.
    wait_for(lambda: _event_names(rec).count("device_recovered") >= 3, what="3 recoveries")
