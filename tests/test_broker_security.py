"""The hall broker with the GENERATED TLS config and certificates from the REAL enrollment
flow (provisioning.emulated): per-device isolation, refused strangers, revocation with the
sessions forced off, signed commands end to end, and a whole ticket over mTLS with every
payload scanned for personal data."""

from __future__ import annotations

import base64
import functools
import secrets
import shutil
import ssl
import threading
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from edge.clock import SYSTEM_CLOCK
from edge.commands import Command, CommandGate, Refusal
from edge.mqtt import LinkDown, LinkMessage, LinkUp, MqttLink, PublishDone, TlsSettings
from emulator.broker import MosquittoBroker
from emulator.idcard import Card
from mqtt_topics.envelope import Signer, canonical_bytes, canonical_json, key_id, verify
from mqtt_topics.topics import KIOSK_KINDS, KINDS, KioskTopics
from provisioning.emulated import provision_emulated_hall
from provisioning.opsclient import OpsClient
from tests.conftest import wait_for

pytestmark = pytest.mark.integration

HALL = "citizen-home"
NOT_AUTHORIZED = 0x87


class Peer:
    """A raw paho MQTT 5 client as one identity, to see CONNACK/PUBACK reason codes."""

    def __init__(self, port: int, tls: TlsSettings | None, client_id: str = "peer",
                 ca_only: str | None = None) -> None:
        self.port = port
        self.cond = threading.Condition()
        self.connack = None
        self.gone = False
        self.error: str | None = None
        self.pubacks: dict[int, object] = {}
        self.subacks: dict[int, list] = {}
        self.messages: list[paho.MQTTMessage] = []
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                        protocol=MQTTProtocolVersion.MQTTv5)
        if tls is not None:
            c.tls_set(ca_certs=tls.ca_file, certfile=tls.cert_file, keyfile=tls.key_file,
                      cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        elif ca_only is not None:
            c.tls_set(ca_certs=ca_only, cert_reqs=ssl.CERT_REQUIRED,
                      tls_version=ssl.PROTOCOL_TLS_CLIENT)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message
        self.c = c

    def _note(self, **kw) -> None:
        with self.cond:
            for k, v in kw.items():
                setattr(self, k, v)
            self.cond.notify_all()

    def _on_connect(self, c, u, flags, rc, props) -> None:
        self._note(connack=rc)

    def _on_disconnect(self, c, u, flags, rc, props) -> None:
        self._note(gone=True)

    def _on_publish(self, c, u, mid, rc, props) -> None:
        with self.cond:
            self.pubacks[mid] = rc
            self.cond.notify_all()

    def _on_subscribe(self, c, u, mid, rcs, props) -> None:
        with self.cond:
            self.subacks[mid] = rcs
            self.cond.notify_all()

    def _on_message(self, c, u, msg) -> None:
        with self.cond:
            self.messages.append(msg)
            self.cond.notify_all()

    def connect(self, timeout_s: float = 5.0) -> bool:
        """True once the broker's CONNACK says success; False if refused in any way."""
        try:
            self.c.connect("127.0.0.1", self.port, keepalive=30)
        except (OSError, ssl.SSLError) as exc:      # handshake refused before CONNECT
            self.error = f"{type(exc).__name__}: {exc}"
            return False
        self.c.loop_start()
        with self.cond:
            self.cond.wait_for(lambda: self.connack is not None or self.gone, timeout_s)
            return self.connack is not None and not self.connack.is_failure

    def publish(self, topic: str, payload: bytes = b"x", timeout_s: float = 5.0) -> int:
        info = self.c.publish(topic, payload, qos=1)
        with self.cond:
            assert self.cond.wait_for(lambda: info.mid in self.pubacks, timeout_s), "no PUBACK"
            return self.pubacks[info.mid].value

    def subscribe(self, topic_filter: str, timeout_s: float = 5.0) -> None:
        _, mid = self.c.subscribe(topic_filter, qos=1)
        with self.cond:
            assert self.cond.wait_for(lambda: mid in self.subacks, timeout_s), "no SUBACK"

    def topics_seen(self) -> list[str]:
        with self.cond:
            return [m.topic for m in self.messages]

    def close(self) -> None:
        try:
            self.c.disconnect()
        finally:
            self.c.loop_stop()


class Recorder:
    """An MqttLink as one identity that records its events (LinkUp/Down, messages)."""

    def __init__(self, mats, broker, ident: str, subscriptions=()) -> None:
        self.events: list[object] = []
        self.lock = threading.Lock()
        self.link = MqttLink(client_id=ident, host="127.0.0.1", port=broker.port, sink=self._sink,
                             tls=mats.tls_for(ident), subscriptions=tuple(subscriptions),
                             reconnect_min_s=0.1, reconnect_max_s=0.5, name=ident)
        self.link.start()

    def _sink(self, ev) -> None:
        with self.lock:
            self.events.append(ev)

    def count(self, kind) -> int:
        with self.lock:
            return sum(isinstance(e, kind) for e in self.events)

    def messages(self) -> list[LinkMessage]:
        with self.lock:
            return [e for e in self.events if isinstance(e, LinkMessage)]

    def close(self) -> None:
        self.link.stop()


class SecureHall:
    """Provisioned PKI + a broker running the generated config + an auditor (monitor role)
    that records every message of the hall, for the personal-data scan at teardown."""

    def __init__(self, root: Path, devices=("k1", "k2")) -> None:
        self.mats = provision_emulated_hall(root / "pki", devices, hall=HALL)
        self.broker = MosquittoBroker(root / "broker", conf_text=self.mats.broker_conf_text).start()
        self.auditor = Recorder(self.mats, self.broker, "auditor",
                                subscriptions=((f"hall/{HALL}/#", 1),))
        assert self.auditor.link.wait_connected(10), self.auditor.link.last_error
        self.closers: list = [self.auditor.close]
        self.forbidden: list[str] = []      # personal data that must never be published

    def recorder(self, ident: str, subscriptions=()) -> Recorder:
        r = Recorder(self.mats, self.broker, ident, subscriptions)
        self.closers.append(r.close)
        return r

    def peer(self, ident: str | None, client_id: str = "peer", **kw) -> Peer:
        p = Peer(self.broker.port, self.mats.tls_for(ident) if ident else None, client_id, **kw)
        self.closers.append(p.close)
        return p

    def scan(self) -> int:
        msgs = self.auditor.messages()
        for m in msgs:
            text = m.payload.decode("utf-8", "replace")
            for secret in self.forbidden:
                assert secret not in text, f"personal data published on {m.topic}"
        return len(msgs)

    def close(self) -> None:
        try:
            self.scan()
        finally:
            for close in reversed(self.closers):
                close()
            self.broker.kill()


@pytest.fixture
def secure(tmp_path):
    h = SecureHall(tmp_path)
    yield h
    h.close()


# -- isolation -----------------------------------------------------------------------------
def test_kiosk_cannot_publish_on_another_kiosks_topics(secure):
    k1 = secure.peer("k1")
    assert k1.connect()
    mine, theirs = KioskTopics(HALL, "k1"), KioskTopics(HALL, "k2")
    for kind in KINDS:
        assert k1.publish(theirs.topic(kind)) == NOT_AUTHORIZED, kind
    for kind in KINDS:
        expected_ok = kind in KIOSK_KINDS        # not its own ticket/ack, cmd nor alert
        code = k1.publish(mine.topic(kind))
        assert (code < 0x80) == expected_ok, (kind, hex(code))
    assert k1.publish(f"hall/{HALL}/ops/alert") == NOT_AUTHORIZED
    assert k1.publish(mine.alert) == NOT_AUTHORIZED      # nobody but a monitor raises alerts
    assert k1.publish("$SYS/broker/x") == NOT_AUTHORIZED
    ops = secure.peer("ops", client_id="ops")
    assert ops.connect()
    assert ops.publish(theirs.cmd) < 0x80
    assert ops.publish(theirs.state) == NOT_AUTHORIZED   # ops cannot speak for a kiosk


def test_kiosk_does_not_receive_another_kiosks_commands(secure):
    k1, k2 = secure.peer("k1", "k1"), secure.peer("k2", "k2")
    assert k1.connect() and k2.connect()
    for f in (KioskTopics(HALL, "k2").cmd, f"hall/{HALL}/kiosk/+/cmd", "#",
              KioskTopics(HALL, "k1").cmd):
        k1.subscribe(f)                           # granted: delivery is what the ACL filters
    k2.subscribe(KioskTopics(HALL, "k2").cmd)
    ops = secure.peer("ops", client_id="ops")
    assert ops.connect()
    assert ops.publish(KioskTopics(HALL, "k2").cmd, b"for k2") < 0x80
    assert ops.publish(KioskTopics(HALL, "k1").cmd, b"for k1") < 0x80
    wait_for(lambda: KioskTopics(HALL, "k1").cmd in k1.topics_seen(), what="k1's own command")
    wait_for(lambda: k2.topics_seen() == [KioskTopics(HALL, "k2").cmd], what="k2's command")
    assert set(k1.topics_seen()) == {KioskTopics(HALL, "k1").cmd}


def test_client_id_is_forced_to_the_certificate_cn(secure):
    k2 = secure.peer("k2", client_id="k2")
    assert k2.connect()
    k1 = secure.peer("k1", client_id="k2")       # tries to take over k2's session
    assert k1.connect()
    assert k1.publish(KioskTopics(HALL, "k1").state) < 0x80
    assert not k2.gone                            # k2 was not kicked
    assert k2.publish(KioskTopics(HALL, "k2").state) < 0x80


def test_clients_without_certificate_or_from_another_ca_refused(secure, tmp_path):
    chain = str(secure.mats.chain_file)
    assert not secure.peer(None, ca_only=chain).connect(3)           # TLS, no certificate
    assert not secure.peer(None).connect(3)                           # plain MQTT on TLS port
    other = provision_emulated_hall(tmp_path / "other", ["k1"], hall=HALL)  # same ids!
    foreign = Peer(secure.broker.port, TlsSettings(chain, str(other["k1"].cert_path),
                                                   str(other["k1"].key_path)))
    secure.closers.append(foreign.close)
    assert not foreign.connect(3)
    assert secure.peer("k1").connect()                                # the real k1 is fine


# -- revocation ------------------------------------------------------------------------------
def test_revoked_kiosk_refused_at_handshake_and_forced_off(secure, caplog):
    secure.mats.add_kiosk("k9")                   # a probe: revoked along with k1
    k1, k2 = secure.recorder("k1"), secure.recorder("k2")
    assert k1.link.wait_connected(10) and k2.link.wait_connected(10)
    secure.mats.revoke("k9")
    secure.mats.revoke("k1")
    secure.broker.reload()                        # SIGHUP: Mosquitto re-reads the CRL ...
    # Probing with k1 itself would, if it still got in, take over k1's session (the client
    # id is forced to the CN): probe with the other revoked kiosk instead.
    wait_for(lambda: not secure.peer("k9").connect(3), timeout_s=15,
             what="a revoked kiosk's new handshake refused after the CRL reload")
    assert not secure.peer("k1").connect(3)
    # ... but (measured, Mosquitto 2.0.11) the open session survives a reload:
    mid = k1.link.publish(KioskTopics(HALL, "k1").state, b"still here", qos=1)
    wait_for(lambda: any(isinstance(e, PublishDone) and e.mid == mid and e.ok
                         for e in list(k1.events)), what="k1's open session still works")
    assert secure.peer("k2").connect()            # others are unaffected by the CRL
    # The mechanism: a graceful restart (persistence keeps every session); all reconnect,
    # the revoked kiosk fails its handshake every time.
    assert k1.count(LinkDown) == 0
    caplog.clear()
    secure.broker.stop()
    secure.broker.start()
    wait_for(lambda: k1.count(LinkDown) >= 1, what="k1's session forced off")
    wait_for(lambda: k2.count(LinkUp) >= 2, timeout_s=15, what="k2 reconnected")

    # paho logs each refused retry. Under TLS 1.3 the client finishes its side of the
    # handshake before the broker checks the certificate, so the broker's alert is read as
    # "certificate revoked" when it arrives first, and as an EOF when the close wins the race
    # (both seen on this machine): count every refused retry, and require the alert once.
    # A refusal that lands inside connect() itself (the handshake still running) is not
    # logged by paho: the link reports it as a LinkDown "connect to ... failed" instead. (This
    # test once saw one refusal in 45 s: the link had stopped retrying, a bug of edge/mqtt.py
    # now fixed, see MqttLink._run.)
    def failures() -> list[str]:
        return [r.getMessage() for r in list(caplog.records)
                if r.name == "hallkiosk.mqtt.paho.k1"
                and "failed to receive on socket" in r.getMessage()]

    def refusals() -> int:
        in_connect = [e for e in list(k1.events)
                      if isinstance(e, LinkDown) and e.reason.startswith("connect to ")]
        return len(failures()) + len(in_connect)
    wait_for(lambda: refusals() >= 2, timeout_s=45, what="k1 retried and was refused twice")
    wait_for(lambda: any("CERTIFICATE_REVOKED" in m for m in failures()), timeout_s=45,
             what="the broker's certificate-revoked alert")
    assert not k1.link.connected and k1.count(LinkUp) == 1


# -- signed commands, end to end ------------------------------------------------------------------
class KioskResponder:
    """The kiosk's side of commands as the agent wires it (edge.commands docstring):
    gate, cmd_result for every command, command_refused event for every refusal."""

    def __init__(self, secure: SecureHall, device: str) -> None:
        mats = secure.mats
        self.topics = KioskTopics(HALL, device)
        self.gate = CommandGate(device, mats.keyring(("ops",)), SYSTEM_CLOCK, hall=HALL)
        seq = iter(range(1, 10**6))
        self.signer = Signer(mats[device].key, sender=device, boot_id=secrets.token_hex(16),
                             next_seq=lambda: next(seq))
        self.outcomes: list[Command | Refusal] = []
        self.lock = threading.Lock()
        self.link = MqttLink(client_id=device, host="127.0.0.1", port=secure.broker.port,
                             sink=self._sink, tls=mats.tls_for(device),
                             subscriptions=((self.topics.cmd, 1),), name=device)
        self.link.start()
        secure.closers.append(self.link.stop)
        assert self.link.wait_connected(10)

    def _sink(self, ev) -> None:
        if not isinstance(ev, LinkMessage) or ev.topic != self.topics.cmd:
            return
        out = self.gate.check(ev.payload, ev.topic)
        with self.lock:
            self.outcomes.append(out)
        body = self.gate.result_body(out)                  # every command is answered
        self.link.publish(self.topics.cmd_result,
                          self.signer.seal(self.topics.cmd_result, "cmd_result", body))
        if isinstance(out, Refusal):
            event = {"name": "command_refused", "severity": "warning", "subject": "cmd",
                     "detail": self.gate.refusal_event(out)}
            self.link.publish(self.topics.event, self.signer.seal(self.topics.event, "event",
                                                                  event))


def hand_sealed(key, sender, topic, body, seq=1):
    env = {"v": 1, "type": "cmd", "sender": sender, "boot": "ab" * 16, "seq": seq, "ts_ms": 0,
           "kid": key_id(key.public_key()), "body": body}
    env["sig"] = base64.urlsafe_b64encode(key.sign(canonical_bytes(topic, env))).rstrip(b"=").decode()
    return canonical_json(env)


def test_signed_commands_answered_accepted_or_refused_with_reason(secure, tmp_path):
    mats = secure.mats
    kiosk = KioskResponder(secure, "k1")
    ops = OpsClient(ops_id="ops", hall=HALL, key=mats["ops"].key, keyring=mats.keyring(("kiosk",)),
                    tls=mats.tls_for("ops"), host="127.0.0.1", port=secure.broker.port,
                    state_dir=tmp_path / "ops-state").start()
    secure.closers.append(ops.stop)

    def answer(nonce):
        got = ops.wait_result(nonce, 10)
        assert got, f"no cmd_result for {nonce}"
        return got[0].body

    topic, payload, nonce = ops.send("k1", "reprint", {"copies": 1})
    assert answer(nonce)["status"] == "accepted"
    def claimed(nonce: str) -> dict:
        """The refusal that names no command but claims ``nonce`` (detail)."""
        got = ops.wait_unattributed(lambda v: v.body["detail"].get("claimed_nonce") == nonce)
        assert got is not None, f"no unattributed cmd_result claiming {nonce}"
        assert (got.body["cmd_seq"], got.body["nonce"], got.body["status"]) == (
            None, None, "refused")
        return got.body

    ops.publish_raw(topic, payload)                                   # replayed
    assert claimed(nonce)["detail"]["code"] == "replayed"
    # The command itself keeps its one answer: ops never read "refused" for it.
    assert [v.body["status"] for v in ops.results(nonce)] == ["accepted"]

    now_ms = int(SYSTEM_CLOCK.wall() * 1000)
    _, _, n_exp = ops.send("k1", "reprint", expires_at_ms=now_ms - 1000)
    assert answer(n_exp)["detail"] == {"code": "expired"}

    mis = {"name": "reprint", "args": {}, "target": "k2", "nonce": "misaddressed-000001",
           "expires_at_ms": now_ms + 60_000}
    ops.publish_raw(topic, hand_sealed(mats["ops"].key, "ops", topic, mis, seq=10**6))
    assert claimed("misaddressed-000001")["detail"]["code"] == "misaddressed"

    forged = dict(mis, target="k1", nonce="forged-00000000001")
    ops.publish_raw(topic, hand_sealed(Ed25519PrivateKey.generate(), "ops", topic, forged))
    assert claimed("forged-00000000001")["detail"]["code"] == "unknown_key"

    assert [o.code for o in kiosk.outcomes if isinstance(o, Refusal)] == [
        "replayed", "expired", "misaddressed", "unknown_key"]

    def events():
        return [m for m in secure.auditor.messages() if m.topic == kiosk.topics.event]
    wait_for(lambda: len(events()) == 4, what="a command_refused event per refusal")
    ring = mats.keyring()
    codes = [verify(m.payload, m.topic, ring, expect_type="event", require_role="kiosk")
             .body["detail"]["code"] for m in events()]
    assert codes == ["replayed", "expired", "misaddressed", "unknown_key"]
    assert ops.rejected == []


def test_cli_command_round_trip(secure, tmp_path, capsys):
    from provisioning import cli

    KioskResponder(secure, "k2")
    ops = secure.mats["ops"]
    argv = ["provision", "command", "--ca-dir", str(secure.mats.ca.dir), "--cert",
            str(ops.cert_path), "--key", str(ops.key_path), "--host", "127.0.0.1", "--port",
            str(secure.broker.port), "--device", "k2", "--name", "reprint", "--args",
            '{"copies": 1}', "--state-dir", str(tmp_path / "ops-state")]
    assert cli.main(argv) == 0
    assert "k2: accepted" in capsys.readouterr().out
    assert cli.main(argv + ["--ttl", "3600"]) == 1
    assert "too_far_future" in capsys.readouterr().out


# -- a whole ticket over mTLS, every payload scanned --------------------------------------------------
@pytest.mark.e2e
def test_ticket_over_mtls_with_enrolled_key_and_no_personal_data(hall):
    """EmulatedHall runs the real enrolment flow and the generated broker config: the agent
    connects with its enrolled certificate, signs with that certificate's key, and the
    ledger (shared subscription, its own certificate) acks. The hall fixture's auditor scans
    every payload for the card's personal data at teardown."""
    consumer = hall.start_consumer(group="consumers")
    kiosk = hall.add_kiosk("k07", prefix="07")
    agent = kiosk.start_agent()
    wait_for(lambda: agent.link.connected, what="agent connected over mTLS")

    card = Card.valid()
    kiosk.reader.present(card)
    wait_for(lambda: kiosk.leds.state("A") or kiosk.leds.state("B"), what="service LEDs")
    kiosk.buttons.press("A")
    assert kiosk.printer.wait_for_tickets(1, 10)
    uid = kiosk.printer.tickets[0].qr_codes[0]
    wait_for(lambda: consumer.ledger.lookup(uid), what="ticket in the ledger")
    wait_for(lambda: agent.store.depth() == 0, what="outbox emptied by the signed ack")
    wait_for(lambda: any(m.topic.endswith("/ticket/ack") for m in hall.auditor.messages),
             what="auditor saw the ack")
    tickets = [m for m in hall.auditor.messages if m.topic == KioskTopics(HALL, "k07").ticket]
    v = verify(tickets[0].payload, tickets[0].topic, hall.keyring, require_role="kiosk")
    assert v.kid == key_id(kiosk.identity.key.public_key())   # signed with the TLS cert's key
    assert consumer.stats.rejected == 0
    assert len(hall.auditor.messages) >= 3                     # state, ticket, ack at least
    assert not hall.auditor.leaks([card])
    kiosk.stop_agent()
