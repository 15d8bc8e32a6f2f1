"""Board profiles: the shipped ones load and differ where the hardware does; bad ones fail
with the file, the key path and both roles of a clash."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from boards import (BOARD_NAMES, HARDWARE_PIN_FACTORIES, BoardProfile, load_board,
                    load_board_file, parse_board)
from hallkiosk.errors import ConfigError

GOOD = """\
model = "test-board"
description = "a harness for tests"
[gpio]
service_buttons = { A = 5, B = 6 }
service_leds = { A = 12, B = 16 }
status_led = 23
staff_call_button = 26
staff_call_led = 24
occupancy = { pir = 17, door = 27 }
[serial]
idcard_reader = "/dev/serial/by-id/usb-reader"
radar = "/dev/ttyAMA0"
[uart_pins]
"/dev/ttyAMA0" = [14, 15]
"""


def write(tmp_path, text, name="bad.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def problems_of(path):
    with pytest.raises(ConfigError) as info:
        load_board_file(path)
    return info.value.problems


# -- the shipped profiles ----------------------------------------------------------------
def test_all_four_boards_ship():
    assert set(BOARD_NAMES) == {"rpi4b", "rpi5", "cm4-kiosk", "rpizero2w"}
    assert list(BOARD_NAMES) == sorted(BOARD_NAMES)


@pytest.mark.parametrize("name", BOARD_NAMES)
def test_every_profile_loads_and_keeps_reserved_pins_free(name):
    board = load_board(name)
    assert isinstance(board, BoardProfile)
    assert board.model == name
    assert board.description
    assert board.service_buttons
    assert set(board.service_leds) <= set(board.service_buttons)
    claimed = board.claimed_pins()
    assert not {0, 1, 2, 3} & set(claimed)
    assert all(0 <= pin <= 27 for pin in claimed)
    gpio_pins = {pin for pin, role in claimed.items() if role.startswith("gpio.")}
    # Whatever on-chip UART a role uses, its header pins are not also GPIO roles.
    for url in board.serial.values():
        for pin in board.uart_pins.get(url, ()):
            assert pin not in gpio_pins
            assert claimed[pin].startswith("serial.")


def test_profiles_differ_where_the_hardware_does():
    rpi4, rpi5 = load_board("rpi4b"), load_board("rpi5")
    cm4, zero = load_board("cm4-kiosk"), load_board("rpizero2w")
    # RP1 on the Pi 5: only lgpio drives it.
    assert rpi5.pin_factories == ("lgpio",)
    assert rpi4.pin_factories == HARDWARE_PIN_FACTORIES
    # The Pi 5 debug UART has its own connector and takes no header pin.
    assert rpi5.uart_pins["/dev/ttyAMA10"] == ()
    # The carrier: six services and a second on-chip UART on GPIO4/5.
    assert list(cm4.service_buttons) == ["A", "B", "C", "D", "E", "F"]
    assert cm4.uart_pins[cm4.serial["qr_scanner"]] == (4, 5)
    assert {4, 5, 14, 15} <= set(cm4.claimed_pins())
    # One USB port on the Zero: reader on USB, printer on the header UART, no radar.
    assert "radar" not in zero.serial
    assert zero.serial["printer"] == "/dev/serial0"
    usb = [url for url in zero.serial.values() if url.startswith("/dev/serial/by-id/")]
    assert usb == [zero.serial["idcard_reader"]]


def test_profile_is_frozen_and_read_only():
    board = load_board("rpi4b")
    with pytest.raises(dataclasses.FrozenInstanceError):
        board.status_led = 4
    with pytest.raises(TypeError):
        board.service_buttons["A"] = 4
    with pytest.raises(TypeError):
        board.claimed_pins()[4] = "x"


# -- unknown names -----------------------------------------------------------------------
@pytest.mark.parametrize("name, near", [("rpi4", "rpi4b"), ("RPI5", "rpi5"),
                                        ("cm4kiosk", "cm4-kiosk"), ("rpizero2", "rpizero2w")])
def test_unknown_board_names_it_and_suggests(name, near):
    with pytest.raises(ConfigError) as info:
        load_board(name)
    message = str(info.value)
    assert f"unknown board '{name}'" in message
    assert f"did you mean '{near}'?" in message


def test_unrelated_board_name_lists_the_known_ones():
    with pytest.raises(ConfigError) as info:
        load_board("../../etc/passwd")
    assert "did you mean" not in str(info.value)
    assert "rpi4b" in str(info.value) and "cm4-kiosk" in str(info.value)


# -- bad profiles ------------------------------------------------------------------------
def test_the_good_test_profile_loads(tmp_path):
    board = load_board_file(write(tmp_path, GOOD))
    assert dict(board.service_buttons) == {"A": 5, "B": 6}
    assert board.serial["radar"] == "/dev/ttyAMA0"


def test_pin_claimed_twice_names_both_roles(tmp_path):
    path = write(tmp_path, GOOD.replace("staff_call_led = 24", "staff_call_led = 6"))
    assert problems_of(path) == [
        f"{path}: gpio.staff_call_led: pin 6 is already claimed by gpio.service_buttons.B"]


def test_gpio_role_on_the_uart_pins_is_refused(tmp_path):
    path = write(tmp_path, GOOD.replace("status_led = 23", "status_led = 14"))
    assert problems_of(path) == [
        f"{path}: gpio.status_led: pin 14 is used by UART /dev/ttyAMA0 (serial.radar)"]


def test_uart_pins_are_free_when_no_role_uses_that_uart(tmp_path):
    text = GOOD.replace('radar = "/dev/ttyAMA0"\n', "").replace("status_led = 23",
                                                                "status_led = 14")
    assert load_board_file(write(tmp_path, text)).status_led == 14


def test_onchip_uart_must_declare_its_pins(tmp_path):
    path = write(tmp_path, GOOD.replace('"/dev/ttyAMA0" = [14, 15]', ""))
    [problem] = problems_of(path)
    assert problem.startswith(f"{path}: serial.radar: on-chip UART /dev/ttyAMA0 has no entry")


@pytest.mark.parametrize("pin, why", [(2, "I2C1 SDA"), (3, "I2C1 SCL"),
                                      (0, "HAT ID EEPROM")])
def test_reserved_pins_are_refused(tmp_path, pin, why):
    path = write(tmp_path, GOOD.replace("staff_call_button = 26", f"staff_call_button = {pin}"))
    [problem] = problems_of(path)
    assert problem.startswith(f"{path}: gpio.staff_call_button: pin {pin} is reserved for {why}")


@pytest.mark.parametrize("value, expect", [("28", "pin 28 is not a header GPIO (BCM 0-27)"),
                                           ("-1", "pin -1 is not a header GPIO"),
                                           ('"5"', "expected a BCM pin number (integer)"),
                                           ("true", "expected a BCM pin number (integer)")])
def test_bad_pin_values(tmp_path, value, expect):
    path = write(tmp_path, GOOD.replace("status_led = 23", f"status_led = {value}"))
    [problem] = problems_of(path)
    assert problem.startswith(f"{path}: gpio.status_led: {expect}")


def test_unknown_keys_get_a_suggestion(tmp_path):
    text = GOOD.replace("service_leds", "servce_leds").replace("radar =", "rader =")
    path = write(tmp_path, text)
    assert problems_of(path) == [
        f"{path}: gpio.servce_leds: unknown key 'servce_leds', did you mean 'service_leds'?",
        f"{path}: serial.rader: unknown key 'rader', did you mean 'radar'?",
    ]


def test_led_without_a_button_and_unknown_sensor(tmp_path):
    text = GOOD.replace("B = 16", "b = 16").replace("door = 27", "dor = 27")
    path = write(tmp_path, text)
    assert problems_of(path) == [
        f"{path}: gpio.service_leds.b: no service button 'b', did you mean 'B'?",
        f"{path}: gpio.occupancy.dor: unknown key 'dor', did you mean 'door'?",
    ]


def test_unknown_pin_factory_suggests(tmp_path):
    path = write(tmp_path, 'pin_factories = ["lgpoi"]\n' + GOOD)
    [problem] = problems_of(path)
    assert problem.startswith(f"{path}: pin_factories[0]: unknown pin factory 'lgpoi', "
                              "did you mean 'lgpio'?")


def test_many_problems_are_reported_together(tmp_path):
    text = (GOOD.replace('description = "a harness for tests"\n', "")
                .replace("status_led = 23", "status_led = 99")
                .replace("staff_call_led = 24", "staff_call_led = 5")
                .replace("radar", "radr"))
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_board_file(path)
    paths = [p.split(": ")[1] for p in info.value.problems]
    assert paths == ["description", "gpio.status_led", "serial.radr", "gpio.staff_call_led"]
    assert all(p in str(info.value) for p in info.value.problems)


def test_missing_and_malformed_files_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.toml: cannot read board profile"):
        load_board_file(tmp_path / "nope.toml")
    path = write(tmp_path, "model = \n")
    with pytest.raises(ConfigError, match=r"bad.toml: invalid TOML: .*line 1"):
        load_board_file(path)


# -- property: parse_board accepts exactly the clash-free assignments --------------------
ROLES = ["gpio.service_buttons.A", "gpio.service_buttons.B", "gpio.service_leds.A",
         "gpio.status_led", "gpio.occupancy.pir"]


def _profile(pins, with_radar):
    data = {"model": "prop", "description": "property test",
            "gpio": {"service_buttons": {"A": pins[0], "B": pins[1]},
                     "service_leds": {"A": pins[2]}, "status_led": pins[3],
                     "occupancy": {"pir": pins[4]}},
            "uart_pins": {"/dev/ttyAMA0": [14, 15]}}
    if with_radar:
        data["serial"] = {"radar": "/dev/ttyAMA0"}
    return data


@settings(max_examples=200, deadline=None)
@given(pins=st.lists(st.integers(-2, 30), min_size=5, max_size=5), with_radar=st.booleans())
def test_parse_board_accepts_exactly_clash_free_pins(pins, with_radar):
    blocked = {0, 1, 2, 3} | ({14, 15} if with_radar else set())
    valid = (all(0 <= p <= 27 and p not in blocked for p in pins)
             and len(set(pins)) == len(pins))
    try:
        board = parse_board(_profile(pins, with_radar), source="prop.toml")
    except ConfigError as exc:
        assert not valid
        assert all(p.startswith("prop.toml: ") for p in exc.problems)
        assert all(p.split(": ")[1] in ROLES for p in exc.problems)
    else:
        assert valid
        assert sorted(board.claimed_pins()) == sorted(
            pins + ([14, 15] if with_radar else []))
