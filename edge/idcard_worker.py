"""The ID-card reader's poll loop, on its own thread.

GA 467 readers do not announce a card: the host asks ``find`` every poll interval, start to
start (no faster than 300 ms on real hardware, PROTOCOLS.md). Between polls the thread sleeps
on an Event, so an idle kiosk costs a few tiny serial exchanges per second and nothing else.
"""

from __future__ import annotations

import logging

from edge.clock import SYSTEM_CLOCK, Clock
from edge.events import CardRead
from edge.idcard.reader import IdCardReader, ReaderRefused
from edge.serialdev import SerialWorker
from hallkiosk.errors import DeviceGone, DeviceTimeout, ProtocolError

log = logging.getLogger("hallkiosk.idcard")

#: Consecutive timeouts / garbled replies after which the port is reopened from scratch.
MAX_SOFT_ERRORS = 3


class CardUnreadable:
    """Event: a card was on the reader but could not be read (the citizen must present it
    again). Carries the SW3 reason, never card data."""
    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __repr__(self) -> str:
        return f"CardUnreadable({self.reason!r})"


class IdCardWorker(SerialWorker):
    device = "idcard-reader"

    def __init__(self, url: str, *, sink, poll_interval_s: float = 0.3, timeout_s: float = 1.0,
                 clock: Clock = SYSTEM_CLOCK, **kwargs) -> None:
        super().__init__(url, sink=sink, **kwargs)
        self.poll_interval_s = poll_interval_s
        self.timeout_s = timeout_s
        self.clock = clock

    def attach(self, port) -> IdCardReader:
        reader = IdCardReader(port, name=self.device, timeout_s=self.timeout_s, clock=self.clock)
        reader.init()
        return reader

    def serve(self, reader: IdCardReader) -> None:
        soft_errors = 0
        while not self.stopping.is_set():
            started = self.clock.monotonic()
            try:
                card = reader.read_card()
                soft_errors = 0
            except ReaderRefused as exc:
                # The card is there but unreadable (SW3 41 etc.): tell the citizen, keep going.
                self._emit(CardUnreadable(str(exc)))
                card = None
            except (DeviceTimeout, ProtocolError) as exc:
                soft_errors += 1
                if soft_errors >= MAX_SOFT_ERRORS:
                    raise DeviceGone(f"{self.url}: {soft_errors} failed exchanges in a row: {exc}") from exc
                log.info("%s: %s (retrying)", self.device, exc)
                card = None
            if card is not None:
                self._emit(CardRead(card, self.clock.monotonic()))
            # Polls START every poll_interval_s (never faster): the exchange's own time comes
            # out of the wait, so a card presented just after a find waits one interval for
            # the next, not an interval plus the exchange.
            self.stopping.wait(max(0.0, started + self.poll_interval_s - self.clock.monotonic()))
