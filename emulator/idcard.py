"""An emulated GA 467 ID-card reader on the far side of a real pty.

The agent opens ``reader.path`` with pyserial as it would a USB reader. Tests script the
card in the field (``present(card)``, ``remove()``), inject wire faults, and assert on
``commands``, the (cmd, param) pairs the SAM saw.

Card life cycle, as on real hardware (PROTOCOLS.md): a presented card answers ``find``;
``select`` needs a found card; ``read`` needs a selected one. After a read, successful
or not, the card is halted: ``find`` answers 80 until it is presented again.

All sample data is synthetic: names ``TEST PERSON nnn``, region code 99 (no such
province), serial numbers from a counter, correct check digits unless asked otherwise.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import itertools
import threading
from typing import Literal

from edge.clock import SYSTEM_CLOCK, Clock
from edge.idcard.card import check_digit, encode_text_block
from edge.idcard.protocol import (
    PHOTO_LEN,
    TEXT_BLOCK_LEN,
    ChecksumError,
    Command,
    FrameDecoder,
    FrameTooLong,
    LengthError,
    Sw3,
    command_name,
    encode_response,
)
from emulator.pty import PtyDevice

Fault = Literal["garbage", "torn", "silent", "bad_checksum"]
_FAULTS = ("garbage", "torn", "silent", "bad_checksum")

# Ends with most of a preamble (AA AA AA 96 but no 69) to make the decoder work for it.
_GARBAGE = b"\x00\xff\x13\xaa\xaa\x96\x69\x42\xaa\xaa\xaa\x96"

# Any 1024 bytes will do: only a licensed library decodes real photos. All below 0x80,
# so no accidental preamble.
_PHOTO = bytes((i * 7) & 0x7F for i in range(PHOTO_LEN))

_SAM_ID = bytes.fromhex("0500000099990000000000000000000a")

# Find and select replies carry 4 and 8 zero bytes on the readers whose captures are public.
_FIND_DATA = bytes(4)
_SELECT_DATA = bytes(8)

_serials = itertools.count(1)


def synthetic_id_number(birth_date: dt.date, gender: str, serial: int) -> str:
    """An 18-character ID number in region 990000 with a correct check digit.

    The sequence digit's parity carries the sex (odd male), as GB 11643 requires.
    """
    seq = (serial * 2) % 1000 + (1 if gender == "1" else 0)
    body = f"990000{birth_date:%Y%m%d}{seq % 1000:03d}"
    return body + check_digit(body)


@dataclasses.dataclass(frozen=True, slots=True)
class Card:
    """A card to lay on the emulated reader. ``kind`` only changes how the SAM behaves:
    ``"unreadable"`` cards are found and selected but fail the read with SW3 41."""

    name: str
    gender: str
    nation: str
    birth_date: dt.date
    address: str
    id_number: str
    issuer: str
    valid_from: dt.date
    valid_to: dt.date | None
    kind: str = "valid"

    def __repr__(self) -> str:
        return f"<Card kind={self.kind}>"

    def text_block(self) -> bytes:
        return encode_text_block(
            name=self.name, gender=self.gender, nation=self.nation, birth_date=self.birth_date,
            address=self.address, id_number=self.id_number, issuer=self.issuer,
            valid_from=self.valid_from, valid_to=self.valid_to)

    @classmethod
    def valid(cls, *, today: dt.date | None = None, **overrides) -> Card:
        """A card valid on ``today`` (default: the host's date) for ten years.

        ``overrides`` replace any field; the ID number is derived from the final birth
        date and gender unless it is overridden too.
        """
        today = today or dt.date.today()
        n = next(_serials)
        fields: dict = dict(
            name=f"TEST PERSON {n % 1000:03d}",  # 15 characters, the field's size
            gender="1" if n % 2 else "2",
            nation="01",
            birth_date=dt.date(1980, 1, 1) + dt.timedelta(days=37 * n),
            address=f"{n} SYNTHETIC ROAD, TEST DISTRICT",
            issuer="TEST ISSUER",
            valid_from=today - dt.timedelta(days=365),
            valid_to=today - dt.timedelta(days=365) + dt.timedelta(days=3652),
            kind="valid",
        )
        fields.update(overrides)
        if "id_number" not in fields:
            fields["id_number"] = synthetic_id_number(fields["birth_date"], fields["gender"], n)
        return cls(**fields)

    @classmethod
    def bad_check_digit(cls, **overrides) -> Card:
        """Valid in every way but the ID number's last character."""
        card = cls.valid(**overrides)
        good = card.id_number[17]
        wrong = "0" if good != "0" else "1"
        return dataclasses.replace(card, id_number=card.id_number[:17] + wrong,
                                   kind="bad_check_digit")

    @classmethod
    def expired(cls, *, today: dt.date | None = None, **overrides) -> Card:
        """A ten-year card whose last valid day was yesterday."""
        today = today or dt.date.today()
        valid_to = today - dt.timedelta(days=1)
        overrides.setdefault("valid_to", valid_to)
        overrides.setdefault("valid_from", valid_to - dt.timedelta(days=3652))
        overrides.setdefault("kind", "expired")
        return cls.valid(today=today, **overrides)

    @classmethod
    def unreadable(cls, **overrides) -> Card:
        """Found and selected, but the read fails with SW3 41 (a damaged chip)."""
        overrides.setdefault("kind", "unreadable")
        return cls.valid(**overrides)


class EmulatedReader(PtyDevice):
    """A GA 467 SAM and its card field, served on a pty at ``path``.

    ``sam_fail = True`` makes ``11 FF`` (and every command but ``10 FF``) answer 60 until a
    reset. ``set_fault`` corrupts the next replies on the wire. ``present_time`` is the
    ``clock.monotonic()`` of the last :meth:`present`, for latency benchmarks.
    """

    kind = "idcard-reader"

    def __init__(self, path, *, clock: Clock = SYSTEM_CLOCK) -> None:
        # State first: the base class starts the device thread.
        self._clock = clock
        self._state = threading.Lock()
        self._decoder = FrameDecoder("command")
        self._card: Card | None = None
        self._phase = "empty"  # empty | present | found | selected | halted
        self._fault: Fault | None = None
        self._fault_left: int | None = 0
        self._commands: list[tuple[int, int]] = []
        self.counts: collections.Counter[str] = collections.Counter()
        self.sam_fail = False
        self.present_time: float | None = None
        super().__init__(path)

    # -- scripting -------------------------------------------------------------------
    #: Every card presented to any emulated reader in this process: the hall's auditor
    #: checks that none of their personal data ever appears in a published payload.
    presented: list = []

    def present(self, card: Card) -> None:
        EmulatedReader.presented.append(card)
        """Lay ``card`` on the reader (replacing any card there)."""
        with self._state:
            self._card = card
            self._phase = "present"
            self.present_time = self._clock.monotonic()

    def remove(self) -> None:
        with self._state:
            self._card = None
            self._phase = "empty"

    def set_fault(self, fault: Fault | None, times: int | None = 1) -> None:
        """Corrupt the next ``times`` replies (``None``: until cleared with ``set_fault(None)``).

        ``garbage``: junk bytes before the reply; ``torn``: only the first half of the reply;
        ``silent``: no reply; ``bad_checksum``: the reply with its checksum flipped. The
        command is still carried out, as when the fault is on the wire.
        """
        if fault is not None and fault not in _FAULTS:
            raise ValueError(f"unknown fault {fault!r}; known: {', '.join(_FAULTS)}")
        with self._state:
            self._fault = fault
            self._fault_left = times if fault is not None else 0

    @property
    def commands(self) -> list[tuple[int, int]]:
        """Every (cmd, param) received, oldest first."""
        with self._state:
            return list(self._commands)

    @property
    def command_count(self) -> int:
        """How many commands were received (a poll loop's cheap "has it asked since")."""
        with self._state:
            return len(self._commands)

    @property
    def card_halted(self) -> bool:
        with self._state:
            return self._phase == "halted"

    # -- the SAM ---------------------------------------------------------------------
    def on_bytes(self, data: bytes) -> None:
        frames = self._decoder.feed(data)
        for error in self._decoder.pop_errors():
            if isinstance(error, ChecksumError):
                self._send(encode_response(Sw3.CHECKSUM_ERROR))
            elif isinstance(error, (LengthError, FrameTooLong)):
                self._send(encode_response(Sw3.LENGTH_ERROR))
        for frame in frames:
            with self._state:
                self._commands.append((frame.cmd, frame.param))
                self.counts[command_name(frame.cmd, frame.param)] += 1
                reply = self._answer(frame.cmd, frame.param)
            self._send(reply)

    def _answer(self, cmd: int, param: int) -> bytes:
        """The reply to one command; called with the state lock held."""
        try:
            command = Command((cmd, param))
        except ValueError:
            command = Command.SET_BAUD if cmd == Command.SET_BAUD.cmd and param <= 4 else None
        if command is Command.RESET:
            self.sam_fail = False
            return encode_response(Sw3.OK)
        if self.sam_fail:
            return encode_response(Sw3.SELF_TEST_FAILED)
        if command is Command.STATUS or command is Command.SET_BAUD:
            return encode_response(Sw3.OK)
        if command is Command.SAM_ID:
            return encode_response(Sw3.OK, _SAM_ID)
        if command is Command.FIND:
            if self._card is not None and self._phase != "halted":
                self._phase = "found" if self._phase == "present" else self._phase
                return encode_response(Sw3.CARD_FOUND, _FIND_DATA)
            return encode_response(Sw3.FIND_FAILED)
        if command is Command.SELECT:
            if self._phase in ("found", "selected"):
                self._phase = "selected"
                return encode_response(Sw3.OK, _SELECT_DATA)
            return encode_response(Sw3.SELECT_FAILED)
        if command is Command.READ_TEXT_PHOTO:
            if self._phase != "selected" or self._card is None:
                return encode_response(Sw3.READ_FAILED)
            self._phase = "halted"
            if self._card.kind == "unreadable":
                return encode_response(Sw3.READ_FAILED)
            lengths = TEXT_BLOCK_LEN.to_bytes(2, "big") + PHOTO_LEN.to_bytes(2, "big")
            return encode_response(Sw3.OK, lengths + self._card.text_block() + _PHOTO)
        if command is Command.READ_ADDRESS:
            # Emulated cards carry no newer address.
            return encode_response(Sw3.FIELD_EMPTY)
        return encode_response(Sw3.BAD_COMMAND)

    def _send(self, reply: bytes) -> None:
        with self._state:
            fault = self._fault if self._fault_left != 0 else None
            if fault is not None and self._fault_left is not None:
                self._fault_left -= 1
        if fault == "silent":
            return
        if fault == "garbage":
            reply = _GARBAGE + reply
        elif fault == "torn":
            reply = reply[:len(reply) // 2]
        elif fault == "bad_checksum":
            reply = reply[:-1] + bytes([reply[-1] ^ 0x5A])
        self.write(reply)

    def on_replug(self) -> None:
        """A power cycle: SAM state cleared, a card on the reader must be found again."""
        with self._state:
            self.sam_fail = False
            self._fault, self._fault_left = None, 0
            self._decoder.reset()
            if self._card is not None:
                self._phase = "present"
