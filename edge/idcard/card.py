"""A citizen's ID card as the SAM returns it: the 256-byte text block. Pure: no I/O.

Text block layout (PROTOCOLS.md, "ID-card reader"), UCS-2 little endian, each field padded
with spaces (``20 00``); (byte offset, byte length):

    name 0/30, gender 30/2, nation 32/4, birth date 36/16, address 52/70,
    ID number 122/36, issuer 158/30, valid from 188/16, valid to 204/16, reserved 220/36

Dates are ``YYYYMMDD``; "valid to" may instead hold the two characters for "long term".
Gender and nation are GB/T 2261.1 and GB 3304 codes ("1" male, "2" female; "01" Han).
The 1024 photo bytes that follow the block on the wire are never decoded here.

Personal data stays inside :class:`CardData`: repr, str and every exception message are
free of it, and :meth:`CardData.identity_hash` is the only form in which the identity may
leave the kiosk. Python cannot promise that no transient copy (a decoded ``str``, the
``bytes`` of a received frame) outlives :meth:`CardData.wipe`; the block itself is zeroed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
from dataclasses import dataclass

from hallkiosk.errors import CardError

TEXT_BLOCK_LEN = 256
NEW_ADDRESS_LEN = 70

LONG_TERM = "\u957f\u671f"
"""What "valid to" holds on a card that never expires: the two characters for "long term"."""


@dataclass(frozen=True, slots=True)
class _Field:
    name: str
    offset: int
    size: int


# Byte offsets and lengths from PROTOCOLS.md (see module docstring).
_FIELDS = {f.name: f for f in (
    _Field("name", 0, 30),
    _Field("gender", 30, 2),
    _Field("nation", 32, 4),
    _Field("birth_date", 36, 16),
    _Field("address", 52, 70),
    _Field("id_number", 122, 36),
    _Field("issuer", 158, 30),
    _Field("valid_from", 188, 16),
    _Field("valid_to", 204, 16),
    _Field("reserved", 220, 36),
)}

GENDER_CODES = {"0": "unknown", "1": "male", "2": "female", "9": "unspecified"}
"""GB/T 2261.1 sex codes; ID cards carry 1 or 2."""

# ISO 7064 MOD 11-2 as GB 11643 uses it: w_i = 2^(17-i) mod 11 for positions 1..17.
_WEIGHTS = tuple(pow(2, 17 - i, 11) for i in range(17))
_CHECK_CHARS = "10X98765432"
_DIGITS = frozenset("0123456789")


def check_digit(first17: str) -> str:
    """The 18th character of an ID number whose first 17 digits are ``first17``."""
    if len(first17) != 17 or not set(first17) <= _DIGITS:
        raise CardError("an ID number body must be exactly 17 ASCII digits")
    total = sum(int(c) * w for c, w in zip(first17, _WEIGHTS))
    return _CHECK_CHARS[total % 11]


def id_number_valid(idn: str) -> bool:
    """True when ``idn`` is 17 digits and the right check character (``x`` counts as ``X``)."""
    if not isinstance(idn, str) or len(idn) != 18 or not set(idn[:17]) <= _DIGITS:
        return False
    return check_digit(idn[:17]) == idn[17].upper()


def _encode_field(name: str, value: str, size: int) -> bytes:
    raw = value.encode("utf-16-le")
    if len(raw) != 2 * len(value):
        raise ValueError(f"field {name} holds characters outside UCS-2")
    if len(raw) > size:
        raise ValueError(f"field {name} is longer than its {size // 2} characters")
    return raw + " ".encode("utf-16-le") * ((size - len(raw)) // 2)


def _date_text(value: dt.date) -> str:
    return f"{value.year:04d}{value.month:02d}{value.day:02d}"


def encode_text_block(*, name: str, gender: str, nation: str, birth_date: dt.date,
                      address: str, id_number: str, issuer: str, valid_from: dt.date,
                      valid_to: dt.date | None) -> bytes:
    """Build a 256-byte text block (for the emulator and tests); ``valid_to=None`` is long term.

    Raises ``ValueError`` when a value does not fit its field. Values are not validated
    beyond that, so tests can build cards with bad check digits or odd codes.
    """
    values = {
        "name": name, "gender": gender, "nation": nation, "birth_date": _date_text(birth_date),
        "address": address, "id_number": id_number, "issuer": issuer,
        "valid_from": _date_text(valid_from),
        "valid_to": LONG_TERM if valid_to is None else _date_text(valid_to),
        "reserved": "",
    }
    block = bytearray(TEXT_BLOCK_LEN)
    for key, spec in _FIELDS.items():
        block[spec.offset:spec.offset + spec.size] = _encode_field(key, values[key], spec.size)
    return bytes(block)


def _decode_ucs2(raw: bytes | bytearray | memoryview, what: str) -> str:
    try:
        text = bytes(raw).decode("utf-16-le")
    except UnicodeDecodeError:
        # "from None": the original message would quote the card's bytes.
        raise CardError(f"ID card field {what} is unreadable (not UCS-2)") from None
    if any(0xD800 <= ord(c) <= 0xDFFF for c in text) or len(text) * 2 != len(raw):
        raise CardError(f"ID card field {what} is unreadable (not UCS-2)")
    return text.rstrip(" \x00")


def parse_new_address(data: bytes | bytearray) -> str:
    """The address from a ``30 03`` reply (70 bytes, UCS-2 LE, space padded)."""
    if len(data) != NEW_ADDRESS_LEN:
        raise CardError(f"new-address block is {len(data)} bytes, expected {NEW_ADDRESS_LEN}")
    return _decode_ucs2(data, "new address")


class CardData:
    """The decoded card, holding only the raw text block; fields decode on access.

    Wiring: the driver builds it from a ``30 01`` reply; the caller validates it, takes
    :meth:`identity_hash`, and calls :meth:`wipe` (or uses ``with card:``) as soon as the
    transaction no longer needs it. After a wipe every field access raises
    :class:`CardError`. Nothing is cached, so wiping the block drops everything.
    """

    __slots__ = ("_block", "_wiped")

    def __init__(self, text_block: bytes | bytearray | memoryview) -> None:
        if len(text_block) != TEXT_BLOCK_LEN:
            raise CardError(f"ID card text block is {len(text_block)} bytes, "
                            f"expected {TEXT_BLOCK_LEN}")
        self._block = bytearray(text_block)
        self._wiped = False

    # -- lifecycle -----------------------------------------------------------------
    @property
    def wiped(self) -> bool:
        return self._wiped

    def wipe(self) -> None:
        """Zero the text block; safe to call twice."""
        self._block[:] = bytes(len(self._block))
        self._wiped = True

    def __enter__(self) -> CardData:
        return self

    def __exit__(self, *exc: object) -> None:
        self.wipe()

    def __repr__(self) -> str:
        return f"<CardData wiped={self._wiped}>"

    __str__ = __repr__

    def __reduce__(self):
        # Pickling would copy personal data to wherever the pickle goes.
        raise TypeError("CardData cannot be pickled")

    # -- raw fields ------------------------------------------------------------------
    def _text(self, key: str) -> str:
        if self._wiped:
            raise CardError("ID card data was wiped")
        spec = _FIELDS[key]
        return _decode_ucs2(memoryview(self._block)[spec.offset:spec.offset + spec.size], key)

    def _date(self, key: str) -> dt.date:
        text = self._text(key)
        if len(text) != 8 or not set(text) <= _DIGITS:
            raise CardError(f"ID card field {key} is not a YYYYMMDD date")
        try:
            return dt.date(int(text[:4]), int(text[4:6]), int(text[6:]))
        except ValueError:
            raise CardError(f"ID card field {key} is not a valid calendar date") from None

    @property
    def name(self) -> str:
        return self._text("name")

    @property
    def gender(self) -> str:
        """GB/T 2261.1 code: "1" male, "2" female (see :data:`GENDER_CODES`)."""
        return self._text("gender")

    @property
    def nation(self) -> str:
        """Two-digit GB 3304 nationality code, "01" is Han."""
        return self._text("nation")

    @property
    def birth_date(self) -> dt.date:
        return self._date("birth_date")

    @property
    def address(self) -> str:
        return self._text("address")

    @property
    def id_number(self) -> str:
        return self._text("id_number")

    @property
    def issuer(self) -> str:
        return self._text("issuer")

    @property
    def valid_from(self) -> dt.date:
        return self._date("valid_from")

    @property
    def long_term(self) -> bool:
        """True when the card never expires."""
        return self._text("valid_to") == LONG_TERM

    @property
    def valid_to(self) -> dt.date | None:
        """Last day of validity; ``None`` on a long-term card."""
        if self.long_term:
            return None
        return self._date("valid_to")

    # -- what may leave the kiosk ----------------------------------------------------
    def identity_hash(self, secret: bytes) -> str:
        """HMAC-SHA256 (hex) of the ID number, uppercased and stripped, keyed by ``secret``."""
        if not isinstance(secret, (bytes, bytearray)) or not secret:
            raise ValueError("identity_hash needs a non-empty bytes secret")
        idn = self.id_number.strip().upper().encode("ascii", "replace")
        return hmac.new(bytes(secret), idn, hashlib.sha256).hexdigest()

    def validate(self, today: dt.date) -> None:
        """Raise :class:`CardError` naming the first reason this card cannot identify anyone.

        Checks, in order: every field decodes; the ID number is 17 digits plus a check
        character and that character is right; the ID number's birth date and sex digit
        agree with the card's fields; the dates are ordered; ``today`` lies within
        ``valid_from .. valid_to`` (inclusive; long-term cards never expire). ``today`` is
        the kiosk's local date, supplied by the caller from its injected clock.
        """
        for key in ("name", "gender", "nation", "address", "issuer"):
            if not self._text(key):
                raise CardError(f"ID card field {key} is empty")
        birth, valid_from, valid_to = self.birth_date, self.valid_from, self.valid_to
        idn = self.id_number.upper()
        if len(idn) != 18 or not set(idn[:17]) <= _DIGITS or idn[17] not in _DIGITS | {"X"}:
            raise CardError("ID number is malformed (expected 17 digits and a check character)")
        if not id_number_valid(idn):
            raise CardError("ID number check digit does not match (ISO 7064 MOD 11-2)")
        if idn[6:14] != _date_text(birth):
            raise CardError("ID number does not agree with the card's birth date")
        gender = self.gender
        if gender not in GENDER_CODES:
            raise CardError("ID card gender code is not a GB/T 2261.1 code")
        if gender in ("1", "2") and int(idn[16]) % 2 != (1 if gender == "1" else 0):
            raise CardError("ID number sex digit does not agree with the card's gender")
        if not (self.nation.isascii() and self.nation.isdigit() and len(self.nation) == 2):
            raise CardError("ID card nation code is not two digits")
        if valid_to is not None and valid_to < valid_from:
            raise CardError("ID card validity dates are reversed")
        if valid_from > today:
            raise CardError("ID card is not yet valid")
        if valid_to is not None and valid_to < today:
            raise CardError("ID card has expired")
