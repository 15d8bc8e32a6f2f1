"""End to end: card -> button -> printed ticket -> signed ticket verified and stored by the
hall's consumer -> ack -> outbox empty. Real broker, devices on real ptys, real crypto."""

from __future__ import annotations

import json
import signal
import time

import pytest

from edge.store import KioskStore
from edge.mqtt import LinkMessage
from emulator.idcard import Card
from mqtt_topics.envelope import verify
from mqtt_topics.topics import HallTopics
from tests.conftest import wait_for

pytestmark = pytest.mark.e2e


class Recorder:
    """A view of what the hall's auditor (a real subscriber on hall/#) saw, filtered."""

    def __init__(self, hall, topic_filter: str) -> None:
        self.auditor = hall.auditor
        self.prefix = topic_filter.split("#")[0].split("+")[0]
        self.suffix = topic_filter.rsplit("+", 1)[1] if "+" in topic_filter else ""

    @property
    def messages(self) -> list[LinkMessage]:
        return [m for m in list(self.auditor.messages)
                if m.topic.startswith(self.prefix) and m.topic.endswith(self.suffix)]

    def of_kind(self, suffix: str) -> list[LinkMessage]:
        return [m for m in self.messages if m.topic.endswith(suffix)]

    def close(self) -> None:
        """Nothing to close: the auditor belongs to the hall."""


def outbox_depth(kiosk) -> int:
    with KioskStore(kiosk.dir / "state" / "kiosk.sqlite") as store:
        return store.depth()


def test_card_button_ticket_ack(hall):
    rec = Recorder(hall, f"hall/{hall.hall_id}/#")
    consumer = hall.start_consumer()
    kiosk = hall.add_kiosk("k07", prefix="07")
    agent = kiosk.start_agent()
    wait_for(lambda: agent.link.connected, what="agent connected")

    card = Card.valid()
    kiosk.reader.present(card)
    wait_for(lambda: kiosk.leds.state("A") or kiosk.leds.state("B"), what="service LEDs blinking")
    kiosk.buttons.press("B")

    assert kiosk.printer.wait_for_tickets(1, 10)
    printed = kiosk.printer.tickets[0]
    assert "B-07-0001" in printed.text
    assert "Social insurance" in printed.text
    assert printed.png_path is not None and printed.png_path.exists()
    uid = printed.qr_codes[0]
    device, serial = uid.split(":")
    assert device == "k07" and serial.isdigit()   # kiosk-wide serial, seeded from the clock

    wait_for(lambda: consumer.ledger.lookup(uid), what="ticket in the ledger")
    row = consumer.ledger.lookup(uid)
    assert (row.ticket_id, row.device, row.service, row.printed) == ("B-07-0001", "k07", "B", "yes")
    wait_for(lambda: agent.store.depth() == 0, what="outbox emptied by the ack")

    # The ticket on the wire verifies (key from the kiosk's certificate); its identity is a hash.
    wait_for(lambda: rec.of_kind("/ticket") and rec.of_kind("/ticket/ack"), what="ticket and ack seen")
    msg = rec.of_kind("/ticket")[0]
    v = verify(msg.payload, msg.topic, hall.keyring, expect_type="ticket", require_role="kiosk")
    assert v.body["citizen"] and len(v.body["citizen"]) == 64
    assert not hall.auditor.leaks([card])
    # The session is over and the card wiped.
    assert agent.machine.session is None
    rec.close()


def test_session_times_out_back_to_idle(hall):
    kiosk = hall.add_kiosk("k08", choose_timeout_s=1.0)
    agent = kiosk.start_agent()
    kiosk.reader.present(Card.valid())
    wait_for(lambda: agent.machine.session is not None, what="session started")
    wait_for(lambda: agent.machine.session is None, timeout_s=5, what="session timed out")
    kiosk.buttons.press("A")        # too late: no ticket
    assert not kiosk.printer.wait_for_tickets(1, 0.5)
    assert agent.store.depth() == 0


@pytest.mark.parametrize("card", [Card.bad_check_digit(), Card.expired()], ids=["check-digit", "expired"])
def test_rejected_cards_give_a_reason_and_no_ticket(hall, card):
    rec = Recorder(hall, HallTopics(hall.hall_id).all_events)
    kiosk = hall.add_kiosk("k09")
    agent = kiosk.start_agent()
    wait_for(lambda: agent.link.connected, what="agent connected")
    kiosk.reader.present(card)
    wait_for(lambda: rec.messages, what="card_rejected event")
    body = json.loads(rec.messages[0].payload)["body"]
    assert body["name"] == "card_rejected" and body["detail"]["reason"]
    assert card.id_number not in rec.messages[0].payload.decode()
    assert agent.machine.session is None and kiosk.printer.tickets == []
    rec.close()


