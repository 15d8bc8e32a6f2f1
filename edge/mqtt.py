"""The MQTT link: one paho-mqtt 2.x client, MQTT 5, on a thread of its own.

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
import struct
import threading
from dataclasses import dataclass
from typing import Callable

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes

from hallkiosk.errors import HallkioskError

log = logging.getLogger("hallkiosk.mqtt")


class _QuietPaho(logging.Filter):
    """paho logs 'Client is not connected' at ERROR after every clean disconnect (its loop
    runs once more on the closed socket): noise in a kiosk's journal, dropped here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Client is not connected")


logging.getLogger("hallkiosk.mqtt.paho").addFilter(_QuietPaho())


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


#: Bytes asked of the socket per read (the kernel hands over what it has; TLS gives one
#: record, up to 16 KiB, and paho's loop comes straight back for the rest).
RECV_BYTES = 256 * 1024
#: The largest packet the link accepts, announced to the broker in CONNECT (MQTT 5
#: Maximum Packet Size: the broker then never sends a bigger one). Contract payloads are at
#: most 16 KiB (mqtt_topics.schemas.MAX_PAYLOAD); this leaves room for anything else on a
#: link while bounding what a cut packet can make the reader hold.
MAX_PACKET_BYTES = 1024 * 1024
_PUBLISH, _PUBACK = int(paho.PUBLISH), int(paho.PUBACK)
_PUBACK_HEADER = bytes([_PUBACK, 2])


def _fresh_in_packet() -> dict:
    """paho's idle reader state (the same dict its connect() and _packet_read() set)."""
    return {"command": 0, "have_remaining": 0, "remaining_count": [], "remaining_mult": 1,
            "remaining_length": 0, "packet": bytearray(), "to_process": 0, "pos": 0}


