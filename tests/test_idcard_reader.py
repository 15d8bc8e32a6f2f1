"""IdCardReader against EmulatedReader over a real pty, opened the way the agent opens it."""

from __future__ import annotations

import datetime as dt
import threading
import time

import pytest
import serial

from edge.idcard.protocol import FrameDecoder, Sw3, encode_response
from edge.idcard.reader import IdCardReader, ReaderGarbled, ReaderRefused
from emulator.idcard import Card, EmulatedReader
from hallkiosk.errors import (
    DeviceError,
    DeviceGone,
    DeviceRefused,
    DeviceTimeout,
    ProtocolError,
)

TIMEOUT_S = 0.3
TODAY = dt.date.today()


def wait_until(predicate, timeout_s: float = 2.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.005)


@pytest.fixture
def emu(tmp_path):
    with EmulatedReader(tmp_path / "idcard") as device:
        yield device


@pytest.fixture
def port(emu):
    p = serial.serial_for_url(emu.path, timeout=0.05)
    yield p
    p.close()


@pytest.fixture
def reader(port):
    r = IdCardReader(port, timeout_s=TIMEOUT_S)
    yield r
    r.close()


def test_init_checks_status_only(reader, emu):
    reader.init()
    assert emu.commands == [(0x11, 0xFF)]


def test_sam_self_test_failure_takes_the_reset_path(reader, emu):
    emu.sam_fail = True
    reader.init()
    assert emu.commands == [(0x11, 0xFF), (0x10, 0xFF), (0x11, 0xFF)]
    assert not emu.sam_fail


def test_no_card(reader, emu):
    assert reader.find() is False
    assert reader.read_card() is None
    assert emu.commands == [(0x20, 0x01), (0x20, 0x01)]


def test_valid_card_is_read_and_then_halted(reader, emu):
    card = Card.valid(today=TODAY)
    emu.present(card)
    data = reader.read_card()
    assert data is not None
    assert emu.commands == [(0x20, 0x01), (0x20, 0x02), (0x30, 0x01)]
    assert data.name == card.name and data.id_number == card.id_number
    assert data.address == card.address and data.birth_date == card.birth_date
    assert (data.valid_from, data.valid_to) == (card.valid_from, card.valid_to)
    data.validate(TODAY)
    assert card.name not in repr(data)
    # Halted after the read: no card until it is presented again.
    assert reader.read_card() is None
    emu.present(card)
    assert reader.read_card().id_number == card.id_number


def test_emulated_problem_cards_fail_validation(reader, emu):
    for card, reason in ((Card.bad_check_digit(today=TODAY), "check digit"),
                         (Card.expired(today=TODAY), "expired")):
        emu.present(card)
        data = reader.read_card()
        with pytest.raises(Exception, match=reason):
            data.validate(TODAY)
    long_term = Card.valid(today=TODAY, valid_to=None)
    emu.present(long_term)
    data = reader.read_card()
    assert data.long_term
    data.validate(TODAY + dt.timedelta(days=100 * 365))


def test_unreadable_card_raises_with_sw3_and_needs_presenting_again(reader, emu):
    emu.present(Card.unreadable())
    with pytest.raises(ReaderRefused) as info:
        reader.read_card()
    assert info.value.sw3 == Sw3.READ_FAILED
    assert isinstance(info.value, DeviceRefused)
    assert emu.path in str(info.value) and "idcard-reader" in str(info.value)
    assert reader.find() is False


def test_select_without_find_is_refused(reader):
    with pytest.raises(ReaderRefused) as info:
        reader.select()
    assert info.value.sw3 == Sw3.SELECT_FAILED


def test_unknown_command_answers_21(reader):
    assert reader.transact((0x77, 0x01)).sw3 == Sw3.BAD_COMMAND


def test_sam_id_and_new_address(reader, emu):
    assert len(reader.sam_id()) == 16
    emu.present(Card.valid(today=TODAY))
    assert reader.read_new_address() is None


def test_garbage_before_a_reply_is_skipped(reader, emu):
    emu.present(Card.valid(today=TODAY))
    emu.set_fault("garbage", times=3)
    assert reader.read_card() is not None


@pytest.mark.parametrize("fault, error", [
    ("torn", DeviceTimeout),
    ("silent", DeviceTimeout),
    ("bad_checksum", ReaderGarbled),
])
def test_each_wire_fault_fails_one_transaction_then_recovers(reader, emu, fault, error):
    emu.present(Card.valid(today=TODAY))
    emu.set_fault(fault)
    with pytest.raises(error) as info:
        reader.find()
    assert emu.path in str(info.value)
    # The card was found by the failed exchange; the SAM keeps it found.
    assert reader.read_card() is not None
    assert emu.commands == [(0x20, 0x01)] * 2 + [(0x20, 0x02), (0x30, 0x01)]


