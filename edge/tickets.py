"""Issuing a ticket, and getting it to the hall end to end.

Order matters, and every step after the first can fail or be cut by a power loss:
1. commit: number allocated and ticket stored in the durable outbox (one fsynced transaction);
2. print: the citizen gets the paper; the outbox records printed yes/no;
3. publish: QoS 1, signed, with a fresh envelope on every transmission;
4. the hall's ticket consumer acknowledges end to end (``ticket/ack``), and only then is the
   outbox entry deleted. A PUBACK proves nothing: Mosquitto loses PUBACKed messages on a crash.
Unacknowledged entries are re-sent after every (re)connection, after a restart, and when no ack
came within ``resend_after_s``. Consumers dedupe on ``ticket_uid``.

After a crash between commit and print, the ticket is *not* printed on restart: the citizen
has most likely walked away and a stale ticket in the tray would be taken by the next person.
The agent cannot know whether the printer got the job before the power went, so the ticket is
published with ``printed: "unknown"`` and the queue system and ops can tell (ops can reprint).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

from edge.clock import Clock
from edge.failpoints import crash_point
from edge.mqtt import NotConnected
from edge.printer.escpos import TicketLayout
from edge.printer.printer import PrinterNotReady
from edge.publisher import Publisher
from edge.store import KioskStore, OutboxEntry, TicketNumber
from hallkiosk.errors import ContractError, DeviceError, ReplayError
from mqtt_topics.envelope import Keyring, SequenceTracker, verify

log = logging.getLogger("hallkiosk.tickets")


@dataclass(frozen=True, slots=True)
class IssueRequest:
    service: str
    service_name: str
    citizen: str | None
    source: str                      # "idcard" | "qr" | "button"
    priority: str = "normal"         # "normal" | "appointment"
    appointment_id: str | None = None
    appointment_expires_ms: int | None = None   # single-use until then (see store.claim)


class TicketDesk:
    """Commits, prints and hands tickets to the outbox sender."""

    def __init__(self, *, store: KioskStore, device: str, prefix: str, hall_name: str,
                 printer_call: Callable[[TicketLayout], object] | None, clock: Clock,
                 clock_trusted: Callable[[], bool]) -> None:
        self.store = store
        self.device = device
        self.prefix = prefix
        self.hall_name = hall_name
        self.printer_call = printer_call
        self.clock = clock
        self.clock_trusted = clock_trusted

    def issue(self, req: IssueRequest) -> tuple[OutboxEntry, str | None]:
        """Returns the committed entry and, when printing failed, why."""
        trusted = self.clock_trusted()
        now_ms = int(self.clock.wall() * 1000)
        if trusted:
            self.store.reset_numbers_if_new_day(time.strftime("%Y-%m-%d", time.localtime(now_ms / 1000)))
        waiting = self.store.waiting_count(req.service)

        def make_body(num: TicketNumber) -> dict:
            return {
                "ticket_uid": num.uid(self.device), "ticket_id": num.display,
                "service": req.service, "service_name": req.service_name,
                "number": num.number, "serial": num.serial,
                "issued_at_ms": now_ms, "clock_trusted": trusted,
                "waiting_ahead": waiting, "priority": req.priority,
                "appointment_id": req.appointment_id, "citizen": req.citizen,
                "source": req.source, "printed": "unknown",
            }

        claim = None
        if req.appointment_id is not None:
            claim = (req.appointment_id, req.appointment_expires_ms or now_ms)
        entry = self.store.commit_ticket(req.service, self.prefix, make_body, claim=claim)
        crash_point("after_commit")
        failure = self._print(entry, req, waiting, now_ms, trusted)
        crash_point("after_print")
        return entry, failure

    def _print(self, entry: OutboxEntry, req: IssueRequest, waiting: int, now_ms: int,
               trusted: bool) -> str | None:
        if self.printer_call is None:
            self.store.set_printed(entry.uid, "no")
            return "no printer"
        notice = None
        if req.priority == "appointment":
            notice = "Appointment"
        if not trusted:
            notice = "Time not verified" if notice is None else f"{notice} - time not verified"
        layout = TicketLayout(
            hall_name=self.hall_name, service_name=req.service_name,
            ticket_number=entry.ticket_id,
            issued_at=time.strftime("%Y-%m-%d %H:%M", time.localtime(now_ms / 1000)),
            waiting_ahead=waiting, qr_data=entry.uid, notice=notice)
        try:
            self.printer_call(layout)
        except PrinterNotReady as exc:
            # Refused before a byte was written: certainly not printed.
            self.store.set_printed(entry.uid, "no")
            return str(exc)
        except DeviceError as exc:
            # Failed during or after the write (e.g. no status answer afterwards): the paper
            # may well be out. Never reprinted automatically, so "unknown", not "no".
            self.store.set_printed(entry.uid, "unknown")
            return str(exc)
        self.store.set_printed(entry.uid, "yes")
        return None


class OutboxSender:
    """Publishes outbox entries and deletes them when the hall's consumer acknowledges them."""

    def __init__(self, *, store: KioskStore, publisher: Publisher, keyring: Keyring,
                 clock: Clock, resend_after_s: float = 15.0) -> None:
        self.store = store
        self.publisher = publisher
        self.keyring = keyring
        self.clock = clock
        self.resend_after_s = resend_after_s
        self.tracker = SequenceTracker()
        self._inflight: dict[int, str] = {}     # mid -> ticket uid (PUBACK bookkeeping)
        self._sent_mono: dict[str, float] = {}  # uid -> monotonic time of the last send
        self._next_check: float | None = None

    def send(self, entry: OutboxEntry) -> bool:
        body = dict(entry.body)
        current = self.store.get(entry.uid)
        if current is None:          # acked meanwhile
            return True
        body["printed"] = current.printed
        try:
            mid = self.publisher.send(self.publisher.topics.ticket, "ticket", body, qos=1)
        except NotConnected:
            return False
        self._inflight[mid] = entry.uid
        self._sent_mono[entry.uid] = self.clock.monotonic()
        self.store.mark_sent(entry.uid)
        self._arm()
        return True

    def flush(self) -> int:
        """Send every unacknowledged entry (after connect / restart). Returns how many went."""
        sent = 0
        for entry in self.store.pending():
            if not self.send(entry):
                break
            sent += 1
        return sent

    def on_publish_done(self, mid: int, ok: bool, reason: str) -> None:
        uid = self._inflight.pop(mid, None)
        if uid is not None and not ok:
            # The broker refused it (e.g. 0x87 not authorised): it stays in the outbox and
            # goes again at the next resend check; the refusal is logged for ops.
            log.warning("ticket %s refused by the broker: %s", uid, reason)

    def on_ack(self, payload: bytes, topic: str) -> str | None:
        """Verify an ack; returns the acknowledged uid, or None (and logs why) if refused."""
        try:
            v = verify(payload, topic, self.keyring, tracker=self.tracker,
                       expect_type="ticket_ack", require_role="consumer")
        except ReplayError as exc:
            log.info("ignored a replayed ticket ack: %s", exc)
            return None
        except ContractError as exc:
            log.warning("refused a ticket ack: %s", exc)
            return None
        uid = v.body["ticket_uid"]
        self.store.ack(uid)
        self._sent_mono.pop(uid, None)
        return uid

    def _arm(self) -> None:
        if self._next_check is None:
            self._next_check = self.clock.monotonic() + self.resend_after_s

    def next_deadline(self) -> float | None:
        return self._next_check

    def tick(self) -> None:
        """At the deadline: re-send what has waited for an ack longer than resend_after_s."""
        if self._next_check is None or self.clock.monotonic() < self._next_check:
            return
        self._next_check = None
        now = self.clock.monotonic()
        for entry in self.store.pending():
            last = self._sent_mono.get(entry.uid)
            if last is None or now - last >= self.resend_after_s:
                if not self.send(entry):
                    break
        if self.store.depth():
            self._arm()
