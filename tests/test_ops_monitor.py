"""The ops monitor against a real Mosquitto and emulated kiosks (agents on real ptys).

Where a test needs a kiosk to misbehave on the wire (drop messages, forge a signature) it
publishes with that kiosk's own key through a plain MQTT link, exactly as a broken or
hostile kiosk would; everything else is the real agent.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import secrets
import threading
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
import paho.mqtt.client as paho
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from prometheus_client.parser import text_string_to_metric_families

from hallkiosk.errors import ContractError
from edge.keys import generate_private_key, public_b64
from edge.mqtt import LinkMessage, MqttLink
from edge.telemetry import TelemetryBuilder, link_health
from emulator.idcard import Card
from mqtt_topics.envelope import Signer, key_id, verify
from mqtt_topics.topics import HallTopics, KioskTopics
from ops.alerts import Alert, AlertEngine, AlertRule, AlertSink
from ops.consumer import TicketConsumer
from ops.dashboard import render
from ops.fleet import Fleet
from ops.metrics import MetricsServer, monitor_view
from ops.monitor import Monitor, alert_signer, subscriptions
from tests.conftest import wait_for

pytestmark = pytest.mark.integration

RULES = (AlertRule("kiosk_offline", "offline", "critical", after_s=0.5),
         AlertRule("lost_messages", "gaps", "warning", threshold=1, window_s=60),
         AlertRule("bad_signature", "bad_signature", "critical", threshold=1, window_s=60))


def enroll_services(hall, *identities: tuple[str, str]) -> None:
    """On a hall with a PKI (mTLS broker, ACLs from the inventory): enroll these service
    (id, role) pairs and restart the broker, which reads its ACL file only at start or
    SIGHUP; a restart is the one that can be waited for (it listens again when ready)."""
    pki = getattr(hall, "pki", None)
    new = [(i, r) for i, r in identities if pki is not None and i not in pki.identities]
    if not new:
        return
    hall.broker.stop()
    for ident, role in new:
        pki.add_service(ident, role)
    hall.broker.start()


def tls(hall, ident: str):
    """mTLS settings as ``ident`` on a PKI hall, None on a plain one."""
    return hall.tls_for(ident) if getattr(hall, "pki", None) is not None else None


def service_key(hall, ident: str, role: str):
    """The signing key of a service identity (enrolled on a PKI hall, generated otherwise),
    trusted by the hall's keyring."""
    pki = getattr(hall, "pki", None)
    key = (pki[ident].key if pki is not None
           else generate_private_key(hall.dir / f"{ident}.key"))
    if key_id(key.public_key()) not in hall.keyring:
        hall.keyring.add(key.public_key(), owner=ident, roles=(role,))
    return key


def start_monitor(hall, *, published=None, instance: str = "ops-mon", **kw) -> Monitor:
    enroll_services(hall, (instance, "monitor"))
    fleet = Fleet(heartbeat_timeout_s=None, gap_grace_s=kw.pop("gap_grace_s", 0.3),
                  track_gaps=kw.get("share_group") is None)
    if kw.pop("sign_alerts", False):
        kw["alert_signer"] = alert_signer(service_key(hall, instance, "monitor"), instance)
    sink = AlertSink(None if published is None else
                     (lambda topic, body: published.append((topic, body))))
    kw = {"reconnect_min_s": 0.1, "reconnect_max_s": 1.0, **kw}
    mon = Monitor(halls=[hall.hall_id], keyring=hall.keyring, port=hall.broker.port,
                  instance=instance, fleet=fleet, alerts=AlertEngine(RULES), sink=sink,
                  tick_s=0.1, tls=tls(hall, instance), **kw).start()
    assert mon.wait_connected(10), "monitor did not connect"
    return mon


def status_of(mon: Monitor, hall, device: str) -> str | None:
    snap = [k for k in mon.snapshot() if k.device == device]
    return snap[0].status if snap else None