class _Client(paho.Client):
    """paho's client with a batched reader: one recv() per wake-up, every whole packet in it.

    paho reads a packet with at least three recv() calls (the command byte, each byte of the
    remaining length, the rest), queues each PUBACK as its own write plus a wake-up byte on
    its socket pair, and builds an MQTTMessage and a Properties object per PUBLISH; with no
    QoS message of its own in flight it also reads one packet per select(). On the ops
    monitor's ingest (py-spy, `make bench`) all that cost about as much as the Ed25519 verify
    itself. Here ``loop_read`` takes what the socket has (up to RECV_BYTES), and splits it:

    - a QoS 0/1 PUBLISH with a UTF-8 topic and no properties (what Mosquitto forwards from a
      plain publish) goes straight to ``fast_publish(topic, payload, qos, retain)``; the
      PUBACKs of one read go out as one write, in the order the PUBLISHes came, and only
      after ``fast_publish`` returned for them;
    - every other packet (CONNACK, SUBACK, PUBACK of our own publishes, PINGRESP,
      DISCONNECT, QoS 2, a PUBLISH with properties or a topic that is not UTF-8) is handed
      whole to paho's own ``_packet_handle``, after the PUBACKs collected before it;
    - a packet cut by the end of a read waits, bytes kept, for the next reads (appended:
      a big packet in 16 KiB TLS records costs linear time, not quadratic);
    - a remaining length of more than 4 bytes, a packet bigger than MAX_PACKET_BYTES, a
      PUBLISH shorter than its own header, or a packet paho's handler finds malformed or
      unknown closes the connection as a protocol error (paho's answer to the first), after
      writing the PUBACKs of the messages delivered before it: a resumed session would
      otherwise deliver them again.

    A read's PUBACKs are queued when its last message was handled, so ``disconnect()``
    (another thread's, as MqttLink.stop() calls it) waits for a read in progress: the
    DISCONNECT goes out after the PUBACKs, and a resumed session has nothing to redeliver.

    ``fast_publish`` unset (None) keeps paho's reader, one packet per recv() sequence. The
    private parts of paho used here (``_sock_recv``, ``_packet_handle``, ``_packet_queue``,
    ``_loop_rc_handle``, ``_in_packet``, ``_msgtime_mutex``, ``_last_bytes_received``,
    ``_protocol``) are pinned with paho 2.2; tests/test_mqtt_link.py checks they exist.
    """

    fast_publish: Callable[[str, bytes, int, bool], None] | None = None
    _rsock: object = None
    _rbuf: bytes | bytearray = b""      # the start of a cut packet (a bytearray of our own)
    _rneed = 0                          # its whole size, once its header was read

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # Reentrant: a handler called from _split may itself disconnect (a refused CONNACK).
        self._reading = threading.RLock()

    def disconnect(self, *args, **kwargs) -> MQTTErrorCode:
        with self._reading:
            return super().disconnect(*args, **kwargs)

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        sock = self._sock
        if self.fast_publish is None or sock is None or self._in_packet["command"]:
            return super().loop_read(max_packets)
        if self._rsock is not sock:           # a new connection: nothing carried over
            self._rsock, self._rbuf, self._rneed = sock, b"", 0
        try:
            data = self._sock_recv(RECV_BYTES)
        except BlockingIOError:
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        except OSError as err:                # TimeoutError and ssl errors included
            log.warning("MQTT read failed: %s", err)
            return self._loop_rc_handle(MQTTErrorCode.MQTT_ERR_CONN_LOST)
        if not data:
            return self._loop_rc_handle(MQTTErrorCode.MQTT_ERR_CONN_LOST)
        with self._msgtime_mutex:
            self._last_bytes_received = paho.time_func()
        if self._rbuf:
            self._rbuf += data                   # in place: _split made it a bytearray
            if len(self._rbuf) < self._rneed:
                return MQTTErrorCode.MQTT_ERR_SUCCESS     # still cut: nothing to split yet
            buf: bytes | bytearray = self._rbuf
            self._rbuf, self._rneed = b"", 0
        else:
            buf = data
        with self._reading:
            rc = self._split(sock, buf)
        return self._loop_rc_handle(rc) if rc > 0 else MQTTErrorCode.MQTT_ERR_SUCCESS

    def _split(self, sock: object, buf: bytes | bytearray) -> MQTTErrorCode:
        """Handle every whole packet in ``buf``; keep the cut one for the next read."""
        deliver = self.fast_publish
        v5 = self._protocol == paho.MQTTv5
        acks: list[int] = []
        pos, end_buf = 0, len(buf)
        rc = MQTTErrorCode.MQTT_ERR_SUCCESS
        while pos < end_buf:
            header = buf[pos]
            # Remaining length: 1-4 bytes of 7 bits, least significant first (MQTT 5 1.5.5).
            length, shift, i, cut = 0, 0, pos + 1, False
            while True:
                if i >= end_buf:
                    cut = True
                    break
                byte = buf[i]
                i += 1
                length |= (byte & 0x7F) << shift
                if byte < 0x80:
                    break
                shift += 7
                if shift == 28:
                    log.warning("MQTT packet with a remaining length of more than 4 bytes")
                    rc = MQTTErrorCode.MQTT_ERR_PROTOCOL
                    break
            if cut or rc:
                break
            if length > MAX_PACKET_BYTES:
                log.warning("MQTT packet of %d bytes, more than the %d announced", length,
                            MAX_PACKET_BYTES)
                rc = MQTTErrorCode.MQTT_ERR_PROTOCOL
                break
            start, end = i, i + length
            if end > end_buf:
                self._rneed = end - pos                    # the body is cut
                break
            qos = (header >> 1) & 3
            if header & 0xF0 == _PUBLISH and qos < 2:
                tlen = (buf[start] << 8 | buf[start + 1]) if length >= 2 else -1
                p = start + 2 + tlen + (2 if qos else 0)
                if tlen < 0 or p + v5 > end:
                    log.warning("MQTT PUBLISH shorter than its own header (%d bytes)", length)
                    rc = MQTTErrorCode.MQTT_ERR_PROTOCOL
                    break
                if not v5 or buf[p] == 0:
                    try:
                        topic = str(buf[start + 2:start + 2 + tlen], "utf-8")
                    except UnicodeDecodeError:
                        topic = ""                         # paho words it (below)
                    if topic:
                        deliver(topic, bytes(buf[p + v5:end]), qos, bool(header & 1))
                        if qos:
                            acks.append(buf[p - 2] << 8 | buf[p - 1])
                        pos = end
                        continue
            # Anything else: paho's own handler, after the PUBACKs owed so far (in order).
            if acks:
                self._queue_pubacks(acks)
                acks = []
            self._in_packet = {"command": header, "have_remaining": 1, "remaining_count": [],
                               "remaining_mult": 1, "remaining_length": length,
                               "packet": bytearray(buf[start:end]), "to_process": 0, "pos": 0}
            try:
                rc = self._packet_handle()
            except (MalformedPacket, struct.error) as exc:  # paho's decoders raise both
                log.warning("malformed MQTT packet: %s", exc or "truncated")
                rc = MQTTErrorCode.MQTT_ERR_PROTOCOL
            finally:
                self._in_packet = _fresh_in_packet()
            pos = end
            if rc > 0 or self._sock is not sock:           # error, or the handler closed it
                break
        if self._sock is not sock:
            return rc
        if acks:
            self._queue_pubacks(acks)
        if rc > 0:
            # Delivered messages are acknowledged before the connection is dropped for what
            # came after them (paho's reconnect empties the queue of what was not written).
            self._packet_write()
        elif pos < end_buf:
            self._rbuf = bytearray(buf[pos:])
        else:
            self._rneed = 0
        return rc

    def _queue_pubacks(self, mids: list[int]) -> None:
        # MQTT 5 3.4.2.1: reason 0x00 without properties may be left out, as paho does.
        self._packet_queue(_PUBACK, b"".join(_PUBACK_HEADER + mid.to_bytes(2, "big")
                                             for mid in mids), 0, 0)


