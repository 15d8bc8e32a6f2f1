"""The agent: wires config, devices, the store and the MQTT link, and runs the main loop.

One thread owns all state: this loop. Device threads and library callbacks only put events
on ``self.events``; the loop waits on that queue with a timeout equal to the next deadline
(session timeout, ack resend, printer poll, watchdog, link probe), so an idle kiosk sleeps.
No busy polling anywhere.
"""

from __future__ import annotations

import json
import logging
import queue
import secrets
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

from edge.citizens import CitizenDesk
from edge.clock import SYSTEM_CLOCK, Clock
from edge.config import AgentConfig, load_config
from edge.events import ButtonPressed, CardRead, DeviceFault, DeviceRecovered, Stop
from edge.gpio import Indication, ServicePanel, make_pin_factory
from edge.health import BROKER, CLOCK, PRINTER, READER, STORE, Health, PollSchedule, printer_level
from edge.idcard_worker import CardUnreadable, IdCardWorker
from edge.keys import load_private_key, load_secret, public_from_raw
from edge.footprint import release_startup_memory
from edge.commands import CommandGate, Refusal
from edge.mqtt import LinkDown, LinkMessage, LinkUp, MqttLink, PublishDone, Will
from edge.printing import PrinterHandle
from edge.peripherals import Peripherals
from edge.publisher import Publisher
from edge.qr import QrScanned, QrUnreadable
from edge.staffcall import StaffCallPressed
from edge.remote import RemoteCommands
from edge.sdnotify import Notifier
from edge.session import SessionMachine
from edge.status import KioskStatus
from edge.store import KioskStore
from edge.tickets import OutboxSender, TicketDesk
from edge.telemetry import SystemPaths, TelemetryBuilder, TelemetrySchedule, printer_health, telemetry_key
from edge.timecheck import clock_trusted
from edge.update.kiosk import KioskUpdates, KioskView
from hallkiosk import __version__
from hallkiosk.errors import ConfigError, StateError
from mqtt_topics.envelope import Keyring, Signer
from mqtt_topics.topics import KioskTopics

log = logging.getLogger("hallkiosk.agent")


@dataclass(frozen=True, slots=True)
class Reload:
    """SIGHUP: reread the config file."""


