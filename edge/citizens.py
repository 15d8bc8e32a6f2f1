"""Serving citizens: identification (ID card, later QR), the choice of service, the ticket.

The main loop hands every citizen-facing event here. The session machine (edge.session) keeps
personal data for the length of a session only; this module decides what the kiosk may offer
now (the service mode from edge.status) and drives the front panel.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Callable

from edge.clock import Clock
from edge.config import AgentConfig
from edge.degraded import ServiceMode
from edge.gpio import Indication, ServicePanel
from edge.health import PRINTER, printer_level
from edge.printing import PrinterHandle
from edge.publisher import Publisher
from edge.session import Phase, SessionMachine
from edge.store import CodeAlreadyUsed
from edge.tickets import IssueRequest, OutboxSender, TicketDesk
from hallkiosk.errors import CardError, DeviceError

log = logging.getLogger("hallkiosk.citizens")


class CitizenDesk:
    def __init__(self, *, cfg: AgentConfig, machine: SessionMachine, desk: TicketDesk,
                 sender: OutboxSender, publisher: Publisher, panel: ServicePanel,
                 printer: PrinterHandle, secret: bytes, clock: Clock,
                 mode: Callable[[], ServiceMode],
                 on_printer: Callable[[object, BaseException | None], None],
                 store=None, clock_trusted: Callable[[], bool] = lambda: True) -> None:
        self.cfg = cfg
        self.machine = machine
        self.desk = desk
        self.sender = sender
        self.publisher = publisher
        self.panel = panel
        self.printer = printer
        self.secret = secret
        self.clock = clock
        self._mode = mode
        self._on_printer = on_printer
        self.accepting = True            # False once SIGTERM arrived: no new citizens
        self.store = store
        self.clock_trusted = clock_trusted
        from edge.keys import public_from_raw
        from edge.qr.codes import trusted_keys

        self._booking = trusted_keys([public_from_raw(k) for k in cfg.qr.booking_keys])
        self._eid = trusted_keys([public_from_raw(k) for k in cfg.qr.eid_keys])

    # -- identification -------------------------------------------------------------------
    def on_card(self, card) -> None:
        mode = self._mode()
        if not self.accepting or not mode.card_ok:
            card.wipe()
            why = "shutting down" if not self.accepting else (mode.reason or "not offered")
            self.publisher.event("citizen_refused", "info", "idcard-reader", reason=why,
                                 direct_to=mode.direct_to)
            return
        try:
            card.validate(dt.date.fromtimestamp(self.clock.wall()))
        except CardError as exc:
            card.wipe()
            self.publisher.event("card_rejected", "info", "idcard-reader", reason=str(exc))
            return
        self._begin("idcard", card.identity_hash(self.secret), card)

    def on_qr(self, payload: bytes, source: str) -> None:
        """A QR code from the camera or the scanner: untrusted input. Never logged or echoed;
        only the refusal's reason word is published."""
        from edge.qr.codes import Appointment, QrRefused, parse_qr

        subject = f"qr-{source}"
        mode = self._mode()
        if not self.accepting or not mode.qr_ok:
            why = "shutting down" if not self.accepting else (mode.reason or "not offered")
            self.publisher.event("citizen_refused", "info", subject, reason=why,
                                 direct_to=mode.direct_to)
            return
        if not self.clock_trusted():
            # Validity windows cannot be judged on a clock that may be years off.
            self.publisher.event("qr_refused", "info", subject, reason="clock_not_trusted")
            return
        now_ms = int(self.clock.wall() * 1000)
        used = (lambda code_id: self.store.code_used(code_id, now_ms)) if self.store else None
        try:
            code = parse_qr(payload, booking_keys=self._booking, eid_keys=self._eid,
                            hall=self.cfg.kiosk.hall, now_ms=now_ms, used=used,
                            leeway_s=self.cfg.qr.leeway_s)
        except QrRefused as exc:
            self.publisher.event("qr_refused", "info", subject, reason=exc.reason)
            return
        if isinstance(code, Appointment):
            if code.service not in self.machine.categories:
                self.publisher.event("qr_refused", "info", subject, reason="service_not_offered")
                return
            if self.machine.begin("qr", None, service=code.service) is Phase.ISSUING:
                self.issue(priority="appointment", appointment_id=code.appointment_id,
                           appointment_expires_ms=code.accepted_until_ms(self.cfg.qr.leeway_s))
            return
        self._begin("qr", code.identity_hash(self.secret), code)      # a citizen's e-ID

    def _begin(self, source: str, citizen: str | None, personal=None) -> None:
        phase = self.machine.begin(source, citizen, personal)
        if phase is Phase.ISSUING:
            self.issue()
        elif phase is Phase.CHOOSING:
            self.panel.show(Indication.CHOOSE, tuple(s.button for s in self.cfg.services))

    def on_button(self, role: str) -> None:
        svc = self.cfg.service_by_button(role)
        if svc is not None and self.machine.choose(svc.category):
            self.issue()

    def tick(self) -> None:
        if self.machine.expire():
            self.show_idle()
            self.publisher.event("session_timeout", "info", "session")

    def end_session(self, why: str) -> None:
        """End (and wipe) any session now: a cell became vacant, or the agent stops."""
        if self.machine.phase is not Phase.IDLE:
            self.machine.end()
            self.publisher.event("session_ended", "info", "session", reason=why)
        self.show_idle()

    def show_idle(self) -> None:
        mode = self._mode()
        self.panel.show(Indication.READY if mode.offers_tickets else Indication.OUT_OF_SERVICE)

    def next_deadline(self) -> float | None:
        return self.machine.next_deadline()

    # -- the ticket ------------------------------------------------------------------------------
    def issue(self, *, priority: str = "normal", appointment_id: str | None = None,
              appointment_expires_ms: int | None = None) -> None:
        session = self.machine.session
        if session is None or session.service is None:
            return
        svc = self.cfg.service(session.service)
        self.panel.show(Indication.ISSUING, (svc.button,))
        try:
            # Ask first: a ticket is committed only when there is paper to print it on.
            try:
                status = self.printer.status()
            except DeviceError as exc:
                self._on_printer(None, exc)
                raise
            self._on_printer(status, None)
            if not status.ok_to_print:
                self.publisher.event("ticket_refused", "warning", "ticket-printer",
                                     reason="printer not ready: " + ",".join(status.faults))
                return
            entry, failure = self.desk.issue(IssueRequest(
                service=svc.category, service_name=svc.name, citizen=session.citizen,
                source=session.source, priority=priority, appointment_id=appointment_id,
                appointment_expires_ms=appointment_expires_ms))
            if failure:
                self._on_printer(None, DeviceError(failure))
                self.publisher.event("print_failed", "fault", "ticket-printer",
                                     ticket=entry.ticket_id, reason=failure)
            elif self.printer.last_status is not None:
                self._on_printer(self.printer.last_status, None)
            self.sender.send(entry)
            log.info("ticket %s issued (printed=%s)", entry.ticket_id, failure is None)
        except CodeAlreadyUsed:
            self.publisher.event("qr_refused", "info", "qr-code", reason="already_used")
        except DeviceError as exc:
            self.publisher.event("ticket_refused", "warning", "ticket-printer", reason=str(exc))
        finally:
            self.machine.end()
            self.show_idle()


__all__ = ["CitizenDesk", "PRINTER", "printer_level"]
