"""Pure tests of the GA 467 framing and the card text block: no ports, no threads."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import pickle
import time

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from edge.idcard.card import (
    LONG_TERM,
    CardData,
    check_digit,
    encode_text_block,
    id_number_valid,
    parse_new_address,
)
from edge.idcard.protocol import (
    MAX_COMMAND_LEN,
    MAX_RESPONSE_LEN,
    PREAMBLE,
    Command,
    CommandFrame,
    FrameDecoder,
    GarbageSkipped,
    ResponseFrame,
    Sw3,
    TornFrame,
    describe_sw3,
    encode_command,
    encode_response,
    set_baud,
)
from hallkiosk.errors import CardError, ChecksumError, FrameTooLong, ProtocolError

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- known byte vectors ----------------------------------------------------------------


def test_find_command_matches_hand_computed_bytes():
    # Length 00 03 counts CMD, PARAM, CHK. CHK = 00 ^ 03 ^ 20 ^ 01 = 0x22.
    assert encode_command(*Command.FIND) == bytes.fromhex("AAAAAA9669 0003 2001 22")


def test_status_and_read_commands_match_hand_computed_bytes():
    # 00 ^ 03 ^ 11 ^ FF = 0xED; 00 ^ 03 ^ 30 ^ 01 = 0x32.
    assert encode_command(*Command.STATUS) == bytes.fromhex("AAAAAA9669 0003 11FF ED")
    assert encode_command(*Command.READ_TEXT_PHOTO) == bytes.fromhex("AAAAAA9669 0003 3001 32")


def test_responses_match_hand_computed_bytes():
    # "no card": length 00 04 (SW1 SW2 SW3 CHK), CHK = 00 ^ 04 ^ 00 ^ 00 ^ 80 = 0x84.
    assert encode_response(Sw3.FIND_FAILED) == bytes.fromhex("AAAAAA9669 0004 000080 84")
    # "found" carries 4 zero bytes: length 00 08, CHK = 08 ^ 9F = 0x97.
    assert encode_response(Sw3.CARD_FOUND, bytes(4)) == bytes.fromhex(
        "AAAAAA9669 0008 00009F 00000000 97")


def test_decoder_reads_a_known_response():
    (frame,) = FrameDecoder().feed(bytes.fromhex("AAAAAA9669 0008 00009F 00000000 97"))
    assert frame == ResponseFrame(0, 0, 0x9F, bytes(4))


def test_encode_rejects_caller_mistakes_as_protocol_errors():
    with pytest.raises(ProtocolError):
        encode_command(0x100, 0x01)
    with pytest.raises(ProtocolError):
        encode_response(-1)
    with pytest.raises(FrameTooLong):
        encode_response(Sw3.OK, bytes(MAX_RESPONSE_LEN))
    with pytest.raises(FrameTooLong):
        encode_command(0x20, 0x01, bytes(MAX_COMMAND_LEN))
    with pytest.raises(ProtocolError):
        set_baud(12345)
    assert set_baud(9600) == (0x60, 0x04)


def test_every_sw3_code_is_described():
    codes = {0x90, 0x91, 0x9F, 0x10, 0x11, 0x21, 0x23, 0x31, 0x32, 0x33, 0x40, 0x41,
             0x60, 0x66, 0x80, 0x81}
    assert {int(c) for c in Sw3} == codes
    for code in Sw3:
        assert code.description
        assert code.name in describe_sw3(code)
    assert "unknown" in describe_sw3(0x55)


def test_response_repr_hides_the_payload():
    frame = ResponseFrame(0, 0, 0x90, "TEST CITIZEN".encode("utf-16-le"))
    assert "TEST" not in repr(frame) and "T\\x00" not in repr(frame)


# -- round trips -------------------------------------------------------------------------
byte = st.integers(0, 255)


@FUZZ
@given(sw3=byte, data=st.binary(max_size=MAX_RESPONSE_LEN - 4))
def test_response_round_trip(sw3, data):
    (frame,) = FrameDecoder("response").feed(encode_response(sw3, data))
    assert (frame.sw1, frame.sw2, frame.sw3, frame.data) == (0, 0, sw3, data)


@FUZZ
@given(cmd=byte, param=byte, data=st.binary(max_size=MAX_COMMAND_LEN - 3))
def test_command_round_trip(cmd, param, data):
    (frame,) = FrameDecoder("command").feed(encode_command(cmd, param, data))
    assert frame == CommandFrame(cmd, param, data)


# -- the decoder against hostile input -------------------------------------------------------
def _feed_in_pieces(decoder, stream, cuts):
    frames, errors = [], []
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    for a, b in zip(points, points[1:]):
        frames += decoder.feed(stream[a:b])
        errors += decoder.pop_errors()
        assert decoder.buffered <= decoder.buffer_bound
    return frames, errors


def _checksum_passes_by_chance(stream: bytes, start: int) -> bool:
    """Whether the header at ``start`` announces a frame that ends inside ``stream`` with a
    checksum that happens to match: then it is a frame, and swallowing what follows is
    right (no decoder can tell). The fuzz tests below exclude that 1-in-256 case."""
    if start + 7 > len(stream):
        return False
    end = start + 7 + int.from_bytes(stream[start + 5:start + 7], "big")
    if end > len(stream) or end - start - 7 < 4:
        return False
    chk = 0
    for b in stream[start + 5:end - 1]:
        chk ^= b
    return chk == stream[end - 1]


responses = st.builds(lambda sw3, data: (sw3, data), byte, st.binary(max_size=300))
garbage = st.binary(max_size=40)


@FUZZ
@given(parts=st.lists(st.tuples(garbage, responses), max_size=6), tail=garbage,
       cuts=st.lists(st.integers(0, 10_000), max_size=12))
def test_garbage_between_frames_is_skipped_in_any_chunking(parts, tail, cuts):
    stream = b"".join(g + encode_response(sw3, data) for g, (sw3, data) in parts) + tail
    # A false preamble in the garbage cannot be told from a frame start; exclude it.
    assume(stream.count(PREAMBLE) == len(parts))
    frames, errors = _feed_in_pieces(FrameDecoder(), stream, cuts)
    assert [(f.sw3, f.data) for f in frames] == [p[1] for p in parts]
    assert all(isinstance(e, GarbageSkipped) for e in errors)
    skipped = sum(e.count for e in errors)
    assert skipped <= sum(len(g) for g, _ in parts) + len(tail)


@FUZZ
@given(data=st.binary(max_size=4000), cuts=st.lists(st.integers(0, 10_000), max_size=20))
def test_random_bytes_never_crash_and_stay_bounded(data, cuts):
    frames, errors = _feed_in_pieces(FrameDecoder(), data, cuts)
    assert all(isinstance(e, ProtocolError) for e in errors)
    assert all(isinstance(f, ResponseFrame) for f in frames)


@FUZZ
@given(prefix=st.binary(max_size=20), length=st.integers(0, 0xFFFF), rest=st.binary(max_size=200),
       cuts=st.lists(st.integers(0, 1000), max_size=8))
def test_random_headers_never_swallow_a_later_frame_forever(prefix, length, rest, cuts):
    """Whatever header arrives, a valid frame after it is decoded once the stream ends."""
    good = encode_response(Sw3.OK, b"after")
    stream = prefix + PREAMBLE + length.to_bytes(2, "big") + rest + good
    assume(PREAMBLE not in prefix + rest)
    assume(not _checksum_passes_by_chance(stream, len(prefix)))
    frames, errors = _feed_in_pieces(FrameDecoder(), stream, cuts)
    assert any(f.data == b"after" for f in frames)
    assert all(isinstance(e, ProtocolError) for e in errors)


@FUZZ
@given(frame=responses, cut=st.integers(1, 10_000), byte_by_byte=st.booleans())
def test_torn_frame_then_a_new_frame(frame, cut, byte_by_byte):
    whole = encode_response(*frame)
    torn = whole[:1 + cut % (len(whole) - 1)]  # at least the first byte, never all of it
    assume(PREAMBLE not in whole[1:])
    good = encode_response(Sw3.OK, b"next")
    decoder = FrameDecoder()
    stream = torn + good
    assume(not _checksum_passes_by_chance(stream, 0))
    frames = []
    if byte_by_byte:
        for i in range(len(stream)):
            frames += decoder.feed(stream[i:i + 1])
    else:
        frames = decoder.feed(stream)
    assert [f.data for f in frames] == [b"next"]
    assert all(isinstance(e, ProtocolError) for e in decoder.pop_errors())


def test_torn_frame_is_reported():
    whole = encode_response(Sw3.OK, bytes(range(200)))
    decoder = FrameDecoder()
    frames = decoder.feed(whole[:100])
    frames += decoder.feed(encode_response(Sw3.FIND_FAILED))
    assert [f.sw3 for f in frames] == [Sw3.FIND_FAILED]
    assert [type(e) for e in decoder.pop_errors()] == [TornFrame]


def test_bad_checksum_is_reported_and_the_next_frame_decodes():
    bad = bytearray(encode_response(Sw3.OK, b"abc"))
    bad[-1] ^= 0xFF
    decoder = FrameDecoder()
    frames = decoder.feed(bytes(bad) + encode_response(Sw3.CARD_FOUND, bytes(4)))
    assert [f.sw3 for f in frames] == [Sw3.CARD_FOUND]
    errors = decoder.pop_errors()
    assert [type(e) for e in errors] == [ChecksumError]
    assert decoder.pop_errors() == []


def test_oversized_length_is_refused_without_buffering():
    decoder = FrameDecoder(max_len=100)
    header = PREAMBLE + (101).to_bytes(2, "big")
    frames = decoder.feed(header + bytes(50) + encode_response(Sw3.OK, b"x"))
    assert [f.data for f in frames] == [b"x"]
    errors = decoder.pop_errors()
    assert isinstance(errors[0], FrameTooLong)
    assert decoder.buffered == 0


def test_length_below_minimum_is_refused():
    decoder = FrameDecoder()
    frames = decoder.feed(PREAMBLE + b"\x00\x02\x00\x00" + encode_response(Sw3.OK))
    assert [f.sw3 for f in frames] == [Sw3.OK]
    assert any(type(e).__name__ == "LengthError" for e in decoder.pop_errors())


def test_a_preamble_inside_photo_bytes_does_not_split_the_reply():
    photo = bytearray(1024)
    photo[500:505] = PREAMBLE
    photo[505:507] = b"\x05\x08"  # even a plausible length field
    data = b"\x01\x00\x04\x00" + bytes(256) + bytes(photo)
    wire = encode_response(Sw3.OK, data)
    decoder = FrameDecoder()
    frames = []
    for i in range(0, len(wire), 7):
        frames += decoder.feed(wire[i:i + 7])
    assert len(frames) == 1 and frames[0].data == data


def test_a_megabyte_of_noise_is_consumed_in_bounded_memory_and_time():
    noise = hashlib.shake_256(b"noise").digest(1 << 20)
    decoder = FrameDecoder()
    started = time.monotonic()
    decoder.feed(noise)
    assert decoder.buffered <= decoder.buffer_bound
    assert time.monotonic() - started < 5
    assert len(decoder.pop_errors()) <= 64


def test_reset_zeroes_and_forgets():
    decoder = FrameDecoder()
    decoder.feed(encode_response(Sw3.OK, b"secret")[:-3])
    assert decoder.buffered > 0
    decoder.reset()
    assert decoder.buffered == 0
    assert decoder.feed(encode_response(Sw3.OK))[0].sw3 == Sw3.OK


def test_decoder_rejects_bad_configuration():
    with pytest.raises(ProtocolError):
        FrameDecoder("sideways")
    with pytest.raises(ProtocolError):
        FrameDecoder(max_len=2)


# -- check digit -----------------------------------------------------------------------------
def test_check_digit_vectors():
    # By hand for 11010519491231002: digits x weights 7 9 10 5 8 4 2 1 6 3 7 9 10 5 8 4 2
    # = 7+9+0+5+0+20+2+9+24+27+7+18+30+5+0+0+4 = 167; 167 mod 11 = 2; "10X98765432"[2] = X.
    assert check_digit("11010519491231002") == "X"
    assert id_number_valid("11010519491231002X")
    assert id_number_valid("11010519491231002x")
    assert not id_number_valid("110105194912310021")
    # Sum 0 -> "1"; sum 1 * 7 = 7 -> "10X98765432"[7] = "5".
    assert check_digit("0" * 17) == "1"
    assert check_digit("1" + "0" * 16) == "5"


def test_check_digit_rejects_malformed_input():
    for bad in ("", "1" * 16, "1" * 18, "1101051949123100A", "\u0661" * 17):
        with pytest.raises(CardError):
            check_digit(bad)
    assert not id_number_valid("1101051949123100AX")
    assert not id_number_valid(None)


@FUZZ
@given(body=st.text("0123456789", min_size=17, max_size=17), pos=st.integers(0, 16),
       delta=st.integers(1, 9))
def test_check_digit_catches_every_single_digit_error(body, pos, delta):
    idn = body + check_digit(body)
    assert id_number_valid(idn)
    changed = body[:pos] + str((int(body[pos]) + delta) % 10) + body[pos + 1:]
    assert not id_number_valid(changed + idn[17])


# -- CardData ----------------------------------------------------------------------------------
TODAY = dt.date(2030, 6, 15)
NAME = "TEST CITIZEN 07"
IDN = "99000019850312" + "003"
IDN += check_digit(IDN)


def make_block(**overrides) -> bytes:
    fields = dict(name=NAME, gender="1", nation="01", birth_date=dt.date(1985, 3, 12),
                  address="7 SYNTHETIC ROAD", id_number=IDN, issuer="TEST ISSUER",
                  valid_from=dt.date(2025, 1, 1), valid_to=dt.date(2035, 1, 1))
    fields.update(overrides)
    return encode_text_block(**fields)


def test_card_fields_decode():
    card = CardData(make_block())
    assert card.name == NAME
    assert card.gender == "1" and card.nation == "01"
    assert card.birth_date == dt.date(1985, 3, 12)
    assert card.address == "7 SYNTHETIC ROAD"
    assert card.id_number == IDN
    assert card.issuer == "TEST ISSUER"
    assert card.valid_from == dt.date(2025, 1, 1)
    assert card.valid_to == dt.date(2035, 1, 1) and not card.long_term
    card.validate(TODAY)


def test_block_layout_offsets():
    block = make_block()
    assert len(block) == 256
    assert block[122:158].decode("utf-16-le") == IDN
    assert block[30:32] == "1".encode("utf-16-le")
    assert block[220:256] == " ".encode("utf-16-le") * 18


def test_long_term_card_never_expires():
    card = CardData(make_block(valid_to=None))
    assert card.long_term and card.valid_to is None
    assert CardData(make_block(valid_to=None))._block[204:208] == LONG_TERM.encode("utf-16-le")
    card.validate(dt.date(2999, 1, 1))


def test_wipe_zeroes_and_blocks_access():
    card = CardData(make_block())
    card.wipe()
    assert card.wiped and card._block == bytearray(256)
    for attr in ("name", "id_number", "valid_to", "birth_date"):
        with pytest.raises(CardError):
            getattr(card, attr)
    with pytest.raises(CardError):
        card.identity_hash(b"k")
    card.wipe()
    with CardData(make_block()) as other:
        assert other.name == NAME
    assert other.wiped


def test_repr_str_and_pickle_hold_no_personal_data():
    card = CardData(make_block())
    for text in (repr(card), str(card), f"{card}"):
        assert NAME not in text and IDN not in text and "SYNTHETIC" not in text
        assert text == "<CardData wiped=False>"
    with pytest.raises(TypeError):
        pickle.dumps(card)
    assert not hasattr(card, "__dict__")


def test_identity_hash_is_hmac_of_the_uppercased_id_number():
    low = IDN[:17] + "x"
    up = low.upper()
    key = b"kiosk-secret"
    expected = hmac.new(key, up.encode(), hashlib.sha256).hexdigest()
    assert CardData(make_block(id_number=low)).identity_hash(key) == expected
    assert CardData(make_block(id_number=up)).identity_hash(key) == expected
    card = CardData(make_block())
    assert card.identity_hash(b"other") != card.identity_hash(key)
    with pytest.raises(ValueError):
        CardData(make_block()).identity_hash(b"")


def _reason(block: bytes | bytearray, today=TODAY) -> str:
    with pytest.raises(CardError) as info:
        CardData(block).validate(today)
    text = str(info.value)
    assert NAME not in text and IDN[:14] not in text
    return text


def test_validate_reasons():
    wrong = IDN[:17] + ("0" if IDN[17] != "0" else "1")
    assert "check digit" in _reason(make_block(id_number=wrong))
    assert "malformed" in _reason(make_block(id_number="99000019850312ABCD"))
    assert "malformed" in _reason(make_block(id_number=IDN[:17]))
    assert "expired" in _reason(make_block(valid_to=TODAY - dt.timedelta(days=1)))
    assert "not yet valid" in _reason(make_block(valid_from=TODAY + dt.timedelta(days=1)))
    assert "birth date" in _reason(make_block(birth_date=dt.date(1985, 3, 13)))
    assert "gender" in _reason(make_block(gender="2"))
    assert "reversed" in _reason(make_block(valid_from=dt.date(2025, 1, 1),
                                            valid_to=dt.date(2024, 1, 1)))
    CardData(make_block(valid_to=TODAY)).validate(TODAY)  # the last day still counts
    CardData(make_block(valid_from=TODAY)).validate(TODAY)


def test_garbled_fields_are_reported_without_their_bytes():
    block = bytearray(make_block())
    block[0:2] = b"\x00\xd8"  # a lone UTF-16 surrogate: not UCS-2
    assert "name" in _reason(block)
    block = bytearray(make_block())
    block[36:38] = "A".encode("utf-16-le")
    assert "birth_date" in _reason(block)
    block = bytearray(make_block())
    block[188:204] = "20251340".encode("utf-16-le")
    assert "valid_from" in _reason(block)
    block = bytearray(make_block())
    block[0:30] = " ".encode("utf-16-le") * 15
    assert "empty" in _reason(block)
    with pytest.raises(CardError):
        CardData(bytes(255))


def test_encode_text_block_refuses_values_that_do_not_fit():
    with pytest.raises(ValueError):
        make_block(name="X" * 16)
    with pytest.raises(ValueError):
        make_block(address="\U0001F600")


def test_parse_new_address():
    raw = "NEW TEST ADDRESS".encode("utf-16-le") + " ".encode("utf-16-le") * 19
    assert parse_new_address(raw) == "NEW TEST ADDRESS"
    with pytest.raises(CardError):
        parse_new_address(raw[:-2])
