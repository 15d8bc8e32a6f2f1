"""The two QR code formats: round trips, every refusal reason, and hostile input (pure)."""

from __future__ import annotations

import base64
import datetime as dt
import pickle
import struct

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.idcard.card import CardData, check_digit
from edge.qr.codes import (
    APPOINTMENT_CONTEXT,
    APPOINTMENT_PREFIX,
    EID_CONTEXT,
    EID_PREFIX,
    MAX_QR_BYTES,
    REASONS,
    Appointment,
    CitizenId,
    QrRefused,
    encode_appointment,
    encode_eid,
    parse_qr,
    qr_key_id,
    trusted_keys,
)
from emulator.booking import BookingService, EidIssuer, forge
from emulator.idcard import Card
from hallkiosk.errors import CardError, HallkioskError

HALL = "citizen-home"
NOW_S = 1_795_000_000
NOW_MS = NOW_S * 1000 + 250
ID_BODY = "99000019800101001"
ID_NUMBER = ID_BODY + check_digit(ID_BODY)

BOOKING = BookingService(HALL)
ISSUER = EidIssuer()


def parse(payload: bytes, **overrides):
    kwargs = dict(booking_keys=BOOKING.keys(), eid_keys=ISSUER.keys(), hall=HALL, now_ms=NOW_MS)
    kwargs.update(overrides)
    return parse_qr(payload, **kwargs)


def refused(payload: bytes, **overrides) -> QrRefused:
    with pytest.raises(QrRefused) as info:
        parse(payload, **overrides)
    return info.value


def b32(raw: bytes) -> bytes:
    return base64.b32encode(raw).rstrip(b"=")


def signed(prefix: bytes, context: bytes, key: Ed25519PrivateKey, body: bytes) -> bytes:
    """A code with an arbitrary body, correctly signed: what a buggy issuer could produce."""
    return prefix + b32(body) + b"." + b32(key.sign(context + body))


def appt_body(key, *, version=1, nb=NOW_S - 60, na=NOW_S + 1800, fields=(HALL, "BK-1", "A")) -> bytes:
    out = struct.pack(">B8sII", version, qr_key_id(key.public_key()), nb, na)
    for f in fields:
        raw = f.encode() if isinstance(f, str) else f
        out += bytes([len(raw)]) + raw
    return out


# -- round trips ---------------------------------------------------------------------------
def test_appointment_round_trip():
    code = BOOKING.appointment("A", start_s=NOW_S, minutes=30, appointment_id="BK-2025:0001.x")
    assert code.startswith(APPOINTMENT_PREFIX)
    appt = parse(code)
    assert isinstance(appt, Appointment)
    assert appt.appointment_id == "BK-2025:0001.x"
    assert (appt.service, appt.hall) == ("A", HALL)
    assert (appt.not_before_s, appt.not_after_s) == (NOW_S - 900, NOW_S + 1800)
    assert appt.kid == BOOKING.kid
    assert "BK-2025" not in repr(appt)


