"""The two QR code formats the kiosk accepts, verified offline. Pure: bytes in, a value or a
refusal out; no I/O, no clock (the caller passes ``now_ms``), no logging.

Formats (docs/qr-codes.md has the byte-precise layout and the reasons behind it)::

    HKA1.<base32 payload>.<base32 signature>    an appointment from the hall's online booking
    HKE1.<base32 payload>.<base32 signature>    a citizen's e-ID code from a phone

Base32 is RFC 4648's alphabet (A-Z, 2-7), upper case, without padding: together with the
prefix and the dots every character is in the QR alphanumeric set, so the code packs 5.5 bits
per character instead of 8 and stays a QR version or two smaller (easier to read off a phone
screen through a kiosk lens). The signature is Ed25519 over a context string and the payload
bytes; the context (``hallkiosk-appt/1`` or ``hallkiosk-eid/1``) makes a signature over one
kind useless as the other, even if one key were configured for both.

QR content is untrusted input. ``parse_qr`` checks, in this order, and refuses with
:class:`QrRefused` at the first failure: size, encoding, format, structure, key, signature,
and only then reads the signed fields (hall, validity window). Nothing is interpreted before
the signature verifies beyond the fixed-offset key id. Refusals carry a machine ``reason``
and a sentence for the citizen's screen and the log; neither ever quotes the code.

Already-used appointments: the pure parser cannot know; pass ``used(appointment_id) -> bool``
(the agent's durable store of appointment ids it issued tickets for) and it refuses with
``already_used`` after every other check has passed. Marking an appointment used, after its
ticket is committed, is the caller's job too.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge.idcard.card import id_number_valid
from hallkiosk.errors import CardError, HallkioskError
from mqtt_topics.envelope import raw_public

#: Upper bound of a whole QR payload, in bytes; the longest valid code is 346.
MAX_QR_BYTES = 512
APPOINTMENT_PREFIX = b"HKA1."
EID_PREFIX = b"HKE1."
APPOINTMENT_CONTEXT = b"hallkiosk-appt/1\n"
EID_CONTEXT = b"hallkiosk-eid/1\n"
PAYLOAD_VERSION = 1
KID_LEN = 8
SIG_LEN = 64
#: Fixed header of both payloads: version (1), key id (8), not-before (4), not-after (4).
_HEADER = struct.Struct(">B8sII")
EID_PAYLOAD_LEN = _HEADER.size + 18
#: Accepted clock disagreement between the issuer and the kiosk, in seconds.
DEFAULT_LEEWAY_S = 60

REASONS = ("oversized", "wrong_encoding", "unknown_format", "malformed", "unknown_key",
           "forged", "wrong_hall", "not_yet_valid", "expired", "already_used")

_MESSAGES = {
    "oversized": "This code is too long to be a hall appointment or e-ID code.",
    "wrong_encoding": "This code contains characters no hall code uses.",
    "unknown_format": "This is not a hall appointment or e-ID code.",
    "malformed": "This code is damaged or incomplete.",
    "unknown_key": "This code was signed by a key this hall does not know.",
    "forged": "This code's signature is not valid: it was altered or not issued by the hall.",
    "wrong_hall": "This appointment is for another service hall.",
    "not_yet_valid": "This code is not valid yet: please come back at your appointment time.",
    "expired": "This code has expired.",
    "already_used": "A ticket has already been issued for this appointment.",
}

# Identifier rules. Hall and service follow the config's id rule (they are compared with
# configured ids); appointment ids may also hold '.' and ':' as booking systems like them.
_ID_RE = re.compile(rb"[A-Za-z0-9_-]{1,32}")
_APPT_RE = re.compile(rb"[A-Za-z0-9_.:-]{1,64}")
# What may appear in a QR payload at all before the format is even looked at: printable ASCII.
_PRINTABLE_RE = re.compile(rb"[\x20-\x7e]+")
_B32_RE = re.compile(rb"[A-Z2-7]+")


class QrRefused(HallkioskError, ValueError):
    """A QR code the kiosk will not act on. ``reason`` is one of :data:`REASONS`; the message
    is a sentence for the citizen and the log. Neither contains the code's content."""

    def __init__(self, reason: str, message: str | None = None) -> None:
        if reason not in _MESSAGES:
            raise ValueError(f"unknown QR refusal reason {reason!r}")
        super().__init__(message or _MESSAGES[reason])
        self.reason = reason

    def __reduce__(self):
        return (QrRefused, (self.reason, str(self)))


