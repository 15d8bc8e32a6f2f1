"""The pure side of ops: fleet model, alert rules, dashboard text, ops.toml and inventory.

Messages are real: sealed by the contract's Signer with a kiosk key and verified the way the
monitor verifies them (state without the tracker, everything else with it), so the fleet
sees exactly what it sees in production. Time is a ManualClock.
"""

from __future__ import annotations

import base64
import logging
import secrets

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.clock import ManualClock
from edge.keys import public_raw
from hallkiosk.errors import ConfigError, ContractError
from mqtt_topics.envelope import Keyring, SequenceTracker, Signer, verify
from mqtt_topics.topics import ROLE_FOR_KIND, KioskTopics
from ops.alerts import AlertEngine, AlertRule, AlertSink
from ops.config import load_inventory, parse_ops_config
from ops.dashboard import render, sort_by_trouble
from ops.fleet import MAX_SERIAL_RANGES, Fleet, Rejection, SerialSet

HALL = "hall-1"


class Harness:
    """A keyring, a tracker and a fleet: what one monitor holds."""

    def __init__(self, **fleet_kw) -> None:
        self.clock = ManualClock()
        self.keyring = Keyring()
        self.tracker = SequenceTracker()
        self.fleet = Fleet(clock=self.clock, **fleet_kw)

    def kiosk(self, device: str) -> FakeKiosk:
        return FakeKiosk(self, device)

    def deliver(self, topic: str, payload: bytes, *, retained: bool = False):
        kind = topic.rsplit("/", 1)[-1] if not topic.endswith("/result") else "cmd_result"
        try:
            if kind == "state":
                v = verify(payload, topic, self.keyring, expect_type="state", require_role="kiosk")
            else:
                v = verify(payload, topic, self.keyring, tracker=self.tracker,
                           require_role=ROLE_FOR_KIND[kind])
        except ContractError as exc:
            return self.fleet.reject(Rejection.from_error(topic, exc))
        return self.fleet.apply(v, retained=retained)


class FakeKiosk:
    """Seals what a kiosk agent would publish (a restart is a new Signer: a new boot)."""

    def __init__(self, h: Harness, device: str) -> None:
        self.h = h
        self.device = device
        self.key = Ed25519PrivateKey.generate()
        h.keyring.add(self.key.public_key(), owner=device, roles=("kiosk",))
        self.topics = KioskTopics(HALL, device)
        self._seq = 0
        self.session = 0
        self.restart()

    def _next(self) -> int:
        self._seq += 1
        return self._seq

    def restart(self) -> None:
        self._seq += 255          # a restarted kiosk skips the rest of its reserved block
        self.signer = Signer(self.key, sender=self.device, boot_id=secrets.token_hex(16),
                             next_seq=self._next, clock=self.h.clock)

    def seal(self, kind: str, body: dict) -> tuple[str, bytes]:
        topic = self.topics.topic(kind)
        return topic, self.signer.seal(topic, kind, body)

    def send(self, kind: str, body: dict, **kw):
        return self.h.deliver(*self.seal(kind, body), **kw)

    def state(self, status: str, *, reason=None, extra=None) -> tuple[str, bytes]:
        body = {"status": status, "session": self.session, "agent_version": "0.1.0",
                "since_ms": 1, "reason": reason, "services": ["A"] if status == "online" else []}
        if extra is not None:
            body["extra"] = extra
        return self.seal("state", body)

    def connect(self) -> tuple[tuple[str, bytes], list]:
        """Seal the will, then publish the birth naming it: returns (will, changes)."""
        self.session += 1
        will = self.state("offline", reason="connection lost")
        will_seq = self._seq
        changes = self.h.deliver(*self.state("online", extra={"will_seq": will_seq}))
        return will, changes

    def telemetry(self, **figures):
        return self.send("telemetry", {"uptime_s": 10, **figures})

    def event(self, name: str, severity="info", subject=None, **detail):
        return self.send("event", {"name": name, "severity": severity, "subject": subject,
                                   "detail": detail})

    def ticket(self, serial: int):
        return self.send("ticket", {
            "ticket_uid": f"{self.device}:{serial}", "ticket_id": f"A-01-{serial:04d}",
            "service": "A", "service_name": "Citizen card", "number": serial, "serial": serial,
            "issued_at_ms": 1, "clock_trusted": True, "waiting_ahead": 0, "priority": "normal",
            "appointment_id": None, "citizen": None, "source": "button", "printed": "yes"})