class Wire:
    """A kiosk's key on a plain paho client: publishes what the test decides, skips what it
    drops. (Plain paho, one publish at a time: this is test scaffolding, not the link.)"""

    def __init__(self, hall, kiosk) -> None:
        self.topics = KioskTopics(hall.hall_id, kiosk.device_id)
        self._seq = 0
        self.signer = Signer(kiosk.key, sender=kiosk.device_id, boot_id=secrets.token_hex(16),
                             next_seq=self._next)
        # As the kiosk itself (with mTLS the broker only lets it write its own topics).
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=kiosk.device_id,
                                  protocol=MQTTProtocolVersion.MQTTv5)
        creds = tls(hall, kiosk.device_id)
        if creds is not None:
            self.client.tls_set(ca_certs=creds.ca_file, certfile=creds.cert_file,
                                keyfile=creds.key_file)
        connected = threading.Event()
        self.client.on_connect = lambda *a: connected.set()
        self.client.connect("127.0.0.1", hall.broker.port)
        self.client.loop_start()
        assert connected.wait(10), "wire did not connect"

    def _next(self) -> int:
        self._seq += 1
        return self._seq

    def seal(self, kind: str, body: dict) -> tuple[str, bytes]:
        topic = self.topics.topic(kind)
        return topic, self.signer.seal(topic, kind, body)

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        info = self.client.publish(topic, payload, qos=qos)
        info.wait_for_publish(10)
        assert info.is_published(), f"publish to {topic} not acknowledged"

    def event(self, name: str, **detail) -> tuple[str, bytes]:
        return self.seal("event", {"name": name, "severity": "info", "subject": None,
                                   "detail": detail})

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def ticket_body(device: str, serial: int) -> dict:
    return {"ticket_uid": f"{device}:{serial}", "ticket_id": f"A-09-{serial:04d}",
            "service": "A", "service_name": "Citizen card", "number": serial, "serial": serial,
            "issued_at_ms": 1, "clock_trusted": True, "waiting_ahead": 0, "priority": "normal",
            "appointment_id": None, "citizen": None, "source": "button", "printed": "yes"}


def test_offline_detected_when_a_kiosk_is_killed(hall):
    published: list = []
    mon = start_monitor(hall, published=published)
    try:
        alive = hall.add_kiosk("k1")
        alive.start_agent()
        doomed = hall.add_kiosk("k2")
        proc = doomed.spawn_agent()
        wait_for(lambda: status_of(mon, hall, "k1") == "online", what="k1 online")
        wait_for(lambda: status_of(mon, hall, "k2") == "online", timeout_s=15, what="k2 online")
        proc.kill()                      # no clean shutdown: only the MQTT will can tell
        proc.wait(10)
        wait_for(lambda: status_of(mon, hall, "k2") == "offline", timeout_s=5,
                 what="k2 offline by its will")
        snap = [k for k in mon.snapshot() if k.device == "k2"][0]
        assert snap.status_reason == "connection lost"
        assert status_of(mon, hall, "k1") == "online"
        wait_for(lambda: [b for _, b in published if b["rule"] == "kiosk_offline"],
                 timeout_s=5, what="offline alert")
        topic, body = published[0]
        assert topic == KioskTopics(hall.hall_id, "k2").alert
        assert (body["device"], body["state"], body["severity"]) == ("k2", "firing", "critical")
        # The will's seq and the births' seqs are not counted as lost messages.
        assert all(k.lost == 0 for k in mon.snapshot())
    finally:
        mon.stop()


def test_a_gap_is_reported_when_messages_are_dropped(hall, tmp_path):
    mon = start_monitor(hall)
    kiosk = hall.add_kiosk("k3")
    wire = Wire(hall, kiosk)
    try:
        telemetry = TelemetryBuilder(agent_version="0.1.0", config_hash="0" * 64,
                                     find_vcgencmd=False, outbox=lambda: (0, None),
                                     peripherals={"idcard-reader": lambda: link_health(True)})
        wire.publish(*wire.seal("telemetry", telemetry.build()), qos=0)
        wire.publish(*wire.event("one"))
        for n in range(4):
            wire.event(f"dropped{n}")          # sealed, never sent
        wire.publish(*wire.event("after"))
        wait_for(lambda: [k for k in mon.snapshot() if k.device == "k3" and k.lost == 4],
                 what="4 lost messages")
        wait_for(lambda: [a for a in mon.firing() if a.rule == "lost_messages"],
                 what="lost-messages alert")
        snap = [k for k in mon.snapshot() if k.device == "k3"][0]
        assert snap.messages == {"telemetry": 1, "event": 2}
        assert snap.peripherals["idcard_reader"]["ok"] is True and snap.net_up is not None
    finally:
        wire.close()
        mon.stop()


