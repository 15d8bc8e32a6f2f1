"""Injected clocks.

Every piece of code whose behaviour depends on time (debounce, hold times, timeouts,
ticket dates) takes a clock, so tests are exact and fast. Timeouts and intervals use
``monotonic()`` only; ``wall()`` is for what a person reads (ticket time, message
timestamps) and may jump when NTP first syncs on a Pi without a real-time clock.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds from an arbitrary origin; never goes backwards."""

    def wall(self) -> float:
        """Seconds since the Unix epoch (UTC), as the system clock says."""


class SystemClock:
    __slots__ = ()

    def monotonic(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()


class ManualClock:
    """A clock tests move by hand: ``clock.advance(0.5)``."""

    def __init__(self, start_mono: float = 1000.0, start_wall: float = 1_795_000_000.0) -> None:
        self._lock = threading.Lock()
        self._mono = start_mono
        self._wall = start_wall

    def monotonic(self) -> float:
        with self._lock:
            return self._mono

    def wall(self) -> float:
        with self._lock:
            return self._wall

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a monotonic clock cannot go back")
        with self._lock:
            self._mono += seconds
            self._wall += seconds

    def set_wall(self, epoch_s: float) -> None:
        """Jump the wall clock only (what an NTP step does)."""
        with self._lock:
            self._wall = epoch_s


SYSTEM_CLOCK = SystemClock()
