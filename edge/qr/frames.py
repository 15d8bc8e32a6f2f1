"""Frame sources: where the QR pipeline's grey frames come from.

A ``FrameSource`` yields the grey (luma, Y) plane of each camera frame as a 2-D ``uint8``
numpy array of shape ``(height, width)``, at the camera's own pace: ``read()`` blocks until
the next frame exists. QR decoding needs nothing but luma, and a YUV420 stream hands it over
without any colour conversion: the Y plane is simply the first ``height`` rows of the buffer.

Backends:

- ``Picamera2Source``: the Raspberry Pi camera through picamera2 (libcamera). picamera2 is
  not on PyPI in a usable form: it comes from the OS package ``python3-picamera2``, so on the
  Pi the agent's venv is created with ``python3 -m venv --system-site-packages``. It is
  imported inside ``start()``, only when this backend is chosen, so the agent runs (and its
  tests run) on machines without it.
- ``emulator.camera.EmulatedCamera``: the same contract, filming synthetic QR codes.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Protocol

from hallkiosk.errors import DeviceGone

log = logging.getLogger("hallkiosk.qr")


class FrameSource(Protocol):
    """A camera stream. ``size`` is (width, height) in pixels.

    ``start()`` opens and starts the stream (raises DeviceGone if the camera is missing);
    ``read()`` returns the next Y plane, blocking at most about one frame interval, and raises
    DeviceGone (or another OSError) when the camera fails; ``stop()`` stops and releases the
    camera and is safe to call twice. All three are called from the one thread that reads
    (``edge.qr.worker.QrCameraWorker``); the returned array may be a view into a buffer the
    source reuses, so a consumer must not keep it past the next ``read()``.
    """

    name: str
    size: tuple[int, int]

    def start(self) -> None: ...

    def read(self) -> Any: ...

    def stop(self) -> None: ...


class Picamera2Source:
    """The Pi camera: main stream 640x480 YUV420, Y plane = ``capture_array("main")[:480]``.

    ``fps`` caps the frame rate (libcamera's ``FrameDurationLimits``, in microseconds); a
    fixed short exposure also limits motion blur of a code held in a moving hand.
    ``factory`` builds the Picamera2 object (default: ``picamera2.Picamera2(camera_num)``,
    imported late); tests of the wiring pass their own.
    """

    name = "pi-camera"

    def __init__(self, *, size: tuple[int, int] = (640, 480), fps: float = 30.0,
                 camera_num: int = 0, factory: Callable[[int], Any] | None = None) -> None:
        if fps <= 0:
            raise ValueError("fps must be > 0")
        self.size = size
        self.fps = fps
        self.camera_num = camera_num
        self._factory = factory
        self._cam: Any = None

    def start(self) -> None:
        if self._cam is not None:
            return
        factory = self._factory
        if factory is None:
            try:
                from picamera2 import Picamera2  # late: only the Pi has it (OS package)
            except ImportError as exc:
                raise DeviceGone(
                    f"{self.name}: picamera2 is not importable ({exc}); install the OS package "
                    "python3-picamera2 and create the venv with --system-site-packages") from None
            factory = Picamera2
        try:
            cam = factory(self.camera_num)
            frame_us = int(1_000_000 / self.fps)
            config = cam.create_preview_configuration(
                main={"size": self.size, "format": "YUV420"},
                controls={"FrameDurationLimits": (frame_us, frame_us)},
                # Few buffers: a stale frame is worse than a dropped one for a live reader.
                buffer_count=3)
            cam.configure(config)
            cam.start()
        except Exception as exc:  # libcamera raises RuntimeError and friends on a missing camera
            raise DeviceGone(f"{self.name} {self.camera_num}: cannot start: {exc}") from exc
        self._cam = cam

    def read(self):
        cam = self._cam
        if cam is None:
            raise DeviceGone(f"{self.name}: not started")
        width, height = self.size
        try:
            buf = cam.capture_array("main")
        except Exception as exc:
            raise DeviceGone(f"{self.name}: capture failed: {exc}") from exc
        # YUV420 planar: `height` rows of Y, then U and V at half resolution below it. Rows may
        # be padded to the stride; the slice drops both the chroma and any padding.
        return buf[:height, :width]

    def stop(self) -> None:
        cam, self._cam = self._cam, None
        if cam is None:
            return
        for step in ("stop", "close"):
            try:
                getattr(cam, step)()
            except Exception:
                log.debug("%s: %s failed", self.name, step, exc_info=True)


__all__ = ["FrameSource", "Picamera2Source"]