def whats(changes) -> list[str]:
    return [c.what for c in changes]


# -- status: birth, will, heartbeat ------------------------------------------------------------
def test_birth_then_will_shows_offline():
    h = Harness()
    k = h.kiosk("k1")
    will, changes = k.connect()
    assert whats(changes) == ["seen", "status"]
    assert h.fleet.kiosk(HALL, "k1").status == "online"
    k.telemetry()
    changes = h.deliver(*will)
    assert [c.detail["new"] for c in changes if c.what == "status"] == ["offline"]
    snap = h.fleet.kiosk(HALL, "k1")
    assert snap.status == "offline" and snap.status_reason == "connection lost"
    assert not snap.online


def test_an_old_will_arriving_after_a_new_birth_is_ignored():
    h = Harness()
    k = h.kiosk("k1")
    old_will, _ = k.connect()
    k.connect()                                  # reconnected before the broker sent the will
    assert h.deliver(*old_will) == []
    assert h.fleet.kiosk(HALL, "k1").status == "online"


def test_retained_state_is_not_a_sign_of_life():
    h = Harness(heartbeat_timeout_s=30)
    k = h.kiosk("k1")
    k.session = 1
    h.deliver(*k.state("online"), retained=True)
    snap = h.fleet.kiosk(HALL, "k1")
    assert snap.status == "online" and snap.last_seen_age_s is None
    h.clock.advance(31)
    assert "status" in whats(h.fleet.tick())          # the heartbeat runs from subscribe time
    assert h.fleet.kiosk(HALL, "k1").status == "offline"


def test_heartbeat_timeout_and_recovery():
    h = Harness(heartbeat_timeout_s=30)
    k = h.kiosk("k1")
    k.connect()
    h.clock.advance(20)
    k.telemetry()
    h.clock.advance(29)
    assert h.fleet.tick() == []
    assert h.fleet.next_deadline() == pytest.approx(h.clock.monotonic() + 1)
    h.clock.advance(2)
    changes = h.fleet.tick()
    assert [(c.what, c.detail["new"]) for c in changes] == [("status", "offline")]
    assert "silent" in h.fleet.kiosk(HALL, "k1").status_reason
    assert h.fleet.tick() == []                            # reported once
    changes = k.telemetry()
    assert [c.detail["new"] for c in changes if c.what == "status"] == ["online"]


def test_heartbeat_does_not_revive_a_kiosk_that_said_goodbye():
    h = Harness(heartbeat_timeout_s=30)
    k = h.kiosk("k1")
    k.connect()
    h.deliver(*k.state("offline", reason="agent stopped"))
    h.clock.advance(100)
    assert h.fleet.tick() == []
    assert h.fleet.kiosk(HALL, "k1").status_reason == "agent stopped"


def test_traffic_without_state_counts_as_online_and_expected_kiosks_are_unknown():
    h = Harness()
    h.fleet.expect(HALL, "k9")
    k = h.kiosk("k1")
    k.telemetry()
    assert h.fleet.kiosk(HALL, "k1").status == "online"
    assert h.fleet.kiosk(HALL, "k9").status == "unknown"
    assert len(h.fleet) == 2


# -- sequence gaps ---------------------------------------------------------------------------------
def test_no_gap_for_the_will_seq_or_state_seqs():
    h = Harness(gap_grace_s=5)
    k = h.kiosk("k1")
    k.telemetry()
    k.connect()                       # will seq (never delivered) + birth seq
    k.telemetry()
    h.deliver(*k.state("degraded", reason="printer"))
    k.telemetry()
    h.clock.advance(10)
    assert h.fleet.tick() == []
    assert h.fleet.kiosk(HALL, "k1").lost == 0


def test_dropped_messages_are_a_gap_after_the_grace_period():
    h = Harness(gap_grace_s=5)
    k = h.kiosk("k1")
    k.telemetry()
    dropped = [k.seal("event", {"name": "x", "severity": "info", "subject": None, "detail": {}})
               for _ in range(3)]
    k.telemetry()
    assert h.fleet.kiosk(HALL, "k1").missing == 3
    h.deliver(*dropped[1])           # one arrives late: it fills its gap
    h.clock.advance(4)
    assert h.fleet.tick() == []
    h.clock.advance(1)
    changes = h.fleet.tick()
    assert [(c.what, c.detail["count"]) for c in changes] == [("lost", 2)]
    snap = h.fleet.kiosk(HALL, "k1")
    assert snap.lost == 2 and snap.missing == 0