def test_verify_threads_keep_each_kiosk_in_order(hall):
    """``workers=2``: the link thread only routes, by device, and two threads verify. Every
    message is counted once, each kiosk's messages are verified in the order they were
    sent (no "late" and no gap), and a forged one is still refused."""
    mon = start_monitor(hall, workers=2)
    seen: list[tuple[str, int, str]] = []
    handle = mon.handle

    def recording(topic, payload, **kw):
        result = handle(topic, payload, **kw)
        if hasattr(result, "seq_status"):
            seen.append((result.device, result.seq, result.seq_status))
        return result

    mon.handle = recording                     # the workers look it up per message
    wires = [Wire(hall, hall.add_kiosk(f"w{n}")) for n in range(3)]
    try:
        n = 100
        sealed = [(wire, wire.event("tick", i=i)) for i in range(n) for wire in wires]
        # All at once (paho queues them), so the workers' queues fill up: order only holds
        # if each kiosk's messages go to one worker.
        infos = [wire.client.publish(topic, payload, qos=1) for wire, (topic, payload) in sealed]
        for info in infos:
            info.wait_for_publish(10)
        forged = wires[0].event("forged")
        wires[0].publish(forged[0], forged[1].replace(b'"forged"', b'"forget"'))
        # ``seen`` grows after handle() returns, the counters inside it: wait for both.
        wait_for(lambda: mon.stats_copy()["received"] >= 3 * n + 1 and len(seen) >= 3 * n,
                 what="every message")
        stats = mon.stats_copy()
        assert stats["verified"] == 3 * n and stats["rejected"]["signature"] == 1
        for wire in wires:
            mine = [(seq, status) for dev, seq, status in seen if dev == wire.topics.device]
            assert [seq for seq, _ in mine] == list(range(1, n + 1))
            assert {status for _, status in mine} <= {"first", "ok"}
        assert all(k.lost == 0 for k in mon.snapshot())
    finally:
        for wire in wires:
            wire.close()
        mon.stop()


def test_a_bad_signature_raises_an_alert(hall, caplog):
    published: list = []
    mon = start_monitor(hall, published=published)
    kiosk = hall.add_kiosk("k4")
    wire = Wire(hall, kiosk)
    try:
        wire.publish(*wire.event("hello"))
        wait_for(lambda: status_of(mon, hall, "k4") == "online", what="k4 seen")
        # Someone without the kiosk's key: a key the hall never trusted, and a tampered body.
        intruder = Signer(Ed25519PrivateKey.generate(), sender="k4",
                          boot_id=secrets.token_hex(16), next_seq=lambda: 10)
        topic = wire.topics.event
        forged = intruder.seal(topic, "event", {"name": "door_open", "severity": "info",
                                                "subject": None, "detail": {}})
        _, genuine = wire.event("paper_ok")
        with caplog.at_level(logging.WARNING):
            wire.publish(topic, forged)
            wire.publish(topic, genuine.replace(b"paper_ok", b"paper_no"))
            wait_for(lambda: [b for _, b in published if b["rule"] == "bad_signature"],
                     what="bad-signature alert published")
        # The alert fires on the first forgery; the second may still be on its way.
        wait_for(lambda: [k for k in mon.snapshot() if k.device == "k4"][0].bad_signatures >= 2,
                 what="both forgeries counted")
        snap = [k for k in mon.snapshot() if k.device == "k4"][0]
        assert snap.bad_signatures == 2
        assert mon.stats_copy()["rejected"]["signature"] == 2
        assert any("bad_signature" in r.getMessage() for r in caplog.records
                   if r.name == "hallkiosk.ops.monitor")
        assert any("alert bad_signature firing" in r.getMessage() for r in caplog.records)
    finally:
        wire.close()
        mon.stop()