def test_tickets_survive_broker_crash_with_nothing_acked(hall):
    kiosk = hall.add_kiosk("k10", services=(("A", "Citizen card", "A"),))
    agent = kiosk.start_agent()
    wait_for(lambda: agent.link.connected, what="agent connected")
    for n in range(3):                      # no consumer yet: nothing is acked
        kiosk.reader.present(Card.valid())
        assert kiosk.printer.wait_for_tickets(n + 1, 10)
    wait_for(lambda: agent.store.depth() == 3, what="3 tickets in the outbox")
    hall.broker.kill()                      # SIGKILL: PUBACKed messages can be lost
    wait_for(lambda: not agent.link.connected, what="agent saw the broker die")
    hall.broker.start()
    consumer = hall.start_consumer()
    wait_for(lambda: consumer.ledger.count() == 3, timeout_s=20, what="all 3 tickets in the ledger")
    wait_for(lambda: agent.store.depth() == 0, timeout_s=20, what="outbox empty")
    assert sorted(r.ticket_id for r in consumer.ledger.rows()) == ["A-01-0001", "A-01-0002", "A-01-0003"]


def test_tickets_issued_while_broker_is_down_are_flushed(hall):
    consumer = hall.start_consumer()
    kiosk = hall.add_kiosk("k11", services=(("A", "Citizen card", "A"),))
    agent = kiosk.start_agent()
    wait_for(lambda: agent.link.connected, what="agent connected")
    hall.broker.kill()
    wait_for(lambda: not agent.link.connected, what="link down")
    kiosk.reader.present(Card.valid())
    assert kiosk.printer.wait_for_tickets(1, 10)   # the citizen is served offline
    assert agent.store.depth() == 1
    hall.broker.start()
    wait_for(lambda: consumer.ledger.count() == 1, timeout_s=20, what="ticket delivered after recovery")
    wait_for(lambda: agent.store.depth() == 0, timeout_s=20, what="outbox empty")


@pytest.mark.parametrize("crash_at", ["after_print", "after_commit"])
def test_kill_9_between_commit_and_publish(hall, crash_at):
    consumer = hall.start_consumer()
    kiosk = hall.add_kiosk("k12", services=(("A", "Citizen card", "A"),))
    proc = kiosk.spawn_agent(env={"HALLKIOSK_CRASH_AT": crash_at})
    wait_for(lambda: kiosk.reader.commands, what="agent polling the reader")
    kiosk.reader.present(Card.valid())
    proc.wait(timeout=20)
    assert proc.returncode == -signal.SIGKILL
    printed_before = len(kiosk.printer.tickets)
    assert printed_before == (1 if crash_at == "after_print" else 0)
    assert consumer.ledger.count() == 0

    proc = kiosk.spawn_agent()
    wait_for(lambda: consumer.ledger.count() == 1, timeout_s=20, what="ticket published after restart")
    row = consumer.ledger.rows()[0]
    assert row.ticket_id == "A-01-0001"
    assert row.printed == ("yes" if crash_at == "after_print" else "unknown")
    wait_for(lambda: outbox_depth(kiosk) == 0, timeout_s=20, what="outbox empty after the ack")
    assert len(kiosk.printer.tickets) == printed_before      # never printed twice
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0
    assert consumer.ledger.count() == 1 and consumer.ledger.rows()[0].deliveries == 1


def _event_names(rec) -> list[str]:
    return [json.loads(m.payload)["body"]["name"] for m in rec.of_kind("/event")]