def test_a_state_arriving_after_the_message_behind_it_fills_the_gap():
    h = Harness(gap_grace_s=5)
    k = h.kiosk("k1")
    k.telemetry()
    late_state = k.state("online")
    k.telemetry()
    h.deliver(*late_state)
    h.clock.advance(6)
    h.fleet.tick()
    assert h.fleet.kiosk(HALL, "k1").lost == 0


def test_a_restart_is_not_a_gap():
    h = Harness(gap_grace_s=1)
    k = h.kiosk("k1")
    k.telemetry()
    k.restart()
    k.telemetry()
    h.clock.advance(2)
    h.fleet.tick()
    assert h.fleet.kiosk(HALL, "k1").lost == 0


def test_gap_tracking_off_for_a_shared_subscription():
    h = Harness(track_gaps=False)
    k = h.kiosk("k1")
    k.telemetry()
    k.seal("telemetry", {"uptime_s": 1})
    k.telemetry()
    h.clock.advance(100)
    h.fleet.tick()
    assert h.fleet.kiosk(HALL, "k1").lost == 0


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_lost_counts_exactly_the_dropped_messages(data):
    h = Harness(gap_grace_s=5)
    k = h.kiosk("k1")
    kinds = data.draw(st.lists(st.sampled_from(["telemetry", "event", "state"]), min_size=2,
                               max_size=25))
    sealed = []
    for kind in kinds:
        if kind == "state":
            sealed.append(("state", k.state("online")))
        elif kind == "event":
            sealed.append((kind, k.seal("event", {"name": "e", "severity": "info",
                                                  "subject": None, "detail": {}})))
        else:
            sealed.append((kind, k.seal("telemetry", {"uptime_s": 1})))
    seqs = list(range(k._seq - len(sealed) + 1, k._seq + 1))
    drop = data.draw(st.sets(st.sampled_from(range(len(sealed)))))
    kept = [i for i in range(len(sealed)) if i not in drop]
    # Deliver with local reordering (each message moves by at most 2 places).
    order = sorted(kept, key=lambda i: i + data.draw(st.integers(0, 2)))
    for i in order:
        h.deliver(*sealed[i][1])
    h.clock.advance(6)
    h.fleet.tick()
    tracked = [seqs[i] for i in order if sealed[i][0] != "state"]
    if not tracked:
        expected = 0
    else:
        first, top = tracked[0], max(tracked)
        expected = sum(1 for i in drop if first < seqs[i] < top)
    snap = h.fleet.kiosk(HALL, "k1")
    assert (snap.lost if snap is not None else 0) == expected


# -- rejections ------------------------------------------------------------------------------------
def test_bad_signature_replay_and_malformed_are_counted_on_the_topic_kiosk():
    h = Harness()
    k = h.kiosk("k1")
    k.connect()
    topic, payload = k.seal("telemetry", {"uptime_s": 1})
    assert whats(h.deliver(topic, payload)) == []
    assert whats(h.deliver(topic, payload)) == ["replay"]
    forged = payload.replace(b'"uptime_s":1', b'"uptime_s":2')
    assert whats(h.deliver(topic, forged)) == ["bad_signature"]
    assert whats(h.deliver(topic, b"{not json")) == ["malformed"]
    # A valid envelope of k1 moved to k2's topic: signature covers the topic.
    assert h.deliver(topic.replace("/k1/", "/k2/"), payload) == []
    snap = h.fleet.kiosk(HALL, "k1")
    assert (snap.replays, snap.bad_signatures, snap.malformed) == (1, 1, 1)
    assert h.fleet.unattributed == {HALL: 1}


