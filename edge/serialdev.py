"""Opening serial endpoints, and the reconnect loop every serial peripheral shares.

Endpoints are pyserial URLs (``/dev/serial/by-id/...``, ``socket://``, ``loop://``,
``spy://``): the emulator serves ptys and the agent cannot tell the difference. This is the
only module that opens a serial port; drivers are handed the open port.
"""

from __future__ import annotations

import logging
import random
import threading
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

    Subclasses implement ``attach(port)`` (build and initialise the driver) and
    ``serve(driver)`` (the device loop; returns or raises when the transport fails).
    """

    device = "serial-device"

    def __init__(self, url: str, *, sink: Callable[[object], None], baudrate: int = 115200,
                 read_timeout_s: float = 0.05, open_port=open_serial,
                 backoff_min_s: float = 0.5, backoff_max_s: float = 5.0,
                 rng: random.Random | None = None) -> None:
        super().__init__(name=f"{self.device}-worker", daemon=True)
        self.url = url
        self.sink = sink
        self._baudrate = baudrate
        self._read_timeout_s = read_timeout_s
        self._open_port = open_port
        self._backoff = (backoff_min_s, backoff_max_s)
        self._rng = rng or random.Random()
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
                self.stopping.wait(backoff_delay(attempt, *self._backoff, self._rng))
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
                self.stopping.wait(backoff_delay(0, *self._backoff, self._rng))

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