def test_alerts_are_signed_and_published_on_the_kiosks_alert_topic(hall):
    """The monitor seals each alert transition with its own key (role monitor) and publishes
    it on hall/{h}/kiosk/{d}/alert, where ops (and only hall services) can read it. An alert
    raised while the broker is down waits and goes out when the link is back."""
    mon = start_monitor(hall, sign_alerts=True)
    enroll_services(hall, ("ops", "ops"))
    got: list = []
    follower = MqttLink(client_id="ops", host="127.0.0.1", port=hall.broker.port,
                        sink=lambda ev: got.append(ev) if isinstance(ev, LinkMessage) else None,
                        subscriptions=((HallTopics(hall.hall_id).alerts, 1),),
                        reconnect_min_s=0.1, reconnect_max_s=0.5, tls=tls(hall, "ops"))
    follower.start()
    kiosk = hall.add_kiosk("k9")
    wire = Wire(hall, kiosk)
    try:
        assert follower.wait_connected(10) and mon.wait_connected(10)
        wire.publish(*wire.event("hello"))
        wait_for(lambda: status_of(mon, hall, "k9") == "online", what="k9 seen")
        intruder = Signer(Ed25519PrivateKey.generate(), sender="k9",
                          boot_id=secrets.token_hex(16), next_seq=lambda: 10)
        wire.publish(wire.topics.event, intruder.seal(wire.topics.event, "event", {
            "name": "door_open", "severity": "info", "subject": None, "detail": {}}))
        wait_for(lambda: got, what="alert on the wire")
        msg = got[0]
        assert msg.topic == KioskTopics(hall.hall_id, "k9").alert
        v = verify(msg.payload, msg.topic, hall.keyring, expect_type="alert",
                   require_role="monitor")
        assert v.sender == "ops-mon"
        assert (v.body["rule"], v.body["state"], v.body["device"], v.body["kind"]) == (
            "bad_signature", "firing", "k9", "bad_signature")
        # A kiosk's key cannot pass for the monitor's, and an alert is bound to its kiosk.
        with pytest.raises(ContractError):
            verify(msg.payload, KioskTopics(hall.hall_id, "k1").alert, hall.keyring)
        with pytest.raises(ContractError, match="lacks role"):
            verify(Signer(kiosk.key, sender="k9", boot_id="0" * 32, next_seq=lambda: 1).seal(
                msg.topic, "alert", v.body), msg.topic, hall.keyring, require_role="monitor")

        # Broker down: the alert is sealed and kept, then sent once the monitor is back.
        hall.broker.stop()
        wait_for(lambda: not mon.stats_copy()["connected"], what="monitor sees the broker gone")
        mon.sink.emit(Alert(f"manual:{hall.hall_id}:k9:1", "manual", "fault", "warning", "firing",
                            hall.hall_id, "k9", 1, 1000, "test alert while offline"))
        assert mon.unsent_alerts == 1
        hall.broker.start()
        wait_for(lambda: [m for m in got if f"manual:{hall.hall_id}:k9:1".encode() in m.payload], timeout_s=20,
                 what="the alert raised while offline")
        assert mon.unsent_alerts == 0
        late = [m for m in got if f"manual:{hall.hall_id}:k9:1".encode() in m.payload][0]
        assert verify(late.payload, late.topic, hall.keyring,
                      require_role="monitor").body["message"] == "test alert while offline"
    finally:
        wire.close()
        follower.stop()
        mon.stop()


def test_dashboard_and_metrics_of_a_live_hall(hall):
    hall.start_consumer()
    mon = start_monitor(hall)
    metrics = MetricsServer(monitor_view(mon), port=0).start()
    try:
        k5 = hall.add_kiosk("k5", services=(("A", "Citizen card", "A"),))
        k5.start_agent()
        k6 = hall.add_kiosk("k6")
        k6.start_agent()
        wait_for(lambda: status_of(mon, hall, "k5") == "online", what="k5 online")
        k5.reader.present(Card.valid())
        wait_for(lambda: [k for k in mon.snapshot() if k.device == "k5" and k.last_ticket_id],
                 what="ticket seen by the monitor")
        wait_for(lambda: status_of(mon, hall, "k6") == "online", what="k6 online")

        text = render(mon.snapshot(), width=80, alerts=mon.firing())
        assert all(len(line) <= 80 for line in text.splitlines())
        rows = {line.split()[0]: line for line in text.splitlines() if line.startswith("k")}
        assert set(rows) == {"k5", "k6"}
        assert "online" in rows["k5"] and "A-01-0001" in rows["k5"]
        assert "2 kiosks: 2 online" in text

        url = f"http://127.0.0.1:{metrics.port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            assert resp.status == 200
            scraped = resp.read().decode()
        samples = {}
        for family in text_string_to_metric_families(scraped):
            for s in family.samples:
                samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
        lab = lambda device, **extra: tuple(sorted({"hall": hall.hall_id, "kiosk": device,  # noqa: E731
                                                    **extra}.items()))
        assert samples[("hallkiosk_kiosk_up", lab("k5"))] == 1
        assert samples[("hallkiosk_kiosk_status", lab("k6", status="online"))] == 1
        assert samples[("hallkiosk_kiosk_tickets_total", lab("k5"))] == 1
        assert samples[("hallkiosk_kiosk_messages_total", lab("k5", type="ticket"))] >= 1
        assert samples[("hallkiosk_hall_kiosks", (("hall", hall.hall_id),
                                                  ("status", "online")))] == 2
        assert samples[("hallkiosk_monitor_messages_total", (("result", "verified"),))] >= 3
        assert samples[("hallkiosk_monitor_connected", ())] == 1
        # Every series the shipped Grafana dashboard queries exists.
        families = {f.name for f in text_string_to_metric_families(scraped)}
        grafana = (Path(__file__).parent.parent / "ops" / "grafana-dashboard.json").read_text()
        used = set(re.findall(r"hallkiosk_[a-z0-9_]+", grafana)) - {"hallkiosk_fleet"}
        missing = {m for m in used if m not in families and m.removesuffix("_total") not in families}
        assert used and not missing, missing
    finally:
        metrics.stop()
        mon.stop()


