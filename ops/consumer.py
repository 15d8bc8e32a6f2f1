"""The hall-side ticket consumer: verify, dedupe, store in the ledger, acknowledge.

It subscribes to every kiosk's ticket topic in one hall (optionally as an MQTT 5 shared
subscription, so several instances split the load), verifies each envelope against the
hall's keyring, records the ticket durably, and only then publishes the signed ack that lets
the kiosk delete its outbox entry.

A replayed envelope (the same transmission twice: a QoS 1 redelivery, or someone replaying a
capture) is never stored twice; if its ticket is already in the ledger it is acked again,
since the first ack may have been lost and acking reveals nothing new.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge.mqtt import LinkDown, LinkMessage, LinkUp, MqttLink, NotConnected, TlsSettings
from edge.store import KioskStore
from hallkiosk.errors import ContractError, ReplayError
from mqtt_topics.envelope import Keyring, SequenceTracker, Signer, Verified, verify
from mqtt_topics.topics import HallTopics, KioskTopics, parse_topic
from ops.ledger import TicketLedger

log = logging.getLogger("hallkiosk.ledger")


@dataclass
class ConsumerStats:
    received: int = 0
    stored: int = 0
    duplicates: int = 0
    replays: int = 0
    rejected: int = 0
    acks_sent: int = 0
    gaps: int = 0
    last_rejection: str | None = None
    rejections: list[str] = field(default_factory=list)


class TicketConsumer:
    def __init__(self, *, service_id: str, hall: str, key: Ed25519PrivateKey, keyring: Keyring,
                 state_dir: Path, host: str, port: int, group: str | None = None,
                 on_ticket: Callable[[Verified, bool], None] | None = None,
                 tls: TlsSettings | None = None) -> None:
        self.hall = hall
        self.keyring = keyring
        state_dir = Path(state_dir)
        self.ledger = TicketLedger(state_dir / "ledger.sqlite")
        self._seq = KioskStore(state_dir / f"{service_id}-seq.sqlite")
        self.signer = Signer(key, sender=service_id, boot_id=secrets.token_hex(16),
                             next_seq=self._seq.next_seq)
        self.tracker = SequenceTracker()
        self.stats = ConsumerStats()
        self.on_ticket = on_ticket
        self.events: queue.Queue[object] = queue.Queue()
        topics = HallTopics(hall)
        sub = topics.shared(group, topics.all_tickets) if group else topics.all_tickets
        # A stable client id per service identity (with mTLS the broker forces it to the
        # certificate's CN anyway): a restarted instance resumes its own session instead of
        # leaving an orphan that keeps taking its share of a shared subscription.
        self.link = MqttLink(client_id=service_id, session_expiry_s=600,
                             host=host, port=port, sink=self.events.put, subscriptions=((sub, 1),),
                             reconnect_min_s=0.2, reconnect_max_s=5.0, tls=tls, name=service_id)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> "TicketConsumer":
        self._thread = threading.Thread(target=self._run, name="ticket-consumer", daemon=True)
        self._thread.start()
        self.link.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.events.put(None)
        self.link.stop()
        if self._thread is not None:
            self._thread.join(5)
        self.ledger.close()
        self._seq.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            ev = self.events.get()
            if ev is None:
                continue
            try:
                if isinstance(ev, LinkMessage):
                    self.handle(ev.topic, ev.payload)
                elif isinstance(ev, LinkUp):
                    log.info("ticket consumer connected")
                elif isinstance(ev, LinkDown):
                    log.warning("ticket consumer link down: %s", ev.reason)
            except Exception:  # one bad message must not stop the consumer
                log.exception("ticket consumer failed on an event")

    def _reject(self, why: str) -> None:
        self.stats.rejected += 1
        self.stats.last_rejection = why
        self.stats.rejections.append(why)
        del self.stats.rejections[:-50]
        log.warning("rejected a ticket message: %s", why)

    def handle(self, topic: str, payload: bytes) -> None:
        self.stats.received += 1
        try:
            parse_topic(topic)
            v = verify(payload, topic, self.keyring, expect_type="ticket", require_role="kiosk")
        except ContractError as exc:
            self._reject(str(exc))
            return
        try:
            status, missing = self.tracker.check(v.sender, v.boot, v.seq)
            if status == "gap":
                self.stats.gaps += missing
        except ReplayError:
            self.stats.replays += 1
            row = self.ledger.lookup(v.body["ticket_uid"])
            if row is not None:
                self._ack(v, row.ledger_id, "duplicate")
            return
        ledger_id, new = self.ledger.record(v.sender, v.body)
        if new:
            self.stats.stored += 1
        else:
            self.stats.duplicates += 1
        self._ack(v, ledger_id, "accepted" if new else "duplicate")
        if self.on_ticket is not None:
            try:
                self.on_ticket(v, new)
            except Exception:
                log.exception("on_ticket hook failed")

    def _ack(self, v: Verified, ledger_id: int, status: str) -> None:
        topic = KioskTopics(self.hall, v.sender).ticket_ack
        body = {"ticket_uid": v.body["ticket_uid"], "ticket_id": v.body["ticket_id"],
                "status": status, "ledger_id": ledger_id}
        try:
            self.link.publish(topic, self.signer.seal(topic, "ticket_ack", body), qos=1)
            self.stats.acks_sent += 1
        except NotConnected:
            # The kiosk re-sends until acked; the ledger already has the ticket, so the
            # next transmission is a duplicate that gets this ack.
            log.info("ack for %s not sent: link down", v.body["ticket_uid"])
