"""The ops monitor: subscribes to halls, verifies every message, feeds the fleet and alerts.

Threads and who owns what:

- with ``workers=0`` (the default) the MQTT link thread (edge.mqtt.MqttLink) verifies each
  message itself and folds it into the Fleet under ``self.lock``;
- with ``workers=N`` it only routes each message to one of N verify threads' queues, chosen
  by the topic's device so one kiosk's messages stay in order. Whether threads help depends
  on how much of a message's cost runs without the GIL (`make bench`, ops part, prints it);
  instances in a share group are the tested way to add cores and hosts;
- one tick thread, every ``tick_s``: heartbeats, gaps confirmed lost, alert evaluation;
  alerts are emitted outside the lock. With an ``alert_signer`` (the monitor's own key, role
  ``monitor``) each alert transition is also sealed and published QoS 1 on the kiosk's
  ``.../alert`` topic; while the link is down they wait (bounded) and go out on reconnect.

Subscriptions, per hall: ``hall/{h}/kiosk/+/state`` always as a plain subscription (retained
states are never sent to shared subscriptions, and every instance needs every kiosk's
birth and will); telemetry, events, tickets and command results plain too, or as
``$share/{share_group}/...`` when instances split the load (each instance then sees a part
of each kiosk's sequence, so gap detection is off). State is verified WITHOUT the replay
tracker (docs/mqtt-contract.md section 3); everything else with it.

The hall's ticket consumers (ops.consumer.TicketConsumer, group ``consumers``) run next to
the monitor when given; they keep their own link and their own verification (their
shared subscription is what splits the tickets between instances, and the ledger they share
is what stops two instances from both accepting one ticket). Each ticket a consumer verifies
is also counted in the fleet, once with what the monitor's link saw (Fleet.ledger_ticket):
after a broker crash the monitor's link can miss a ticket the ledger has.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from edge.clock import SYSTEM_CLOCK, Clock
from edge.mqtt import LinkDown, LinkMessage, LinkUp, MqttLink, NotConnected, TlsSettings
from hallkiosk.errors import ContractError, HallkioskError
from mqtt_topics.envelope import Keyring, SequenceTracker, Signer, Verified, verify
from mqtt_topics.topics import ROLE_FOR_KIND, HallTopics, parse_topic
from ops.alerts import Alert, AlertEngine, AlertSink
from ops.fleet import Change, Fleet, KioskSnapshot, Rejection

log = logging.getLogger("hallkiosk.ops.monitor")

#: Kinds a monitor subscribes to (kiosk -> hall). ``state`` is handled apart (never shared).
WATCHED_KINDS = ("telemetry", "event", "ticket", "cmd_result")
#: Changes worth a log line as they happen (alerts add their own lines).
_LOGGED = {"status": logging.INFO, "fault": logging.WARNING, "recovered": logging.INFO,
           "bad_signature": logging.WARNING, "lost": logging.INFO, "seen": logging.INFO,
           "replay": logging.INFO, "malformed": logging.WARNING}


#: Sealed alerts kept while the link is down (oldest dropped beyond this, with a log line).
MAX_PENDING_ALERTS = 1000


class MonitorError(HallkioskError, RuntimeError):
    """The monitor was wired wrongly (no hall, no worker)."""


class WallSequence:
    """Sequence numbers for a sender without durable state (a monitor instance): the first is
    the wall clock in microseconds, then +1 each, so a restarted instance starts above every
    number it used before (unless its clock was stepped back by more than it had published;
    receivers of alerts dedupe on ``alert_id`` in any case). Thread-safe."""

    def __init__(self, clock: Clock = SYSTEM_CLOCK) -> None:
        self._clock = clock
        self._last = 0
        self._lock = threading.Lock()

    def __call__(self) -> int:
        with self._lock:
            self._last = max(self._last + 1, int(self._clock.wall() * 1_000_000))
            return self._last


def alert_signer(key: Any, instance: str, clock: Clock = SYSTEM_CLOCK) -> Signer:
    """The Signer a monitor instance seals its alerts with (``instance`` = its certificate CN)."""
    return Signer(key, sender=instance, boot_id=secrets.token_hex(16),
                  next_seq=WallSequence(clock), clock=clock)


@dataclass
class MonitorStats:
    """Counters since start (read under ``Monitor.lock``)."""

    received: int = 0
    verified: int = 0
    rejected: dict[str, int] = field(default_factory=lambda: {"signature": 0, "replay": 0,
                                                               "malformed": 0})
    by_kind: dict[str, int] = field(default_factory=dict)
    connected: bool = False
    link_downs: int = 0


def subscriptions(halls: Iterable[str], share_group: str | None = None
                  ) -> tuple[tuple[str, int], ...]:
    """The (filter, qos) pairs of a monitor watching ``halls``."""
    subs: list[tuple[str, int]] = []
    for hall in halls:
        topics = HallTopics(hall)
        subs.append((topics.all_state, 1))
        for kind in WATCHED_KINDS:
            flt = topics.all_of(kind)
            subs.append((topics.shared(share_group, flt) if share_group else flt, 1))
    return tuple(subs)


class Monitor:
    """Verifies the traffic of ``halls`` into ``self.fleet``.

    ``keyring`` holds every kiosk key (role ``kiosk``); ``expected`` lists (hall, device)
    pairs from the inventory, shown as ``unknown`` until they speak. ``sink`` receives alert
    transitions. ``consumers`` are started and stopped with the monitor.
    ``instance`` must be unique among the monitors on one broker (it is the MQTT client id;
    with mTLS the broker uses the certificate's CN instead, so each instance needs its own).
    ``link_factory`` builds the MQTT link (tests and the benchmark may pass their own).
    ``alert_signer`` (see ``alert_signer()``): when given and ``sink`` has no publisher of its
    own, alerts are signed and published on the contract's alert topics.
    """

    def __init__(self, *, halls: Sequence[str], keyring: Keyring, host: str = "127.0.0.1",
                 port: int = 1883, instance: str = "ops", share_group: str | None = None,
                 workers: int = 0, fleet: Fleet | None = None, alerts: AlertEngine | None = None,
                 sink: AlertSink | None = None, consumers: Sequence[Any] = (),
                 expected: Iterable[tuple[str, str]] = (), clock: Clock = SYSTEM_CLOCK,
                 tick_s: float = 1.0, keepalive_s: int = 30, reconnect_min_s: float = 0.5,
                 reconnect_max_s: float = 30.0, session_expiry_s: int = 600,
                 tls: TlsSettings | None = None, alert_signer: Signer | None = None,
                 link_factory: Callable[..., Any] = MqttLink, protocol: str = "5",
                 fallbacks: tuple[tuple[str, int], ...] = ()) -> None:
        if not halls:
            raise MonitorError("a monitor needs at least one hall")
        if share_group and protocol != "5":
            raise MonitorError(f"share_group needs MQTT 5 shared subscriptions; protocol "
                               f"{protocol} has none (split the halls between instances)")
        if workers < 0:
            raise MonitorError("workers: 0 (verify on the link thread) or more threads")
        self.halls = tuple(halls)
        self.keyring = keyring
        self.clock = clock
        self.share_group = share_group
        # "is None", not "or": an empty Fleet is falsy (it has a length).
        self.fleet = fleet if fleet is not None else Fleet(clock=clock,
                                                           track_gaps=share_group is None)
        self.alerts = alerts if alerts is not None else AlertEngine(clock=clock)
        self.sink = sink if sink is not None else AlertSink()
        self.alert_signer = alert_signer
        self._unsent_alerts: deque[tuple[str, bytes]] = deque()
        self._alert_lock = threading.Lock()
        if alert_signer is not None and self.sink.publish is None:
            self.sink.publish = self._publish_alert
        self.consumers = tuple(consumers)
        for consumer in self.consumers:
            # The dashboard's ticket count is the ledger's as well as what this link saw
            # (Fleet.ledger_ticket says why); a consumer given a hook of its own keeps it.
            if getattr(consumer, "on_ticket", False) is None:
                consumer.on_ticket = self._ledger_ticket
        self.tracker = SequenceTracker()
        self.stats = MonitorStats()
        self.lock = threading.Lock()
        self.tick_s = tick_s
        self.on_change: Callable[[Change], None] | None = None
        for hall, device in expected:
            if hall in self.halls:
                self.fleet.expect(hall, device)
        self._queues: list[queue.SimpleQueue[LinkMessage | None]] = [
            queue.SimpleQueue() for _ in range(workers)]
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._connected = threading.Event()
        # A stable client id per instance: a restarted instance resumes its session (and the
        # events queued for it). A member of a shared group that never comes back keeps
        # taking its share of the group's messages into its queue until the session expires,
        # hence a session expiry of minutes, not hours.
        self.link = link_factory(
            client_id=f"{instance}-mon", host=host, port=port, sink=self._route,
            on_message=self._on_message,
            keepalive_s=keepalive_s, subscriptions=subscriptions(self.halls, share_group),
            reconnect_min_s=reconnect_min_s, reconnect_max_s=reconnect_max_s,
            session_expiry_s=session_expiry_s, tls=tls, name=f"{instance}-monitor",
            **({} if protocol == "5" and not fallbacks else
               {"protocol": protocol, "fallbacks": tuple(fallbacks)}))

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> Monitor:
        for i, q in enumerate(self._queues):
            t = threading.Thread(target=self._work, args=(q,), name=f"verify-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        ticker = threading.Thread(target=self._tick_loop, name="ops-tick", daemon=True)
        ticker.start()
        self._threads.append(ticker)
        for consumer in self.consumers:
            consumer.start()
        self.link.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.link.stop()
        for consumer in self.consumers:
            consumer.stop()
        for q in self._queues:
            q.put(None)
        for t in self._threads:
            t.join(5)
        self._threads.clear()

    def wait_connected(self, timeout_s: float) -> bool:
        return self._connected.wait(timeout_s)

    def __enter__(self) -> Monitor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the link thread: route only ------------------------------------------------------------
    def _on_message(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        if not self._queues:
            try:
                self.handle(topic, payload, retained=retain)
            except Exception:  # one message must never stop the link
                log.exception("monitor failed on a message")
            return
        # hall/{h}/kiosk/{d}/...: the device picks the worker, so a kiosk stays in order.
        levels = topic.split("/", 4)
        device = levels[3] if len(levels) > 3 else ""
        self._queues[hash(device) % len(self._queues)].put(LinkMessage(topic, payload, qos, retain))

    def _route(self, ev: object) -> None:
        if isinstance(ev, LinkMessage):          # from a link that has no on_message
            self._on_message(ev.topic, ev.payload, ev.qos, ev.retain)
        elif isinstance(ev, LinkUp):
            self.stats.connected = True
            self._connected.set()
            if self._unsent_alerts:
                # Not from the link thread: publish() waits on it.
                threading.Thread(target=self._flush_alerts, name="alert-flush",
                                 daemon=True).start()
            log.info("monitor connected (halls %s, share group %s)", ",".join(self.halls),
                     self.share_group or "none")
        elif isinstance(ev, LinkDown):
            self.stats.connected = False
            self._connected.clear()
            if not self._stop.is_set():
                self.stats.link_downs += 1
                log.warning("monitor link down: %s", ev.reason)

    # -- verify workers -----------------------------------------------------------------------
    def _work(self, q: queue.SimpleQueue[LinkMessage | None]) -> None:
        while True:
            ev = q.get()
            if ev is None:
                return
            try:
                self.handle(ev.topic, ev.payload, retained=ev.retain)
            except Exception:  # one message must never stop a worker
                log.exception("monitor failed on a message")

    def handle(self, topic: str, payload: bytes, *, retained: bool = False
               ) -> Verified | Rejection:
        """Verify one message and fold it into the fleet (thread-safe; what workers run)."""
        try:
            kind = parse_topic(topic).kind
            if kind == "state":
                result: Verified | Rejection = verify(payload, topic, self.keyring,
                                                      expect_type="state", require_role="kiosk")
            else:
                result = verify(payload, topic, self.keyring, tracker=self.tracker,
                                require_role=ROLE_FOR_KIND[kind])
        except ContractError as exc:
            result = Rejection.from_error(topic, exc)
        with self.lock:
            self.stats.received += 1
            if isinstance(result, Rejection):
                self.stats.rejected[result.reason] = self.stats.rejected.get(result.reason, 0) + 1
                changes = self.fleet.reject(result)
            else:
                self.stats.verified += 1
                self.stats.by_kind[result.msg_type] = self.stats.by_kind.get(result.msg_type, 0) + 1
                changes = self.fleet.apply(result, retained=retained)
            if changes:
                self.alerts.observe(changes)
        if isinstance(result, Rejection) and not changes:
            log.warning("rejected a message on %s: %s (%s)", result.topic, result.reason,
                        result.message)
        for change in changes:
            self._log_change(change)
        return result

    def _ledger_ticket(self, v: Verified, _new: bool) -> None:
        """From a consumer's thread: a ticket the ledger verified (and stored or had)."""
        with self.lock:
            changes = self.fleet.ledger_ticket(v)
            if changes:
                self.alerts.observe(changes)
        for change in changes:
            self._log_change(change)

    def _log_change(self, c: Change) -> None:
        level = _LOGGED.get(c.what)
        if level is not None and log.isEnabledFor(level):
            detail = " ".join(f"{k}={v}" for k, v in c.detail.items())
            log.log(level, "kiosk %s/%s %s %s", c.hall, c.device, c.what, detail)
        if self.on_change is not None:
            try:
                self.on_change(c)
            except Exception:
                log.exception("on_change hook failed")

    # -- time -------------------------------------------------------------------------------------
    def tick(self) -> list[Alert]:
        """Apply the clock (heartbeats, lost gaps), evaluate alerts, emit them."""
        with self.lock:
            changes = self.fleet.tick()
            self.alerts.observe(changes)
            fired = self.alerts.evaluate(self.fleet.snapshot())
        for change in changes:
            self._log_change(change)
        self.sink.emit_all(fired)
        return fired

    # -- alerts on the wire -------------------------------------------------------------------
    def _publish_alert(self, topic: str, body: dict[str, Any]) -> None:
        """Seal once, send QoS 1; while the link is down keep the sealed payload for later."""
        assert self.alert_signer is not None
        payload = self.alert_signer.seal(topic, "alert", dict(body))
        with self._alert_lock:
            self._unsent_alerts.append((topic, payload))
            if len(self._unsent_alerts) > MAX_PENDING_ALERTS:
                dropped, _ = self._unsent_alerts.popleft()
                log.warning("alert queue full: the oldest unsent alert (%s) is dropped", dropped)
        self._flush_alerts()

    def _flush_alerts(self) -> None:
        with self._alert_lock:
            while self._unsent_alerts:
                topic, payload = self._unsent_alerts[0]
                try:
                    self.link.publish(topic, payload, qos=1)
                except NotConnected:
                    log.info("%d alert(s) wait for the broker", len(self._unsent_alerts))
                    return
                self._unsent_alerts.popleft()

    @property
    def unsent_alerts(self) -> int:
        with self._alert_lock:
            return len(self._unsent_alerts)

    def _tick_loop(self) -> None:
        while not self._stop.wait(self.tick_s):
            try:
                self.tick()
            except Exception:
                log.exception("monitor tick failed")

    # -- reading ----------------------------------------------------------------------------------
    def snapshot(self, hall: str | None = None) -> list[KioskSnapshot]:
        with self.lock:
            return self.fleet.snapshot(hall)

    def firing(self) -> list[Alert]:
        with self.lock:
            return self.alerts.firing

    def stats_copy(self) -> dict[str, Any]:
        with self.lock:
            s = self.stats
            return {"received": s.received, "verified": s.verified, "rejected": dict(s.rejected),
                    "by_kind": dict(s.by_kind), "connected": s.connected,
                    "link_downs": s.link_downs,
                    "queued": sum(q.qsize() for q in self._queues),
                    "unattributed": dict(self.fleet.unattributed)}


__all__ = ["Monitor", "MonitorError", "MonitorStats", "WATCHED_KINDS", "WallSequence",
           "alert_signer", "subscriptions"]
