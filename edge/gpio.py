"""Service buttons and indicator LEDs, through gpiozero with an injected pin factory.

Wiring (BCM numbers) comes from the board profile; buttons are wired to ground with the
internal pull-up (pressed = low), LEDs are active high through a resistor. gpiozero runs
callbacks on its own threads: ours only put an event on the main loop's queue.

MockPin ignores ``bounce_time``, so a real bounce filter would live in our code with an
injected clock; service buttons need none: a second press while a ticket is being issued is
ignored by the session logic, which is the behaviour a citizen expects from a bouncy switch.

Inputs are plain ``DigitalInputDevice``s (see :func:`input_pin`), not gpiozero's ``Button``:
a Button starts a hold-detection thread that wakes every 100 ms for as long as it exists, and
with three buttons that was over half of an idle kiosk's CPU (py-spy). Nothing here uses
hold events; edges come from the pin factory's own edge detection.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from enum import Enum
from typing import Callable, Mapping

from gpiozero.input_devices import DigitalInputDevice
from gpiozero.output_devices import LED

from edge.events import ButtonPressed

log = logging.getLogger("hallkiosk.gpio")


def input_pin(pin: int, *, pull_up: bool, pin_factory=None) -> DigitalInputDevice:
    """A digital input with edge callbacks (``when_activated``/``when_deactivated``) and no
    polling thread. With ``pull_up`` the input is active when pulled to ground (a button or
    reed switch to GND); without, active when driven high (a PIR module's output)."""
    return DigitalInputDevice(pin, pull_up=pull_up, bounce_time=None, pin_factory=pin_factory)


class Indication(Enum):
    """What the front panel shows."""
    READY = "ready"              # status LED on, service LEDs off
    CHOOSE = "choose"            # offered services' LEDs blink: press one
    ISSUING = "issuing"          # chosen service's LED on
    OUT_OF_SERVICE = "out_of_service"  # status LED blinks slowly, service LEDs off
    FAULT = "fault"              # status LED blinks fast


class ServicePanel:
    """The kiosk's front panel: one button and one LED per service, and a status LED.

    ``buttons`` / ``leds`` map role names (board roles, e.g. "A") to BCM pins; only roles
    that a configured service uses are claimed. ``pin_factory`` is a gpiozero factory (a real
    one on the Pi, MockFactory in the emulator and tests).
    """

    def __init__(self, buttons: Mapping[str, int], leds: Mapping[str, int], status_led: int | None,
                 *, sink: Callable[[object], None], pin_factory=None) -> None:
        self._sink = sink
        self._buttons: dict[str, DigitalInputDevice] = {}
        self._leds: dict[str, LED] = {}
        self._status: LED | None = None
        try:
            for role, pin in buttons.items():
                b = input_pin(pin, pull_up=True, pin_factory=pin_factory)
                b.when_activated = self._press_handler(role)
                self._buttons[role] = b
            for role, pin in leds.items():
                self._leds[role] = LED(pin, pin_factory=pin_factory)
            if status_led is not None:
                self._status = LED(status_led, pin_factory=pin_factory)
        except Exception:
            self.close()
            raise
        self.indication: Indication | None = None

    def _press_handler(self, role: str) -> Callable[[], None]:
        def pressed() -> None:
            try:
                self._sink(ButtonPressed(role))
            except Exception:  # a gpiozero callback must never raise
                log.exception("button %s: could not queue the press", role)
        return pressed

    def show(self, indication: Indication, roles: tuple[str, ...] = ()) -> None:
        """Drive the LEDs for ``indication``; ``roles`` are the service LEDs concerned."""
        self.indication = indication
        for role, led in self._leds.items():
            if indication is Indication.CHOOSE and role in roles:
                led.blink(on_time=0.4, off_time=0.4)
            elif indication is Indication.ISSUING and role in roles:
                led.on()
            else:
                led.off()
        if self._status is None:
            return
        if indication in (Indication.READY, Indication.CHOOSE, Indication.ISSUING):
            self._status.on()
        elif indication is Indication.OUT_OF_SERVICE:
            self._status.blink(on_time=1.0, off_time=1.0)
        else:
            self._status.blink(on_time=0.15, off_time=0.15)

    def close(self) -> None:
        for dev in (*self._buttons.values(), *self._leds.values(), self._status):
            if dev is not None:
                try:
                    dev.close()
                except Exception:
                    log.debug("closing a GPIO device failed", exc_info=True)
        self._buttons.clear()
        self._leds.clear()
        self._status = None

    def __enter__(self) -> "ServicePanel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_pin_factory(name: str):
    """Build the gpiozero pin factory named in config; hardware libraries are imported
    here, late, only for the backend chosen (mqtt-io style)."""
    if name == "default":
        return None  # gpiozero picks (GPIOZERO_PIN_FACTORY or its own probing order)
    if name == "mock":
        from gpiozero.pins.mock import MockFactory
        factory = MockFactory()
        if os.environ.get(MOCK_GPIO_ENV):
            serve_mock_pins(factory, os.environ[MOCK_GPIO_ENV])
        return factory
    if name == "lgpio":
        from gpiozero.pins.lgpio import LGPIOFactory
        return LGPIOFactory()
    if name == "rpigpio":
        from gpiozero.pins.rpigpio import RPiGPIOFactory
        return RPiGPIOFactory()
    if name == "pigpio":
        from gpiozero.pins.pigpio import PiGPIOFactory
        return PiGPIOFactory()
    if name == "native":
        from gpiozero.pins.native import NativeFactory
        return NativeFactory()
    raise ValueError(f"unknown pin factory {name!r}")


#: Emulation only. With the mock pin factory and this variable set to a socket path, the
#: agent lets the emulator drive its input pins and read its outputs over a unix datagram
#: socket (emulator.gpio.RemotePins): how the hall run presses the buttons of 50 agent
#: processes and moves people through their cells. A kiosk runs a hardware pin factory, so
#: this is never reached on one.
MOCK_GPIO_ENV = "HALLKIOSK_MOCK_GPIO"


def serve_mock_pins(factory, path: str) -> threading.Thread:
    """Serve ``factory``'s pins at ``path``: ``L <pin>`` drives an input low, ``H <pin>``
    high, ``? <pin>`` answers ``0``/``1`` (the pin's state) to the sender; a bad request
    is answered ``E <reason>``. The socket is bound before this returns, so the emulator
    can press buttons as soon as the agent is ready."""
    try:
        os.unlink(path)          # a previous run's socket (the agent was killed)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)

    def serve() -> None:
        while True:
            data, sender = sock.recvfrom(64)
            try:
                op, _, num = data.decode("ascii").partition(" ")
                pin = factory.pin(int(num))
                if op == "L":
                    pin.drive_low()
                    reply = b"ok"
                elif op == "H":
                    pin.drive_high()
                    reply = b"ok"
                elif op == "?":
                    reply = b"1" if pin.state else b"0"
                else:
                    reply = b"E unknown operation"
            except Exception as exc:  # a bad request must not stop the server
                reply = f"E {exc}".encode("utf-8", "replace")[:200]
            if sender:
                try:
                    sock.sendto(reply, sender)
                except OSError:
                    log.debug("mock GPIO: the requester went away", exc_info=True)

    t = threading.Thread(target=serve, name="mock-gpio", daemon=True)
    t.start()
    return t
