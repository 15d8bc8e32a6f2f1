"""An emulated kiosk camera: a FrameSource that films a hall counter and, on request, a QR code
held up to it, with the faults of a real lens and a real hand.

Frames are what ``edge.qr.frames.Picamera2Source`` yields: the grey (Y) plane of a 640x480
YUV420 frame, a C-contiguous ``uint8`` array of shape ``(480, 640)``. Scripting::

    cam = EmulatedCamera(seed=7)                       # paced at 30 fps by default
    cam.show(payload, faults=LensFaults.typical())     # a citizen holds up a phone
    cam.hide()                                         # ... and walks away

Everything random comes from one ``random.Random(seed)`` / ``numpy`` generator pair, so a
seed replays the same film frame for frame. A frame costs almost nothing to produce while
no code is shown (a ring of pre-rendered noisy frames of the empty counter); while a code is
shown, up to ``variants`` distinct frames are rendered (2-10 ms each) and then replayed in
random order, which keeps a 30 fps film cheap enough that the emulator does not distort CPU
figures of the pipeline watching it.

Faults (``LensFaults``), in the order they are applied, and what each models:

- geometry: the code's size on the sensor (``module_px``), in-plane ``rotation_deg``,
  ``perspective`` (a tilted phone: the far edge shrinks by that fraction) and ``shake_px``
  (hand tremor: a new random offset and a degree of extra rotation on every frame);
- ``moire``: a phone screen filmed by a sensor: interference fringes across the screen,
  amplitude as a fraction of the screen's contrast;
- ``occlusion``: a finger over the bottom edge of the code, covering that fraction of its
  height across a third of its width;
- ``glare``: a specular highlight over part of the code, 0..1 of full white;
- ``blur_px``: defocus (Gaussian radius in pixels);
- ``noise_sigma``: sensor noise (grey levels, Gaussian), on top of the camera's own;
- ``no_code``: the probability that a frame has no readable code (the hand moves: the frame
  shows the code smeared by motion blur).
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass

import numpy as np

from edge.clock import SYSTEM_CLOCK, Clock
from hallkiosk.errors import DeviceGone

WIDTH, HEIGHT = 640, 480


@dataclass(frozen=True, slots=True)
class LensFaults:
    """How badly the code is filmed. Units are in the names; 0 means "no such fault"."""

    module_px: float = 4.0
    rotation_deg: float = 0.0
    perspective: float = 0.0
    shake_px: float = 0.0
    moire: float = 0.0
    occlusion: float = 0.0
    glare: float = 0.0
    blur_px: float = 0.0
    noise_sigma: float = 0.0
    no_code: float = 0.0
    #: Where the code's centre sits, as fractions of the frame's width and height.
    center: tuple[float, float] = (0.5, 0.5)
    #: QR error-correction level the code is rendered with ("l", "m", "q", "h").
    error: str = "m"

    def __post_init__(self) -> None:
        checks = (
            ("module_px", 1.0 <= self.module_px <= 16.0),
            ("perspective", 0.0 <= self.perspective <= 0.5),
            ("shake_px", 0.0 <= self.shake_px <= 40.0),
            ("moire", 0.0 <= self.moire <= 1.0),
            ("occlusion", 0.0 <= self.occlusion <= 0.5),
            ("glare", 0.0 <= self.glare <= 1.0),
            ("blur_px", 0.0 <= self.blur_px <= 10.0),
            ("noise_sigma", 0.0 <= self.noise_sigma <= 64.0),
            ("no_code", 0.0 <= self.no_code <= 1.0),
            ("error", self.error in ("l", "m", "q", "h")),
        )
        bad = [name for name, ok in checks if not ok]
        if bad:
            raise ValueError(f"LensFaults: out of range: {', '.join(bad)}")

    @classmethod
    def none(cls) -> LensFaults:
        """A code held square to the lens, still, in good light."""
        return cls()

    @classmethod
    def typical(cls) -> LensFaults:
        """What a counter camera mostly sees: a slightly tilted, shaking, noisy phone."""
        return cls(module_px=4.0, rotation_deg=12.0, perspective=0.12, shake_px=3.0,
                   moire=0.15, glare=0.25, blur_px=0.8, noise_sigma=5.0, no_code=0.2)

    @classmethod
    def harsh(cls) -> LensFaults:
        """Everything at once, near the limit of what zbar still reads now and then."""
        return cls(module_px=3.5, rotation_deg=25.0, perspective=0.12, shake_px=5.0,
                   moire=0.3, occlusion=0.08, glare=0.45, blur_px=1.0, noise_sigma=8.0,
                   no_code=0.3, center=(0.42, 0.55))

    @classmethod
    def single(cls, fault: str, **base) -> LensFaults:
        """One named fault at a telling strength (for tests that sweep the faults)."""
        strengths = {
            "noise": {"noise_sigma": 12.0}, "blur": {"blur_px": 1.3},
            "rotation": {"rotation_deg": 35.0}, "perspective": {"perspective": 0.15},
            "glare": {"glare": 0.5}, "occlusion": {"occlusion": 0.1},
            "moire": {"moire": 0.35}, "shake": {"shake_px": 8.0}, "no_code": {"no_code": 0.5},
        }
        if fault not in strengths:
            raise ValueError(f"unknown fault {fault!r}; known: {', '.join(strengths)}")
        return cls(**{**base, **strengths[fault]})


FAULT_NAMES = ("noise", "blur", "rotation", "perspective", "glare", "occlusion", "moire",
               "shake", "no_code")


def _perspective_coeffs(dst: np.ndarray, src: np.ndarray) -> tuple[float, ...]:
    """PIL PERSPECTIVE coefficients mapping output points ``dst`` to input points ``src``.

    PIL samples the input at ((a x + b y + c) / (g x + h y + 1), (d x + e y + f) / (...)) for
    every output pixel (x, y); four point pairs give the eight unknowns.
    """
    rows, rhs = [], []
    for (x, y), (u, v) in zip(dst, src):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs.extend([u, v])
    return tuple(float(c) for c in np.linalg.solve(np.array(rows, float), np.array(rhs, float)))


class _Scene:
    """What stands in front of the lens (a code, or a visitor without one) and the frames
    rendered for it so far."""

    __slots__ = ("payload", "faults", "modules", "variants", "smeared", "sway_px", "prerendered")

    def __init__(self, payload: bytes | None, faults: LensFaults, sway_px: float = 0.0) -> None:
        self.payload = payload
        self.faults = faults
        self.sway_px = sway_px
        self.modules = None
        if payload is not None:
            import segno

            symbol = segno.make(payload, error=faults.error, micro=False, boost_error=False)
            # 1 = dark module; a 4-module quiet zone, as on a phone screen or a printout.
            self.modules = np.pad(np.array([list(r) for r in symbol.matrix], dtype=np.uint8), 4)
        self.variants: list[np.ndarray] = []
        self.smeared: list[np.ndarray] = []
        self.prerendered = False


class EmulatedCamera:
    """A FrameSource (see ``edge.qr.frames``) filming the empty counter or a held-up code.

    ``fps``: frames per second; ``read()`` blocks until the next frame is due, and drops
    frames the consumer was too slow for, as a camera's ring buffer does. ``paced=False``
    returns frames at once (tests and the benchmark step through a film as fast as they can).
    ``noise_sigma``: the sensor's own noise in grey levels, present in every frame.
    ``variants``: distinct frames rendered per shown code before they are replayed.
    """

    name = "emulated-camera"
    size = (WIDTH, HEIGHT)

    def __init__(self, *, fps: float = 30.0, seed: int = 0, paced: bool = True,
                 noise_sigma: float = 2.0, variants: int = 12, clock: Clock = SYSTEM_CLOCK) -> None:
        if fps <= 0:
            raise ValueError("fps must be > 0")
        self.fps = fps
        self.paced = paced
        self.clock = clock
        self._variants_max = max(1, variants)
        self._rng = random.Random(seed)
        self._np = np.random.default_rng(seed)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._scene: _Scene | None = None
        self._plugged = True
        self._started = False
        self._next_due: float | None = None
        self.frames = 0
        #: ``clock.monotonic()`` when the first frame holding the current code was returned.
        self.code_since_mono: float | None = None
        #: Number of frames returned since ``show()`` (0 while hidden).
        self.code_frames = 0
        self._background = self._make_background()
        self._yy, self._xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
        self._unit: list[np.ndarray] | None = None
        self._noise = self._make_noise(noise_sigma, 8)
        self._idle = [np.clip(self._background + n, 0, 255).astype(np.uint8) for n in self._noise]
        for frame in self._idle:
            frame.flags.writeable = False

    # -- scripting ------------------------------------------------------------------------
    def show(self, payload: bytes, faults: LensFaults | None = None, *, prerender: bool = False) -> None:
        """Hold a QR code carrying ``payload`` (bytes, encoded as segno chooses) in view.

        ``prerender``: render all the variants now, on the caller's thread, so that reading
        them costs nothing (benchmarks: a real camera does not pay for drawing the scene)."""
        scene = _Scene(bytes(payload), faults or LensFaults.none())
        if prerender:
            f = scene.faults
            smeared = round(self._variants_max * f.no_code) if f.no_code else 0
            for _ in range(smeared):
                scene.smeared.append(self._frozen(self._render(scene, True)))
            for _ in range(self._variants_max if f.no_code < 1 else 0):
                scene.variants.append(self._frozen(self._render(scene, False)))
            scene.prerendered = True
        with self._lock:
            self._scene = scene
            self.code_since_mono = None
            self.code_frames = 0

    def visitor(self, sway_px: float = 6.0) -> None:
        """Someone stands at the counter holding no code; ``sway_px`` is how far they move
        between frames (0: perfectly still)."""
        with self._lock:
            self._scene = _Scene(None, LensFaults.none(), sway_px)
            self.code_since_mono = None
            self.code_frames = 0

    def hide(self) -> None:
        """Take the code (or the visitor) away: the camera films the empty counter again."""
        with self._lock:
            self._scene = None
            self.code_since_mono = None
            self.code_frames = 0

    def unplug(self) -> None:
        """The camera fails (ribbon cable, libcamera error): reads raise DeviceGone."""
        with self._lock:
            self._plugged = False
        self._wake.set()

    def replug(self) -> None:
        with self._lock:
            self._plugged = True
            self._wake.clear()

    # -- FrameSource ----------------------------------------------------------------------
    def start(self) -> None:
        with self._lock:
            if not self._plugged:
                raise DeviceGone(f"{self.name}: no camera")
            self._started = True
            self._next_due = None
            self._wake.clear()

    def stop(self) -> None:
        """Stop the stream; a ``read()`` blocked waiting for its frame returns at once."""
        with self._lock:
            self._started = False
        self._wake.set()

    close = stop

    def read(self) -> np.ndarray:
        """The next frame, (480, 640) uint8, read-only. Raises DeviceGone when unplugged or
        stopped."""
        if self.paced:
            self._pace()
        with self._lock:
            if not self._plugged or not self._started:
                raise DeviceGone(f"{self.name}: camera {'gone' if not self._plugged else 'stopped'}")
            scene = self._scene
            self.frames += 1
        if scene is None:
            return self._idle[self._np.integers(len(self._idle))]
        frame = self._scene_frame(scene)
        with self._lock:
            if self._scene is scene and scene.payload is not None:
                self.code_frames += 1
                if self.code_since_mono is None:
                    self.code_since_mono = self.clock.monotonic()
        return frame

    def _pace(self) -> None:
        period = 1.0 / self.fps
        now = self.clock.monotonic()
        due = self._next_due if self._next_due is not None else now
        if due < now - period:
            # The consumer fell behind: skip the frames it missed rather than bursting.
            due = now
        if due > now:
            # A camera's frame interval, not synchronisation; stop()/unplug() cut it short.
            self._wake.wait(due - now)
        self._next_due = due + period

    # -- rendering ------------------------------------------------------------------------
    def _make_background(self) -> np.ndarray:
        """An empty counter: a lit wall gradient, a counter edge and a few fixtures (int16)."""
        y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
        bg = 150 + 40 * (x / WIDTH) - 30 * (y / HEIGHT)
        bg[int(HEIGHT * 0.78):, :] = 95                        # the counter top
        for _ in range(4):                                      # posters, a sign, a pen holder
            x0, y0 = self._rng.randrange(0, WIDTH - 80), self._rng.randrange(0, int(HEIGHT * 0.7))
            w, h = self._rng.randrange(30, 120), self._rng.randrange(20, 90)
            bg[y0:y0 + h, x0:x0 + w] = self._rng.randrange(60, 220)
        return bg.astype(np.int16)

    def _make_noise(self, sigma: float, count: int) -> list[np.ndarray]:
        if sigma <= 0:
            return [np.zeros((HEIGHT, WIDTH), np.int16)]
        return [np.rint(self._np.normal(0.0, sigma, (HEIGHT, WIDTH))).astype(np.int16)
                for _ in range(count)]

    def _scene_frame(self, scene: _Scene) -> np.ndarray:
        f = scene.faults
        smeared = f.no_code > 0 and self._rng.random() < f.no_code
        pool = scene.smeared if smeared else scene.variants
        if not scene.prerendered and len(pool) < self._variants_max:
            frame = self._frozen(self._render(scene, smeared))
            pool.append(frame)
            return frame
        pool = pool or scene.variants or scene.smeared
        return pool[self._rng.randrange(len(pool))]

    @staticmethod
    def _frozen(frame: np.ndarray) -> np.ndarray:
        frame.flags.writeable = False
        return frame

    def _render_visitor(self, scene: _Scene) -> np.ndarray:
        """A dark-clothed torso and a head against the counter, shifted by the sway."""
        dx = self._rng.uniform(-scene.sway_px, scene.sway_px)
        dy = self._rng.uniform(-scene.sway_px, scene.sway_px) / 2
        yy, xx = self._yy, self._xx
        frame = self._background.astype(np.float32)
        torso = ((xx - 320 - dx) / 170) ** 2 + ((yy - 470 - dy) / 220) ** 2 <= 1.0
        head = ((xx - 320 - dx) / 65) ** 2 + ((yy - 190 - dy) / 80) ** 2 <= 1.0
        frame[torso] = 55.0
        frame[head] = 120.0
        out = np.rint(frame).astype(np.int16) + self._noise[self._rng.randrange(len(self._noise))]
        return np.ascontiguousarray(np.clip(out, 0, 255).astype(np.uint8))

    def _render(self, scene: _Scene, smeared: bool) -> np.ndarray:
        from PIL import Image, ImageFilter

        if scene.modules is None:
            return self._render_visitor(scene)
        f = scene.faults
        rng = self._rng
        n = scene.modules.shape[0]
        # The code plane: white screen (230), dark modules (35), 8 pixels per module so the
        # warp samples it smoothly.
        plane = (230 - 195 * scene.modules).astype(np.uint8)
        scale = 8
        code = Image.fromarray(plane, "L").resize((n * scale, n * scale), Image.Resampling.NEAREST)
        side = n * f.module_px
        cx = f.center[0] * WIDTH + rng.uniform(-f.shake_px, f.shake_px)
        cy = f.center[1] * HEIGHT + rng.uniform(-f.shake_px, f.shake_px)
        angle = np.radians(f.rotation_deg + (rng.uniform(-1.0, 1.0) if f.shake_px else 0.0))
        half = side / 2
        # Corners TL, TR, BR, BL; the top edge shrinks with perspective (phone tilted away).
        top = half * (1 - f.perspective)
        local = np.array([[-top, -half], [top, -half], [half, half], [-half, half]])
        rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        dst = local @ rot.T + [cx, cy]

        # Everything below happens in a window around the code (the finger reaches half a
        # side below it; blur needs a few pixels more): the rest of the frame is background.
        pad = side * 0.6 + 8
        x0, y0 = (max(0, int(np.floor(v - pad))) for v in dst.min(axis=0))
        x1 = min(WIDTH, int(np.ceil(dst[:, 0].max() + pad)))
        y1 = min(HEIGHT, int(np.ceil(dst[:, 1].max() + pad)))
        w, h = x1 - x0, y1 - y0
        src = np.array([[0, 0], [n * scale, 0], [n * scale, n * scale], [0, n * scale]], float)
        coeffs = _perspective_coeffs(dst - [x0, y0], src)
        warped = np.asarray(code.transform((w, h), Image.Transform.PERSPECTIVE, coeffs,
                                           Image.Resampling.BILINEAR), dtype=np.float32)
        mask = np.asarray(Image.new("L", code.size, 255).transform(
            (w, h), Image.Transform.PERSPECTIVE, coeffs, Image.Resampling.BILINEAR),
            dtype=np.float32) / 255.0
        yy, xx = self._yy[y0:y1, x0:x1], self._xx[y0:y1, x0:x1]

        if f.moire:
            # Fringes from the screen's pixel grid beating against the sensor's: a few pixels
            # apart, slightly slanted, drifting from frame to frame.
            period = rng.uniform(5.0, 8.0)
            slant = rng.uniform(-0.4, 0.4)
            phase = rng.uniform(0, 2 * np.pi)
            fringe = np.sin(2 * np.pi * (xx + slant * yy) / period + phase)
            warped = warped * (1.0 + f.moire * 0.5 * fringe)

        window = self._background[y0:y1, x0:x1] * (1 - mask) + warped * mask

        if f.occlusion:
            # A finger: a skin-grey ellipse pushing up over the middle of the bottom edge.
            bottom = dst[2:4].mean(axis=0)
            up = np.array([-np.sin(angle), np.cos(angle)])         # from the centre down
            # Past the 4-module quiet zone, then ``occlusion`` of the symbol's own height.
            tip = bottom - up * f.module_px * (4 + (n - 8) * f.occlusion)
            centre = tip + up * side * 0.5
            dx, dy = xx - centre[0], yy - centre[1]
            along = dx * up[0] + dy * up[1]
            across = dx * up[1] - dy * up[0]
            window[(along / (side * 0.5)) ** 2 + (across / (side / 6)) ** 2 <= 1.0] = 140.0

        if f.glare:
            gx = cx + rng.uniform(-0.3, 0.3) * side
            gy = cy + rng.uniform(-0.3, 0.3) * side
            radius = side * 0.18
            window = window + f.glare * 255.0 * np.exp(
                -((xx - gx) ** 2 + (yy - gy) ** 2) / (2 * radius ** 2))

        img = Image.fromarray(np.clip(window, 0, 255).astype(np.uint8), "L")
        if smeared:
            # Motion: the code is there but smeared past reading.
            img = img.filter(ImageFilter.BoxBlur(max(4.0, f.module_px * 2)))
        elif f.blur_px:
            img = img.filter(ImageFilter.GaussianBlur(f.blur_px))
        out = self._background.astype(np.int16)
        out[y0:y1, x0:x1] = np.asarray(img, dtype=np.int16)
        out += self._noise[rng.randrange(len(self._noise))]
        if f.noise_sigma:
            unit = self._unit_noise()
            out += np.rint(f.noise_sigma * unit[rng.randrange(len(unit))]).astype(np.int16)
        return np.ascontiguousarray(np.clip(out, 0, 255).astype(np.uint8))

    def _unit_noise(self) -> list[np.ndarray]:
        # Standard-normal fields drawn once per camera and scaled per fault: drawing 300 000
        # normals per frame would cost more than the rest of the frame.
        if self._unit is None:
            self._unit = [self._np.standard_normal((HEIGHT, WIDTH), dtype=np.float32)
                          for _ in range(4)]
        return self._unit

    def __repr__(self) -> str:
        return f"<EmulatedCamera fps={self.fps} showing={self._scene is not None}>"


def film(camera: EmulatedCamera, frames: int) -> list[np.ndarray]:
    """Read ``frames`` frames from an unpaced camera (a convenience for tests and benches)."""
    if camera.paced:
        raise ValueError("film() needs a camera made with paced=False")
    camera.start()
    return [camera.read() for _ in range(frames)]


__all__ = ["EmulatedCamera", "FAULT_NAMES", "LensFaults", "film"]