def test_a_message_verified_without_its_role_is_refused():
    """Issue 16: verify(require_role=None) skips step 9, so a consumer's (or any trusted
    service's) key could speak for a 'kiosk' named like itself; the fleet refuses such a
    Verified instead of showing the kiosk as verified."""
    h = Harness()
    key = Ed25519PrivateKey.generate()
    h.keyring.add(key.public_key(), owner="k9", roles=("consumer",))
    topic = KioskTopics(HALL, "k9").telemetry
    payload = Signer(key, sender="k9", boot_id=secrets.token_hex(16), next_seq=lambda: 1,
                     clock=h.clock).seal(topic, "telemetry", {"uptime_s": 1})
    unchecked = verify(payload, topic, h.keyring, require_role=None)
    assert unchecked.role_checked is False
    with pytest.raises(ContractError, match="without its role check"):
        h.fleet.apply(unchecked)
    with pytest.raises(ContractError, match="without its role check"):
        h.fleet.ledger_ticket(unchecked)
    assert (HALL, "k9") not in h.fleet and h.fleet.snapshot() == []
    # Verified the way the monitor does, it is a refusal, and still no kiosk appears.
    assert h.deliver(topic, payload) == [] and h.fleet.unattributed == {HALL: 1}
    assert (HALL, "k9") not in h.fleet


def test_rejection_from_an_unparsable_topic():
    r = Rejection.from_error("not/a/kiosk/topic", ContractError("x"))
    assert r.hall is None and r.reason == "malformed"
    h = Harness()
    assert h.fleet.reject(r) == [] and h.fleet.unattributed == {"": 1}


# -- faults, paper, tickets -------------------------------------------------------------------------
def test_faults_from_events_and_recoveries():
    h = Harness()
    k = h.kiosk("k1")
    k.connect()
    changes = k.event("device_fault", "fault", "ticket-printer", fault="cover_open")
    assert [(c.what, c.detail) for c in changes] == [
        ("fault", {"subject": "ticket_printer", "fault": "cover_open"})]
    k.event("device_fault", "fault", "idcard-reader", fault="gone", detail="port vanished")
    assert h.fleet.kiosk(HALL, "k1").faults == (("idcard_reader", "gone"),
                                               ("ticket_printer", "cover_open"))
    # The agent's serial workers recover without naming the fault: everything clears.
    changes = k.event("device_recovered", "info", "idcard-reader")
    assert [(c.what, c.detail["fault"]) for c in changes] == [("recovered", "gone")]
    k.event("device_recovered", "info", "ticket-printer", fault="paper_out")   # not active
    assert h.fleet.kiosk(HALL, "k1").faults == (("ticket_printer", "cover_open"),)
    assert h.fleet.kiosk(HALL, "k1").last_event == "device_recovered (info)"


def test_paper_from_events_then_telemetry_reconciles():
    h = Harness()
    k = h.kiosk("k1")
    k.connect()
    k.event("device_warning", "warning", "ticket-printer", warning="paper_near_end")
    assert h.fleet.kiosk(HALL, "k1").paper == "near_end"
    k.event("device_fault", "fault", "ticket-printer", fault="paper_out")
    assert h.fleet.kiosk(HALL, "k1").paper == "out"
    # Paper was changed while the monitor missed the events: telemetry is the truth.
    changes = k.telemetry(ticket_printer={"ok": True, "paper": "ok", "fault": None,
                                          "warning": None}, temp_mC=48000, outbox_depth=2)
    assert sorted(whats(changes)) == ["recovered", "warning_cleared"]
    snap = h.fleet.kiosk(HALL, "k1")
    assert (snap.paper, snap.faults, snap.warnings) == ("ok", (), ())
    assert (snap.temp_mC, snap.outbox_depth) == (48000, 2)
    changes = k.telemetry(ticket_printer={"ok": False, "paper": "out", "fault": "paper_out",
                                          "warning": None})
    assert whats(changes) == ["fault"]
    assert h.fleet.kiosk(HALL, "k1").paper == "out"


def test_the_agents_printer_flag_events_are_conditions():
    h = Harness()
    k = h.kiosk("k1")
    k.connect()
    k.event("printer_paper_near_end", "warning", "ticket-printer")
    k.event("printer_cover_open", "fault", "ticket-printer")
    snap = h.fleet.kiosk(HALL, "k1")
    assert (snap.paper, snap.faults) == ("near_end", (("ticket_printer", "cover_open"),))
    changes = k.event("printer_cover_open_cleared", "info", "ticket-printer")
    assert [(c.what, c.detail["fault"]) for c in changes] == [("recovered", "cover_open")]
    k.event("printer_paper_near_end_cleared", "info", "ticket-printer")
    k.event("print_failed", "fault", "ticket-printer", reason="cutter jam")   # one-off
    snap = h.fleet.kiosk(HALL, "k1")
    assert (snap.faults, snap.warnings, snap.paper) == ((), (), None)
    assert snap.last_event == "print_failed (fault)"


