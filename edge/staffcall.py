"""Staff call: a citizen asks for a person. Pure logic on an injected clock, plus the GPIO panel.

Behaviour:

- The first press (on the kiosk's button or a cell's) raises a call: one
  ``staff_call.raised`` event naming the cell and the button's source, and the call LED
  lights.
- While the call is pending, presses only bump its counter, except that a press at least
  ``repeat_after_s`` (default 60 s) after the call was last published publishes it again
  (``staff_call.repeated``, with the count): a citizen still waiting a minute later is news, ten
  impatient presses in a second are not. So one button can cost the hall at most one event
  a minute.
- Ops acknowledges with a signed command (``staff_call.ack``, args ``{"call": "<id>"}``);
  the agent calls :meth:`StaffCall.acknowledge`, which ends the call (``staff_call.acked``
  event) and turns the LED off. An ack for another call id (an old call, a call from before
  a restart) is ignored and reported as False.
- A pending call lives in memory only: after an agent restart the LED is off and a press
  raises a new call (the old one was already published; ops acks it as stale).

No personal data: a call names a kiosk, a cell, a source button and counts.

Wiring: :class:`StaffCallPanel` owns the buttons and the LED (gpiozero, injected pin
factory); its callbacks only put :class:`StaffCallPressed` on the agent's queue. The agent's
loop calls ``press`` and ``acknowledge`` and publishes each returned :class:`CallNotice`.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from gpiozero.input_devices import DigitalInputDevice
from gpiozero.output_devices import LED

from edge.clock import Clock
from edge.gpio import input_pin

log = logging.getLogger("hallkiosk.staffcall")


@dataclass(frozen=True, slots=True)
class StaffCallPressed:
    """Event from a staff-call button: ``source`` names the button ("kiosk", "cell")."""
    source: str
    cell: str | None


@dataclass(frozen=True, slots=True)
class CallNotice:
    """Something to publish as an event (``publisher.event(n.name, n.severity, n.subject,
    **n.detail)``)."""
    name: str
    severity: str
    subject: str
    detail: dict


@dataclass(slots=True)
class Call:
    call_id: str
    source: str
    cell: str | None
    raised_mono: float
    published_mono: float
    presses: int = 1


class StaffCall:
    """The kiosk's staff-call state. ``on_pending(bool)`` drives the LED (e.g.
    ``panel.show_pending``); it is called on every change and never raises out of here."""

    def __init__(self, *, clock: Clock, repeat_after_s: float = 60.0,
                 on_pending: Callable[[bool], None] | None = None,
                 new_id: Callable[[], str] = lambda: secrets.token_hex(4)) -> None:
        if not repeat_after_s > 0:
            raise ValueError(f"repeat_after_s must be > 0, got {repeat_after_s!r}")
        self.clock = clock
        self.repeat_after_s = repeat_after_s
        self._on_pending = on_pending
        self._new_id = new_id
        self.pending: Call | None = None
        #: Presses absorbed without an event (for telemetry).
        self.suppressed = 0

    def press(self, source: str = "kiosk", cell: str | None = None) -> CallNotice | None:
        """A button was pressed: the notice to publish, or None when it only bumped a counter."""
        now = self.clock.monotonic()
        call = self.pending
        if call is None:
            call = self.pending = Call(self._new_id(), source, cell, now, now)
            self._led(True)
            return self._notice(call, repeat=False)
        call.presses += 1
        if now - call.published_mono >= self.repeat_after_s:
            call.published_mono = now
            return self._notice(call, repeat=True)
        self.suppressed += 1
        return None

    def acknowledge(self, call_id: str | None = None, by: str | None = None) -> CallNotice | None:
        """Ops acknowledged ``call_id`` (None: whatever call is pending). Returns the notice to
        publish, or None when there was no such call pending."""
        call = self.pending
        if call is None or (call_id is not None and call_id != call.call_id):
            return None
        self.pending = None
        self._led(False)
        waited_s = int(self.clock.monotonic() - call.raised_mono)
        return CallNotice("staff_call.acked", "info", call.cell or "kiosk",
                          {"call": call.call_id, "by": by, "waited_s": waited_s,
                           "presses": call.presses})

    def _notice(self, call: Call, *, repeat: bool) -> CallNotice:
        return CallNotice("staff_call.repeated" if repeat else "staff_call.raised", "warning",
                          call.cell or "kiosk",
                          {"call": call.call_id, "source": call.source, "cell": call.cell,
                           "presses": call.presses})

    def _led(self, pending: bool) -> None:
        if self._on_pending is None:
            return
        try:
            self._on_pending(pending)
        except Exception:
            log.exception("staff call LED could not be set")


class StaffCallPanel:
    """Staff-call buttons and the call LED.

    ``buttons`` maps a source name to ``(bcm_pin, cell or None)``: the kiosk's own button
    (board role ``staff_call_button``) and any button inside a cell. Buttons switch to ground
    with the internal pull-up. ``led_pin`` is the call LED (board role ``staff_call_led``):
    steady on while a call is pending, like a lift's call button, off otherwise.
    """

    def __init__(self, buttons: Mapping[str, tuple[int, str | None]], led_pin: int | None, *,
                 sink: Callable[[object], None], pin_factory=None) -> None:
        self._sink = sink
        self._buttons: dict[str, DigitalInputDevice] = {}
        self._led: LED | None = None
        try:
            for source, (pin, cell) in buttons.items():
                b = input_pin(pin, pull_up=True, pin_factory=pin_factory)
                b.when_activated = self._handler(source, cell)
                self._buttons[source] = b
            if led_pin is not None:
                self._led = LED(led_pin, pin_factory=pin_factory)
        except Exception:
            self.close()
            raise

    def _handler(self, source: str, cell: str | None) -> Callable[[], None]:
        def pressed() -> None:
            try:
                self._sink(StaffCallPressed(source, cell))
            except Exception:  # a gpiozero callback must never raise
                log.exception("staff call %s: could not queue the press", source)
        return pressed

    def show_pending(self, pending: bool) -> None:
        if self._led is not None:
            self._led.value = bool(pending)

    def close(self) -> None:
        """Release the pins; safe to call twice."""
        for dev in (*self._buttons.values(), self._led):
            if dev is not None:
                try:
                    dev.close()
                except Exception:
                    log.debug("closing a staff call GPIO device failed", exc_info=True)
        self._buttons.clear()
        self._led = None

    def __enter__(self) -> StaffCallPanel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
