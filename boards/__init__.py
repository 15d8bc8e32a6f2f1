"""Board profiles: which kiosk role sits on which BCM GPIO pin or serial port.

A profile is pure data, one TOML file per board model under ``boards/profiles/`` (shipped as
package data, found next to this file). This module only loads and checks them;
nothing here touches hardware. The agent resolves a profile once at start-up
(``load_board(cfg.kiosk.board)``) and hands pins and port URLs to the drivers it builds.

Profile layout (every key is checked; unknown keys are errors with a suggestion)::

    model = "rpi4b"                       # must equal the file name
    description = "..."
    pin_factories = ["lgpio", ...]        # optional: gpiozero factories that drive this SoC
    [gpio]
    service_buttons = { A = 5, ... }      # button label -> BCM pin (required, >= 1)
    service_leds    = { A = 12, ... }     # labels must be service buttons
    status_led = 23                       # optional single pins
    staff_call_button = 26
    staff_call_led = 24
    occupancy = { pir = 17, door = 27 }   # sensor kind -> BCM pin
    [serial]                              # role -> default pyserial URL
    radar = "/dev/ttyAMA0"
    [uart_pins]                           # on-chip UART device -> header pins it takes
    "/dev/ttyAMA0" = [14, 15]

Checks: BCM pins are 0-27 (the 40-pin header), no pin is claimed twice (both roles named),
the HAT ID EEPROM pins (0/1) and I2C1 (2/3) stay free, and an on-chip UART used by a serial
role claims the header pins listed for it in ``[uart_pins]``, so a button on GPIO14 next to
a radar on ``/dev/ttyAMA0`` is refused.
"""

from __future__ import annotations

import difflib
import functools
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from hallkiosk.errors import ConfigError

__all__ = [
    "BOARD_NAMES",
    "BoardProfile",
    "HARDWARE_PIN_FACTORIES",
    "OCCUPANCY_SENSORS",
    "SERIAL_ROLES",
    "load_board",
    "load_board_file",
    "parse_board",
    "unknown_board_message",
]

#: gpiozero pin factories that drive real GPIO (``mock`` is always allowed, it drives none).
HARDWARE_PIN_FACTORIES = ("lgpio", "rpigpio", "pigpio", "native")
#: Serial roles a profile may name; each is one peripheral the agent knows how to drive.
SERIAL_ROLES = ("idcard_reader", "printer", "qr_scanner", "radar", "cell_node")
#: Occupancy sensors wired straight to GPIO (the LD2410 radar is a serial role instead).
OCCUPANCY_SENSORS = ("pir", "door")

BCM_PINS = range(0, 28)
# Pins no GPIO role may take on any board: the firmware probes 0/1 for a HAT ID EEPROM at
# boot, and I2C1 on 2/3 has fixed 1.8 kOhm pull-ups to 3V3 on the Pi boards (a button or
# sensor there would fight them) and stays free for an RTC or fan controller.
_ALWAYS_RESERVED = {0: "HAT ID EEPROM (ID_SD)", 1: "HAT ID EEPROM (ID_SC)",
                    2: "I2C1 SDA", 3: "I2C1 SCL"}
# Device names of the SoC's own UARTs. A role on one of these must say (in [uart_pins])
# which header pins it uses, because that differs per board and overlay (serial0 is the
# GPIO14/15 UART on a Pi 4 but the debug connector on a Pi 5).
_ONCHIP_UART = re.compile(r"/dev/(ttyAMA\d+|ttyS\d+|serial\d)")
_LABEL = re.compile(r"[A-Za-z0-9_-]{1,32}")
_MODEL = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")

_TOP_KEYS = ("model", "description", "pin_factories", "gpio", "serial", "uart_pins")
_GPIO_KEYS = ("service_buttons", "service_leds", "status_led", "staff_call_button",
              "staff_call_led", "occupancy")
_PROFILES = "profiles"