# -- keys ---------------------------------------------------------------------------------
def qr_key_id(public_key: Any) -> bytes:
    """8 bytes: the first 8 of SHA-256 over the raw 32-byte public key (the same key id the
    MQTT envelope prints as 16 hex characters)."""
    raw = raw_public(public_key)     # ValueError unless a public key or 32 raw bytes
    return hashlib.sha256(raw).digest()[:KID_LEN]


def trusted_keys(keys: Iterable[Any]) -> dict[bytes, Ed25519PublicKey]:
    """The ``booking_keys`` / ``eid_keys`` mapping for :func:`parse_qr`: key id -> key
    (``cryptography`` Ed25519 public keys, or their 32 raw bytes)."""
    out: dict[bytes, Ed25519PublicKey] = {}
    for key in keys:
        pub = Ed25519PublicKey.from_public_bytes(raw_public(key))
        out[qr_key_id(pub)] = pub
    return out


# -- results ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True, repr=False)
class Appointment:
    """A verified appointment. Times are Unix seconds (UTC), both ends inclusive."""

    appointment_id: str
    service: str
    hall: str
    not_before_s: int
    not_after_s: int
    kid: str                 # 16 hex: which booking key signed it

    def accepted_until_ms(self, leeway_s: int = DEFAULT_LEEWAY_S) -> int:
        """The first Unix millisecond at which ``parse_qr`` refuses this code as expired: how
        long the caller must remember it as used."""
        return (self.not_after_s + 1 + leeway_s) * 1000

    def __repr__(self) -> str:
        # The id is left out: it is QR content, and it links to a person in the booking system.
        return (f"<Appointment service={self.service} hall={self.hall} "
                f"window={self.not_before_s}..{self.not_after_s} kid={self.kid}>")


class CitizenId:
    """A citizen identified by a verified e-ID code: the ID number and the code's validity.

    Handled like ``edge.idcard.card.CardData``: the ID number lives in one bytearray, leaves
    only as :meth:`identity_hash` (the same keyed hash as a card's, so a citizen is the same
    citizen whichever they present), and :meth:`wipe` zeroes it; repr shows nothing personal.
    Python cannot promise that no transient copy (the decoded payload ``bytes``) outlives the
    wipe.
    """

    __slots__ = ("_idn", "_wiped", "not_before_s", "not_after_s", "kid")

    def __init__(self, id_number: bytes | bytearray, *, not_before_s: int, not_after_s: int,
                 kid: str) -> None:
        self._idn = bytearray(id_number)
        self._wiped = False
        self.not_before_s = not_before_s
        self.not_after_s = not_after_s
        self.kid = kid

    @property
    def wiped(self) -> bool:
        return self._wiped

    def wipe(self) -> None:
        """Zero the ID number; safe to call twice."""
        self._idn[:] = bytes(len(self._idn))
        self._wiped = True

    def __enter__(self) -> CitizenId:
        return self

    def __exit__(self, *exc: object) -> None:
        self.wipe()

    def __repr__(self) -> str:
        return f"<CitizenId wiped={self._wiped}>"

    __str__ = __repr__

    def __reduce__(self):
        raise TypeError("CitizenId cannot be pickled")

    @property
    def id_number(self) -> str:
        if self._wiped:
            raise CardError("e-ID data was wiped")
        return self._idn.decode("ascii")

    def identity_hash(self, secret: bytes) -> str:
        """HMAC-SHA256 (hex) of the upper-case ID number keyed by ``secret``: byte for byte
        what ``CardData.identity_hash`` computes for the same person's card."""
        if not isinstance(secret, (bytes, bytearray)) or not secret:
            raise ValueError("identity_hash needs a non-empty bytes secret")
        if self._wiped:
            raise CardError("e-ID data was wiped")
        return hmac.new(bytes(secret), bytes(self._idn).strip().upper(), hashlib.sha256).hexdigest()

    def validate(self, today: object = None) -> None:
        """For callers that treat cards and e-IDs alike: the code's validity was checked by
        :func:`parse_qr` against its ``now_ms``; here only a wiped identity is refused."""
        if self._wiped:
            raise CardError("e-ID data was wiped")