def test_two_monitors_share_the_load_without_double_acking(hall):
    # Two instances, each with its own consumer identity (the contract wants one sender id
    # and key per instance), sharing one ledger database on this host. Identities first:
    # a kiosk learns which consumers to trust when it is enrolled.
    enroll_services(hall, ("ledger-b", "consumer"), ("ops-0", "monitor"), ("ops-1", "monitor"),
                    ("ack-recorder", "monitor"))
    keys = {"ledger": hall.ledger_key, "ledger-b": service_key(hall, "ledger-b", "consumer")}
    ledger_dir = hall.dir / "shared-ledger"
    acks: list[LinkMessage] = []
    rec = MqttLink(client_id="ack-recorder", host="127.0.0.1", port=hall.broker.port,
                   sink=lambda ev: acks.append(ev) if isinstance(ev, LinkMessage) else None,
                   subscriptions=((HallTopics(hall.hall_id).all_ticket_acks, 1),),
                   tls=tls(hall, "ack-recorder"))
    rec.start()
    assert rec.wait_connected(10)
    consumers = [
        TicketConsumer(service_id=sid, hall=hall.hall_id, key=keys[sid], keyring=hall.keyring,
                       state_dir=ledger_dir, host="127.0.0.1", port=hall.broker.port,
                       group="consumers", tls=tls(hall, sid))
        for sid in ("ledger", "ledger-b")]
    monitors = [start_monitor(hall, share_group="ops", instance=f"ops-{i}",
                              consumers=[consumers[i]]) for i in range(2)]
    try:
        for c in consumers:
            assert c.link.wait_connected(10)
        kiosks = []
        for device in ("k7", "k8"):
            k = hall.add_kiosk(device, services=(("A", "Citizen card", "A"),))
            if getattr(hall, "pki", None) is None:
                with open(k.config_path, "a") as f:
                    f.write(f'\n[[keys.trusted]]\nowner = "ledger-b"\nrole = "consumer"\n'
                            f'public_key = "{public_b64(keys["ledger-b"])}"\n')
            k.start_agent()
            kiosks.append(k)
        # A kiosk takes citizens once it says it is online (its retained state).
        try:
            wait_for(lambda: all(status_of(m, hall, k.device_id) == "online"
                                 for m in monitors for k in kiosks), what="kiosks online")
        except AssertionError:
            raise AssertionError([[(k.device, k.status, k.status_reason) for k in m.snapshot()]
                                  for m in monitors]) from None
        per_kiosk = 4
        for n in range(per_kiosk):
            for k in kiosks:
                k.reader.present(Card.valid())
            for k in kiosks:
                assert k.printer.wait_for_tickets(n + 1, 10)
        total = per_kiosk * len(kiosks)
        wait_for(lambda: consumers[0].ledger.count() == total, timeout_s=15,
                 what="every ticket in the shared ledger")
        wait_for(lambda: all(k.agent.store.depth() == 0 for k in kiosks), timeout_s=15,
                 what="every outbox emptied by an ack")

        # Both instances took a share of the tickets.
        stored = [c.stats.stored for c in consumers]
        assert sum(stored) == total and all(stored), stored

        # The hard case: one ticket sent twice in fresh envelopes (an outbox re-send racing
        # a slow ack), each copy landing on another instance. Separate ledgers would accept
        # it twice under two ledger ids; the shared one accepts once and says duplicate.
        wire = Wire(hall, hall.add_kiosk("k9"))
        twice = 3
        for serial in range(1, twice + 1):
            body = ticket_body("k9", serial)
            for _ in range(2):
                wire.publish(*wire.seal("ticket", body))
        total += twice
        wait_for(lambda: consumers[0].ledger.count() == total, what="k9 tickets stored")

        def k9_acks():
            out = [verify(m.payload, m.topic, hall.keyring, expect_type="ticket_ack")
                   for m in list(acks) if "/k9/" in m.topic]
            return out if len(out) == 2 * twice else None

        k9 = wait_for(k9_acks, what="both copies of every k9 ticket acknowledged")
        wire.close()
        split = 0
        for serial in range(1, twice + 1):
            pair = [v for v in k9 if v.body["ticket_uid"] == f"k9:{serial}"]
            answers = sorted((v.body["status"], v.body["ledger_id"]) for v in pair)
            assert [a[0] for a in answers] == ["accepted", "duplicate"], answers
            assert answers[0][1] == answers[1][1]
            split += len({v.sender for v in pair}) == 2
        # The group's round robin gave the two copies of a pair to different instances.
        assert split, "no pair was split between the instances"

        # No ticket was ever accepted twice (kiosk re-sends included): one "accepted" ack per
        # ticket, distinct ledger ids, and every "duplicate" names the first copy's id.
        verified = [verify(m.payload, m.topic, hall.keyring, expect_type="ticket_ack")
                    for m in acks]
        accepted = Counter(v.body["ticket_uid"] for v in verified
                           if v.body["status"] == "accepted")
        assert len(accepted) == total and set(accepted.values()) == {1}
        ids = {v.body["ticket_uid"]: v.body["ledger_id"] for v in verified
               if v.body["status"] == "accepted"}
        assert len(set(ids.values())) == total
        for v in verified:
            if v.body["status"] == "duplicate":
                assert v.body["ledger_id"] == ids[v.body["ticket_uid"]]
        assert {v.sender for v in verified} == {"ledger", "ledger-b"}
        # The monitors split the fleet traffic too, and both saw every kiosk's birth.
        tickets_seen = [m.stats_copy()["by_kind"].get("ticket", 0) for m in monitors]
        assert sum(tickets_seen) >= total and all(tickets_seen), tickets_seen
        for m in monitors:
            assert {k.device: k.status for k in m.snapshot() if k.device != "k9"} == {
                "k7": "online", "k8": "online"}
    finally:
        for m in monitors:
            m.stop()
        rec.stop()


