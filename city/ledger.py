"""The city's central ticket ledger: every hall's tickets, once, acknowledged end to end.

It reads ``hall/{h}/kiosk/+/ticket`` from the city tier for each hall it serves, verifies
each envelope against that hall's keyring (signatures cross the bridge unchanged), records
it in a per-hall ops.ledger.TicketLedger (dedupe on ticket_uid) and only then publishes a
ticket_ack signed with a consumer key the hall issued (so the kiosk accepts it), which the
bridge carries back in. The QoS 1 PUBACK to the city tier is sent only after the ledger
commit (paho manual ack), so a ledger killed mid-message gets it again from JetStream.

The NATS MQTT gateway speaks 3.1.1, so this uses paho directly rather than edge.mqtt's
MQTT 5 link. paho callbacks only queue; one worker thread owns the ledgers.
"""

from __future__ import annotations

import logging
import queue
import itertools
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge.mqtt import TlsSettings
from hallkiosk.errors import ContractError
from mqtt_topics.envelope import Keyring, Signer, verify
from mqtt_topics.topics import HallTopics, KioskTopics, parse_topic
from ops.ledger import TicketLedger

log = logging.getLogger("hallkiosk.city.ledger")


@dataclass(frozen=True)
class HallTrust:
    """What the city ledger needs of one hall: its keyring and the consumer identity the
    hall issued to the city ledger (id and key)."""

    hall: str
    keyring: Keyring
    sender: str
    key: Ed25519PrivateKey


@dataclass
class CityLedgerStats:
    received: int = 0
    stored: int = 0
    duplicates: int = 0
    rejected: int = 0
    acks_sent: int = 0


class CityLedger:
    def __init__(self, *, client_id: str, halls: list[HallTrust], state_dir: Path,
                 addresses: list[tuple[str, int]], tls: TlsSettings) -> None:
        self.halls = {h.hall: h for h in halls}
        state_dir = Path(state_dir)
        self.ledgers = {h.hall: TicketLedger(state_dir / f"{h.hall}.sqlite") for h in halls}
        # A fresh boot id per process start: kiosks track each instance's seq separately.
        self.signers = {h.hall: Signer(h.key, sender=h.sender, boot_id=secrets.token_hex(16),
                                       next_seq=itertools.count(1).__next__)
                        for h in halls}
        self.stats = CityLedgerStats()
        self.addresses = addresses
        self._q: queue.Queue[mqtt.MQTTMessage | None] = queue.Queue()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                        protocol=mqtt.MQTTv311, clean_session=False, manual_ack=True)
        c.tls_set(ca_certs=tls.ca_file, certfile=tls.cert_file, keyfile=tls.key_file)
        c.reconnect_delay_set(0.2, 2)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        # A node that refuses the TCP connection (it is down) reaches on_connect_fail, not
        # on_disconnect: without this the ledger kept retrying a dead node forever.
        c.on_connect_fail = lambda client, _u: self._next_node(client)
        c.on_message = lambda _c, _u, m: self._q.put(m)
        self._client = c
        self._next_addr = 0
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="city-ledger", daemon=True)

    def start(self) -> "CityLedger":
        self._thread.start()
        host, port = self.addresses[0]
        self._client.connect_async(host, port, keepalive=10)
        self._client.loop_start()
        return self

    def _on_connect(self, client, _u, _flags, reason, _props) -> None:
        if reason.is_failure:
            return
        # One filter per hall: the city ledger reads only the halls it holds a keyring for.
        for h in self.halls:
            client.subscribe(HallTopics(h).all_tickets, 1)

    def _on_disconnect(self, client, _u, _flags, _reason, _props) -> None:
        """paho reconnects to the address it was given: move to the next cluster node
        first (the session lives in JetStream on every node, so it resumes there)."""
        self._next_node(client)

    def _next_node(self, client) -> None:
        if self._stopping:
            return
        self._next_addr = (self._next_addr + 1) % len(self.addresses)
        host, port = self.addresses[self._next_addr]
        client.connect_async(host, port, keepalive=10)

    def stop(self) -> None:
        self._stopping = True
        self._client.disconnect()
        self._client.loop_stop()
        self._q.put(None)
        self._thread.join(5)
        for led in self.ledgers.values():
            led.close()

    def _run(self) -> None:
        while (m := self._q.get()) is not None:
            try:
                self.handle(m.topic, m.payload)
            except Exception:  # one bad message must not stop the ledger
                log.exception("city ledger failed on %s", m.topic)
            self._client.ack(m.mid, m.qos)

    def handle(self, topic: str, payload: bytes) -> None:
        self.stats.received += 1
        try:
            parts = parse_topic(topic)
            trust = self.halls[parts.hall]
            v = verify(payload, topic, trust.keyring, expect_type="ticket", require_role="kiosk")
        except (ContractError, KeyError) as exc:
            self.stats.rejected += 1
            log.warning("rejected a ticket on %s: %s", topic, exc)
            return
        ledger_id, new = self.ledgers[trust.hall].record(v.sender, v.body)
        if new:
            self.stats.stored += 1
        else:
            self.stats.duplicates += 1
        ack_topic = KioskTopics(trust.hall, v.sender).ticket_ack
        body = {"ticket_uid": v.body["ticket_uid"], "ticket_id": v.body["ticket_id"],
                "status": "accepted" if new else "duplicate", "ledger_id": ledger_id}
        self._client.publish(ack_topic, self.signers[trust.hall].seal(ack_topic, "ticket_ack", body),
                             qos=1)
        self.stats.acks_sent += 1
