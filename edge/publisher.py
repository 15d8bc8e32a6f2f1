"""Signing and publishing the kiosk's own messages (state, events, tickets).

Every message is sealed by the contract's Signer (fresh sequence number per transmission) and
published through the link. Events and command results raised while the broker is
unreachable wait in bounded queues and go out, oldest first, after the next connection
(results first: ops wait on them); tickets never rely on these queues: they live in the
durable outbox (edge.tickets).
"""

from __future__ import annotations

import logging
from collections import deque

from edge.mqtt import MqttLink, NotConnected
from mqtt_topics.envelope import Signer
from mqtt_topics.topics import KioskTopics

log = logging.getLogger("hallkiosk.publish")

#: Events kept while offline; beyond this the oldest are dropped (and the drop is counted and
#: reported), because a kiosk offline for a day must not grow without bound.
MAX_PENDING_EVENTS = 500

#: Command results kept while offline. A command is only received while connected, so this
#: holds the outcome of one that ended after the link dropped (a restart, an update, a
#: reprint during a broker restart): far fewer than events; the oldest go first.
MAX_PENDING_RESULTS = 64

#: Longest free-text detail value sent (the contract bounds strings at 256 code points).
MAX_DETAIL_CHARS = 240


class Publisher:
    def __init__(self, link: MqttLink, signer: Signer, topics: KioskTopics) -> None:
        self.link = link
        self.signer = signer
        self.topics = topics
        self._pending_events: deque[dict] = deque()
        self._pending_results: deque[dict] = deque()
        self.dropped_events = 0
        self.dropped_results = 0

    def send(self, topic: str, msg_type: str, body: dict, *, qos: int = 1, retain: bool = False) -> int:
        """Seal and publish now; raises NotConnected (the caller decides what to keep)."""
        if not self.link.connected:
            raise NotConnected("not connected")
        return self.link.publish(topic, self.signer.seal(topic, msg_type, body), qos=qos, retain=retain)

    def event(self, name: str, severity: str = "info", subject: str | None = None,
              **detail: str | int | bool | None) -> None:
        # Free text (exception messages, device paths) is cut to what the contract allows,
        # so a long error can never make the event itself unsendable.
        detail = {k: (v[:MAX_DETAIL_CHARS] if isinstance(v, str) else v) for k, v in detail.items()}
        body = {"name": name, "severity": severity, "subject": subject, "detail": detail}
        log.info("event %s severity=%s subject=%s %s", name, severity, subject,
                 " ".join(f"{k}={v}" for k, v in detail.items()))
        try:
            self.send(self.topics.event, "event", body)
        except NotConnected:
            if len(self._pending_events) >= MAX_PENDING_EVENTS:
                self._pending_events.popleft()
                self.dropped_events += 1
            self._pending_events.append(body)

    def command_result(self, body: dict) -> None:
        """Publish a ``cmd_result``; kept (bounded) until the next connection when the broker
        is unreachable, so every command still gets its answer (docs/mqtt-contract.md)."""
        try:
            self.send(self.topics.cmd_result, "cmd_result", body, qos=1)
        except NotConnected:
            log.info("command result %s of seq %s kept until the broker is back",
                     body.get("status"), body.get("cmd_seq"))
            if len(self._pending_results) >= MAX_PENDING_RESULTS:
                self._pending_results.popleft()
                self.dropped_results += 1
            self._pending_results.append(body)

    def flush_events(self) -> None:
        """After a (re)connection: kept command results, then kept events, oldest first."""
        while self._pending_results:
            try:
                self.send(self.topics.cmd_result, "cmd_result", self._pending_results[0], qos=1)
            except NotConnected:
                return
            self._pending_results.popleft()
        if self.dropped_results:
            dropped, self.dropped_results = self.dropped_results, 0
            self.event("command_results_dropped", "warning", "cmd", count=dropped)
        if self.dropped_events:
            dropped, self.dropped_events = self.dropped_events, 0
            self._pending_events.appendleft({"name": "events_dropped", "severity": "warning",
                                             "subject": None, "detail": {"count": dropped}})
        while self._pending_events:
            try:
                self.send(self.topics.event, "event", self._pending_events[0])
            except NotConnected:
                return
            self._pending_events.popleft()