def test_a_ticket_the_monitor_missed_in_a_broker_crash_is_counted_from_the_ledger(hall):
    # A Mosquitto killed between snapshots forgets every session. A kiosk back before the
    # monitor publishes a ticket into no subscription of the monitor's; the ledger has it and
    # acks it, so the kiosk never sends it again. (The hall day hit this: dashboard 149,
    # ledger 150.) The dashboard counts what the ledger holds, once.
    consumer = TicketConsumer(service_id=hall.ledger_id, hall=hall.hall_id, key=hall.ledger_key,
                              keyring=hall.keyring, state_dir=hall.dir / "crash-ledger",
                              host="127.0.0.1", port=hall.broker.port,
                              tls=tls(hall, hall.ledger_id))
    k9 = hall.add_kiosk("k9")
    # The monitor waits 8 s before each reconnect; the consumer 0.2 s to 5 s.
    mon = start_monitor(hall, consumers=[consumer], reconnect_min_s=8.0, reconnect_max_s=8.0)
    try:
        assert consumer.link.wait_connected(10)
        wire = Wire(hall, k9)
        wire.publish(*wire.seal("ticket", ticket_body("k9", 1)))
        wait_for(lambda: [k.tickets for k in mon.snapshot() if k.device == "k9"] == [1],
                 what="the first ticket on the dashboard")
        wire.close()

        hall.broker.kill()
        wait_for(lambda: not mon.stats_copy()["connected"], what="the monitor saw the crash")
        hall.broker.start()
        assert consumer.link.wait_connected(10)
        seq, wire = wire._seq, Wire(hall, k9)
        wire._seq = seq                 # a kiosk's sequence survives its reconnects
        wire.publish(*wire.seal("ticket", ticket_body("k9", 2)))
        wait_for(lambda: consumer.ledger.count() == 2, what=f"the second ticket in the ledger")
        # Only meaningful while the monitor is still away: it must not have seen it itself.
        assert not mon.stats_copy()["connected"], "the monitor came back before the ticket"
        wire.publish(*wire.seal("ticket", ticket_body("k9", 2)))   # a re-send: counted once
        assert mon.wait_connected(15)
        # Seen by both, counted once. The link says connected before its SUBACK, so the
        # kiosk sends again (fresh envelopes, one uid) until the monitor has it itself.
        for _ in range(20):
            wire.publish(*wire.seal("ticket", ticket_body("k9", 3)))
            try:
                wait_for(lambda: mon.stats_copy()["by_kind"].get("ticket", 0) >= 2, 0.5,
                         what="the monitor saw the third ticket itself")
                break
            except AssertionError:
                continue
        assert mon.stats_copy()["by_kind"].get("ticket", 0) >= 2
        wait_for(lambda: consumer.ledger.count() == 3, what="the third ticket in the ledger")
        wire.close()
        [k] = [k for k in mon.snapshot() if k.device == "k9"]
        assert k.tickets == consumer.ledger.count() == 3
    finally:
        mon.stop()