# -- parsing ------------------------------------------------------------------------------
def _refuse(reason: str) -> QrRefused:
    return QrRefused(reason)


def _b32decode(text: bytes) -> bytes:
    """Strict RFC 4648 base32: upper case, no padding, canonical (unused bits zero)."""
    if not text or not _B32_RE.fullmatch(text) or len(text) % 8 in (1, 3, 6):
        raise _refuse("malformed")
    try:
        raw = base64.b32decode(text + b"=" * (-len(text) % 8))
    except (binascii.Error, ValueError):
        raise _refuse("malformed") from None
    if _b32encode(raw) != text:
        raise _refuse("malformed")
    return raw


def _b32encode(raw: bytes) -> bytes:
    return base64.b32encode(raw).rstrip(b"=")


def _split(payload: bytes, prefix: bytes) -> tuple[bytes, bytes]:
    parts = payload[len(prefix):].split(b".")
    if len(parts) != 2:
        raise _refuse("malformed")
    body, sig = _b32decode(parts[0]), _b32decode(parts[1])
    if len(sig) != SIG_LEN or len(body) < _HEADER.size:
        raise _refuse("malformed")
    return body, sig


def _verify(body: bytes, sig: bytes, context: bytes,
            keys: Mapping[bytes, Ed25519PublicKey]) -> tuple[int, int, str]:
    version, kid, not_before, not_after = _HEADER.unpack_from(body)
    if version != PAYLOAD_VERSION:
        raise _refuse("malformed")
    key = keys.get(kid)
    if key is None:
        raise _refuse("unknown_key")
    try:
        key.verify(sig, context + body)
    except InvalidSignature:
        raise _refuse("forged") from None
    if not_after < not_before:
        raise _refuse("malformed")
    return not_before, not_after, kid.hex()


def _check_window(not_before: int, not_after: int, now_ms: int, leeway_s: int) -> None:
    leeway_ms = leeway_s * 1000
    if now_ms < not_before * 1000 - leeway_ms:
        raise _refuse("not_yet_valid")
    # ``not_after`` is the last valid second, inclusive (Appointment.accepted_until_ms).
    if now_ms >= (not_after + 1) * 1000 + leeway_ms:
        raise _refuse("expired")


def _read_field(body: bytes, pos: int, pattern: re.Pattern[bytes]) -> tuple[str, int]:
    if pos >= len(body):
        raise _refuse("malformed")
    end = pos + 1 + body[pos]
    value = body[pos + 1:end]
    if end > len(body) or not pattern.fullmatch(value):
        raise _refuse("malformed")
    return value.decode("ascii"), end


def parse_qr(payload: bytes, *, booking_keys: Mapping[bytes, Ed25519PublicKey],
             eid_keys: Mapping[bytes, Ed25519PublicKey], hall: str, now_ms: int,
             used: Callable[[str], bool] | None = None,
             leeway_s: int = DEFAULT_LEEWAY_S) -> Appointment | CitizenId:
    """Verify and decode one QR payload, or raise :class:`QrRefused`.

    ``booking_keys`` / ``eid_keys``: key id -> public key (build them with
    :func:`trusted_keys`); ``hall``: this kiosk's hall id, which an appointment must name;
    ``now_ms``: the kiosk's wall clock in Unix milliseconds; ``used``: see the module
    docstring; ``leeway_s``: tolerated clock disagreement at both ends of a validity window.
    """
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise TypeError("parse_qr: payload must be bytes")
    payload = bytes(payload)
    if len(payload) > MAX_QR_BYTES:
        raise _refuse("oversized")
    if not _PRINTABLE_RE.fullmatch(payload):
        raise _refuse("wrong_encoding" if payload else "malformed")
    if payload.startswith(APPOINTMENT_PREFIX):
        return _parse_appointment(payload, booking_keys, hall, now_ms, used, leeway_s)
    if payload.startswith(EID_PREFIX):
        return _parse_eid(payload, eid_keys, now_ms, leeway_s)
    raise _refuse("unknown_format")


