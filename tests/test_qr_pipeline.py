"""The camera path: EmulatedCamera frames through QrPipeline (injected clock, stepped frame by
frame), the QrCameraWorker thread, and the Picamera2 backend's late import."""

from __future__ import annotations

import queue
import sys

import numpy as np
import pytest

from edge.clock import ManualClock
from edge.events import DeviceFault, DeviceRecovered
from edge.qr import QrScanned
from edge.qr.codes import parse_qr
from edge.qr.frames import Picamera2Source
from edge.qr.pipeline import QrPipeline, zbar_decode
from edge.qr.worker import QrCameraWorker
from emulator.booking import BookingService
from emulator.camera import FAULT_NAMES, EmulatedCamera, LensFaults, film
from hallkiosk.errors import DeviceGone

FPS = 30
HALL = "citizen-home"
BOOKING = BookingService(HALL)
NOW_S = 1_795_000_000
CODE = BOOKING.appointment("A", start_s=NOW_S, appointment_id="BK-000042")
OTHER = BOOKING.appointment("B", start_s=NOW_S, appointment_id="BK-000043")


class Counting:
    """Wraps the real decoder to count calls and record the size of each image decoded."""

    def __init__(self) -> None:
        self.sizes: list[tuple[int, int]] = []

    def __call__(self, grey):
        self.sizes.append(grey.shape)
        return zbar_decode(grey)


class Rig:
    """A camera and a pipeline on one manual clock, advanced 1/30 s per frame."""

    def __init__(self, seed: int = 0, **pipeline_kwargs) -> None:
        self.clock = ManualClock()
        self.camera = EmulatedCamera(paced=False, seed=seed, clock=self.clock)
        self.camera.start()
        self.decoder = Counting()
        self.pipeline = QrPipeline(clock=self.clock, decoder=self.decoder, **pipeline_kwargs)

    def run(self, frames: int) -> list[bytes]:
        out: list[bytes] = []
        for _ in range(frames):
            out += self.pipeline.process(self.camera.read())
            self.clock.advance(1 / FPS)
        return out


