"""From grey frames to QR payloads, spending CPU only when something is in front of the camera.

Decoding a 640x480 frame with zbar costs 5-14 ms on an x86 core and 3-5x that on a Pi 4
(PROTOCOLS.md), so decoding every frame at 30 fps would keep a Pi core busy all day in front
of an empty counter. Every frame therefore first goes through a change test that costs tens
of microseconds:

1. Sample the frame on a sparse grid (every ``sample_step``-th pixel of every
   ``sample_step``-th row: 4800 samples at the defaults). A sample has *changed* when it
   differs from the reference by more than ``change_level`` grey levels, far above sensor
   noise; a scene differs when at least ``change_samples`` samples changed. A code held up
   at reading distance covers hundreds of samples, and its black and white modules both
   differ from whatever was behind it.
2. The reference is the *background*: the counter as it looks with nobody there. A frame
   matching it is skipped, and it refreshes the background (tracking daylight and exposure).
   The last ``KNOWN_SCENES`` backgrounds are kept (see 5), so the empty counter is still
   recognised when the person who became the background walks away.
3. A frame matching the *held* scene, the frame of the last successful decode, is skipped
   too: the same code is still held still in front of the lens, and its sighting counts for
   repeat suppression.
4. Anything else is decoded: first the region around the last code seen (a code moves only a
   little between frames, and a crop a fraction of the frame's size decodes that much faster),
   then, if that finds nothing, the whole frame.
5. A scene that differs from the background but has not moved for ``settle_s`` without
   yielding a code (a person standing still, a bag left on the counter) becomes the new
   background. While it is still settling, only every ``still_every``-th frame is decoded:
   a motionless scene that did not decode a frame ago rarely decodes now.

Nothing that moves is ever skipped, so a code held up for half a second (15 frames at 30 fps)
gets a decode attempt on every frame in which the hand moves it, and at least every
``still_every``-th frame otherwise.

Repeat suppression: a payload is returned once, and again only after it has gone unseen for
``repeat_window_s`` (a sighting, decoded or held, restarts the window), so a code held for a
minute yields one ticket, and a code shown again after the citizen walked away yields another.

Threading: a pipeline belongs to one thread (the camera worker); ``stats`` may be read from
anywhere (plain counters, read without a lock, possibly a frame stale).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np

from edge.clock import Clock

#: Hard cap on the payloads remembered for repeat suppression (a hostile stream of distinct
#: codes must not grow memory).
MAX_REMEMBERED = 64
#: Backgrounds remembered: the empty counter, and scenes adopted since (a person standing).
KNOWN_SCENES = 3


class Found(NamedTuple):
    """One decoded symbol: raw payload bytes and its bounding box in the frame (pixels)."""

    payload: bytes
    left: int
    top: int
    width: int
    height: int


Decoder = Callable[[np.ndarray], list[Found]]


def zbar_decode(grey: np.ndarray) -> list[Found]:
    """pyzbar, QR codes only (every other symbology would triple the cost), on a 2-D uint8
    array. zbar returns the payload as UTF-8 when it guessed a text encoding; ASCII payloads
    (all of ours) come back byte for byte."""
    from pyzbar.pyzbar import ZBarSymbol, decode

    out = []
    for sym in decode(grey, symbols=[ZBarSymbol.QRCODE]):
        r = sym.rect
        out.append(Found(bytes(sym.data), r.left, r.top, r.width, r.height))
    return out


@dataclass(slots=True)
class PipelineStats:
    frames: int = 0        # frames seen
    skipped: int = 0       # frames not decoded (background, held code, settling)
    decodes: int = 0       # decoder calls (a frame may take two: region, then whole frame)
    decoded: int = 0       # payloads returned (new, not suppressed)
    suppressed: int = 0    # payloads decoded again within the repeat window
    adopted: int = 0       # still scenes taken as the new background


class QrPipeline:
    """``process(frame) -> list[bytes]``: the new payloads visible in one frame.

    ``frame``: 2-D uint8 (height, width), the Y plane. ``clock``: injected; only
    ``monotonic()`` is used (repeat window, settling). ``decoder``: the zbar call (tests pass
    a counting wrapper). Parameters are described in the module docstring; units in names.
    """

    def __init__(self, *, clock: Clock, repeat_window_s: float = 3.0, sample_step: int = 8,
                 change_level: int = 28, change_samples: int = 16, settle_s: float = 2.0,
                 still_every: int = 2, roi_margin: float = 0.25, roi_ttl_s: float = 1.0,
                 decoder: Decoder = zbar_decode) -> None:
        if repeat_window_s < 0 or settle_s <= 0 or roi_ttl_s < 0 or roi_margin < 0:
            raise ValueError("QrPipeline: times and margins must be positive")
        if sample_step < 1 or still_every < 1 or change_samples < 1 or not 0 < change_level < 255:
            raise ValueError("QrPipeline: sample_step, still_every, change_samples >= 1 and "
                             "change_level in 1..254")
        self.clock = clock
        self.repeat_window_s = repeat_window_s
        self.sample_step = sample_step
        self.change_level = change_level
        self.change_samples = change_samples
        self.settle_s = settle_s
        self.still_every = still_every
        self.roi_margin = roi_margin
        self.roi_ttl_s = roi_ttl_s
        self.decoder = decoder
        self.stats = PipelineStats()
        self._backgrounds: list[np.ndarray] = []
        self._previous: np.ndarray | None = None
        self._held: np.ndarray | None = None
        self._held_payloads: tuple[bytes, ...] = ()
        self._still_since = 0.0
        self._still_frames = 0
        self._roi: tuple[int, int, int, int] | None = None   # x0, y0, x1, y1
        self._roi_mono = 0.0
        self._seen: OrderedDict[bytes, float] = OrderedDict()

    def reset(self) -> None:
        """Forget the scene (the camera was restarted and may see it differently). The
        payloads seen are kept: a citizen still holding a code up across a camera restart
        must not get a second ticket."""
        self._backgrounds = []
        self._previous = self._held = None
        self._held_payloads = ()
        self._roi = None

    # -- the per-frame path ---------------------------------------------------------------
    def process(self, frame: np.ndarray) -> list[bytes]:
        now = self.clock.monotonic()
        self.stats.frames += 1
        if frame.ndim != 2 or frame.dtype != np.uint8:
            raise ValueError("QrPipeline.process: expected a 2-D uint8 grey frame")
        step = self.sample_step
        # int16 so that differences of uint8 samples neither wrap nor saturate.
        sample = frame[step // 2::step, step // 2::step].astype(np.int16)

        moved = self._previous is None or self._differs(sample, self._previous)
        self._previous = sample
        if moved:
            self._still_since = now
            self._still_frames = 0
        else:
            self._still_frames += 1

        if self._held is not None:
            if not self._differs(sample, self._held):
                for payload in self._held_payloads:
                    self._refresh(payload, now)
                self.stats.skipped += 1
                return []
            self._held, self._held_payloads = None, ()

        for i, known in enumerate(self._backgrounds):
            if not self._differs(sample, known):
                del self._backgrounds[i]
                self._backgrounds.insert(0, sample)
                self.stats.skipped += 1
                return []

        if not moved:
            if now - self._still_since >= self.settle_s:
                self._adopt(sample)
                self.stats.adopted += 1
                self.stats.skipped += 1
                return []
            if self._still_frames % self.still_every:
                self.stats.skipped += 1
                return []

        found = self._decode(frame, now)
        if not self._backgrounds and not found:
            # The very first frame: nothing to compare with, and no code in it.
            self._adopt(sample)
        if not found:
            return []
        self._held = sample
        self._held_payloads = tuple(f.payload for f in found)
        fresh = []
        for f in found:
            if self._sighted(f.payload, now):
                fresh.append(f.payload)
        self.stats.decoded += len(fresh)
        return fresh

    def _adopt(self, sample: np.ndarray) -> None:
        self._backgrounds.insert(0, sample)
        del self._backgrounds[KNOWN_SCENES:]

    def _differs(self, a: np.ndarray, b: np.ndarray) -> bool:
        return int(np.count_nonzero(np.abs(a - b) > self.change_level)) >= self.change_samples

    def _decode(self, frame: np.ndarray, now: float) -> list[Found]:
        roi = self._roi if self._roi is not None and now - self._roi_mono <= self.roi_ttl_s else None
        found: list[Found] = []
        if roi is not None:
            x0, y0, x1, y1 = roi
            self.stats.decodes += 1
            found = [Found(f.payload, f.left + x0, f.top + y0, f.width, f.height)
                     for f in self.decoder(np.ascontiguousarray(frame[y0:y1, x0:x1]))]
        if not found:
            self.stats.decodes += 1
            found = self.decoder(frame)
        if found:
            self._remember_roi(found, frame.shape, now)
        return found

    def _remember_roi(self, found: list[Found], shape: tuple[int, ...], now: float) -> None:
        height, width = shape
        x0 = min(f.left for f in found)
        y0 = min(f.top for f in found)
        x1 = max(f.left + f.width for f in found)
        y1 = max(f.top + f.height for f in found)
        # zbar's box hugs the symbol; the margin (a quarter of its size each side, 8 px at
        # least) covers the quiet zone zbar needs (4 modules of 25-57) plus a frame's worth
        # of hand movement.
        mx = int((x1 - x0) * self.roi_margin) + 8
        my = int((y1 - y0) * self.roi_margin) + 8
        self._roi = (max(0, x0 - mx), max(0, y0 - my), min(width, x1 + mx), min(height, y1 + my))
        self._roi_mono = now

    def _refresh(self, payload: bytes, now: float) -> float | None:
        """Record a sighting at ``now``; returns the previous one's time, if remembered."""
        last = self._seen.pop(payload, None)
        self._seen[payload] = now
        while len(self._seen) > MAX_REMEMBERED:
            self._seen.popitem(last=False)
        return last

    def _sighted(self, payload: bytes, now: float) -> bool:
        """A decode: True when the payload is new (not seen within the repeat window)."""
        last = self._refresh(payload, now)
        if last is not None and now - last < self.repeat_window_s:
            self.stats.suppressed += 1
            return False
        return True

    def __repr__(self) -> str:
        s = self.stats
        return (f"<QrPipeline frames={s.frames} skipped={s.skipped} decodes={s.decodes} "
                f"decoded={s.decoded}>")


__all__ = ["KNOWN_SCENES", "Decoder", "Found", "PipelineStats", "QrPipeline", "zbar_decode"]
