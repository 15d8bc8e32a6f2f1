"""Lightweight emulated kiosks: one mTLS MQTT 5 connection each to its hall broker,
real Ed25519 keys from the hall's enrollment, real signed envelopes, an outbox kept until
a ticket_ack verifies. Many per hall without the full agent (no devices, no store).

An outbox entry is dropped at the first valid ack (the hall ledger's, normally); acks
from every consumer are recorded so the harness can tell which tier acknowledged what.
"""

from __future__ import annotations

import itertools
import secrets
import threading
import time

import paho.mqtt.client as mqtt

from edge.mqtt import TlsSettings
from hallkiosk.errors import ContractError
from mqtt_topics.envelope import Keyring, Signer, verify
from mqtt_topics.topics import KioskTopics


class LightKiosk:
    def __init__(self, hall: str, device: str, key, tls: TlsSettings, keyring: Keyring,
                 host: str, port: int) -> None:
        self.hall, self.device = hall, device
        self.topics = KioskTopics(hall, device)
        # A fresh boot id per start, so an in-memory seq counter never repeats a (boot, seq).
        self.signer = Signer(key, sender=device, boot_id=secrets.token_hex(16),
                             next_seq=itertools.count(1).__next__)
        self.keyring = keyring
        self._lock = threading.Lock()
        self.serial = 0
        self.outbox: dict[str, dict] = {}          # ticket_uid -> body, until acked
        self.acked_by: dict[str, set[str]] = {}    # ticket_uid -> consumer ids that acked
        self.issued: dict[str, float] = {}          # ticket_uid -> monotonic issue time
        self.bodies: dict[str, dict] = {}           # ticket_uid -> body, kept for re-sends
        self.first_ack: dict[tuple[str, str], float] = {}  # (uid, sender) -> monotonic
        self.bad_acks = 0
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device,
                        protocol=mqtt.MQTTv5)
        c.tls_set(ca_certs=tls.ca_file, certfile=tls.cert_file, keyfile=tls.key_file)
        c.reconnect_delay_set(0.2, 2)
        c.on_connect = self._on_connect
        c.on_message = self._on_message
        # Its state, as the agent keeps it: retained "online" on every connection, and a
        # retained "offline" will the broker publishes if the kiosk vanishes. The bridge
        # carries both to the city, where central ops build the fleet from them.
        self._since_ms = int(time.time() * 1000)
        self._session = 0
        t = self.topics.state
        c.will_set(t, self.signer.seal(t, "state", self._state_body("offline", "connection lost")),
                   qos=1, retain=True)
        self._client = c
        self._host, self._port = host, port

    def _state_body(self, status: str, reason: str | None = None) -> dict:
        return {"status": status, "session": self._session, "agent_version": "0.1.0",
                "since_ms": self._since_ms, "reason": reason, "services": ["passport"]}

    def start(self) -> "LightKiosk":
        self._client.connect_async(self._host, self._port, keepalive=10)
        self._client.loop_start()
        return self

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    @property
    def connected(self) -> bool:
        return self._client.is_connected()

    def _on_connect(self, client, _u, _f, reason, _p) -> None:
        if not reason.is_failure:
            client.subscribe(self.topics.ticket_ack, qos=1)
            self._session += 1
            t = self.topics.state
            client.publish(t, self.signer.seal(t, "state", self._state_body("online")), qos=1,
                           retain=True)

    def _on_message(self, _c, _u, m) -> None:
        try:
            v = verify(m.payload, m.topic, self.keyring, expect_type="ticket_ack",
                       require_role="consumer")
        except ContractError:
            with self._lock:
                self.bad_acks += 1
            return
        uid = v.body["ticket_uid"]
        with self._lock:
            if uid not in self.issued:
                return                                  # an ack for an unknown ticket
            self.acked_by.setdefault(uid, set()).add(v.sender)
            self.first_ack.setdefault((uid, v.sender), time.monotonic())
            self.outbox.pop(uid, None)

    def issue(self) -> str:
        with self._lock:
            self.serial += 1
            serial = self.serial
            uid = f"{self.device}:{serial}"
            body = {"ticket_uid": uid, "ticket_id": f"A-{serial % 10000:04d}",
                    "service": "passport", "service_name": "Passport", "number": serial,
                    "serial": serial, "issued_at_ms": int(time.time() * 1000),
                    "clock_trusted": True, "waiting_ahead": 0, "priority": "normal",
                    "appointment_id": None, "citizen": None, "source": "button",
                    "printed": "yes"}
            self.outbox[uid] = body
            self.issued[uid] = time.monotonic()
            self.bodies[uid] = body
        self._send(body)
        return uid

    def _send(self, body: dict) -> None:
        t = self.topics.ticket
        self._client.publish(t, self.signer.seal(t, "ticket", body), qos=1)

    def resend(self, uid: str) -> None:
        """Send an already issued ticket again (a kiosk that missed the ack)."""
        with self._lock:
            body = self.bodies[uid]
        self._send(body)

    def resend_unacked(self) -> int:
        """Re-send every outbox entry with a fresh envelope (what the agent does when no
        ack came in time); paho queues them while disconnected."""
        with self._lock:
            pending = list(self.outbox.values())
        for body in pending:
            self._send(body)
        return len(pending)

    def acked(self, by: str | None = None) -> set[str]:
        with self._lock:
            return {u for u, s in self.acked_by.items() if by is None or by in s}