def test_paper_near_end_is_reported_at_once_and_paper_out_refuses(hall):
    rec = Recorder(hall, f"hall/{hall.hall_id}/#")
    kiosk = hall.add_kiosk("k13", services=(("A", "Citizen card", "A"),))
    agent = kiosk.start_agent()
    wait_for(lambda: agent.link.connected, what="agent connected")

    kiosk.printer.set_paper("near_end")
    kiosk.reader.present(Card.valid())
    assert kiosk.printer.wait_for_tickets(1, 10)            # near end still prints
    wait_for(lambda: "printer_paper_near_end" in _event_names(rec), what="near-end event")

    kiosk.printer.set_paper("out")                          # noticed by the printer poll
    wait_for(lambda: "printer_paper_out" in _event_names(rec), what="paper-out event")
    wait_for(lambda: _last_state(rec)["status"] == "out_of_service", what="out of service state")
    assert _last_state(rec)["extra"]["direct_to"]
    kiosk.reader.present(Card.valid())
    wait_for(lambda: "citizen_refused" in _event_names(rec), what="refusal event")
    assert len(kiosk.printer.tickets) == 1
    assert agent.store.last_ticket().ticket_id == "A-01-0001"   # nothing committed for it

    kiosk.printer.set_paper("ok")                           # refilled: back by itself
    wait_for(lambda: _last_state(rec)["status"] == "online", what="back online")
    assert "printer_paper_out_cleared" in _event_names(rec)
    kiosk.reader.present(Card.valid())
    assert kiosk.printer.wait_for_tickets(2, 10)
    assert "A-01-0002" in kiosk.printer.tickets[1].text       # numbering carries on
    rec.close()


def _last_state(rec) -> dict:
    states = rec.of_kind("/state")
    return json.loads(states[-1].payload)["body"] if states else {"status": None}


def test_silent_printer_is_a_fault_never_ok(hall):
    rec = Recorder(hall, HallTopics(hall.hall_id).all_events)
    kiosk = hall.add_kiosk("k14", services=(("A", "Citizen card", "A"),))
    agent = kiosk.start_agent()
    wait_for(lambda: agent.link.connected, what="agent connected")
    kiosk.printer.set_silent(True)
    kiosk.reader.present(Card.valid())
    wait_for(lambda: "device_fault" in _event_names(rec), what="printer fault event")
    wait_for(lambda: {"ticket_refused", "citizen_refused"} & set(_event_names(rec)), what="refusal")
    assert agent.store.depth() == 0 and kiosk.printer.tickets == []
    rec.close()


def test_signed_telemetry_carries_health_and_outbox(hall):
    rec = Recorder(hall, f"hall/{hall.hall_id}/#")
    kiosk = hall.add_kiosk("t1", services=(("A", "Citizen card", "A"),))
    cfg = kiosk.config_path.read_text()
    kiosk.config_path.write_text(cfg + "\n[telemetry]\ninterval_s = 1\n[unattended]\nprinter_check_s = 1\n")
    kiosk.start_agent()
    wait_for(lambda: len(rec.of_kind("/telemetry")) >= 2, what="two telemetry messages")
    msg = rec.of_kind("/telemetry")[-1]
    v = verify(msg.payload, msg.topic, hall.keyring, expect_type="telemetry", require_role="kiosk")
    body = v.body
    assert body["uptime_s"] >= 0 and body["outbox_depth"] == 0
    assert body["ticket_printer"]["ok"] is True and body["ticket_printer"]["paper"] == "ok"
    assert body["idcard_reader"]["ok"] is True
    kiosk.printer.set_paper("near_end")
    wait_for(lambda: json.loads(rec.of_kind("/telemetry")[-1].payload)["body"]["ticket_printer"]["paper"]
             == "near_end", timeout_s=15, what="paper near end in telemetry")


def test_telemetry_goes_out_with_the_birth_when_the_broker_comes_late(hall):
    """The first telemetry is due 1 s after start, then every 60 s. A kiosk whose broker is
    not up at that moment must not wait a whole interval once it connects: health goes out
    with every birth (the QEMU boot showed the 60 s hole)."""
    hall.broker.stop()
    kiosk = hall.add_kiosk("k12")
    agent = kiosk.start_agent()
    sent: list[tuple[str, float]] = []
    real_send = agent.publisher.send

    def recording_send(topic, msg_type, body, **kw):
        sent.append((msg_type, time.monotonic()))
        return real_send(topic, msg_type, body, **kw)

    agent.publisher.send = recording_send
    time.sleep(2.0)                      # the first slot passes with no broker
    assert not agent.link.connected and not [t for t, _ in sent if t == "telemetry"]
    hall.broker.start()
    wait_for(lambda: agent.link.connected, timeout_s=15, what="agent connected")
    up = time.monotonic()
    wait_for(lambda: [t for t, _ in sent if t == "telemetry"], timeout_s=10,
             what="telemetry with the birth")
    first = [at for t, at in sent if t == "telemetry"][0]
    assert first - up < 10