def test_empty_counter_costs_no_decodes():
    rig = Rig()
    assert rig.run(3 * FPS) == []
    stats = rig.pipeline.stats
    assert stats.frames == 90
    assert len(rig.decoder.sizes) <= 1          # the first frame, which has no reference
    assert stats.skipped >= 89


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("faults", ["typical", "harsh"])
def test_code_held_half_a_second_with_faults_is_read_exactly_once(seed, faults):
    rig = Rig(seed=seed)
    assert rig.run(FPS) == []
    rig.camera.show(CODE, getattr(LensFaults, faults)())
    seen = rig.run(FPS // 2)                    # 15 frames at 30 fps
    rig.camera.hide()
    seen += rig.run(FPS)
    assert seen == [CODE]
    assert rig.pipeline.stats.decoded == 1


@pytest.mark.parametrize("fault", FAULT_NAMES)
def test_each_lens_fault_alone_still_reads_in_half_a_second(fault):
    rig = Rig(seed=11)
    rig.run(10)
    rig.camera.show(CODE, LensFaults.single(fault))
    assert rig.run(FPS // 2) == [CODE]


def test_a_code_that_cannot_be_read_is_not_read():
    # Negative control: every frame smeared by motion; nothing may come out.
    rig = Rig()
    rig.run(10)
    rig.camera.show(CODE, LensFaults(no_code=1.0))
    assert rig.run(FPS) == []
    assert len(rig.decoder.sizes) > 10          # but it was tried on the moving frames


def test_decoded_payload_is_the_appointment():
    rig = Rig()
    rig.camera.show(CODE, LensFaults.typical())
    (payload,) = rig.run(FPS // 2)
    appt = parse_qr(payload, booking_keys=BOOKING.keys(), eid_keys={}, hall=HALL,
                    now_ms=NOW_S * 1000)
    assert appt.appointment_id == "BK-000042"


def test_repeat_suppression_window():
    rig = Rig(repeat_window_s=3.0)
    rig.camera.show(CODE, LensFaults.typical())
    assert rig.run(3 * FPS) == [CODE]           # held for 3 s: one ticket, not three
    rig.camera.hide()
    rig.run(FPS)                                # away for 1 s: within the window
    rig.camera.show(CODE, LensFaults.typical())
    assert rig.run(FPS // 2) == []
    assert rig.pipeline.stats.suppressed > 0
    rig.camera.hide()
    rig.run(4 * FPS)                            # away for 4 s: a new visit
    rig.camera.show(CODE, LensFaults.typical())
    assert rig.run(FPS // 2) == [CODE]


def test_a_different_code_is_not_suppressed():
    rig = Rig()
    rig.camera.show(CODE, LensFaults.typical())
    assert rig.run(FPS // 2) == [CODE]
    rig.camera.show(OTHER, LensFaults.typical())
    assert rig.run(FPS // 2) == [OTHER]


def test_code_held_still_is_decoded_once_then_skipped():
    rig = Rig()
    rig.run(5)
    rig.camera.show(CODE, LensFaults.none())    # no shake: the frames differ by noise only
    assert rig.run(2 * FPS) == [CODE]
    assert len(rig.decoder.sizes) <= 3
    assert rig.pipeline.stats.suppressed == 0   # held, so not even re-decoded


def test_moving_code_is_decoded_in_its_region():
    rig = Rig()
    rig.run(5)
    rig.camera.show(CODE, LensFaults(shake_px=4.0, noise_sigma=3.0))
    rig.run(FPS)
    full = (480, 640)
    crops = [s for s in rig.decoder.sizes[2:] if s != full]
    assert crops, "after the first read the region around the code should be decoded"
    assert all(h * w < 0.5 * 480 * 640 for h, w in crops)
    assert rig.pipeline.stats.decodes < 2 * FPS


def test_still_visitor_becomes_background():
    rig = Rig(settle_s=1.0)
    rig.run(5)
    rig.camera.visitor(sway_px=0.0)
    rig.run(2 * FPS)
    before = len(rig.decoder.sizes)
    rig.run(2 * FPS)
    assert len(rig.decoder.sizes) == before     # adopted: no more decodes
    assert rig.pipeline.stats.adopted == 1
    # ... a code shown by that visitor is still read ...
    rig.camera.show(CODE, LensFaults.typical())
    assert rig.run(FPS // 2) == [CODE]
    # ... and when they leave, the empty counter is recognised at once.
    rig.camera.hide()
    before = len(rig.decoder.sizes)
    rig.run(FPS)
    assert len(rig.decoder.sizes) == before


def test_swaying_visitor_is_decoded_every_frame():
    rig = Rig()
    rig.run(5)
    rig.camera.visitor(sway_px=8.0)
    start = len(rig.decoder.sizes)
    rig.run(FPS)
    assert len(rig.decoder.sizes) - start >= FPS * 3 // 4


def test_pipeline_refuses_non_grey_frames_and_bad_settings():
    p = QrPipeline(clock=ManualClock())
    with pytest.raises(ValueError):
        p.process(np.zeros((480, 640, 3), np.uint8))
    with pytest.raises(ValueError):
        p.process(np.zeros((480, 640), np.float32))
    with pytest.raises(ValueError):
        QrPipeline(clock=ManualClock(), sample_step=0)
    with pytest.raises(ValueError):
        QrPipeline(clock=ManualClock(), change_level=300)


def test_camera_film_is_deterministic_per_seed():
    def frames(seed):
        cam = EmulatedCamera(paced=False, seed=seed)
        cam.show(CODE, LensFaults.harsh())
        return film(cam, 5)

    a, b, c = frames(3), frames(3), frames(4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    assert a[0].shape == (480, 640) and a[0].dtype == np.uint8 and a[0].flags.c_contiguous


# -- the worker thread ------------------------------------------------------------------------
def _next_event(events: queue.Queue, kind: type, timeout_s: float = 5.0):
    """Wait (with a deadline) for the next event of ``kind``, dropping others."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"no {kind.__name__} within {timeout_s} s")
        try:
            ev = events.get(timeout=remaining)
        except queue.Empty:
            continue
        if isinstance(ev, kind):
            return ev


@pytest.fixture
def camera_worker():
    events: queue.Queue = queue.Queue()
    camera = EmulatedCamera(fps=60, seed=5)
    from edge.clock import SYSTEM_CLOCK

    worker = QrCameraWorker(camera, QrPipeline(clock=SYSTEM_CLOCK), sink=events.put,
                            backoff_min_s=0.05, backoff_max_s=0.2)
    worker.start()
    yield camera, worker, events
    worker.stop()
    assert not worker.is_alive()


def test_worker_emits_scans_at_the_camera_pace(camera_worker):
    camera, worker, events = camera_worker
    camera.show(CODE, LensFaults.typical())
    ev = _next_event(events, QrScanned)
    assert ev.payload == CODE and ev.source == "camera"
    assert camera.code_since_mono is not None and ev.mono >= camera.code_since_mono
    assert CODE.decode() not in repr(ev) and "bytes" in repr(ev)


def test_worker_reports_a_failed_camera_and_its_recovery(camera_worker):
    camera, worker, events = camera_worker
    camera.unplug()
    fault = _next_event(events, DeviceFault)
    assert (fault.device, fault.fault) == ("qr-camera", "gone")
    camera.replug()
    assert _next_event(events, DeviceRecovered).device == "qr-camera"
    camera.show(OTHER, LensFaults.typical())
    assert _next_event(events, QrScanned).payload == OTHER


# -- the Pi backend ------------------------------------------------------------------------------
def test_picamera2_is_imported_only_when_started(monkeypatch):
    monkeypatch.setitem(sys.modules, "picamera2", None)   # make the import fail, as off a Pi
    source = Picamera2Source()                             # constructing never imports
    with pytest.raises(DeviceGone, match="--system-site-packages"):
        source.start()


class _RecordingCamera:
    """Stands in for picamera2.Picamera2 to check what the backend asks of it (the Pi's own
    camera stack cannot run here). Records calls; returns a YUV420 buffer's shape."""

    def __init__(self, num: int) -> None:
        self.calls: list[tuple] = [("init", num)]

    def create_preview_configuration(self, **kwargs):
        self.calls.append(("config", kwargs))
        return kwargs

    def configure(self, config):
        self.calls.append(("configure",))

    def start(self):
        self.calls.append(("start",))

    def capture_array(self, name):
        self.calls.append(("capture", name))
        buf = np.zeros((720, 640), np.uint8)
        buf[:480] = 7          # luma
        buf[480:] = 128        # chroma planes
        return buf

    def stop(self):
        self.calls.append(("stop",))

    def close(self):
        self.calls.append(("close",))


def test_picamera2_source_takes_the_y_plane_of_a_yuv420_stream():
    made = []
    source = Picamera2Source(factory=lambda n: made.append(_RecordingCamera(n)) or made[-1])
    source.start()
    frame = source.read()
    source.stop()
    source.stop()
    cam = made[0]
    config = cam.calls[1][1]
    assert config["main"] == {"size": (640, 480), "format": "YUV420"}
    assert frame.shape == (480, 640) and int(frame.max()) == 7
    assert [c[0] for c in cam.calls] == ["init", "config", "configure", "start", "capture",
                                         "stop", "close"]
    with pytest.raises(DeviceGone):
        source.read()