class MqttLink:
    """Keeps one MQTT 5 session to the hall broker alive.

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
                 on_message: Callable[[str, bytes, int, bool], None] | None = None) -> None:
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

        c = _Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                        protocol=MQTTProtocolVersion.MQTTv5, reconnect_on_failure=False)
        c.enable_logger(logging.getLogger("hallkiosk.mqtt.paho"))
        c.max_inflight_messages_set(100)
        if tls is not None:
            c.tls_set(ca_certs=tls.ca_file, certfile=tls.cert_file, keyfile=tls.key_file,
                      cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_publish = self._on_publish
        c.on_subscribe = self._on_subscribe
        c.fast_publish = self._on_fast_publish
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
            try:
                self._prepare_will()
                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = self._session_expiry_s
                props.MaximumPacketSize = MAX_PACKET_BYTES
                self._client.connect(self.host, self.port, keepalive=self.keepalive_s,
                                     clean_start=False, properties=props)
            except Exception as exc:  # OSError, ssl errors: the broker is unreachable
                self.last_error = f"connect to {self.host}:{self.port} failed: {exc}"
                self._emit(LinkDown(self.last_error))
                self._wait_backoff()
                continue
            try:
                # paho writes a publish straight to the socket from the caller's thread when
                # it believes no network thread runs (its _thread is None, as it is when we run
                # loop_forever ourselves). With TLS that interleaves SSL writes with this
                # thread's reads and corrupts the stream (bad record MAC). Telling paho this
                # thread is its network thread makes publish() queue the packet and wake us.
                # The same two private attributes paho's own loop_start() sets: the wake-up
                # socket pair (connect() closes it, so it is made anew each time) and the
                # network thread. Without them a publish waited for the 1 s select timeout
                # (tests/test_e2e_*.py teardowns took seconds) and TLS links dropped with
                # "bad record MAC" under load (seen in tests/test_ops_monitor.py).
                c = self._client
                if c._sockpairR is None or c._sockpairW is None:
                    c._sockpairR, c._sockpairW = paho._socketpair_compat()
                c._thread = threading.current_thread()
                c.loop_forever(timeout=1.0)
            except Exception as exc:  # a socket error paho did not turn into a return code
                self.last_error = f"network loop failed: {exc}"
                log.warning("%s: %s", self._name, self.last_error)
            if self._connected.is_set():
                self._connected.clear()
                self._emit(LinkDown(self.last_error or "connection lost"))
            if not self._stop.is_set():
                self._wait_backoff()

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
            for topic, qos in self.subscriptions:
                client.subscribe(topic, qos=qos)
            self._connected.set()
            self._emit(LinkUp(bool(flags.session_present)))
        except Exception:
            log.exception("%s: on_connect failed", self._name)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
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
        # paho's own reader (a PUBLISH with properties, QoS 2): the same way out as _Client's.
        try:
            topic = message.topic               # raises for a topic that is not UTF-8
        except Exception:
            log.exception("%s: on_message failed", self._name)
            return
        self._on_fast_publish(topic, bytes(message.payload), message.qos, bool(message.retain))

    def _on_fast_publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        try:
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

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        try:
            for rc in reason_codes:
                if rc.is_failure:
                    log.warning("%s: a subscription was refused: %s", self._name, rc)
        except Exception:
            log.exception("%s: on_subscribe failed", self._name)
