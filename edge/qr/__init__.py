"""QR codes at the kiosk: two readers (a camera, a serial scanner module) and the two code
formats they may carry (a signed appointment, a citizen's signed e-ID code).

Wiring, from glass to ticket:

    FrameSource (frames.py: Picamera2Source | emulator.camera.EmulatedCamera)
        -> QrCameraWorker (worker.py) -> QrPipeline (pipeline.py: change test, ROI, pyzbar,
           repeat suppression) -> QrScanned(payload, "camera", mono) on the agent's queue
    serial GM65 module -> QrScannerWorker (scanner.py: ScanFramer) -> QrScanned(..., "scanner")
    agent main loop: codes.parse_qr(payload, ...) -> Appointment | CitizenId, or QrRefused

This package's ``__init__`` holds only the events, so importing it pulls in neither numpy
nor pyzbar nor the camera stack. QR content is untrusted and may be personal: the events'
repr shows its length only, and no module here logs or echoes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

QrSource = Literal["camera", "scanner"]


@dataclass(frozen=True, slots=True, repr=False)
class QrScanned:
    """A QR code was read. ``payload`` is the code's raw content (untrusted, possibly personal:
    parse it with ``edge.qr.codes.parse_qr``, never log it). ``mono`` is ``clock.monotonic()``
    when the frame or the scanner's last byte arrived."""

    payload: bytes
    source: QrSource
    mono: float

    def __repr__(self) -> str:
        return f"QrScanned(<{len(self.payload)} bytes>, {self.source!r}, {self.mono:.3f})"


@dataclass(frozen=True, slots=True)
class QrUnreadable:
    """A reader saw something it had to throw away before it became a payload (a scanner frame
    over the length bound, one that never ended). ``reason`` is a short machine word
    ("oversized", "unterminated"); the bytes themselves are never kept."""

    source: QrSource
    reason: str


__all__ = ["QrScanned", "QrSource", "QrUnreadable"]
