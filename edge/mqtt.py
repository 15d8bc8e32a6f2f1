"""The MQTT link: one paho-mqtt 2.x client (MQTT 5; 3.1.1 for a city tier) on its own thread.

What this wrapper adds to paho, each for a measured reason (PROTOCOLS.md):
- Callbacks never raise: an exception inside any paho callback silently kills paho's network
  thread while ``is_connected()`` keeps saying True. Every callback here is wrapped, logs, and
  hands a small event to ``sink`` (the agent's queue); the state lives with whoever owns the
  queue, never on paho's thread.
- Reconnect with jittered exponential backoff (full jitter): paho's own backoff has none, and a
  whole hall would reconnect in lock step after a broker restart. paho's automatic reconnect is
  off (``reconnect_on_failure=False``); our thread runs connect / loop_forever / wait.
- Publish completion is reported by mid *and* reason code: a PUBACK carrying a failure reason
  (e.g. 0x87 not authorised) still marks paho's message as published.
- ``publish`` refuses while disconnected instead of letting paho queue the message in memory
  (paho would send it later, behind the outbox's own resend, and lose it on a restart).
"""

from __future__ import annotations

import logging
import random
import ssl
import threading
from dataclasses import dataclass
from typing import Callable

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes

from hallkiosk.errors import HallkioskError

log = logging.getLogger("hallkiosk.mqtt")


class _QuietPaho(logging.Filter):
    """paho logs 'Client is not connected' at ERROR after every clean disconnect (its loop
    runs once more on the closed socket): noise in a kiosk's journal, dropped here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Client is not connected")


def _paho_logger(client_id: str) -> logging.Logger:
    """paho's log for one link, named after its client id (hallkiosk.mqtt.paho.<id>), so a
    journal with several links (a hall service, a test) says whose retry failed. Levels set
    on hallkiosk.mqtt.paho apply to every link; a logger filter does not propagate, so each
    link's logger gets its own."""
    log = logging.getLogger(f"hallkiosk.mqtt.paho.{client_id}")
    if not any(isinstance(f, _QuietPaho) for f in log.filters):
        log.addFilter(_QuietPaho())
    return log


class NotConnected(HallkioskError, ConnectionError):
    """A publish was attempted while the link is down (the caller keeps the message)."""


# -- events handed to the sink (one owner of state) ---------------------------------
@dataclass(frozen=True, slots=True)
class LinkUp:
    session_present: bool


@dataclass(frozen=True, slots=True)
class LinkDown:
    reason: str


@dataclass(frozen=True, slots=True)
class LinkMessage:
    topic: str
    payload: bytes
    qos: int
    retain: bool


@dataclass(frozen=True, slots=True)
class PublishDone:
    mid: int
    ok: bool
    reason: str


@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """mTLS material (paths). Filled by the provisioning bundle."""
    ca_file: str
    cert_file: str
    key_file: str


def backoff_delay(attempt: int, min_s: float, max_s: float, rng: random.Random) -> float:
    """Full-jitter exponential backoff: uniform in [min_s, min(max_s, min_s * 2**attempt)]."""
    ceiling = min(max_s, min_s * (2 ** min(attempt, 20)))
    return rng.uniform(min_s, max(min_s, ceiling))


#: The largest packet the link accepts, announced to the broker in CONNECT (MQTT 5
#: Maximum Packet Size: the broker then never sends a bigger one, and paho closes the link on
#: one). Contract payloads are at most 16 KiB (mqtt_topics.schemas.MAX_PAYLOAD); this leaves
#: room for anything else on a link.
MAX_PACKET_BYTES = 1024 * 1024


#: Protocol versions a link speaks: MQTT 5 to hall brokers (everything on the kiosk side),
#: 3.1.1 for a city tier whose gateway has no MQTT 5 (NATS: docs/city.md).
PROTOCOLS = {"5": MQTTProtocolVersion.MQTTv5, "3.1.1": MQTTProtocolVersion.MQTTv311}