def test_subscriptions_keep_state_unshared():
    subs = dict(subscriptions(["h1"], "ops"))
    assert "hall/h1/kiosk/+/state" in subs
    assert "$share/ops/hall/h1/kiosk/+/telemetry" in subs
    assert all(not f.startswith("$share/") for f in subs if f.endswith("/state"))
    assert dict(subscriptions(["h1", "h2"])).keys() >= {"hall/h2/kiosk/+/ticket",
                                                        "hall/h1/kiosk/+/cmd/result"}


def test_ops_toml_builds_a_monitor_that_signs_alerts_as_its_certificate(hall, tmp_path):
    """`hallkiosk ops run` wiring: with mTLS and no [ops] alert_key, the monitor signs its
    alerts with its certificate's key as the certificate's CN (what receivers check)."""
    from cryptography.hazmat.primitives.serialization import Encoding

    from ops.cli import build_monitor
    from ops.config import load_ops_config

    enroll_services(hall, ("mon-7", "monitor"), ("ops", "ops"))
    kiosk = hall.add_kiosk("k10")
    pki = hall.pki
    certs = tmp_path / "certs.pem"
    certs.write_bytes(b"".join(c.public_bytes(Encoding.PEM) for c in pki.certs()))
    me = pki["mon-7"]
    _ops_toml(tmp_path / "ops.toml", hall, me, certs, "ops-cli")
    cfg = load_ops_config(tmp_path / "ops.toml")
    assert cfg.alert_key == me.key_path
    mon = build_monitor(cfg, with_ledger=False)
    assert mon.alert_signer is not None and mon.alert_signer.sender == "mon-7"   # not ops-cli
    got: list = []
    follower = MqttLink(client_id="ops", host="127.0.0.1", port=hall.broker.port,
                        sink=lambda ev: got.append(ev) if isinstance(ev, LinkMessage) else None,
                        subscriptions=((HallTopics(hall.hall_id).alerts, 1),), tls=tls(hall, "ops"))
    mon.start()
    follower.start()
    wire = Wire(hall, kiosk)
    try:
        assert mon.wait_connected(10) and follower.wait_connected(10)
        wire.publish(*wire.event("hello"))
        intruder = Signer(Ed25519PrivateKey.generate(), sender="k10",
                          boot_id=secrets.token_hex(16), next_seq=lambda: 10)
        wire.publish(wire.topics.event, intruder.seal(wire.topics.event, "event", {
            "name": "x", "severity": "info", "subject": None, "detail": {}}))
        wait_for(lambda: got, what="alert from the configured monitor")
        ring = pki.keyring()                               # every signing role, CRL applied
        v = verify(got[0].payload, got[0].topic, ring, require_role="monitor")
        assert (v.sender, v.body["rule"], v.body["device"]) == ("mon-7", "bad_signature", "k10")
    finally:
        wire.close()
        follower.stop()
        mon.stop()


def test_ops_toml_without_a_key_logs_alerts_only(tmp_path):
    from ops.config import parse_ops_config

    cfg = parse_ops_config({"ops": {"instance": "o", "halls": ["h"]},
                            "keys": {"inventory": "inv.toml"}, "ledger": {"enabled": False}}, source="ops.toml",
                           base_dir=tmp_path)
    assert cfg.alert_key is None
    cfg = parse_ops_config({"ops": {"instance": "o", "halls": ["h"], "alert_key": "a.key"},
                            "keys": {"inventory": "inv.toml"}, "ledger": {"enabled": False}}, source="ops.toml",
                           base_dir=tmp_path)
    assert cfg.alert_key == tmp_path / "a.key"
    cfg = parse_ops_config({"ops": {"instance": "o", "halls": ["h"], "alert_key": "a.key",
                                    "publish_alerts": False},
                            "keys": {"inventory": "inv.toml"}, "ledger": {"enabled": False}}, source="ops.toml",
                           base_dir=tmp_path)
    assert cfg.alert_key is None