def test_last_ticket_and_resends_counted_once():
    h = Harness()
    k = h.kiosk("k1")
    k.connect()
    assert whats(k.ticket(1)) == ["ticket"]
    assert whats(k.ticket(1)) == []            # the outbox re-sent it in a fresh envelope
    k.ticket(2)
    snap = h.fleet.kiosk(HALL, "k1")
    assert (snap.tickets, snap.last_ticket_id) == (2, "A-01-0002")
    assert snap.messages == {"state": 1, "ticket": 3}


def test_a_late_resend_is_counted_once_however_many_tickets_came_between():
    # A re-send of a kiosk's first ticket after hundreds more (a kiosk that never got the
    # ack, a city bridge delivering its queue late) is still the same ticket.
    h = Harness()
    k = h.kiosk("k1")
    k.connect()
    for serial in range(1, 301):
        k.ticket(serial)
    k.ticket(1)
    k.ticket(150)
    k.ticket(302)                      # 301 skipped: still new when it comes after 302
    k.ticket(301)
    assert h.fleet.kiosk(HALL, "k1").tickets == 302


@given(st.lists(st.integers(1, 400), max_size=300))
def test_serial_set_is_a_set(serials):
    seen, ss = set(), SerialSet()
    for n in serials:
        assert ss.add(n) == (n not in seen)
        seen.add(n)
    assert all(n in ss for n in seen)
    assert not any(n in ss for n in set(range(1, 401)) - seen)


def test_serial_set_stays_bounded_against_scattered_serials():
    ss = SerialSet()
    for n in range(1, 4 * MAX_SERIAL_RANGES, 2):       # every other serial: no range merges
        ss.add(n)
    assert ss.ranges == MAX_SERIAL_RANGES
    assert ss.add(4 * MAX_SERIAL_RANGES + 1)            # new ones are still told apart


def test_cmd_result_is_kept():
    h = Harness()
    k = h.kiosk("k1")
    changes = k.send("cmd_result", {"cmd_seq": 7, "nonce": "n" * 22, "status": "done",
                                    "reason": None, "detail": {}})
    assert changes[-1].what == "cmd_result"
    assert h.fleet.kiosk(HALL, "k1").last_cmd_result["status"] == "done"


def test_trouble_sorts_offline_and_faulty_first():
    h = Harness()
    fine, faulty, dead = h.kiosk("a-fine"), h.kiosk("b-faulty"), h.kiosk("c-dead")
    for k in (fine, faulty, dead):
        k.connect()
    faulty.event("device_fault", "fault", "ticket-printer", fault="cover_open")
    h.deliver(*dead.state("offline", reason="connection lost"))
    assert [k.device for k in sort_by_trouble(h.fleet.snapshot())] == [
        "c-dead", "b-faulty", "a-fine"]


# -- alerts -------------------------------------------------------------------------------------------
def test_offline_alert_fires_after_n_seconds_and_resolves():
    h = Harness()
    engine = AlertEngine([AlertRule("off", "offline", "critical", after_s=30)], clock=h.clock)
    k = h.kiosk("k1")
    will, _ = k.connect()
    h.deliver(*will)
    h.clock.advance(29)
    assert engine.evaluate(h.fleet.snapshot()) == []
    h.clock.advance(2)
    fired = engine.evaluate(h.fleet.snapshot())
    assert [(a.rule, a.state, a.device, a.severity) for a in fired] == [
        ("off", "firing", "k1", "critical")]
    assert engine.evaluate(h.fleet.snapshot()) == []          # once per episode
    k.connect()
    resolved = engine.evaluate(h.fleet.snapshot())
    assert [(a.state, a.alert_id) for a in resolved] == [("resolved", fired[0].alert_id)]


