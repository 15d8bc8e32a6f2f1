"""A contact debouncer for the cell's door reed switch, on an injected clock.

gpiozero's MockPin ignores ``bounce_time`` (PROTOCOLS.md), and a bounce filter in a library
thread cannot be tested without sleeping, so the filter lives here: the GPIO callback only
enqueues each raw edge (edge.cells.sensors), and the agent's main loop feeds it to
:meth:`Debouncer.feed` and calls :meth:`Debouncer.poll` at :meth:`Debouncer.next_deadline`.

Rule: a raw level becomes the stable level once it has held, unchanged, for ``settle_s``
(default 50 ms: a reed switch bounces for a few ms; nobody opens and shuts a door in 50 ms).
A bounce back to the stable level before that cancels the change. So the stable level lags
a clean edge by ``settle_s`` and never follows a burst of bounces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from edge.clock import Clock


@dataclass(frozen=True, slots=True)
class ContactEdge:
    """Event: a raw edge of a contact input (bounces included), to be debounced before use."""
    cell: str
    sensor: str
    closed: bool


class Debouncer:
    """One contact. ``initial`` is the level read when the input was set up (None: unknown,
    then the first raw level is adopted once it has settled)."""

    __slots__ = ("clock", "settle_s", "stable", "_raw", "_raw_since", "edges")

    def __init__(self, initial: bool | None, *, clock: Clock, settle_s: float = 0.05) -> None:
        if not (math.isfinite(settle_s) and settle_s >= 0):
            raise ValueError(f"settle_s must be a finite number >= 0, got {settle_s!r}")
        self.clock = clock
        self.settle_s = settle_s
        self.stable = initial
        self._raw = initial
        self._raw_since = clock.monotonic()
        #: Raw edges seen, bounces included (for telemetry: a rising count hints at a worn switch).
        self.edges = 0

    def feed(self, raw: bool) -> bool | None:
        """Record a raw level. Returns the new stable level if it changed right now (only
        when ``settle_s`` is 0), else None; call :meth:`poll` at :meth:`next_deadline`."""
        raw = bool(raw)
        if raw != self._raw:
            self._raw = raw
            self._raw_since = self.clock.monotonic()
            self.edges += 1
        return self.poll()

    def poll(self) -> bool | None:
        """The new stable level if the raw level has now settled on a different one, else None."""
        if self._raw is None or self._raw == self.stable:
            return None
        # Within a microsecond counts: a clock advanced to the deadline by float arithmetic
        # may land a rounding error short of it.
        if self._raw_since + self.settle_s <= self.clock.monotonic() + 1e-6:
            self.stable = self._raw
            return self.stable
        return None

    def next_deadline(self) -> float | None:
        """When :meth:`poll` may next report a change (monotonic seconds), or None."""
        if self._raw is None or self._raw == self.stable:
            return None
        return self._raw_since + self.settle_s