def _ops_toml(path: Path, hall, ident, certs: Path, instance: str) -> Path:
    pki = hall.pki
    path.write_text(f"""
[ops]
instance = "{instance}"
halls = ["{hall.hall_id}"]
state_dir = "{path.parent / (instance + '-state')}"
tick_s = 0.1
[broker]
port = {hall.broker.port}
reconnect_min_s = 0.1
tls_ca_file = "{pki.chain_file}"
tls_cert_file = "{ident.cert_path}"
tls_key_file = "{ident.key_path}"
[keys]
ca_chain = "{pki.chain_file}"
certs = ["{certs}"]
crl = "{pki.crl_file}"
[ledger]
enabled = false
[metrics]
enabled = false
""")
    return path


def _publish_as(hall, ident: str, topic: str, payload: bytes) -> None:
    creds = hall.tls_for(ident)
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=ident,
                         protocol=MQTTProtocolVersion.MQTTv5)
    client.tls_set(ca_certs=creds.ca_file, certfile=creds.cert_file, keyfile=creds.key_file)
    client.connect("127.0.0.1", hall.broker.port)
    client.loop_start()
    try:
        info = client.publish(topic, payload, qos=1)
        info.wait_for_publish(10)
        assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


def test_ops_alerts_prints_verified_transitions_once(hall, tmp_path, caplog):
    """`hallkiosk ops alerts`: each transition printed once though two monitors raise it; an
    alert signed by a monitor the ops station does not trust is refused, not printed."""
    import io

    from cryptography.hazmat.primitives.serialization import Encoding

    from ops.cli import build_monitor, follow_alerts
    from ops.config import load_ops_config

    enroll_services(hall, ("mon-8", "monitor"), ("mon-9", "monitor"), ("rogue", "monitor"),
                    ("ops", "ops"))
    pki = hall.pki
    hall.add_kiosk("k11")
    certs = tmp_path / "certs.pem"
    certs.write_bytes(b"".join(c.public_bytes(Encoding.PEM) for c in pki.certs()
                               if c.subject.rfc4514_string().find("CN=rogue") < 0))
    mon = build_monitor(load_ops_config(_ops_toml(tmp_path / "mon.toml", hall, pki["mon-8"],
                                                  certs, "mon-8")), with_ledger=False)
    feed_cfg = load_ops_config(_ops_toml(tmp_path / "feed.toml", hall, pki["ops"], certs, "ops"))
    out, stop, connected = io.StringIO(), threading.Event(), threading.Event()
    feed = threading.Thread(target=follow_alerts, args=(feed_cfg,),
                            kwargs={"count": 2, "out": out, "stop": stop,
                                    "connected": connected}, daemon=True)
    mon.start()
    feed.start()
    try:
        assert mon.wait_connected(10) and connected.wait(10)
        firing = Alert(f"paper_out:{hall.hall_id}:k11:1", "paper_out", "paper", "critical", "firing",
                       hall.hall_id, "k11", None, 1000, "paper out")
        with caplog.at_level(logging.WARNING, logger="hallkiosk.ops"):
            mon.sink.emit(firing)
            topic = firing.topic
            _publish_as(hall, "mon-9", topic,
                        alert_signer(pki["mon-9"].key, "mon-9").seal(topic, "alert", firing.body()))
            rogue = Alert(f"hot:{hall.hall_id}:k11:1", "hot", "temperature", "warning", "firing", hall.hall_id,
                          "k11", 90_000, 1000, "fake heat")
            _publish_as(hall, "rogue", topic,
                        alert_signer(pki["rogue"].key, "rogue").seal(topic, "alert", rogue.body()))
            wait_for(lambda: any("alert refused" in r.getMessage() for r in caplog.records),
                     what="the untrusted monitor's alert refused")
            mon.sink.emit(dataclasses.replace(firing, state="resolved"))
            feed.join(15)
        assert not feed.is_alive()
        lines = out.getvalue().splitlines()
        assert len(lines) == 2, lines
        assert "CRITICAL firing" in lines[0] and "k11 paper_out: paper out" in lines[0]
        assert "resolved" in lines[1] and "fake heat" not in out.getvalue()
    finally:
        stop.set()
        mon.stop()