def test_torn_read_reply_leaves_no_trace_for_the_next_exchange(reader, emu):
    emu.present(Card.valid(today=TODAY))
    reader.find()
    reader.select()
    emu.set_fault("torn")
    with pytest.raises(DeviceTimeout):
        reader.read_text()
    assert reader.find() is False  # halted: a failed read needs the card presented again


def test_bad_checksum_fails_fast(reader, emu):
    emu.set_fault("bad_checksum")
    started = time.monotonic()
    with pytest.raises(ReaderGarbled) as info:
        reader.find()
    assert time.monotonic() - started < TIMEOUT_S
    assert isinstance(info.value, DeviceError) and isinstance(info.value, ProtocolError)


def test_stale_reply_in_the_buffer_is_not_taken_for_the_answer(reader, emu, port):
    # A "card found" left over from an earlier exchange; there is no card now.
    emu.write(encode_response(Sw3.CARD_FOUND, bytes(4)))
    wait_until(lambda: port.in_waiting > 0)
    assert reader.find() is False


def test_silence_raises_timeout_naming_device_and_port(reader, emu):
    emu.set_fault("silent", times=None)
    started = time.monotonic()
    with pytest.raises(DeviceTimeout) as info:
        reader.init()
    assert time.monotonic() - started < 4 * TIMEOUT_S + 1
    assert "idcard-reader" in str(info.value) and emu.path in str(info.value)
    assert emu.commands == [(0x11, 0xFF), (0x10, 0xFF)]
    emu.set_fault(None)
    reader.init()


def test_unplug_raises_device_gone(reader, emu):
    emu.unplug()
    with pytest.raises(DeviceGone) as info:
        reader.find()
    assert emu.path in str(info.value)


def test_unplug_while_waiting_for_a_reply_raises_device_gone(emu, port):
    reader = IdCardReader(port, timeout_s=5.0)
    emu.set_fault("silent", times=None)
    outcome: list[BaseException | bool] = []

    def run():
        try:
            outcome.append(reader.find())
        except BaseException as exc:  # handed to the test thread
            outcome.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    wait_until(lambda: emu.commands == [(0x20, 0x01)])
    emu.unplug()
    worker.join(timeout=5)
    assert not worker.is_alive()
    assert isinstance(outcome[0], DeviceGone)


def test_replug_and_reopen_recovers(emu, port):
    emu.unplug()
    emu.replug()
    fresh = serial.serial_for_url(emu.path, timeout=0.05)
    try:
        reader = IdCardReader(fresh, name="front-desk", timeout_s=TIMEOUT_S)
        reader.init()
        assert "front-desk" in repr(reader)
    finally:
        fresh.close()


def test_close_leaves_the_port_to_its_owner(reader, port):
    reader.close()
    reader.close()
    assert port.is_open
    with pytest.raises(DeviceGone):
        reader.find()


def test_port_without_a_finite_timeout_is_refused(emu):
    blocking = serial.serial_for_url(emu.path, timeout=None)
    try:
        with pytest.raises(ValueError):
            IdCardReader(blocking)
    finally:
        blocking.close()


def test_emulator_answers_corrupt_commands_with_sw3(emu, port):
    frame = bytearray(bytes.fromhex("AAAAAA9669 0003 2001 22"))
    frame[-1] ^= 1
    port.write(bytes(frame))
    decoder, frames = FrameDecoder(), []
    deadline = time.monotonic() + 2
    while not frames and time.monotonic() < deadline:
        frames = decoder.feed(port.read(64))
    assert [f.sw3 for f in frames] == [Sw3.CHECKSUM_ERROR]
    assert emu.commands == []


def test_present_time_is_monotonic(emu):
    before = time.monotonic()
    emu.present(Card.valid(today=TODAY))
    assert before <= emu.present_time <= time.monotonic()


def test_synthetic_cards_are_plainly_synthetic(emu):
    card = Card.valid(today=TODAY)
    assert card.name.startswith("TEST PERSON")
    assert card.id_number.startswith("99")
    assert "TEST PERSON" not in repr(card)
    with pytest.raises(ValueError):
        emu.set_fault("melted")  # type: ignore[arg-type]