@dataclass(frozen=True, slots=True)
class BoardProfile:
    """One board model's wiring. Pins are BCM numbers; serial values are pyserial URLs.

    Mappings are read-only views; ``uart_pins`` maps each on-chip UART device to the BCM
    pins it takes (empty for a UART with its own connector, e.g. the Pi 5 debug UART).
    """

    model: str
    description: str
    service_buttons: Mapping[str, int]
    service_leds: Mapping[str, int]
    status_led: int | None
    staff_call_button: int | None
    staff_call_led: int | None
    occupancy: Mapping[str, int]
    serial: Mapping[str, str]
    uart_pins: Mapping[str, tuple[int, ...]]
    pin_factories: tuple[str, ...]

    def claimed_pins(self) -> Mapping[int, str]:
        """BCM pin -> the role holding it (key path), including pins of UARTs in use."""
        claims: dict[int, str] = {}
        for role, pin in _gpio_roles(self):
            claims[pin] = role
        for role, url in self.serial.items():
            for pin in self.uart_pins.get(url, ()):
                claims[pin] = f"serial.{role} ({url})"
        return MappingProxyType(claims)


def _gpio_roles(board: BoardProfile) -> list[tuple[str, int]]:
    roles = [(f"gpio.service_buttons.{k}", v) for k, v in board.service_buttons.items()]
    roles += [(f"gpio.service_leds.{k}", v) for k, v in board.service_leds.items()]
    for key in ("status_led", "staff_call_button", "staff_call_led"):
        pin = getattr(board, key)
        if pin is not None:
            roles.append((f"gpio.{key}", pin))
    roles += [(f"gpio.occupancy.{k}", v) for k, v in board.occupancy.items()]
    return roles


def _profile_dir() -> Path:
    # Next to this file, not through importlib.resources: the package is never zipped, and
    # the agent then does not load importlib.resources (with zipfile, tempfile, shutil...).
    return Path(__file__).with_name(_PROFILES)


def _discover() -> tuple[str, ...]:
    return tuple(sorted(entry.name[:-5] for entry in _profile_dir().iterdir()
                        if entry.name.endswith(".toml")))


#: Every board model with a shipped profile, sorted.
BOARD_NAMES: tuple[str, ...] = _discover()


def _nearest(word: str, choices) -> str | None:
    choices = list(choices)
    for choice in choices:
        if choice.lower() == word.lower():
            return choice
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return close[0] if close else None


def unknown_board_message(name: str) -> str:
    """The message for a board name with no profile, with the nearest valid name."""
    near = _nearest(name, BOARD_NAMES)
    hint = f", did you mean '{near}'?" if near else ""
    return f"unknown board '{name}'{hint} (known boards: {', '.join(BOARD_NAMES)})"


@functools.lru_cache(maxsize=None)
def load_board(name: str) -> BoardProfile:
    """Load and check the shipped profile ``boards/profiles/{name}.toml``.

    Raises ConfigError naming the board and the nearest valid name when there is no such
    profile, or listing every problem of an invalid one.
    """
    if not isinstance(name, str) or name not in BOARD_NAMES:
        raise ConfigError(unknown_board_message(str(name)))
    entry = _profile_dir().joinpath(f"{name}.toml")
    source = f"boards/{_PROFILES}/{name}.toml"
    return _parse_bytes(entry.read_bytes(), source, expect_model=name)


