"""The agent: wires config, devices, the store and the MQTT link, and runs the main loop.

One thread owns all state: this loop. Device threads and library callbacks only put events
on ``self.events``; the loop waits on that queue with a timeout equal to the next deadline
(session timeout, ack resend), so an idle kiosk sleeps. No busy polling anywhere.
"""

from __future__ import annotations

import datetime as dt
import logging
import queue
import secrets
import signal
import threading
import time

from edge.clock import SYSTEM_CLOCK, Clock
from edge.config import AgentConfig
from edge.events import ButtonPressed, CardRead, DeviceFault, DeviceRecovered, Stop
from edge.gpio import Indication, ServicePanel, make_pin_factory
from edge.idcard_worker import CardUnreadable, IdCardWorker
from edge.keys import load_private_key, load_secret, public_from_raw
from edge.mqtt import LinkDown, LinkMessage, LinkUp, MqttLink, PublishDone, Will
from edge.printing import PrinterHandle
from edge.publisher import Publisher
from edge.session import Phase, SessionMachine
from edge.store import KioskStore
from edge.tickets import IssueRequest, OutboxSender, TicketDesk
from edge.timecheck import clock_trusted
from hallkiosk import __version__
from hallkiosk.errors import CardError, DeviceError
from mqtt_topics.envelope import Keyring, Signer
from mqtt_topics.topics import KioskTopics

log = logging.getLogger("hallkiosk.agent")

#: How often an idle kiosk asks its printer for status (three one-byte exchanges).
PRINTER_CHECK_S = 30.0