def test_codes_use_only_the_qr_alphanumeric_set():
    alnum = set(b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ $%*+-./:")
    appt = BOOKING.appointment("A", start_s=NOW_S, appointment_id="bk_lower-case")
    eid = ISSUER.code(ID_NUMBER, now_s=NOW_S)
    # Lower case and '_' in the fields travel inside the base32 text.
    assert set(appt) <= alnum and set(eid) <= alnum


def test_longest_possible_appointment_fits_the_bound():
    code = encode_appointment(BOOKING.key, hall="h" * 32, appointment_id="a" * 64, service="s" * 32,
                              not_before_s=0, not_after_s=0xFFFFFFFF)
    assert len(code) == 346 <= MAX_QR_BYTES
    assert parse(code, hall="h" * 32, now_ms=NOW_MS).service == "s" * 32


def test_eid_round_trip_and_identity_hash_matches_the_card():
    code = ISSUER.code(ID_NUMBER, now_s=NOW_S)
    citizen = parse(code)
    assert isinstance(citizen, CitizenId)
    secret = b"s" * 32
    card = Card.valid(id_number=ID_NUMBER, birth_date=dt.date(1980, 1, 1))
    assert citizen.identity_hash(secret) == CardData(card.text_block()).identity_hash(secret)
    assert citizen.not_after_s == NOW_S + ISSUER.lifetime_s


def test_eid_with_x_check_character():
    body = next(b for b in (f"990000198001010{n:02d}" for n in range(100)) if check_digit(b) == "X")
    citizen = parse(ISSUER.code(body + "X", now_s=NOW_S))
    assert citizen.id_number == body + "X"


def test_citizen_id_is_wipeable_and_redacted():
    citizen = parse(ISSUER.code(ID_NUMBER, now_s=NOW_S))
    assert ID_NUMBER not in repr(citizen) and ID_NUMBER not in str(citizen)
    with pytest.raises(TypeError):
        pickle.dumps(citizen)
    with citizen:
        assert citizen.id_number == ID_NUMBER
    assert citizen.wiped
    for access in (lambda: citizen.id_number, lambda: citizen.identity_hash(b"k"), citizen.validate):
        with pytest.raises(CardError):
            access()
    citizen.wipe()                                  # twice is fine


# -- refusals, one per reason --------------------------------------------------------------
def test_forged_appointment_and_eid():
    assert refused(forge(BOOKING.appointment("A", start_s=NOW_S))).reason == "forged"
    assert refused(forge(ISSUER.code(ID_NUMBER, now_s=NOW_S))).reason == "forged"


@pytest.mark.parametrize("at", range(28, 60, 3))
def test_any_edit_of_the_signed_fields_is_forged(at):
    assert refused(forge(BOOKING.appointment("A", start_s=NOW_S), at=at)).reason == "forged"


def test_signature_swapped_from_another_code_is_forged():
    a = BOOKING.appointment("A", start_s=NOW_S)
    b = BOOKING.appointment("B", start_s=NOW_S)
    mixed = a.rsplit(b".", 1)[0] + b"." + b.rsplit(b".", 1)[1]
    assert refused(mixed).reason == "forged"


def test_unknown_key():
    stranger = BookingService(HALL)
    assert refused(stranger.appointment("A", start_s=NOW_S)).reason == "unknown_key"
    assert refused(EidIssuer().code(ID_NUMBER, now_s=NOW_S)).reason == "unknown_key"


def test_booking_key_is_not_an_eid_key_and_back():
    # The same key material in the wrong role: the key is unknown for that kind.
    assert refused(BOOKING.appointment("A", start_s=NOW_S), booking_keys={}).reason == "unknown_key"
    shared = Ed25519PrivateKey.generate()
    keys = trusted_keys([shared.public_key()])
    eid = encode_eid(shared, id_number=ID_NUMBER, not_before_s=NOW_S, not_after_s=NOW_S + 60)
    # An e-ID signature relabelled as an appointment never verifies: the contexts differ.
    relabelled = APPOINTMENT_PREFIX + eid[len(EID_PREFIX):]
    assert refused(relabelled, booking_keys=keys, eid_keys=keys).reason == "forged"


def test_wrong_hall():
    code = BookingService("other-hall", key=BOOKING.key).appointment("A", start_s=NOW_S)
    assert refused(code).reason == "wrong_hall"


def test_validity_window_edges_with_leeway():
    code = encode_appointment(BOOKING.key, hall=HALL, appointment_id="BK-9", service="A",
                              not_before_s=NOW_S, not_after_s=NOW_S + 100)
    leeway_ms = 60_000
    parse(code, now_ms=NOW_S * 1000 - leeway_ms)                        # earliest accepted
    assert refused(code, now_ms=NOW_S * 1000 - leeway_ms - 1).reason == "not_yet_valid"
    parse(code, now_ms=(NOW_S + 101) * 1000 + leeway_ms - 1)            # last accepted ms
    assert refused(code, now_ms=(NOW_S + 101) * 1000 + leeway_ms).reason == "expired"
    assert refused(code, now_ms=NOW_S * 1000 - 1, leeway_s=0).reason == "not_yet_valid"
    parse(code, now_ms=(NOW_S + 100) * 1000 + 999, leeway_s=0)          # not_after inclusive
    appt = parse(code)
    assert refused(code, now_ms=appt.accepted_until_ms()).reason == "expired"
    parse(code, now_ms=appt.accepted_until_ms() - 1)


def test_expired_and_not_yet_valid_eid():
    code = ISSUER.code(ID_NUMBER, now_s=NOW_S)
    assert refused(code, now_ms=(NOW_S + 3600) * 1000).reason == "expired"
    assert refused(code, now_ms=(NOW_S - 3600) * 1000).reason == "not_yet_valid"


def test_already_used_is_asked_only_after_everything_else():
    asked = []

    def used(appt_id: str) -> bool:
        asked.append(appt_id)
        return appt_id == "BK-USED"

    code = BOOKING.appointment("A", start_s=NOW_S, appointment_id="BK-USED")
    assert refused(code, used=used).reason == "already_used"
    assert asked == ["BK-USED"]
    assert refused(forge(code), used=used).reason == "forged"
    assert refused(code, used=used, now_ms=0).reason == "not_yet_valid"
    assert asked == ["BK-USED"]
    assert parse(BOOKING.appointment("A", start_s=NOW_S, appointment_id="BK-NEW"), used=used)


def test_oversized():
    code = BOOKING.appointment("A", start_s=NOW_S)
    assert refused(code + b"A" * (MAX_QR_BYTES + 1 - len(code))).reason == "oversized"
    assert refused(b"\xff" * 100_000).reason == "oversized"


@pytest.mark.parametrize("payload", [
    "HKA1.ÄBC.DEF".encode(), b"HKA1.\x00AAAA.AAAA", b"HKA1.AAAA\r\n.AAAA", b"\x1b[2J\x1b[HKA1.",
    b"\xef\xbb\xbfHKA1.AAAA.AAAA", "HKE1.\u2028".encode(), b"\tHKE1.AA.AA",
    "ＨＫＡ１.AA.AA".encode("utf-16-le"),
])
def test_wrong_encoding(payload):
    assert refused(payload).reason == "wrong_encoding"


@pytest.mark.parametrize("payload", [
    b"https://booking.example/appt?id=1", b"'; DROP TABLE tickets; --", b'{"appt":"1","svc":"A"}',
    b"%s%s%n%x", b"../../etc/passwd", b"HKA2.AAAA.AAAA", b"hka1.AAAA.AAAA", b"HKA1", b" HKA1.A.A",
])
def test_unknown_format(payload):
    assert refused(payload).reason == "unknown_format"


def _tamper_outer(code: bytes) -> list[bytes]:
    prefix, body, sig = code[:5], *code[5:].split(b".")
    return [
        prefix + body,                                    # no signature
        prefix + body + b"." + sig + b".",                # an extra part
        prefix + body + b"." + sig[:-2],                  # signature cut short
        prefix + body + b"." + sig + b"AAAA",             # signature too long
        prefix + body.lower() + b"." + sig,               # lower case
        prefix + body + b"==." + sig,                     # padding
        prefix + body + b"." + sig[:-1] + b"1",           # not in the alphabet
        prefix + body[:-1] + b"." + sig,                  # an impossible base32 length
        prefix + b"." + sig,                              # empty payload
        prefix + b"AAAA" + b"." + sig,                    # payload shorter than the header
        prefix[:5],
    ]


@pytest.mark.parametrize("kind", ["appointment", "eid"])
def test_malformed_outer_structure(kind):
    code = (BOOKING.appointment("A", start_s=NOW_S) if kind == "appointment"
            else ISSUER.code(ID_NUMBER, now_s=NOW_S))
    for bad in _tamper_outer(code):
        assert refused(bad).reason == "malformed", bad


def test_non_canonical_base32_trailing_bits_are_malformed():
    code = ISSUER.code(ID_NUMBER, now_s=NOW_S)
    prefix, body, sig = code[:5], *code[5:].split(b".")
    # 64 signature bytes = 102 characters plus 2 bits: the last character's low bits are 0.
    last = sig[-1:]
    sibling = bytes([last[0] + 1]) if last != b"7" else b"6"
    assert refused(prefix + body + b"." + sig[:-1] + sibling).reason == "malformed"


def test_signed_but_malformed_payloads():
    key = BOOKING.key
    cases = [
        appt_body(key, version=2),
        appt_body(key, nb=NOW_S, na=NOW_S - 1),                      # window reversed
        appt_body(key) + b"\x00",                                     # trailing byte
        appt_body(key, fields=(HALL, "BK-1")),                        # missing service
        appt_body(key, fields=(HALL, "BK 1", "A")),                   # space in the id
        appt_body(key, fields=(HALL, "", "A")),                       # empty id
        appt_body(key, fields=(HALL, "BK-1", "A" * 33)),              # service too long
        appt_body(key, fields=(HALL, "BK-1", b"\xc3\xa4")),           # non-ASCII inside
        appt_body(key, fields=(HALL, "BK-1", "A'--")),                # injection inside
        appt_body(key)[:-1] + b"\x09",                               # length beyond the end
    ]
    for body in cases:
        code = signed(APPOINTMENT_PREFIX, APPOINTMENT_CONTEXT, key, body)
        assert refused(code).reason == "malformed", body


def test_signed_eid_with_a_bad_id_number_is_malformed():
    key = ISSUER.key
    header = struct.pack(">B8sII", 1, qr_key_id(key.public_key()), NOW_S, NOW_S + 60)
    wrong_check = ID_BODY + ("0" if ID_NUMBER[-1] != "0" else "1")
    for idn in (wrong_check, ID_BODY + "x", ID_BODY[:-1] + "A" + "1", ID_NUMBER[:-1]):
        code = signed(EID_PREFIX, EID_CONTEXT, key, header + idn.encode())
        assert refused(code).reason == "malformed", idn


def test_encoders_refuse_bad_fields():
    key = BOOKING.key
    good = dict(hall=HALL, appointment_id="BK-1", service="A", not_before_s=NOW_S,
                not_after_s=NOW_S + 60)
    for bad in (dict(hall="a/b"), dict(service=""), dict(appointment_id="x" * 65),
                dict(appointment_id="ä"), dict(not_before_s=-1), dict(not_after_s=NOW_S - 1),
                dict(not_before_s=1.5), dict(not_after_s=2**32)):
        with pytest.raises(ValueError):
            encode_appointment(key, **{**good, **bad})
    wrong_check = ID_BODY + ("0" if ID_NUMBER[-1] != "0" else "1")
    for idn in (wrong_check, ID_NUMBER[:-1], ID_NUMBER + "1"):
        with pytest.raises(ValueError):
            encode_eid(ISSUER.key, id_number=idn, not_before_s=NOW_S, not_after_s=NOW_S)


def test_refusal_is_a_hallkiosk_value_error_and_pickles():
    exc = refused(b"nonsense")
    assert isinstance(exc, HallkioskError) and isinstance(exc, ValueError)
    again = pickle.loads(pickle.dumps(exc))
    assert again.reason == exc.reason and str(again) == str(exc)
    with pytest.raises(ValueError):
        QrRefused("no_such_reason")
    with pytest.raises(TypeError):
        parse("HKA1.AAAA.AAAA")                      # a str is a caller's mistake


# -- hostile input, generated ----------------------------------------------------------------
SECRET_LIKE = st.binary(min_size=0, max_size=700)


@settings(max_examples=300, deadline=None)
@given(SECRET_LIKE)
def test_arbitrary_bytes_are_refused_without_echo(payload):
    exc = refused(payload)
    assert exc.reason in REASONS
    message = str(exc)
    # One of the fixed sentences: nothing of the payload can be in it.
    assert message in {QrRefused(r).args[0] for r in REASONS}


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ234567.", min_size=0, max_size=400),
       st.sampled_from([APPOINTMENT_PREFIX, EID_PREFIX]))
def test_random_base32_after_a_prefix_is_refused(text, prefix):
    assert refused(prefix + text.encode()).reason in ("malformed", "unknown_key", "forged",
                                                      "oversized")


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=400), st.integers(min_value=0x20, max_value=0x7E),
       st.sampled_from(["appointment", "eid"]))
def test_any_single_character_change_is_refused(pos, char, kind):
    code = (BOOKING.appointment("A", start_s=NOW_S, appointment_id="BK-77") if kind == "appointment"
            else ISSUER.code(ID_NUMBER, now_s=NOW_S))
    pos %= len(code)
    if code[pos] == char:
        return
    changed = code[:pos] + bytes([char]) + code[pos + 1:]
    assert refused(changed).reason in ("malformed", "forged", "unknown_key", "unknown_format")