def load_board_file(path: str | Path) -> BoardProfile:
    """Load and check a profile from any path (for tests and for trying a new harness)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read board profile: {exc.strerror or exc}") from None
    return _parse_bytes(raw, str(path), expect_model=None)


def parse_board(data: dict, *, source: str) -> BoardProfile:
    """Check an already-parsed profile; ``source`` names it in problem messages."""
    return _parse(data, source, None)


def _parse_bytes(raw: bytes, source: str, *, expect_model: str | None) -> BoardProfile:
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}") from None
    return _parse(data, source, expect_model)


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__


class _Check:
    """Collects every problem of one profile before anything is raised."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.problems.append(f"{self.source}: {path}: {message}")

    def keys(self, path: str, table: dict, allowed) -> None:
        for key in table:
            if key not in allowed:
                near = _nearest(key, allowed)
                hint = f", did you mean '{near}'?" if near else f" (valid: {', '.join(allowed)})"
                self.add(f"{path}.{key}" if path else key, f"unknown key '{key}'{hint}")

    def table(self, path: str, value: Any) -> dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.add(path, f"expected a table, found {_kind(value)}")
            return {}
        return value

    def string(self, path: str, value: Any, *, required: bool = True) -> str | None:
        if value is None:
            if required:
                self.add(path, "required key missing")
            return None
        if not isinstance(value, str) or not value.strip():
            self.add(path, f"expected a non-empty string, found {_kind(value)}")
            return None
        return value

    def pin(self, path: str, value: Any) -> int | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self.add(path, f"expected a BCM pin number (integer), found {_kind(value)}")
            return None
        if value not in BCM_PINS:
            self.add(path, f"pin {value} is not a header GPIO (BCM 0-27)")
            return None
        return value

    def pin_table(self, path: str, value: Any, *, allowed=None) -> dict[str, int]:
        out: dict[str, int] = {}
        table = self.table(path, value)
        if allowed is not None:
            self.keys(path, table, allowed)
        for label, raw in table.items():
            if allowed is not None and label not in allowed:
                continue
            if not _LABEL.fullmatch(label):
                self.add(f"{path}.{label}", "label must be 1-32 of A-Z a-z 0-9 _ -")
                continue
            pin = self.pin(f"{path}.{label}", raw)
            if pin is not None:
                out[label] = pin
        return out


