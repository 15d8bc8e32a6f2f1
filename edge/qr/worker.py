"""The camera's thread: pull frames at the source's pace, run the pipeline, hand payloads on.

The thread never sleeps on its own schedule: ``source.read()`` blocks until the camera has
the next frame, so the loop runs exactly at the camera's frame rate and, when a decode takes
longer than a frame interval (a Pi 4 decoding a busy frame), the camera drops frames instead
of the worker queueing them. When the camera fails, the worker reports ``DeviceFault``, backs
off with jitter (0.5 s to 5 s, as the serial peripherals do) and starts it again; it reports
``DeviceRecovered`` once frames flow again.
"""

from __future__ import annotations

import logging
import random
import threading
from typing import Callable

from edge.clock import SYSTEM_CLOCK, Clock
from edge.events import DeviceFault, DeviceRecovered
from edge.mqtt import backoff_delay
from edge.qr import QrScanned
from edge.qr.frames import FrameSource
from edge.qr.pipeline import QrPipeline
from hallkiosk.errors import DeviceGone

log = logging.getLogger("hallkiosk.qr")


class QrCameraWorker(threading.Thread):
    """Reads ``source``, feeds ``pipeline``, puts ``QrScanned(payload, "camera", mono)`` on
    ``sink`` (the agent's ``events.put``). ``mono`` is ``clock.monotonic()`` when the frame
    was read. ``stop()`` returns within about one frame interval."""

    device = "qr-camera"

    def __init__(self, source: FrameSource, pipeline: QrPipeline, *,
                 sink: Callable[[object], None], clock: Clock = SYSTEM_CLOCK,
                 backoff_min_s: float = 0.5, backoff_max_s: float = 5.0,
                 rng: random.Random | None = None) -> None:
        super().__init__(name=f"{self.device}-worker", daemon=True)
        self.source = source
        self.pipeline = pipeline
        self.sink = sink
        self.clock = clock
        self._backoff = (backoff_min_s, backoff_max_s)
        self._rng = rng or random.Random()
        self.stopping = threading.Event()
        self.healthy = False
        self._faulted = False

    def stop(self, timeout_s: float = 3.0) -> None:
        self.stopping.set()
        if self.is_alive():
            self.join(timeout_s)

    def run(self) -> None:
        attempt = 0
        while not self.stopping.is_set():
            try:
                self.source.start()
                self.pipeline.reset()
                self._stream()
                attempt = 0
            except Exception as exc:
                self._fault(exc)
                self.stopping.wait(backoff_delay(attempt, *self._backoff, self._rng))
                attempt += 1
            finally:
                self.healthy = False
                self._stop_source()

    def _stream(self) -> None:
        first = True
        while not self.stopping.is_set():
            frame = self.source.read()
            mono = self.clock.monotonic()
            if first:
                first = False
                self.healthy = True
                if self._faulted:
                    self._faulted = False
                    self._emit(DeviceRecovered(self.device))
            for payload in self.pipeline.process(frame):
                self._emit(QrScanned(payload, "camera", mono))

    def _stop_source(self) -> None:
        try:
            self.source.stop()
        except Exception:
            log.debug("%s: stop failed", self.device, exc_info=True)

    def _fault(self, exc: BaseException) -> None:
        if not self._faulted:
            self._faulted = True
            fault = "gone" if isinstance(exc, (DeviceGone, OSError)) else "failed"
            self._emit(DeviceFault(self.device, fault, f"{self.source.name}: {exc}"))
        else:
            log.debug("%s still down: %s", self.device, exc)

    def _emit(self, event: object) -> None:
        try:
            self.sink(event)
        except Exception:
            log.exception("%s: could not queue %s", self.device, type(event).__name__)


__all__ = ["QrCameraWorker"]