class Agent:
    def __init__(self, cfg: AgentConfig, *, clock: Clock = SYSTEM_CLOCK, pin_factory=None,
                 on_ready=None) -> None:
        self.cfg = cfg
        self.clock = clock
        self.events: queue.Queue[object] = queue.Queue()
        self.boot_id = secrets.token_hex(16)
        self.topics = KioskTopics(cfg.kiosk.hall, cfg.kiosk.device_id)
        self._stopping = threading.Event()
        self._on_ready = on_ready
        self._session_no = 0
        self.ready = threading.Event()
        self._printer_flags: frozenset[str] = frozenset()
        self._next_printer_check = 0.0

        self.secret = load_secret(cfg.hall.citizen_hash_secret_file)
        key = load_private_key(cfg.keys.device_key)
        self.store = KioskStore(cfg.kiosk.state_dir / "kiosk.sqlite", clock=clock)
        self.signer = Signer(key, sender=cfg.kiosk.device_id, boot_id=self.boot_id,
                             next_seq=self.store.next_seq, clock=clock)
        self.keyring = Keyring()
        for t in cfg.keys.trusted:
            self.keyring.add(public_from_raw(t.public_key), owner=t.owner, roles=(t.role,))

        b = cfg.broker
        self.link = MqttLink(client_id=b.client_id or cfg.kiosk.device_id, host=b.host, port=b.port,
                             sink=self.events.put, keepalive_s=b.keepalive_s,
                             reconnect_min_s=b.reconnect_min_s, reconnect_max_s=b.reconnect_max_s,
                             subscriptions=((self.topics.ticket_ack, 1),),
                             make_will=self._make_will, name=cfg.kiosk.device_id)
        self.publisher = Publisher(self.link, self.signer, self.topics)
        self.printer = PrinterHandle(cfg.printer.port, timeout_s=cfg.printer.timeout_s,
                                     encoding=cfg.printer.encoding, clock=clock)
        self.desk = TicketDesk(store=self.store, device=cfg.kiosk.device_id,
                               prefix=cfg.kiosk.number_prefix, hall_name=cfg.hall.name,
                               printer_call=self.printer.print_ticket, clock=clock,
                               clock_trusted=(clock_trusted if cfg.clock.trust == "kernel"
                                              else lambda: True))
        self.sender = OutboxSender(store=self.store, publisher=self.publisher,
                                   keyring=self.keyring, clock=clock)
        self.machine = SessionMachine(tuple(s.category for s in cfg.services),
                                      choose_timeout_s=cfg.session.choose_timeout_s, clock=clock)
        board = cfg.board
        used = {s.button for s in cfg.services}
        factory = pin_factory if pin_factory is not None else make_pin_factory(cfg.gpio.pin_factory)
        self.panel = ServicePanel({r: p for r, p in board.service_buttons.items() if r in used},
                                  {r: p for r, p in board.service_leds.items() if r in used},
                                  board.status_led, sink=self.events.put, pin_factory=factory)
        self.reader = IdCardWorker(cfg.reader.port, sink=self.events.put,
                                   poll_interval_s=cfg.reader.poll_interval_s,
                                   timeout_s=cfg.reader.timeout_s, clock=clock)

    # -- birth and death ------------------------------------------------------------------
    def _state_body(self, status: str, reason: str | None = None) -> dict:
        return {"status": status, "session": self._session_no, "agent_version": __version__,
                "since_ms": int(self.clock.wall() * 1000), "reason": reason,
                "services": [s.category for s in self.cfg.services] if status == "online" else []}

    def _make_will(self) -> Will:
        """On the link thread, before each new connection: the death certificate for it."""
        self._session_no = self.store.session_counter()
        body = self._state_body("offline", "connection lost")
        return Will(self.topics.state, self.signer.seal(self.topics.state, "state", body))

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        self.reader.start()
        self.link.start()
        self.panel.show(Indication.READY)
        self.ready.set()
        log.info("ready device=%s hall=%s boot=%s outbox=%d", self.cfg.kiosk.device_id,
                 self.cfg.kiosk.hall, self.boot_id, self.store.depth())
        if self._on_ready is not None:
            self._on_ready()

    def stop(self, reason: str = "requested") -> None:
        self.events.put(Stop(reason))

    def run(self, *, install_signals: bool = False) -> None:
        if install_signals:
            signal.signal(signal.SIGTERM, lambda *_: self.stop("SIGTERM"))
            signal.signal(signal.SIGINT, lambda *_: self.stop("SIGINT"))
        self.start()
        try:
            while not self._stopping.is_set():
                try:
                    event = self.events.get(timeout=self._timeout())
                except queue.Empty:
                    event = None
                if event is not None:
                    self._handle(event)
                self._tick()
        finally:
            self._shutdown()

    def _timeout(self) -> float | None:
        deadlines = [d for d in (self.machine.next_deadline(), self.sender.next_deadline(),
                                 self._next_printer_check) if d is not None]
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - self.clock.monotonic())

    def _tick(self) -> None:
        if self.machine.expire():
            self.panel.show(Indication.READY)
            self.publisher.event("session_timeout", "info", "session")
        self.sender.tick()
        if self.clock.monotonic() >= self._next_printer_check:
            self._check_printer()

    def _check_printer(self) -> None:
        """Ask the printer how it is while idle, so ops hear of paper out before a citizen."""
        self._next_printer_check = self.clock.monotonic() + PRINTER_CHECK_S
        try:
            self._note_printer(self.printer.status())
        except DeviceError as exc:
            self._note_printer_error(exc)

    def _note_printer(self, status) -> None:
        """Publish each printer flag the moment it appears or clears (not at the next poll)."""
        flags = frozenset(status.faults) | frozenset(status.warnings)
        if "unreachable" in self._printer_flags:
            self.publisher.event("device_recovered", "info", "ticket-printer")
        for flag in sorted(flags - self._printer_flags):
            severity = "fault" if flag in status.faults else "warning"
            self.publisher.event(f"printer_{flag}", severity, "ticket-printer")
        for flag in sorted(self._printer_flags - flags - {"unreachable"}):
            self.publisher.event(f"printer_{flag}_cleared", "info", "ticket-printer")
        self._printer_flags = flags

    def _note_printer_error(self, exc: DeviceError) -> None:
        if "unreachable" not in self._printer_flags:
            self.publisher.event("device_fault", "fault", "ticket-printer",
                                 fault=type(exc).__name__, detail=str(exc))
        self._printer_flags = frozenset({"unreachable"})

    def _shutdown(self) -> None:
        self.reader.stop()
        if self.machine.phase is not Phase.IDLE:
            self.machine.end()
        try:
            self.publisher.send(self.topics.state, "state",
                                self._state_body("offline", "agent stopped"), qos=1, retain=True)
        except Exception:
            log.info("offline state not published (broker unreachable)")
        self.link.stop()
        self.panel.close()
        self.printer.close()
        self.store.close()
        log.info("stopped")

    # -- events --------------------------------------------------------------------------------
    def _handle(self, ev: object) -> None:
        if isinstance(ev, CardRead):
            self._on_card(ev)
        elif isinstance(ev, ButtonPressed):
            svc = self.cfg.service_by_button(ev.role)
            if svc is not None and self.machine.choose(svc.category):
                self._issue()
        elif isinstance(ev, LinkMessage):
            if ev.topic == self.topics.ticket_ack:
                self.sender.on_ack(ev.payload, ev.topic)
        elif isinstance(ev, PublishDone):
            self.sender.on_publish_done(ev.mid, ev.ok, ev.reason)
        elif isinstance(ev, LinkUp):
            self._on_link_up(ev)
        elif isinstance(ev, LinkDown):
            log.warning("broker link down: %s (outbox %d)", ev.reason, self.store.depth())
        elif isinstance(ev, CardUnreadable):
            self.publisher.event("card_unreadable", "info", "idcard-reader", reason=ev.reason)
        elif isinstance(ev, DeviceFault):
            self.publisher.event("device_fault", "fault", ev.device, fault=ev.fault, detail=ev.detail)
        elif isinstance(ev, DeviceRecovered):
            self.publisher.event("device_recovered", "info", ev.device)
        elif isinstance(ev, Stop):
            log.info("stopping: %s", ev.reason)
            self._stopping.set()

    def _on_link_up(self, ev: LinkUp) -> None:
        log.info("broker link up session=%d session_present=%s", self._session_no, ev.session_present)
        try:
            self.publisher.send(self.topics.state, "state", self._state_body("online"), qos=1, retain=True)
        except Exception:
            log.warning("birth message not published", exc_info=True)
        sent = self.sender.flush()
        if sent:
            log.info("re-sent %d unacknowledged tickets", sent)
        self.publisher.flush_events()

    def _on_card(self, ev: CardRead) -> None:
        card = ev.card
        try:
            card.validate(dt.date.fromtimestamp(self.clock.wall()))
        except CardError as exc:
            card.wipe()
            self.publisher.event("card_rejected", "info", "idcard-reader", reason=str(exc))
            return
        citizen = card.identity_hash(self.secret)
        phase = self.machine.begin("idcard", citizen, card)
        if phase is Phase.ISSUING:
            self._issue()
        elif phase is Phase.CHOOSING:
            buttons = tuple(s.button for s in self.cfg.services)
            self.panel.show(Indication.CHOOSE, buttons)

    def _issue(self) -> None:
        session = self.machine.session
        if session is None or session.service is None:
            return
        svc = self.cfg.service(session.service)
        self.panel.show(Indication.ISSUING, (svc.button,))
        try:
            status = self.printer.status()
            self._note_printer(status)
            if not status.ok_to_print:
                self.publisher.event("ticket_refused", "warning", "ticket-printer",
                                     reason="printer not ready: " + ",".join(status.faults))
                return
            entry, failure = self.desk.issue(IssueRequest(
                service=svc.category, service_name=svc.name, citizen=session.citizen,
                source=session.source))
            if self.printer.last_status is not None:
                self._note_printer(self.printer.last_status)
            if failure:
                self.publisher.event("print_failed", "fault", "ticket-printer", ticket=entry.ticket_id,
                                     reason=failure)
            self.sender.send(entry)
            log.info("ticket %s issued (printed=%s)", entry.ticket_id, failure is None)
        except DeviceError as exc:
            self._note_printer_error(exc)
            self.publisher.event("ticket_refused", "warning", "ticket-printer", reason=str(exc))
        finally:
            self.machine.end()
            self.panel.show(Indication.READY)