def _parse(data: dict, source: str, expect_model: str | None) -> BoardProfile:
    check = _Check(source)
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a TOML document (a table)")
    check.keys("", data, _TOP_KEYS)

    model = check.string("model", data.get("model"))
    if model is not None and not _MODEL.fullmatch(model):
        check.add("model", "must be 1-32 of a-z 0-9 - (it is the profile's file name)")
    elif model is not None and expect_model is not None and model != expect_model:
        check.add("model", f"'{model}' does not match the file name '{expect_model}'")
    description = check.string("description", data.get("description"))

    factories: tuple[str, ...] = HARDWARE_PIN_FACTORIES
    if "pin_factories" in data:
        raw = data["pin_factories"]
        if not isinstance(raw, list) or not raw:
            check.add("pin_factories", f"expected a non-empty array, found {_kind(raw)}")
        else:
            good = []
            for i, name in enumerate(raw):
                if name in HARDWARE_PIN_FACTORIES:
                    good.append(name)
                    continue
                near = _nearest(str(name), HARDWARE_PIN_FACTORIES)
                hint = f", did you mean '{near}'?" if near else ""
                check.add(f"pin_factories[{i}]", f"unknown pin factory '{name}'{hint} "
                          f"(one of: {', '.join(HARDWARE_PIN_FACTORIES)})")
            factories = tuple(good)

    if "gpio" not in data:
        check.add("gpio", "required section missing")
    gpio = check.table("gpio", data.get("gpio"))
    check.keys("gpio", gpio, _GPIO_KEYS)
    raw_buttons = gpio.get("service_buttons")
    if raw_buttons is None and "gpio" in data:
        check.add("gpio.service_buttons", "required key missing")
    elif isinstance(raw_buttons, dict) and not raw_buttons:
        check.add("gpio.service_buttons", "a kiosk needs at least one service button")
    buttons = check.pin_table("gpio.service_buttons", raw_buttons)
    button_labels = raw_buttons if isinstance(raw_buttons, dict) else {}
    leds = check.pin_table("gpio.service_leds", gpio.get("service_leds"))
    for label in leds:
        if label not in button_labels:
            near = _nearest(label, button_labels)
            hint = f", did you mean '{near}'?" if near else ""
            check.add(f"gpio.service_leds.{label}", f"no service button '{label}'{hint}")
    singles = {key: check.pin(f"gpio.{key}", gpio.get(key))
               for key in ("status_led", "staff_call_button", "staff_call_led")}
    occupancy = check.pin_table("gpio.occupancy", gpio.get("occupancy"),
                                allowed=OCCUPANCY_SENSORS)

    serial_raw = check.table("serial", data.get("serial"))
    check.keys("serial", serial_raw, SERIAL_ROLES)
    serial: dict[str, str] = {}
    for role in SERIAL_ROLES:
        if role in serial_raw:
            url = check.string(f"serial.{role}", serial_raw[role])
            if url is not None:
                serial[role] = url

    uart_raw = check.table("uart_pins", data.get("uart_pins"))
    uart_pins: dict[str, tuple[int, ...]] = {}
    for device, pins in uart_raw.items():
        path = f'uart_pins."{device}"'
        if not _ONCHIP_UART.fullmatch(device):
            check.add(path, "expected an on-chip UART device (/dev/ttyAMA<n>, /dev/ttyS<n> "
                            "or /dev/serial<n>)")
            continue
        if not isinstance(pins, list):
            check.add(path, f"expected an array of BCM pins, found {_kind(pins)}")
            continue
        got = [check.pin(f"{path}[{i}]", p) for i, p in enumerate(pins)]
        if None not in got:
            uart_pins[device] = tuple(got)

    # Who holds each pin: GPIO roles first, then UARTs actually used by a serial role.
    claims: dict[int, str] = {}

    def claim(pin: int, role: str) -> None:
        if pin in _ALWAYS_RESERVED:
            check.add(role, f"pin {pin} is reserved for {_ALWAYS_RESERVED[pin]}")
        elif pin in claims:
            check.add(role, f"pin {pin} is already claimed by {claims[pin]}")
        else:
            claims[pin] = role

    for label, pin in buttons.items():
        claim(pin, f"gpio.service_buttons.{label}")
    for label, pin in leds.items():
        claim(pin, f"gpio.service_leds.{label}")
    for key, pin in singles.items():
        if pin is not None:
            claim(pin, f"gpio.{key}")
    for kind, pin in occupancy.items():
        claim(pin, f"gpio.occupancy.{kind}")
    used_uarts: dict[str, str] = {}
    for role, url in serial.items():
        if not _ONCHIP_UART.fullmatch(url):
            continue
        if url in used_uarts:
            check.add(f"serial.{role}", f"UART {url} is already used by serial.{used_uarts[url]}")
            continue
        used_uarts[url] = role
        if url not in uart_pins:
            if url not in uart_raw:
                check.add(f"serial.{role}", f"on-chip UART {url} has no entry in [uart_pins]; "
                                            "list the header pins it uses ([] if none)")
            continue
        for pin in uart_pins[url]:
            if pin in claims:
                check.add(claims[pin], f"pin {pin} is used by UART {url} (serial.{role})")
            else:
                claim(pin, f"serial.{role} (UART {url})")

    if check.problems:
        raise ConfigError(_summary(source, check.problems), check.problems)
    return BoardProfile(
        model=model,
        description=description,
        service_buttons=MappingProxyType(buttons),
        service_leds=MappingProxyType(leds),
        status_led=singles["status_led"],
        staff_call_button=singles["staff_call_button"],
        staff_call_led=singles["staff_call_led"],
        occupancy=MappingProxyType(occupancy),
        serial=MappingProxyType(serial),
        uart_pins=MappingProxyType(uart_pins),
        pin_factories=factories,
    )


def _summary(source: str, problems: list[str]) -> str:
    if len(problems) == 1:
        return problems[0]
    return f"{source}: {len(problems)} problems:\n" + "\n".join(f"  {p}" for p in problems)
