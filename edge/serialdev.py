"""Opening serial endpoints, and the reconnect loop every serial peripheral shares.

Endpoints are pyserial URLs (``/dev/serial/by-id/...``, ``socket://``, ``loop://``,
``spy://``): the emulator serves ptys and the agent cannot tell the difference. This is the
only module that opens a serial port; drivers are handed the open port.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from typing import Callable

import serial

from edge.events import DeviceFault, DeviceRecovered
from edge.mqtt import backoff_delay
from hallkiosk.errors import DeviceGone

log = logging.getLogger("hallkiosk.serial")


def open_serial(url: str, *, baudrate: int = 115200, timeout_s: float = 0.05):
    """Open ``url`` exclusively (a second agent must not share a port). Raises DeviceGone."""
    try:
        kwargs = {"baudrate": baudrate, "timeout": timeout_s, "write_timeout": 2.0}
        if "://" not in url:
            kwargs["exclusive"] = True
        return serial.serial_for_url(url, **kwargs)
    except (serial.SerialException, OSError, ValueError) as exc:
        raise DeviceGone(f"cannot open {url}: {exc}") from exc


class SerialWorker(threading.Thread):
    """Keeps one serial peripheral open: open, initialise, run the device loop, and on any
    transport failure close, back off with jitter (0.5 s to 5 s) and reopen when the port
    returns. Faults and recoveries are reported to ``sink`` as events the moment they happen.

    Hot-plug: while backing off, a port given as a plain path (``/dev/serial/by-id/...``, a
    pty symlink) is watched with a stat every ``path_poll_s``. When the path reappears after
    being absent (the cable was pushed back), the wait is cut short after a random settle of
    up to ``settle_s`` (udev creates the link before it sets group and mode) and the backoff
    starts over, so recovery takes well under 2 s from the replug instead of up to the 5 s
    backoff cap. URLs (``socket://`` ...) have no path to watch and keep the plain backoff.
    Every wait here is on the monotonic clock.

    Subclasses implement ``attach(port)`` (build and initialise the driver) and
    ``serve(driver)`` (the device loop; returns or raises when the transport fails).
    """

    device = "serial-device"

    def __init__(self, url: str, *, sink: Callable[[object], None], baudrate: int = 115200,
                 read_timeout_s: float = 0.05, open_port=open_serial,
                 backoff_min_s: float = 0.5, backoff_max_s: float = 5.0,
                 rng: random.Random | None = None, path_poll_s: float = 0.1,
                 settle_s: float = 0.2) -> None:
        super().__init__(name=f"{self.device}-worker", daemon=True)
        self.url = url
        self.sink = sink
        self._baudrate = baudrate
        self._read_timeout_s = read_timeout_s
        self._open_port = open_port
        self._backoff = (backoff_min_s, backoff_max_s)
        self._rng = rng or random.Random()
        if not path_poll_s > 0 or settle_s < 0:
            raise ValueError("path_poll_s must be > 0 and settle_s >= 0")
        self._path_poll_s = path_poll_s
        self._settle_s = settle_s
        # Only a plain path can be watched; "://" marks a pyserial URL (see open_serial).
        self._watch_path = None if "://" in url else url
        self.stopping = threading.Event()
        self.healthy = False
        self._faulted = False
        self._port = None

    def stop(self, timeout_s: float = 3.0) -> None:
        self.stopping.set()
        if self.is_alive():
            self.join(timeout_s)

    def run(self) -> None:
        attempt = 0
        while not self.stopping.is_set():
            try:
                self._port = self._open_port(self.url, baudrate=self._baudrate,
                                             timeout_s=self._read_timeout_s)
                driver = self.attach(self._port)
            except Exception as exc:
                self._close_port()
                self._fault("gone" if isinstance(exc, (DeviceGone, OSError)) else "init_failed", exc)
                if self._wait_retry(backoff_delay(attempt, *self._backoff, self._rng)):
                    attempt = 0         # a device just appeared: a fresh backoff for it
                else:
                    attempt += 1
                continue
            attempt = 0
            self.healthy = True
            if self._faulted:
                self._faulted = False
                self._emit(DeviceRecovered(self.device))
            try:
                self.serve(driver)
            except Exception as exc:
                self._fault("gone" if isinstance(exc, (DeviceGone, OSError)) else "failed", exc)
            finally:
                self.healthy = False
                self._close_port()
            if not self.stopping.is_set():
                self._wait_retry(backoff_delay(0, *self._backoff, self._rng))

    def _wait_retry(self, delay_s: float) -> bool:
        """Wait ``delay_s`` before the next open, or less when the watched path appears.
        Returns True when cut short by the path appearing; False after the full wait or stop."""
        path = self._watch_path
        if path is None:
            self.stopping.wait(delay_s)
            return False
        deadline = time.monotonic() + delay_s
        was_present = os.path.exists(path)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.stopping.wait(min(self._path_poll_s, remaining)):
                return False
            present = os.path.exists(path)
            if present and not was_present:
                log.info("%s: %s appeared, reopening", self.device, path)
                self.stopping.wait(self._rng.uniform(0, self._settle_s))
                return True
            was_present = present

    def _close_port(self) -> None:
        port, self._port = self._port, None
        if port is not None:
            try:
                port.close()
            except Exception:
                log.debug("%s: close failed", self.device, exc_info=True)

    def _fault(self, fault: str, exc: BaseException) -> None:
        if not self._faulted:
            self._faulted = True
            self._emit(DeviceFault(self.device, fault, f"{self.url}: {exc}"))
        else:
            log.debug("%s still down: %s", self.device, exc)

    def _emit(self, event: object) -> None:
        try:
            self.sink(event)
        except Exception:
            log.exception("%s: could not queue %s", self.device, type(event).__name__)

    # -- for subclasses ------------------------------------------------------------------
    def attach(self, port):
        raise NotImplementedError

    def serve(self, driver) -> None:
        raise NotImplementedError