def test_count_and_condition_alerts():
    h = Harness(gap_grace_s=1)
    rules = [AlertRule("badsig", "bad_signature", "critical", threshold=1, window_s=60),
             AlertRule("gaps", "gaps", threshold=3, window_s=60),
             AlertRule("paper", "paper", level="near_end"),
             AlertRule("hot", "temperature", threshold=80_000, after_s=10),
             AlertRule("backlog", "outbox_backlog", threshold=5, max_age_s=600),
             AlertRule("fault", "fault")]
    engine = AlertEngine(rules, clock=h.clock)
    k = h.kiosk("k1")
    k.connect()
    k.telemetry()

    def step(changes=()):
        engine.observe(changes)
        return sorted((a.rule, a.state) for a in engine.evaluate(h.fleet.snapshot()))

    topic, payload = k.seal("event", {"name": "x", "severity": "info", "subject": None,
                                      "detail": {}})
    assert step(h.deliver(topic, payload.replace(b'"x"', b'"y"'))) == [("badsig", "firing")]
    for _ in range(3):
        k.seal("telemetry", {"uptime_s": 1})            # dropped
    assert step(k.telemetry(temp_mC=85_000, outbox_depth=1, outbox_oldest_s=900,
                            ticket_printer={"ok": True, "paper": "near_end", "fault": None,
                                            "warning": "paper_near_end"})) == [
        ("backlog", "firing"), ("paper", "firing")]
    h.clock.advance(2)
    assert step(h.fleet.tick()) == [("gaps", "firing")]
    h.clock.advance(10)
    assert step() == [("hot", "firing")]
    h.clock.advance(60)                                    # the counting windows pass
    assert step(k.event("device_fault", "fault", "ticket-printer", fault="cover_open")) == [
        ("badsig", "resolved"), ("fault", "firing"), ("gaps", "resolved")]


def test_alert_sink_logs_and_publishes_and_survives_a_failing_publisher(caplog):
    h = Harness()
    engine = AlertEngine([AlertRule("off", "offline", "critical")], clock=h.clock)
    k = h.kiosk("k1")
    will, _ = k.connect()
    h.deliver(*will)
    published = []
    sink = AlertSink(lambda topic, body: published.append((topic, body)))
    with caplog.at_level(logging.INFO, logger="hallkiosk.ops.alerts"):
        sink.emit_all(engine.evaluate(h.fleet.snapshot()))
    topic, body = published[0]
    assert topic == f"hall/{HALL}/kiosk/k1/alert"
    assert body["rule"] == "off" and body["state"] == "firing" and body["device"] == "k1"
    assert any("alert off firing" in r.getMessage() and r.levelno == logging.ERROR
               for r in caplog.records)

    def broken(topic, body):
        raise ConnectionError("broker gone")

    AlertSink(broken).emit(sink.history[0])             # logged, not raised


def test_alert_rules_are_checked():
    with pytest.raises(ConfigError, match="unknown kind"):
        AlertRule("x", "nonsense")
    with pytest.raises(ConfigError, match="threshold"):
        AlertRule("x", "temperature")
    with pytest.raises(ConfigError, match="duplicate"):
        AlertEngine([AlertRule("x", "fault"), AlertRule("x", "offline")])


# -- dashboard ------------------------------------------------------------------------------------------
def test_dashboard_fits_80_columns_worst_first():
    h = Harness()
    names = ["k01", "kiosk-with-a-long-id", "k03"]
    kiosks = [h.kiosk(n) for n in names]
    for k in kiosks:
        k.connect()
    kiosks[1].event("device_fault", "fault", "ticket-printer", fault="paper_out")
    kiosks[1].telemetry(temp_mC=81234, outbox_depth=4)
    kiosks[2].ticket(12)
    h.deliver(*kiosks[0].state("degraded", reason="card reader answers slowly since 9:00, "
                                                  "technician called"))
    text = render(h.fleet, width=80)
    lines = text.splitlines()
    assert all(len(line) <= 80 for line in lines)
    body = [line for line in lines if line.startswith(("k0", "kiosk"))]
    assert body[0].startswith("kiosk-wit") and "OUT" in body[0] and "81C" in body[0]
    assert body[1].startswith("k01") and "degraded" in body[1] and body[1].endswith("…")
    assert "A-01-0012" in text
    assert "3 kiosks: 2 online 1 degraded | 0 alerts firing" in text
    wide = render(h.fleet, width=120)
    assert max(len(line) for line in wide.splitlines()) > 80


