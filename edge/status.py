"""What the kiosk is able to do right now, and telling everyone: health -> service mode ->
retained state (for ops), the front panel (for citizens) and systemd (STATUS, WATCHDOG).

One owner, the main loop, calls in here; nothing in this module runs on another thread.
"""

from __future__ import annotations

import logging
from typing import Callable

from edge.clock import Clock
from edge.degraded import OUT_OF_SERVICE, ServiceMode, decide, state_fields
from edge.health import Health
from edge.mqtt import NotConnected
from edge.publisher import Publisher
from edge.sdnotify import Notifier
from hallkiosk import __version__

log = logging.getLogger("hallkiosk.status")


class KioskStatus:
    def __init__(self, *, health: Health, notifier: Notifier, publisher: Publisher,
                 categories: tuple[str, ...], direct_to: str, clock: Clock,
                 on_mode: Callable[[ServiceMode], None],
                 extra: Callable[[], dict] = dict) -> None:
        self.health = health
        self.notifier = notifier
        self.publisher = publisher
        self.categories = categories
        self.direct_to = direct_to
        self.clock = clock
        self._on_mode = on_mode
        self._extra = extra                   # more retained-state fields (the cell's state)
        self.hold: str | None = None          # out of service by command, or shutting down
        self.session_no = 0                   # MQTT session counter (birth and death)
        self.will_seq: int | None = None      # the seq the current will was sealed with
        self.mode = decide(health.snapshot(), direct_to=direct_to)
        self._since_ms = self._now_ms()

    def _now_ms(self) -> int:
        return int(self.clock.wall() * 1000)

    # -- the service mode ----------------------------------------------------------------
    def refresh(self, *, force_publish: bool = False) -> bool:
        """Re-decide the mode; on a change (or when forced) tell ops, the panel and systemd."""
        mode = decide(self.health.snapshot(), direct_to=self.direct_to, out_of_service=self.hold)
        changed = mode != self.mode
        if mode.status != self.mode.status:
            self._since_ms = self._now_ms()
        self.mode = mode
        if changed:
            log.info("service mode %s offers_tickets=%s reason=%s", mode.status,
                     mode.offers_tickets, mode.reason)
            self._on_mode(mode)
            self.notifier.status(self.status_line())
        if changed or force_publish:
            self.publish_state()
        return changed

    def set_hold(self, reason: str | None) -> None:
        self.hold = reason
        self.refresh()

    def status_line(self) -> str:
        line = f"{self.mode.status}: {self.mode.reason}" if self.mode.reason else self.mode.status
        return line[:200]

    # -- retained state (birth, changes, death) -------------------------------------------------
    def state_body(self, *, offline_reason: str | None = None) -> dict:
        if offline_reason is not None:
            return {"status": "offline", "session": self.session_no, "agent_version": __version__,
                    "since_ms": self._now_ms(), "reason": offline_reason, "services": []}
        body = {"session": self.session_no, "agent_version": __version__, "since_ms": self._since_ms,
                **state_fields(self.mode, self.categories)}
        more = self._extra()
        if more:
            body["extra"] = {**body.get("extra", {}), **more}
        if self.will_seq is not None:
            # The will was sealed (and took its seq) before this connection: consumers must
            # not count that seq as a lost message (docs/mqtt-contract.md).
            body["extra"] = {**body.get("extra", {}), "will_seq": self.will_seq}
        return body

    def publish_state(self) -> int | None:
        try:
            return self.publisher.send(self.publisher.topics.state, "state", self.state_body(),
                                       qos=1, retain=True)
        except NotConnected:
            return None        # published again at the next connection (birth)

    def publish_offline(self, reason: str) -> bool:
        try:
            self.publisher.send(self.publisher.topics.state, "state",
                                self.state_body(offline_reason=reason), qos=1, retain=True)
            return True
        except NotConnected:
            return False

    @property
    def out_of_service(self) -> bool:
        return self.mode.status == OUT_OF_SERVICE

    # -- each loop turn --------------------------------------------------------------------------
    def tick(self) -> None:
        """Liveness and the watchdog: ping systemd only while the health checks pass."""
        self.health.loop_tick()
        if self.notifier.watchdog_due():
            if self.health.watchdog_ok():
                self.notifier.watchdog()
            else:
                problems = ", ".join(self.health.watchdog_problems())
                log.error("watchdog withheld: %s", problems)
                self.notifier.status(f"unhealthy: {problems}"[:200])
        if self.health.probe_due():
            mid = self.publish_state()
            if mid is not None:
                self.health.probe_sent(mid)

    def deadlines(self) -> list[float]:
        out = [d for d in (self.notifier.next_watchdog_deadline(), self.health.next_probe_deadline())
               if d is not None]
        return out