class MqttLink:
    """Keeps one MQTT session to a broker alive (MQTT 5 unless ``protocol="3.1.1"``).

    ``fallbacks``: further (host, port) addresses of the same clustered broker: after a failed
    attempt or a lost connection the next address is tried, in turn (the session lives in
    the cluster, so it resumes on any node). With 3.1.1 the session is kept by
    ``clean_session=False`` (no expiry interval: the broker's own policy applies) and no
    packet size is announced.

    ``subscriptions`` are (topic filter, qos) pairs re-subscribed on every connection.
    ``make_will`` is called on the link thread before a connection attempt that needs a new
    will (after every successful connection), so each session's death message carries its own
    session counter. ``sink`` receives LinkUp / LinkDown / LinkMessage / PublishDone; with
    ``on_message`` given, each message goes to ``on_message(topic, payload, qos, retain)``
    instead of becoming a LinkMessage (the ops monitor's ingest: no event object per
    message). Either is called on the link thread, and what it raises is logged, never
    passed to paho.
    """

    def __init__(self, *, client_id: str, host: str, port: int, sink: Callable[[object], None],
                 keepalive_s: int = 30, reconnect_min_s: float = 0.5, reconnect_max_s: float = 30.0,
                 subscriptions: tuple[tuple[str, int], ...] = (),
                 make_will: Callable[[], Will | None] | None = None,
                 tls: TlsSettings | None = None, session_expiry_s: int = 3600,
                 rng: random.Random | None = None, name: str = "mqtt",
                 on_message: Callable[[str, bytes, int, bool], None] | None = None,
                 protocol: str = "5", fallbacks: tuple[tuple[str, int], ...] = ()) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol {protocol!r}: one of {', '.join(PROTOCOLS)}")
        self.protocol = protocol
        self._addresses = ((host, port), *fallbacks)
        self._address_index = 0
        self.host, self.port = host, port
        self.keepalive_s = keepalive_s
        self.reconnect_min_s, self.reconnect_max_s = reconnect_min_s, reconnect_max_s
        self.subscriptions = tuple(subscriptions)
        self._sink = sink
        self._on_msg = on_message
        self._make_will = make_will
        self._will_used = True
        self._session_expiry_s = session_expiry_s
        self._rng = rng or random.Random()
        self._name = name
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._thread: threading.Thread | None = None
        self._attempt = 0
        self.last_error: str | None = None
        self._unacked: set[int] = set()       # QoS 1 mids not yet PUBACKed
        self._acked_early: set[int] = set()   # PUBACKs that arrived before publish() returned
        self._unacked_cond = threading.Condition()

        self._sub_mids: dict[int, tuple[str, int]] = {}   # SUBSCRIBE mid -> (filter, qos)
        self._sub_retries: dict[str, int] = {}            # filter -> refusals in a row
        self._down = threading.Event()        # set by on_disconnect: the session ended
        extra = {} if protocol == "5" else {"clean_session": False}
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                        protocol=PROTOCOLS[protocol], reconnect_on_failure=False, **extra)
        c.enable_logger(_paho_logger(client_id))
        c.max_inflight_messages_set(100)
        if tls is not None:
            c.tls_set(ca_certs=tls.ca_file, certfile=tls.cert_file, keyfile=tls.key_file,
                      cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_publish = self._on_publish
        c.on_subscribe = self._on_subscribe
        self._client = c

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name=f"{self._name}-link", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0, *, drain_s: float = 2.0) -> None:
        """Wait up to ``drain_s`` for in-flight QoS 1 publishes to be PUBACKed (the offline
        state, the last events), then disconnect cleanly (the broker discards the will) and
        join the thread."""
        with self._unacked_cond:
            self._unacked_cond.wait_for(lambda: not self._unacked or not self._connected.is_set(),
                                        timeout=drain_s)
        self._stop.set()
        if self._client.is_connected():
            try:
                self._client.disconnect()
            except Exception:  # went down meanwhile: nothing to tell the broker
                pass
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def abandon(self) -> None:
        """Drop the TCP connection without DISCONNECT, so the broker publishes the will.
        Used by tests and by a watchdog that finds the loop stuck."""
        self._stop.set()
        sock = self._client.socket()
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    @property
    def alive(self) -> bool:
        """The link thread runs (watched by the health model: a dead thread means restart)."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout_s: float) -> bool:
        return self._connected.wait(timeout_s)

    # -- publishing --------------------------------------------------------------------
    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> int:
        """Send now; returns the mid. Raises NotConnected instead of queueing in memory."""
        if not self._connected.is_set():
            raise NotConnected(f"{self._name}: not connected to {self.host}:{self.port}")
        # Our lock is NOT held across paho's publish: paho calls on_publish holding its own
        # mutexes, and on_publish takes ours, so holding both here could deadlock. A PUBACK
        # that beats us back here is remembered in _acked_early instead.
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise NotConnected(f"{self._name}: publish to {topic} failed: {paho.error_string(info.rc)}")
        if qos:
            with self._unacked_cond:
                if info.mid in self._acked_early:
                    self._acked_early.discard(info.mid)
                else:
                    self._unacked.add(info.mid)
        return info.mid

    # -- the link thread -----------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            # Cleared before connect(), not after: paho may end the attempt inside connect()
            # (its CONNECT written at once and refused, a TLS 1.3 peer closing on a revoked
            # certificate), calling on_disconnect there. Cleared after, that end was wiped and
            # this thread waited for good on a paho loop with no socket: the kiosk never
            # reconnected (tests/test_broker_security.py, 1 run in 6).
            self._down.clear()
            try:
                self._prepare_will()
                if self.protocol == "5":
                    props = Properties(PacketTypes.CONNECT)
                    props.SessionExpiryInterval = self._session_expiry_s
                    props.MaximumPacketSize = MAX_PACKET_BYTES
                    self._client.connect(self.host, self.port, keepalive=self.keepalive_s,
                                         clean_start=False, properties=props)
                else:
                    self._client.connect(self.host, self.port, keepalive=self.keepalive_s)
            except Exception as exc:  # OSError, ssl errors: the broker is unreachable
                self.last_error = f"connect to {self.host}:{self.port} failed: {exc}"
                self._emit(LinkDown(self.last_error))
                self._next_address()
                self._wait_backoff()
                continue
            # paho's own network thread runs the session (loop_start: publish() from any
            # thread queues the packet and wakes it); with reconnect_on_failure off it ends
            # when the connection does, and this thread, which owns the backoff, connects
            # again. loop_stop() only joins it, or tells it to end when stop() came first.
            self._client.loop_start()
            while not self._down.wait(1.0) and not self._stop.is_set():
                pass
            self._client.loop_stop()
            if self._connected.is_set():
                self._connected.clear()
                self._emit(LinkDown(self.last_error or "connection lost"))
            if not self._stop.is_set():
                self._next_address()
                self._wait_backoff()

    def _next_address(self) -> None:
        if len(self._addresses) > 1:
            self._address_index = (self._address_index + 1) % len(self._addresses)
            self.host, self.port = self._addresses[self._address_index]

    def _prepare_will(self) -> None:
        if self._make_will is None or not self._will_used:
            return
        will = self._make_will()
        if will is None:
            self._client.will_clear()
        else:
            self._client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        self._will_used = False

    def _wait_backoff(self) -> None:
        delay = backoff_delay(self._attempt, self.reconnect_min_s, self.reconnect_max_s, self._rng)
        self._attempt += 1
        self._stop.wait(delay)

    # -- paho callbacks: never raise, never block ---------------------------------------------
    def _emit(self, event: object) -> None:
        try:
            self._sink(event)
        except Exception:
            log.exception("%s: event sink failed for %r", self._name, type(event).__name__)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        try:
            if reason_code.is_failure:
                self.last_error = f"broker refused the connection: {reason_code}"
                log.warning("%s: %s", self._name, self.last_error)
                self._will_used = True
                client.disconnect()
                return
            self._attempt = 0
            self._will_used = True
            self._sub_mids.clear()
            for topic, qos in self.subscriptions:
                self._subscribe(client, topic, qos)
            self._connected.set()
            self._emit(LinkUp(bool(flags.session_present)))
        except Exception:
            log.exception("%s: on_connect failed", self._name)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._down.set()
        try:
            self.last_error = f"disconnected: {reason_code}"
            was = self._connected.is_set()
            self._connected.clear()
            with self._unacked_cond:
                self._unacked.clear()          # paho re-sends them itself on reconnect
                self._unacked_cond.notify_all()
            if was:
                self._emit(LinkDown(self.last_error))
        except Exception:
            log.exception("%s: on_disconnect failed", self._name)

    def _on_message(self, client, userdata, message) -> None:
        try:
            topic = message.topic               # raises for a topic that is not UTF-8
            payload, qos, retain = bytes(message.payload), message.qos, bool(message.retain)
            if self._on_msg is not None:
                self._on_msg(topic, payload, qos, retain)
            else:
                self._sink(LinkMessage(topic, payload, qos, retain))
        except Exception:
            log.exception("%s: on_message failed", self._name)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        try:
            ok = not reason_code.is_failure
            with self._unacked_cond:
                if mid in self._unacked:
                    self._unacked.discard(mid)
                else:
                    self._acked_early.add(mid)
                    if len(self._acked_early) > 1000:      # never grows without bound
                        self._acked_early.clear()
                self._unacked_cond.notify_all()
            self._emit(PublishDone(mid, ok, str(reason_code)))
        except Exception:
            log.exception("%s: on_publish failed", self._name)

    def _subscribe(self, client, topic: str, qos: int) -> None:
        _rc, mid = client.subscribe(topic, qos=qos)
        if mid is not None:
            self._sub_mids[mid] = (topic, qos)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        # A refusal is retried with backoff while the connection lasts: a clustered broker
        # refuses a subscription while it elects the leader that stores it (NATS, after a
        # node loss: "Unspecified error"), and a monitor without it would miss a kind of
        # message for the whole session. A hall broker's ACL refusal keeps failing, slowly.
        try:
            topic, qos = self._sub_mids.pop(mid, (None, 0))
            for rc in reason_codes:
                if not rc.is_failure:
                    if topic is not None:
                        self._sub_retries.pop(topic, None)
                    continue
                if topic is None:
                    log.warning("%s: a subscription was refused: %s", self._name, rc)
                    continue
                n = self._sub_retries.get(topic, 0)
                self._sub_retries[topic] = n + 1
                delay = min(30.0, 0.5 * 2 ** n)
                log.warning("%s: subscription to %s refused (%s): again in %.1f s", self._name,
                            topic, rc, delay)
                t = threading.Timer(delay, self._resubscribe, args=(topic, qos))
                t.daemon = True
                t.start()
        except Exception:
            log.exception("%s: on_subscribe failed", self._name)

    def _resubscribe(self, topic: str, qos: int) -> None:
        if self._stop.is_set() or not self._connected.is_set():
            return         # the next connection subscribes to everything anyway
        try:
            self._subscribe(self._client, topic, qos)
        except Exception:
            log.exception("%s: re-subscribing to %s failed", self._name, topic)
