"""A cell's GPIO sensors through gpiozero: a PIR and a door reed switch, as digital inputs.

Wiring (BCM pins from the board profile's ``gpio.occupancy``):

- PIR: the module's output to the pin, pulled down (an unplugged PIR reads "no motion").
  The module holds its output for seconds and switches cleanly, so it is read by edge
  callbacks, not with gpiozero's MotionSensor, which samples the pin on a thread at 10 Hz
  forever (idle CPU for nothing; see edge.gpio.input_pin).
- Door: a normally-open reed switch between the pin and ground, with the internal pull-up;
  the magnet on the door closes it when the door is shut, so pressed = door closed.

The pin factory is injected (a real one on the Pi, MockFactory in the emulator and tests).
Callbacks run on gpiozero's threads: they only put an event on ``sink``, never raise. The door
is reported as raw :class:`ContactEdge` events: MockPin ignores ``bounce_time``, so the
debouncing happens in the main loop (edge.cells.debounce), where a test can drive the clock.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from gpiozero.input_devices import DigitalInputDevice

from edge.cells.debounce import ContactEdge
from edge.cells.occupancy import SensorReading
from edge.gpio import input_pin

log = logging.getLogger("hallkiosk.cells.gpio")

__all__ = ["CellGpioSensors", "ContactEdge"]


class CellGpioSensors:
    """The PIR and/or door switch of one cell. Either pin may be None (not fitted)."""

    def __init__(self, cell: str, *, sink: Callable[[object], None], pir_pin: int | None = None,
                 door_pin: int | None = None, pir_name: str = "pir", door_name: str = "door",
                 pin_factory=None) -> None:
        self.cell = cell
        self.pir_name = pir_name
        self.door_name = door_name
        self._sink = sink
        self._pir: DigitalInputDevice | None = None
        self._door: DigitalInputDevice | None = None
        try:
            if pir_pin is not None:
                self._pir = input_pin(pir_pin, pull_up=False, pin_factory=pin_factory)
            if door_pin is not None:
                self._door = input_pin(door_pin, pull_up=True, pin_factory=pin_factory)
        except Exception:
            self.close()
            raise

    def start(self) -> None:
        """Hook the callbacks and report the current levels (a level read at start-up is
        steady, so it is a SensorReading, not an edge)."""
        if self._pir is not None:
            self._pir.when_activated = self._safe(lambda: SensorReading(self.cell, self.pir_name, True))
            self._pir.when_deactivated = self._safe(lambda: SensorReading(self.cell, self.pir_name, False))
            self._put(SensorReading(self.cell, self.pir_name, bool(self._pir.is_active)))
        if self._door is not None:
            self._door.when_activated = self._safe(lambda: ContactEdge(self.cell, self.door_name, True))
            self._door.when_deactivated = self._safe(lambda: ContactEdge(self.cell, self.door_name, False))
            self._put(SensorReading(self.cell, self.door_name, bool(self._door.is_active)))

    def _safe(self, build: Callable[[], object]) -> Callable[[], None]:
        def callback() -> None:
            try:
                self._put(build())
            except Exception:  # a gpiozero callback must never raise
                log.exception("cell %s: could not queue a sensor event", self.cell)
        return callback

    def _put(self, event: object) -> None:
        try:
            self._sink(event)
        except Exception:
            log.exception("cell %s: could not queue %s", self.cell, type(event).__name__)

    @property
    def sensor_names(self) -> tuple[str, ...]:
        names = []
        if self._pir is not None:
            names.append(self.pir_name)
        if self._door is not None:
            names.append(self.door_name)
        return tuple(names)

    def close(self) -> None:
        """Release the pins; safe to call twice."""
        for dev in (self._pir, self._door):
            if dev is not None:
                try:
                    dev.close()
                except Exception:
                    log.debug("closing a cell GPIO device failed", exc_info=True)
        self._pir = self._door = None

    def __enter__(self) -> CellGpioSensors:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
