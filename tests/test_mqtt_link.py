"""The MQTT link against a real Mosquitto: publish tracking, reconnect, will, robustness."""

from __future__ import annotations

import queue
import random

import pytest

from edge.mqtt import LinkDown, LinkMessage, LinkUp, MqttLink, NotConnected, PublishDone, Will, backoff_delay
from tests.conftest import wait_for

pytestmark = pytest.mark.integration


def _link(broker, name: str, sink, **kw) -> MqttLink:
    link = MqttLink(client_id=name, host="127.0.0.1", port=broker.port, sink=sink,
                    reconnect_min_s=0.1, reconnect_max_s=0.5, **kw)
    link.start()
    return link


def _next(q: queue.Queue, kind, timeout_s: float = 10.0):
    while True:
        ev = q.get(timeout=timeout_s)
        if isinstance(ev, kind):
            return ev


def test_publish_is_tracked_by_mid_and_reason(broker):
    events: queue.Queue = queue.Queue()
    sub = _link(broker, "sub", events.put, subscriptions=(("t/#", 1),))
    _next(events, LinkUp)
    pub_events: queue.Queue = queue.Queue()
    pub = _link(broker, "pub", pub_events.put)
    _next(pub_events, LinkUp)
    mid = pub.publish("t/x", b"hello", qos=1)
    done = _next(pub_events, PublishDone)
    assert done.mid == mid and done.ok
    msg = _next(events, LinkMessage)
    assert (msg.topic, msg.payload, msg.qos) == ("t/x", b"hello", 1)
    pub.stop()
    sub.stop()


def test_publish_while_down_raises_instead_of_queueing(broker):
    events: queue.Queue = queue.Queue()
    link = _link(broker, "k", events.put)
    _next(events, LinkUp)
    broker.kill()
    _next(events, LinkDown)
    with pytest.raises(NotConnected):
        link.publish("t/x", b"late")
    broker.start()
    _next(events, LinkUp, timeout_s=15)       # reconnects by itself
    link.stop()


def test_will_is_published_when_the_connection_dies(broker):
    watcher_q: queue.Queue = queue.Queue()
    watcher = _link(broker, "watcher", watcher_q.put, subscriptions=(("state/#", 1),))
    _next(watcher_q, LinkUp)
    q: queue.Queue = queue.Queue()
    link = _link(broker, "dying", q.put, make_will=lambda: Will("state/dying", b"offline"))
    _next(q, LinkUp)
    link.abandon()                            # TCP dropped without DISCONNECT: a crash
    msg = _next(watcher_q, LinkMessage, timeout_s=15)
    assert (msg.topic, msg.payload) == ("state/dying", b"offline")
    watcher.stop()


def test_a_sink_that_raises_does_not_kill_the_network_thread(broker):
    seen: list = []

    def bad_sink(ev):
        seen.append(ev)
        if isinstance(ev, LinkMessage) and ev.payload == b"boom":
            raise RuntimeError("consumer bug")

    sub = _link(broker, "sub2", bad_sink, subscriptions=(("t/#", 1),))
    wait_for(lambda: sub.connected, what="connected")
    q: queue.Queue = queue.Queue()
    pub = _link(broker, "pub2", q.put)
    _next(q, LinkUp)
    def got(payload: bytes) -> bool:
        return any(isinstance(e, LinkMessage) and e.payload == payload for e in seen)

    # The SUBACK may trail the CONNACK under load: publish until the subscriber has it.
    wait_for(lambda: got(b"boom") or (pub.publish("t/a", b"boom") and False), interval_s=0.1,
             what="the message whose handling raises")
    wait_for(lambda: got(b"after") or (pub.publish("t/a", b"after") and False), interval_s=0.1,
             what="a message after the exception")
    pub.stop()
    sub.stop()


def test_backoff_is_jittered_and_bounded():
    rng = random.Random(1)
    for attempt in range(12):
        delays = {backoff_delay(attempt, 0.5, 30.0, rng) for _ in range(50)}
        assert all(0.5 <= d <= min(30.0, 0.5 * 2 ** attempt) for d in delays)
        if attempt > 0:
            assert len(delays) > 40           # spread out, not lock step



def test_a_burst_is_read_in_batches_in_order_once(broker):
    """The link reads up to READ_BATCH buffered packets per wake-up (edge.mqtt._Client),
    with paho's own reader: every message arrives once, in order, and is acknowledged."""
    from edge import mqtt
    from emulator.bench_ops import publish_all

    assert callable(getattr(mqtt.paho.Client, "_packet_read", None))      # what _Client uses
    assert callable(getattr(mqtt.paho.Client, "_loop_rc_handle", None))
    got: list[bytes] = []
    events: queue.Queue = queue.Queue()
    link = _link(broker, "burst", lambda ev: got.append(ev.payload)
                 if isinstance(ev, LinkMessage) else events.put(ev), subscriptions=(("b/#", 1),))
    _next(events, LinkUp)
    wakeups = 0
    read = link._client.loop_read

    def counted(*args, **kwargs):
        nonlocal wakeups
        wakeups += 1
        return read(*args, **kwargs)

    link._client.loop_read = counted
    def probe(topic: str, payload: bytes, seen: list[bytes]) -> bool:
        publish_all(broker.port, [(topic, payload)])
        return payload in seen

    # The SUBACK carries no event of its own here: probe until one comes through.
    wait_for(lambda: probe("b/probe", b"probe", got), 10, "the subscription", interval_s=0.1)
    n = 3000
    wakeups = 0

    def burst() -> list[bytes]:
        return [p for p in got if p != b"probe"]    # a late probe may still come in

    publish_all(broker.port, [(f"b/{i % 7}", str(i).encode()) for i in range(n)])
    wait_for(lambda: len(burst()) >= n, 30, "the burst")
    assert burst() == [str(i).encode() for i in range(n)]
    assert wakeups < n / 2, f"{wakeups} wake-ups for {n} messages"
    link.stop()

    # Every message was acknowledged: the resumed session has nothing to redeliver, so the
    # first message after it is a new one.
    again: list[bytes] = []
    events = queue.Queue()
    link = _link(broker, "burst", lambda ev: again.append(ev.payload)
                 if isinstance(ev, LinkMessage) else events.put(ev), subscriptions=(("b/#", 1),))
    assert _next(events, LinkUp).session_present
    wait_for(lambda: probe("b/end", b"end", again), 10, "a message after the resumed session",
             interval_s=0.1)
    assert set(again) == {b"end"}, again[:5]
    link.stop()