def _parse_appointment(payload: bytes, keys: Mapping[bytes, Ed25519PublicKey], hall: str,
                       now_ms: int, used: Callable[[str], bool] | None,
                       leeway_s: int) -> Appointment:
    body, sig = _split(payload, APPOINTMENT_PREFIX)
    not_before, not_after, kid = _verify(body, sig, APPOINTMENT_CONTEXT, keys)
    # Signed, so written by the booking service; still parsed strictly (a buggy issuer).
    code_hall, pos = _read_field(body, _HEADER.size, _ID_RE)
    appt, pos = _read_field(body, pos, _APPT_RE)
    service, pos = _read_field(body, pos, _ID_RE)
    if pos != len(body):
        raise _refuse("malformed")
    if code_hall != hall:
        raise _refuse("wrong_hall")
    _check_window(not_before, not_after, now_ms, leeway_s)
    if used is not None and used(appt):
        raise _refuse("already_used")
    return Appointment(appt, service, code_hall, not_before, not_after, kid)


def _parse_eid(payload: bytes, keys: Mapping[bytes, Ed25519PublicKey], now_ms: int,
               leeway_s: int) -> CitizenId:
    body, sig = _split(payload, EID_PREFIX)
    if len(body) != EID_PAYLOAD_LEN:
        raise _refuse("malformed")
    not_before, not_after, kid = _verify(body, sig, EID_CONTEXT, keys)
    idn = bytearray(body[_HEADER.size:])
    try:
        # Canonical form only: 17 digits and a digit or an upper-case X, right check digit.
        if not (idn[:17].isdigit() and (idn[17:].isdigit() or idn[17:] == b"X")
                and id_number_valid(idn.decode("ascii"))):
            raise _refuse("malformed")
        _check_window(not_before, not_after, now_ms, leeway_s)
        return CitizenId(idn, not_before_s=not_before, not_after_s=not_after, kid=kid)
    finally:
        idn[:] = bytes(len(idn))


# -- issuing (the booking service's and the e-ID issuer's side; tests and the emulator) ----
def _header(key: Ed25519PrivateKey, not_before_s: int, not_after_s: int) -> bytes:
    for name, value in (("not_before_s", not_before_s), ("not_after_s", not_after_s)):
        if type(value) is not int or not 0 <= value <= 0xFFFFFFFF:
            raise ValueError(f"{name} must be an int of Unix seconds that fits 32 bits")
    if not_after_s < not_before_s:
        raise ValueError("not_after_s is before not_before_s")
    return _HEADER.pack(PAYLOAD_VERSION, qr_key_id(key.public_key()), not_before_s, not_after_s)


def _field(name: str, value: str, pattern: re.Pattern[bytes]) -> bytes:
    raw = value.encode("ascii", "strict") if value.isascii() else b""
    if not pattern.fullmatch(raw):
        raise ValueError(f"{name} does not follow its rule ({pattern.pattern.decode()})")
    return bytes([len(raw)]) + raw


def _seal(prefix: bytes, context: bytes, key: Ed25519PrivateKey, body: bytes) -> bytes:
    return prefix + _b32encode(body) + b"." + _b32encode(key.sign(context + body))


def encode_appointment(key: Ed25519PrivateKey, *, hall: str, appointment_id: str, service: str,
                       not_before_s: int, not_after_s: int) -> bytes:
    """An ``HKA1.`` code as the booking service issues it (ValueError on a bad field)."""
    body = (_header(key, not_before_s, not_after_s) + _field("hall", hall, _ID_RE)
            + _field("appointment_id", appointment_id, _APPT_RE)
            + _field("service", service, _ID_RE))
    return _seal(APPOINTMENT_PREFIX, APPOINTMENT_CONTEXT, key, body)


def encode_eid(key: Ed25519PrivateKey, *, id_number: str, not_before_s: int,
               not_after_s: int) -> bytes:
    """An ``HKE1.`` code as an e-ID issuer's app shows it (ValueError on a bad ID number)."""
    if not id_number_valid(id_number) or not id_number.isascii():
        raise ValueError("id_number is not a valid 18-character ID number")
    body = _header(key, not_before_s, not_after_s) + id_number.upper().encode("ascii")
    return _seal(EID_PREFIX, EID_CONTEXT, key, body)


__all__ = [
    "APPOINTMENT_CONTEXT", "APPOINTMENT_PREFIX", "EID_CONTEXT", "EID_PREFIX", "MAX_QR_BYTES",
    "REASONS", "Appointment", "CitizenId", "QrRefused", "encode_appointment", "encode_eid",
    "parse_qr", "qr_key_id", "trusted_keys",
]