# -- config and inventory --------------------------------------------------------------------------------
def test_ops_config_defaults_and_errors(tmp_path):
    cfg = parse_ops_config({"ops": {"instance": "ops-1", "halls": ["h1", "h2"]},
                            "keys": {"inventory": "inv.toml"},
                            "ledger": {"key": "ledger.key"}},
                           source="ops.toml", base_dir=tmp_path)
    assert cfg.halls == ("h1", "h2") and cfg.trust.inventory == tmp_path / "inv.toml"
    assert cfg.broker.tls is None and cfg.ledger.tls is None
    assert cfg.share_group is None and cfg.fleet.heartbeat_timeout_s == 90
    assert cfg.metrics.host == "127.0.0.1" and cfg.alerts[0].name == "kiosk_offline"
    with pytest.raises(ConfigError) as exc:
        parse_ops_config({"ops": {"instance": "-bad", "halls": ["h1", "h1"], "worker": 2},
                          "fleet": {"heartbeat_timeout_s": "soon"},
                          "alerts": [{"name": "a", "kind": "ofline"}]},
                         source="ops.toml", base_dir=tmp_path)
    problems = "\n".join(exc.value.problems)
    assert "ops.toml: ops.instance: expected an id" in problems
    assert "ops.halls[1]: hall 'h1' listed twice" in problems
    assert "did you mean 'workers'?" in problems
    assert "keys: required section missing" in problems
    assert "fleet.heartbeat_timeout_s" in problems
    assert "did you mean 'offline'?" in problems
    with pytest.raises(ConfigError) as exc:
        parse_ops_config({"ops": {"instance": "o", "halls": ["h"]}, "keys": {"certs": ["k.pem"]},
                          "broker": {"tls_cert_file": "o.crt", "tls_key_file": "o.key"},
                          "ledger": {"key": "l.key"}}, source="ops.toml", base_dir=tmp_path)
    problems = "\n".join(exc.value.problems)
    assert "keys.ca_chain: required with certs" in problems
    assert "broker.tls_ca_file: required with a TLS certificate" in problems


def test_inventory_builds_the_keyring(tmp_path):
    kiosk, ledger = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    b64 = lambda k: base64.b64encode(public_raw(k)).decode()   # noqa: E731
    inv_path = tmp_path / "inventory.toml"
    inv_path.write_text(f'[[kiosk]]\nhall = "h1"\ndevice = "k1"\npublic_key = "{b64(kiosk)}"\n'
                        f'[[service]]\nowner = "ledger"\nroles = ["consumer"]\n'
                        f'public_key = "{b64(ledger)}"\n')
    inv = load_inventory(inv_path)
    assert inv.kiosks == (("h1", "k1"),) and len(inv.keyring) == 2
    inv_path.write_text(f'[[kiosk]]\nhall = "h1"\ndevice = "k1"\npublic_key = "{b64(kiosk)}"\n'
                        f'[[kiosk]]\nhall = "h1"\ndevice = "k2"\npublic_key = "{b64(kiosk)}"\n'
                        '[[kiosk]]\nhall = "h1"\ndevice = "k3"\npublic_key = "AAAA"\n')
    with pytest.raises(ConfigError) as exc:
        load_inventory(inv_path)
    text = "\n".join(exc.value.problems)
    assert "already belongs to 'k1'" in text and "kiosk[2].public_key: decodes to 3 bytes" in text


def test_trust_from_hall_certificates_leaves_revoked_kiosks_out(tmp_path):
    from ops.config import TrustSources, load_trust
    from provisioning.emulated import provision_emulated_hall

    pki = provision_emulated_hall(tmp_path / "pki", ["k1", "k2"], hall="h1")
    pki.revoke("k2")
    certs = [pki["k1"].cert_path, pki["k2"].cert_path, pki["ledger"].cert_path]
    inv = load_trust(TrustSources(pki.chain_file, tuple(certs), pki.crl_file, None))
    assert inv.kiosks == (("h1", "k1"),)
    assert {inv.keyring.get(kid).owner for kid in inv.keyring} == {"k1"}
    # Without the CRL the revoked kiosk would still be believed.
    inv = load_trust(TrustSources(pki.chain_file, tuple(certs), None, None))
    assert sorted(inv.kiosks) == [("h1", "k1"), ("h1", "k2")]