class Agent:
    def __init__(self, cfg: AgentConfig, *, clock: Clock = SYSTEM_CLOCK, pin_factory=None,
                 notifier: Notifier | None = None, frame_source=None) -> None:
        self.cfg = cfg
        self.clock = clock
        self.events: queue.Queue[object] = queue.Queue()
        self.boot_id = secrets.token_hex(16)
        self.topics = KioskTopics(cfg.kiosk.hall, cfg.kiosk.device_id)
        self.notifier = notifier or Notifier.from_env(unset=True)
        self.ready = threading.Event()
        self.next_config: AgentConfig | None = None     # set when a reload was accepted
        self._stopping = threading.Event()
        self._printer_flags: frozenset[str] = frozenset()
        ua = cfg.unattended

        tls_check = self._start_tls_check(cfg)      # runs while the rest starts
        self.secret = load_secret(cfg.hall.citizen_hash_secret_file)
        key = load_private_key(cfg.keys.device_key)
        self.store = KioskStore(cfg.kiosk.state_dir / "kiosk.sqlite", clock=clock)
        self.signer = Signer(key, sender=cfg.kiosk.device_id, boot_id=self.boot_id,
                             next_seq=self.store.next_seq, clock=clock)
        self.keyring = Keyring()
        for t in cfg.keys.trusted:
            self.keyring.add(public_from_raw(t.public_key), owner=t.owner, roles=(t.role,))
        tls = self._load_tls(tls_check)
        self.gate = CommandGate(cfg.kiosk.device_id, self.keyring, clock, cfg.commands.window_s,
                                hall=cfg.kiosk.hall,
                                nonce_file=cfg.kiosk.state_dir / "cmd-nonces.json")
        self.remote = RemoteCommands(self)
        # None when the kiosk has no update.toml (signed updates not provisioned).
        self.updates = KioskUpdates.for_agent_config(cfg.source)

        b = cfg.broker
        self.link = MqttLink(client_id=b.client_id, host=b.host, port=b.port,
                             sink=self.events.put, keepalive_s=b.keepalive_s,
                             reconnect_min_s=b.reconnect_min_s, reconnect_max_s=b.reconnect_max_s,
                             subscriptions=((self.topics.ticket_ack, 1), (self.topics.cmd, 1)),
                             make_will=self._make_will, tls=tls, name=cfg.kiosk.device_id)
        self.publisher = Publisher(self.link, self.signer, self.topics)
        factory = pin_factory if pin_factory is not None else make_pin_factory(cfg.gpio.pin_factory)
        self.extras = Peripherals(cfg, sink=self.events.put, clock=clock, pin_factory=factory,
                                  frame_source=frame_source)
        self.cell = self.extras.cell
        self.staff_call = self.extras.staff
        self.health = Health((READER, PRINTER, BROKER, STORE, CLOCK, *self.extras.parts), clock=clock,
                             loop_stall_s=ua.loop_stall_s,
                             link_probe_interval_s=ua.link_probe_interval_s,
                             link_probe_timeout_s=ua.link_probe_timeout_s)
        self.poll = PollSchedule(ok_interval_s=ua.printer_check_s,
                                 down_interval_s=ua.printer_recheck_s, clock=clock)
        categories = tuple(s.category for s in cfg.services)
        self.status = KioskStatus(health=self.health, notifier=self.notifier,
                                  publisher=self.publisher, categories=categories,
                                  direct_to=ua.direct_to, clock=clock, on_mode=self._on_mode,
                                  extra=self._state_extra)
        self.printer = PrinterHandle(cfg.printer.port, timeout_s=cfg.printer.timeout_s,
                                     encoding=cfg.printer.encoding, clock=clock)
        self._trusted = clock_trusted if cfg.clock.trust == "kernel" else (lambda: True)
        desk = TicketDesk(store=self.store, device=cfg.kiosk.device_id,
                          prefix=cfg.kiosk.number_prefix, hall_name=cfg.hall.name,
                          printer_call=self.printer.print_ticket, clock=clock,
                          clock_trusted=self._trusted)
        self.sender = OutboxSender(store=self.store, publisher=self.publisher,
                                   keyring=self.keyring, clock=clock)
        self.machine = SessionMachine(categories, choose_timeout_s=cfg.session.choose_timeout_s,
                                      clock=clock)
        board = cfg.board
        used = {s.button for s in cfg.services}
        self.panel = ServicePanel({r: p for r, p in board.service_buttons.items() if r in used},
                                  {r: p for r, p in board.service_leds.items() if r in used},
                                  board.status_led, sink=self.events.put, pin_factory=factory)
        self.citizens = CitizenDesk(cfg=cfg, machine=self.machine, desk=desk, sender=self.sender,
                                    publisher=self.publisher, panel=self.panel,
                                    printer=self.printer, secret=self.secret, clock=clock,
                                    mode=lambda: self.status.mode, on_printer=self._on_printer,
                                    store=self.store, clock_trusted=self._trusted)
        self._session_active = False
        self._memory_released = False
        self.telemetry = TelemetryBuilder(
            agent_version=__version__, config_hash=cfg.digest[:16], clock=clock,
            outbox=lambda: (self.store.depth(), self.store.oldest_age_s(int(self.clock.wall() * 1000))),
            peripherals={name: self._probe(name) for name in self.health.snapshot()
                         if name not in (BROKER, STORE)},
            paths=SystemPaths(disk=cfg.kiosk.state_dir))     # free space where the outbox lives
        self.telemetry_schedule = TelemetrySchedule(cfg.telemetry.interval_s, clock=clock,
                                                    first_after_s=1.0)
        self.reader = IdCardWorker(cfg.reader.port, sink=self.events.put,
                                   poll_interval_s=cfg.reader.poll_interval_s,
                                   timeout_s=cfg.reader.timeout_s, clock=clock)

    def _start_tls_check(self, cfg: AgentConfig):
        """Start the certificate checks (edge.tls.TlsCheck, a helper process: the agent itself
        never imports X.509 code); _load_tls reads the answer."""
        if cfg.tls is None:
            return None
        from edge.tls import TlsCheck

        t = cfg.tls
        return TlsCheck(ca_file=t.ca_file, cert_file=t.cert_file, key_file=cfg.keys.device_key,
                        crl_file=t.crl_file, device_id=cfg.kiosk.device_id,
                        warn_days=t.warn_days, trusted_certs=t.trusted_certs,
                        trusted_roles=("consumer", "ops"), clock=self.clock).start()

    def _load_tls(self, check):
        """mTLS settings, and the hall services' keys from their certificates (chain + CRL
        checked in the helper)."""
        if check is None:
            return None
        checked, trusted = check.result()
        for t in trusted:
            self.keyring.add(t.raw, owner=t.owner, roles=t.roles)
        return checked.settings

    def _probe(self, name: str):
        """The telemetry health object of one part: the printer's own, the others from the
        health model (ok / fault / warning words, the convention ops relies on)."""
        if name == PRINTER:
            def printer() -> dict:
                level = self.health.get(PRINTER)
                error = level.reason if level is not None and level.level.value == "down" else None
                return printer_health(self.printer.last_status if error is None else None, error=error)
            return printer

        def part() -> dict:
            c = self.health.get(name)
            if c is None:
                return {"ok": True, "fault": None, "warning": None}
            word = telemetry_key(c.reason or "")[:32] or None
            return {"ok": c.level.value != "down",
                    "fault": word if c.level.value == "down" else None,
                    "warning": word if c.level.value == "degraded" else None}
        return part

    # -- birth and death ------------------------------------------------------------------
    def _make_will(self) -> Will:
        """On the link thread, before each new connection: the death certificate for it."""
        self.status.session_no = self.store.session_counter()
        payload = self.signer.seal(self.topics.state, "state",
                                   self.status.state_body(offline_reason="connection lost"))
        self.status.will_seq = json.loads(payload)["seq"]
        return Will(self.topics.state, payload)

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        self.reader.start()
        self.extras.start()
        self.link.start()
        self.health.watch_thread("idcard-worker", self.reader.is_alive)
        self.health.watch_thread("mqtt-link", lambda: self.link.alive)
        self.health.loop_tick()
        self.citizens.show_idle()
        self.ready.set()
        self.notifier.ready(self.status.status_line())
        log.info("ready device=%s hall=%s boot=%s outbox=%d", self.cfg.kiosk.device_id,
                 self.cfg.kiosk.hall, self.boot_id, self.store.depth())

    def stop(self, reason: str = "requested") -> None:
        self.events.put(Stop(reason))

    def reload(self) -> None:
        self.events.put(Reload())

    def run(self, *, install_signals: bool = False) -> AgentConfig | None:
        """Run until stopped. Returns the new config when a SIGHUP reload was accepted
        (the caller builds a fresh Agent from it), None on a stop."""
        if install_signals:
            signal.signal(signal.SIGTERM, lambda *_: self.stop("SIGTERM"))
            signal.signal(signal.SIGINT, lambda *_: self.stop("SIGINT"))
            signal.signal(signal.SIGHUP, lambda *_: self.reload())
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
        return self.next_config

    def _timeout(self) -> float | None:
        deadlines = [d for d in (self.citizens.next_deadline(), self.sender.next_deadline(),
                                 self.poll.next_deadline()) if d is not None]
        deadlines += self.status.deadlines()
        if self.link.connected:
            # Only while connected: a deadline that cannot be served would spin the loop.
            deadlines.append(self.telemetry_schedule.next_deadline())
        if self.cell is not None and self.cell.next_deadline() is not None:
            deadlines.append(self.cell.next_deadline())
        # The watchdog's liveness check wants a turn at least every loop_stall_s / 2.
        deadlines.append(self.clock.monotonic() + self.cfg.unattended.loop_stall_s / 2)
        return max(0.0, min(deadlines) - self.clock.monotonic())

    def _tick(self) -> None:
        self.citizens.tick()
        if self.cell is not None:
            self._cell_update(self.cell.tick())
        self._sync_cell_session()
        try:
            self.sender.tick()
        except StateError as exc:
            self._store_failed(exc)
        if self.poll.due():
            self._check_printer()
        changed = (self.health.ok(CLOCK) if self._trusted()
                   else self.health.degraded(CLOCK, "not synchronised"))
        if changed:
            self.status.refresh()
        self.status.tick()
        # Connected first: a slot that falls while the link is down is not used up, and the
        # next connection sends telemetry with its birth (_on_link_up).
        if self.link.connected and self.telemetry_schedule.due():
            try:
                self.publisher.send(self.topics.telemetry, "telemetry", self.telemetry.build(), qos=0)
            except Exception:  # telemetry must never stop the kiosk
                log.warning("telemetry not published", exc_info=True)
        if self.updates is not None:
            self._update_tick()

    # -- updates (edge.update.kiosk) ------------------------------------------------------------
    def _state_extra(self) -> dict:
        extra = self.cell.state_extra() if self.cell else {}
        if self.updates is not None:
            extra = {**extra, **self.updates.fields()}
        return extra

    def update_view(self) -> KioskView:
        """What the update gate checks: READY, broker link, reader and printer self-tests
        (the reader's SAM answered its status query; the printer answered a status poll and
        is not down), outbox drained, no citizen in session."""
        printer = self.health.get(PRINTER)
        reader = self.health.get(READER)
        return KioskView(
            ready=self.ready.is_set(), link_up=self.link.connected,
            reader_ok=bool(self.reader.healthy) and (reader is None or reader.level.value != "down"),
            printer_ok=self.printer.last_status is not None
            and (printer is None or printer.level.value != "down"),
            outbox_depth=self.store.depth(), in_session=self.machine.active)

    def _update_tick(self) -> None:
        try:
            t = self.updates.tick(self.update_view())
        except Exception:  # an update problem must never stop the kiosk serving citizens
            log.warning("update step failed", exc_info=True)
            return
        for name, severity, detail in t.events:
            self.publisher.event(name, severity, "update", **detail)
        if t.state_changed:
            self.status.publish_state()
        if t.exit_reason is not None:
            self.citizens.accepting = False
            self.stop(t.exit_reason)

    def _shutdown(self) -> None:
        """SIGTERM: no new citizens, the ticket in progress is already done (the loop is
        single-threaded), flush the outbox, say offline, close devices."""
        reloading = self.next_config is not None
        self.citizens.accepting = False
        if not reloading:
            self.notifier.stopping("stopping")
        self.citizens.end_session("agent stopping")
        self.reader.stop()
        self.extras.stop()
        self._drain_acks(min(3.0, self.cfg.unattended.stop_timeout_s / 2))
        if not reloading and not self.status.publish_offline("agent stopped"):
            log.info("offline state not published (broker unreachable)")
        self.link.stop()
        self.panel.close()
        self.printer.close()
        self.store.close()
        log.info("stopped (outbox kept for the next start)" if not reloading else "reloading")

    def _drain_acks(self, budget_s: float) -> None:
        """Send what is unacknowledged and give acks a moment to arrive before leaving."""
        if not self.link.connected or self.store.depth() == 0:
            return
        self.sender.flush()
        deadline = self.clock.monotonic() + budget_s
        while self.store.depth() and self.clock.monotonic() < deadline:
            try:
                ev = self.events.get(timeout=max(0.0, deadline - self.clock.monotonic()))
            except queue.Empty:
                break
            if isinstance(ev, LinkMessage) and ev.topic == self.topics.ticket_ack:
                self.sender.on_ack(ev.payload, ev.topic)

    # -- events --------------------------------------------------------------------------------
    def _handle(self, ev: object) -> None:
        if self.health.apply(ev):
            self.status.refresh()
        try:
            self._dispatch(ev)
            if self.cell is not None:
                self._cell_update(self.cell.handle(ev))
            self._sync_cell_session()
        except StateError as exc:
            # The durable store failed (disk full, SD card dying): no ticket can be committed,
            # so the kiosk goes out of service instead of crashing in a restart loop.
            self._store_failed(exc)

    def _dispatch(self, ev: object) -> None:
        if isinstance(ev, CardRead):
            self.citizens.on_card(ev.card)
        elif isinstance(ev, ButtonPressed):
            self.citizens.on_button(ev.role)
        elif isinstance(ev, LinkMessage):
            if ev.topic == self.topics.ticket_ack:
                self.sender.on_ack(ev.payload, ev.topic)
            elif ev.topic == self.topics.cmd:
                self._on_command(ev.payload, ev.topic)
        elif isinstance(ev, PublishDone):
            self.sender.on_publish_done(ev.mid, ev.ok, ev.reason)
        elif isinstance(ev, LinkUp):
            self._on_link_up(ev)
        elif isinstance(ev, LinkDown):
            log.warning("broker link down: %s (outbox %d)", ev.reason, self.store.depth())
        elif isinstance(ev, QrScanned):
            self.citizens.on_qr(ev.payload, ev.source)
        elif isinstance(ev, QrUnreadable):
            self.publisher.event("qr_unreadable", "info", f"qr-{ev.source}", reason=ev.reason)
        elif isinstance(ev, StaffCallPressed):
            if self.staff_call is not None:
                self._notice(self.staff_call.press(ev.source, ev.cell))
        elif isinstance(ev, CardUnreadable):
            self.publisher.event("card_unreadable", "info", "idcard-reader", reason=ev.reason)
        elif isinstance(ev, DeviceFault):
            self.publisher.event("device_fault", "fault", ev.device, fault=ev.fault, detail=ev.detail)
        elif isinstance(ev, DeviceRecovered):
            self.publisher.event("device_recovered", "info", ev.device)
        elif isinstance(ev, Reload):
            self._reload()
        elif isinstance(ev, Stop):
            log.info("stopping: %s", ev.reason)
            self._stopping.set()

    def _on_link_up(self, ev: LinkUp) -> None:
        log.info("broker link up session=%d session_present=%s", self.status.session_no,
                 ev.session_present)
        self.status.refresh(force_publish=True)          # birth: the retained state
        self.telemetry_schedule.due_now()                # and fresh health with it
        sent = self.sender.flush()
        if sent:
            log.info("re-sent %d unacknowledged tickets", sent)
        self.publisher.flush_events()
        if not self._memory_released:
            # Start-up is over once the first connection is made and its birth sent: hand
            # its garbage back (edge.footprint; make bench reports the idle RSS after it).
            self._memory_released = True
            release_startup_memory()

    # -- the privacy cell and the staff call -----------------------------------------------------
    def _notice(self, notice) -> None:
        if notice is not None:
            self.publisher.event(notice.name, notice.severity, notice.subject, **notice.detail)

    def _cell_update(self, update) -> None:
        if update is None:
            return
        for notice in update.notices:
            self._notice(notice)
        if update.vacated:
            # The citizen left the booth: the session ends, and all personal data with it.
            self.citizens.end_session("cell vacant")
        if update.changed:
            self.status.publish_state()

    def _sync_cell_session(self) -> None:
        active = self.machine.active
        if self.cell is not None and active != self._session_active:
            self._session_active = active
            self._cell_update(self.cell.set_session(active))

    def _on_command(self, payload: bytes, topic: str) -> None:
        """Answer every command: refused (with the gate's reason and an event), or accepted
        then done / failed."""
        outcome = self.gate.check(payload, topic)
        if isinstance(outcome, Refusal):
            self._answer(self.gate.result_body(outcome))
            self.publisher.event("command_refused", "warning", "cmd", **self.gate.refusal_event(outcome))
            return
        log.info("command %s from %s accepted", outcome.name, outcome.sender)
        self._answer(self.gate.result_body(outcome))
        status, reason, detail = self.remote.run(outcome)
        self._answer(self.gate.result_body(outcome, status=status, reason=reason, detail=detail))

    def _answer(self, body: dict | None) -> None:
        if body is not None:
            self.publisher.command_result(body)

    def _on_mode(self, mode) -> None:
        if not mode.offers_tickets:
            self.citizens.end_session(mode.reason or "out of service")
        self.citizens.show_idle()

    def _reload(self) -> None:
        self.notifier.reloading()
        try:
            new = load_config(self.cfg.source)
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("config reload refused: %s", problem)
            self.publisher.event("config_reload_refused", "warning", "config",
                                 problems=len(exc.problems), first=exc.problems[0])
            self.notifier.ready(self.status.status_line())
            return
        if new.digest == self.cfg.digest:
            log.info("config reload: unchanged")
            self.notifier.ready(self.status.status_line())
            return
        log.info("config reload accepted (digest %s): restarting the agent's parts", new.digest[:12])
        self.publisher.event("config_reloaded", "info", "config", digest=new.digest[:16])
        self.next_config = new
        self._stopping.set()

    # -- the printer ------------------------------------------------------------------------------
    def _check_printer(self) -> None:
        try:
            self._on_printer(self.printer.status(), None)
        except Exception as exc:  # DeviceError, or a driver bug: the printer is then down
            self._on_printer(None, exc)

    def _on_printer(self, status, error: BaseException | None) -> None:
        """Every printer answer (or silence) ends here: health, poll schedule, events."""
        level, reason = printer_level(status, error)
        self.poll.polled(level)
        if error is not None:
            if "unreachable" not in self._printer_flags:
                self.publisher.event("device_fault", "fault", PRINTER,
                                     fault=type(error).__name__, detail=str(error))
            flags = frozenset({"unreachable"})
        else:
            flags = frozenset(status.faults) | frozenset(status.warnings)
            if "unreachable" in self._printer_flags:
                self.publisher.event("device_recovered", "info", PRINTER)
            for flag in sorted(flags - self._printer_flags):
                sev = "fault" if flag in status.faults else "warning"
                self.publisher.event(f"printer_{flag}", sev, PRINTER)
            for flag in sorted(self._printer_flags - flags - {"unreachable"}):
                self.publisher.event(f"printer_{flag}_cleared", "info", PRINTER)
        self._printer_flags = flags
        if self.health.report(PRINTER, level, reason):
            self.status.refresh()

    def _store_failed(self, exc: StateError) -> None:
        log.error("kiosk store failed: %s", exc)
        if self.health.down(STORE, "unusable"):
            self.status.refresh()


def run_agent(config_path: Path, *, pin_factory=None, install_signals: bool = False,
              on_agent=None) -> int:
    """Build and run agents until stopped; a SIGHUP reload builds a fresh one from the new
    config in the same process (same PID for systemd, one notifier)."""
    notifier = Notifier.from_env(unset=True)
    cfg = load_config(config_path)
    while cfg is not None:
        agent = Agent(cfg, pin_factory=pin_factory, notifier=notifier)
        if on_agent is not None:
            on_agent(agent)
        new = agent.run(install_signals=install_signals)
        if new is not None:
            notifier.ready(agent.status.status_line())
        cfg = new
    return 0
