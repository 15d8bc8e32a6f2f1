"""The indicator LED outside a cell's door: one LED, three meanings.

Mapping (a single red "occupied" lamp, as over a studio or lavatory door):

    FREE      off
    OCCUPIED  steady on (LEAVING too: until the hold runs out the cell is not free)
    FAULT     slow blink, 0.5 s on / 0.5 s off: a sensor is stuck, flapping or lost, so the
              free/occupied reading cannot be trusted; staff should look (the fault is
              also an MQTT event)

Why "free = off": a citizen outside can read it at a glance, and it is the state the cell is
in most of the day. A dark lamp also means a dead kiosk; a dead kiosk's cell is not usable
either, and the kiosk's death is reported by its MQTT will.

Wiring: an LED (or a lamp through a transistor) on a BCM pin, active high. The pin factory is
injected (MockFactory in the emulator and tests).
"""

from __future__ import annotations

import logging

from gpiozero.output_devices import LED

from edge.cells.occupancy import Indication

log = logging.getLogger("hallkiosk.cells.indicator")

BLINK_ON_S = 0.5
BLINK_OFF_S = 0.5


class CellIndicator:
    def __init__(self, pin: int, *, pin_factory=None) -> None:
        self._led: LED | None = LED(pin, pin_factory=pin_factory)
        self.indication: Indication | None = None

    def show(self, indication: Indication) -> None:
        """Drive the LED for ``indication``; showing the same indication again is a no-op
        (so a blink is not restarted by every sensor event)."""
        if indication is self.indication or self._led is None:
            return
        self.indication = indication
        if indication is Indication.FREE:
            self._led.off()
        elif indication is Indication.OCCUPIED:
            self._led.on()
        else:
            self._led.blink(on_time=BLINK_ON_S, off_time=BLINK_OFF_S)

    def close(self) -> None:
        """Turn the LED off and release the pin; safe to call twice."""
        led, self._led = self._led, None
        if led is not None:
            try:
                led.close()
            except Exception:
                log.debug("closing the cell indicator failed", exc_info=True)

    def __enter__(self) -> CellIndicator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
