"""Shared fixtures: a real Mosquitto on a free loopback port, and emulated halls."""

from __future__ import annotations

import time
from typing import Callable

import pytest

from emulator.broker import MosquittoBroker
from emulator.kiosk import EmulatedHall


def wait_for(predicate: Callable[[], object], timeout_s: float = 10.0, what: str = "condition",
             interval_s: float = 0.01):
    """Wait for a condition with a deadline (polling a predicate, never a bare sleep)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


@pytest.fixture
def broker(tmp_path):
    b = MosquittoBroker(tmp_path / "broker").start()
    yield b
    b.kill()


@pytest.fixture
def hall(tmp_path):
    """An emulated hall (real PKI, mTLS broker with generated ACLs). On teardown it proves
    what every end-to-end test must keep true: no payload published on the hall's topics
    contains a presented card's name, ID number or address."""
    from emulator.idcard import EmulatedReader

    EmulatedReader.presented.clear()
    h = EmulatedHall(tmp_path / "hall").start()
    try:
        yield h
        leaks = h.auditor.leaks(EmulatedReader.presented)
        assert not leaks, f"personal data published on: {sorted(set(leaks))}"
    finally:
        h.close()
