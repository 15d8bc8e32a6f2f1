"""ESC/POS protocol code: builder vectors, status tables, ASB splitting, parser round trip
and fuzzing. Pure code, no ports."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge.printer.escpos import (MAX_BUFFERED, MAX_GS_K_LENGTH, Alignment, AsbBlock, EscPos,
                                 InboundSplitter, PrinterStatus, StatusAnswer, StrayByte,
                                 TicketLayout, asb_enable, decode_asb, decode_status, encode_asb,
                                 encode_status, is_asb_first_byte, render_ticket, status_query)
from edge.printer.parser import (OP_TYPES, Align, AsbEnable, Bold, Cut, EscPosParser, Feed, Init,
                                 Oversized, QrErrorLevel, QrModel, QrModuleSize, QrPrint, QrStore,
                                 SetSize, StatusRequest, Text, Unknown)
from hallkiosk.errors import ProtocolError

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

LAYOUT = TicketLayout(hall_name="Service Hall North", service_name="Passports",
                      ticket_number="A-07-0123", issued_at="2026-11-12 09:41", waiting_ahead=4,
                      qr_data="HK1:A-07-0123:7f3a9c", notice="Appointment")


# -- builder -----------------------------------------------------------------------------
def test_basic_command_bytes():
    b = EscPos().init().align(Alignment.CENTER).bold().bold(False).feed(3).cut().cut(partial=False)
    assert b.to_bytes() == bytes.fromhex("1b40 1b6101 1b4501 1b4500 1b6403 1d5601 1d5600")


@pytest.mark.parametrize("w,h,n", [(1, 1, 0x00), (2, 2, 0x11), (4, 4, 0x33), (3, 1, 0x20), (1, 8, 0x07),
                                   (8, 8, 0x77)])
def test_size_byte_high_nibble_width_low_nibble_height(w, h, n):
    assert EscPos().size(w, h).to_bytes() == bytes((0x1D, 0x21, n))


@pytest.mark.parametrize("w,h", [(0, 1), (1, 0), (9, 1), (1, 9)])
def test_size_out_of_range_is_a_caller_mistake(w, h):
    with pytest.raises(ValueError):
        EscPos().size(w, h)


def test_qr_sequence_and_store_length_for_300_bytes():
    payload = bytes(range(32, 127)) * 3 + b"abcdefghijklmno"
    assert len(payload) == 300
    out = EscPos().qr(payload, module_size=5, error="M").to_bytes()
    model = bytes.fromhex("1d286b 0400 31 41 32 00")
    module = bytes.fromhex("1d286b 0300 31 43 05")
    level = bytes.fromhex("1d286b 0300 31 45 31")
    # 300 data bytes + cn fn m = 303 = 0x012F: pL 2F, pH 01.
    store = bytes.fromhex("1d286b 2f01 31 50 30") + payload
    show = bytes.fromhex("1d286b 0300 31 51 30")
    assert out == model + module + level + store + show


def test_qr_limits():
    with pytest.raises(ValueError):
        EscPos().qr(b"")
    with pytest.raises(ValueError):
        EscPos().qr(b"1" * 7090)
    with pytest.raises(ValueError):
        EscPos().qr(b"x", error="X")
    with pytest.raises(ValueError):
        EscPos().qr(b"x", module_size=17)


def test_text_replaces_unencodable_and_control_characters():
    out = EscPos("cp437").text("Größe €\x1b@\x10\x04\x01\n").to_bytes()
    # ö is 0x94 in cp437; ß is 0xE1; € is not in cp437; ESC, DLE, EOT, SOH and LF are controls.
    assert out == b"Gr\x94\xe1e ??@????"
    assert b"\x1b" not in out and b"\x10" not in out


def test_status_query_and_asb_enable():
    assert [status_query(n) for n in (1, 2, 3, 4)] == [b"\x10\x04\x01", b"\x10\x04\x02",
                                                       b"\x10\x04\x03", b"\x10\x04\x04"]
    with pytest.raises(ValueError):
        status_query(5)
    assert asb_enable() == b"\x1d\x61\x0e"
    assert asb_enable(0) == b"\x1d\x61\x00"


def test_layout_validation():
    with pytest.raises(ValueError):
        TicketLayout("h", "s", "A-1", "t", -1, "q")
    with pytest.raises(ValueError):
        TicketLayout("h", "s", "", "t", 0, "q")
    assert "HK1:" not in repr(LAYOUT)


# -- status ------------------------------------------------------------------------------
def test_idle_printer():
    s = PrinterStatus()
    for n in (1, 2, 3, 4):
        s = decode_status(n, 0x12, s)
    assert s.ok_to_print and s.faults == () and s.warnings == ()
    assert s.answered == {1, 2, 3, 4}


@pytest.mark.parametrize("n,byte,faults,warnings", [
    (1, 0x12, (), ()),
    (1, 0x1A, ("offline",), ()),
    (2, 0x16, ("cover_open",), ()),
    (2, 0x32, ("paper_out",), ()),
    (2, 0x52, ("error",), ()),
    (3, 0x1A, ("cutter_error",), ()),
    (3, 0x32, ("unrecoverable_error",), ()),
    (3, 0x16, ("mechanical_error",), ()),
    (3, 0x52, ("auto_recoverable_error",), ()),
    (4, 0x1E, (), ("paper_near_end",)),
    (4, 0x72, ("paper_out",), ()),
    (4, 0x7E, ("paper_out",), ()),
])
def test_status_tables(n, byte, faults, warnings):
    s = decode_status(n, byte)
    assert s.faults == faults
    assert s.warnings == warnings
    assert s.answered == {n}


def test_near_end_still_prints_and_out_does_not():
    online = decode_status(1, 0x12)
    assert decode_status(4, 0x1E, online).ok_to_print
    assert decode_status(4, 0x1E, online).paper_near_end
    assert not decode_status(4, 0x72, online).ok_to_print
    assert not decode_status(4, 0x7E, online).ok_to_print


def test_silence_is_not_health():
    # A status nobody answered (python-escpos's "paper OK") must not allow printing.
    assert not PrinterStatus().ok_to_print
    assert not decode_status(4, 0x12).ok_to_print


def test_later_answer_replaces_its_own_flags():
    s = decode_status(2, 0x16)
    assert s.cover_open
    assert not decode_status(2, 0x12, s).cover_open


@pytest.mark.parametrize("byte", [0x00, 0xFF, 0x10, 0x13, 0x02, 0x92, 0x11, 0x1F])
def test_bytes_breaking_fixed_bits_are_protocol_errors(byte):
    with pytest.raises(ProtocolError):
        decode_status(1, byte)


def test_bad_n_is_a_caller_mistake():
    with pytest.raises(ValueError):
        decode_status(0, 0x12)


@given(st.integers(1, 4), st.integers(0, 255))
@FUZZ
def test_decode_status_accepts_exactly_the_fixed_pattern(n, byte):
    if byte & 0x93 == 0x12:
        s = decode_status(n, byte)
        assert decode_status(n, encode_status(n, s)) == s
    else:
        with pytest.raises(ProtocolError):
            decode_status(n, byte)


def test_encode_decode_round_trip_of_emulator_bytes():
    s = PrinterStatus(online=False, cover_open=True, paper_near_end=True, answered=frozenset({1, 2, 3, 4}))
    again = PrinterStatus()
    for n in (1, 2, 3, 4):
        again = decode_status(n, encode_status(n, s), again)
    assert again == s


# -- automatic status back -------------------------------------------------------------------
def test_asb_first_byte_rule():
    assert is_asb_first_byte(0x10) and is_asb_first_byte(0x38)
    assert not is_asb_first_byte(0x12)     # a real-time answer
    assert not is_asb_first_byte(0x11)     # XON


def test_asb_block_decodes():
    s = decode_asb(bytes((0x18 | 0x20, 0x08, 0x03, 0x00)))
    assert not s.online and s.cover_open and s.cutter_error and s.paper_near_end
    assert encode_asb(s) == bytes((0x38, 0x08, 0x03, 0x00))
    with pytest.raises(ProtocolError):
        decode_asb(b"\x12\x00\x00\x00")
    with pytest.raises(ProtocolError):
        decode_asb(b"\x10\x10\x00\x00")


def test_split_asb_blocks_from_answers():
    near_end = bytes((0x10, 0x00, 0x03, 0x00))
    stream = near_end + b"\x12" + bytes((0x18, 0x00, 0x00, 0x00)) + b"\x1e"
    items = InboundSplitter().feed(stream)
    assert items == [AsbBlock(near_end), StatusAnswer(0x12), AsbBlock(bytes((0x18, 0, 0, 0))),
                     StatusAnswer(0x1E)]
    assert items[0].status.paper_near_end


def test_split_across_feeds_and_truncated_block():
    sp = InboundSplitter()
    assert sp.feed(b"\x10\x00") == []
    assert sp.feed(b"\x03\x00\x16") == [AsbBlock(b"\x10\x00\x03\x00"), StatusAnswer(0x16)]
    # A block cut short (2 bytes) never swallows the answer that follows it.
    assert sp.feed(b"\x10\x00\x12") == [StrayByte(0x10), StrayByte(0x00), StatusAnswer(0x12)]


@given(st.lists(st.one_of(st.integers(0, 255).filter(lambda b: b & 0x93 == 0x12).map(lambda b: ("a", b)),
                          st.builds(PrinterStatus, online=st.booleans(), cover_open=st.booleans(),
                                    paper_near_end=st.booleans(), paper_out=st.booleans(),
                                    cutter_error=st.booleans()).map(lambda s: ("b", s))),
                max_size=30),
       st.integers(1, 7))
@FUZZ
def test_split_interleaved_stream_in_any_chunking(events, chunk):
    stream = b"".join(bytes((v,)) if kind == "a" else encode_asb(v) for kind, v in events)
    sp = InboundSplitter()
    items = []
    for i in range(0, len(stream), chunk):
        items += sp.feed(stream[i:i + chunk])
    expected = [StatusAnswer(v) if kind == "a" else AsbBlock(encode_asb(v)) for kind, v in events]
    assert items == expected


# -- parser ----------------------------------------------------------------------------------
def _merge_text(ops):
    """Adjacent Text ops with one style are one run (chunking may split them)."""
    out = []
    for op in ops:
        if isinstance(op, Text) and out and isinstance(out[-1], Text) and out[-1].style == op.style:
            out[-1] = Text(out[-1].text + op.text, op.style)
        else:
            out.append(op)
    return out


def _lines(ops):
    lines, cur = [], ""
    for op in ops:
        if isinstance(op, Text):
            cur += op.text
        elif isinstance(op, Feed):
            lines.append(cur)
            cur = ""
    return lines


def test_render_ticket_round_trip():
    ops = EscPosParser().feed(render_ticket(LAYOUT))
    assert isinstance(ops[0], Init)
    assert Align(Alignment.CENTER) in ops
    assert _lines(ops)[:8] == ["Service Hall North", "Passports", "", "A-07-0123", "", "2026-11-12 09:41",
                               "4 people waiting ahead", "Appointment"]
    number = next(op for op in ops if isinstance(op, Text) and op.text == "A-07-0123")
    assert (number.style.width, number.style.height) == (4, 4)
    hall = next(op for op in ops if isinstance(op, Text) and op.text == "Service Hall North")
    assert hall.style.bold and hall.style.align == Alignment.CENTER
    assert QrModel(2) in ops and QrErrorLevel("M") in ops
    assert any(isinstance(op, QrModuleSize) for op in ops)
    assert [op.data for op in ops if isinstance(op, QrStore)] == [b"HK1:A-07-0123:7f3a9c"]
    assert ops.index(QrPrint()) > next(i for i, op in enumerate(ops) if isinstance(op, QrStore))
    assert ops[-1] == Cut(partial=True)
    assert not any(isinstance(op, (Unknown, Oversized)) for op in ops)


def test_long_ticket_numbers_shrink():
    layout = TicketLayout("H", "S", "PASSPORT-000123", "t", 0, "q")
    ops = EscPosParser().feed(render_ticket(layout))
    number = next(op for op in ops if isinstance(op, Text) and op.text == "PASSPORT-000123")
    assert number.style.width == 2


texts = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x2FF, exclude_categories=("Cs",)),
                min_size=1, max_size=50)


@given(hall=texts, service=texts, number=st.text("ABC-0123456789", min_size=1, max_size=14),
       waiting=st.integers(0, 999), qr=st.text(min_size=1, max_size=300).filter(lambda s: s.strip()),
       chunk=st.integers(1, 64))
@FUZZ
def test_round_trip_any_text_any_chunking(hall, service, number, waiting, qr, chunk):
    layout = TicketLayout(hall, service, number, "09:41", waiting, qr)
    data = render_ticket(layout)
    whole = EscPosParser().feed(data)
    p = EscPosParser()
    pieces = []
    for i in range(0, len(data), chunk):
        pieces += p.feed(data[i:i + chunk])
    assert p.buffered == 0
    assert _merge_text(pieces) == _merge_text(whole)
    def printable(s: str) -> str:
        s = "".join("?" if ch == "\x7f" else ch for ch in s)
        return s.encode("cp437", "replace").decode("cp437")
    assert _lines(whole)[:4] == [printable(hall), printable(service), "", number]
    assert [op.data for op in whole if isinstance(op, QrStore)] == [qr.encode("utf-8")]


def test_status_request_and_asb_ops():
    ops = EscPosParser().feed(b"\x10\x04\x01\x10\x04\x04\x1d\x61\x0e\x10\x04\x07\x01")
    assert ops == [StatusRequest(1), StatusRequest(4), AsbEnable(0x0E), Unknown(b"\x10\x04\x07\x01")]


def test_cut_variants_and_esc_bang():
    ops = EscPosParser().feed(b"\x1dV\x00\x1dV\x31\x1dVB\x10\x1b!\x38x")
    assert ops[:3] == [Cut(False), Cut(True), Cut(True, 0x10)]
    assert ops[3:5] == [Bold(True), SetSize(2, 2)]
    assert ops[5].style.bold and ops[5].style.width == 2


def test_unknown_commands_are_stepped_over_whole():
    # ESC - 1 (underline) and GS B 1 (reverse) have one parameter byte each: "A" must
    # not print as text. An unknown GS ( letter with a payload is skipped by its length.
    ops = EscPosParser().feed(b"\x1b-A\x1dBA\x1d(E\x03\x00ABCok")
    assert ops == [Unknown(b"\x1b-A"), Unknown(b"\x1dBA"), Unknown(b"\x1d(E\x03\x00"),
                   Text("ok", ops[-1].style)]


def test_oversized_gs_k_is_an_error_op_not_an_allocation():
    p = EscPosParser()
    length = 60000
    ops = p.feed(b"\x1d(k" + length.to_bytes(2, "little") + b"\x31\x50\x30")
    assert ops == [Oversized(b"\x1d(k" + length.to_bytes(2, "little"), length)]
    assert p.buffered == 0
    for _ in range(10):
        assert p.feed(b"\x10\x04\x01" * 1000) == []     # payload, not commands
        assert p.buffered == 0
    assert p.skipping == length - 3 - 30000
    p.feed(b"x" * p.skipping)
    assert p.feed(b"\x10\x04\x01") == [StatusRequest(1)]


def test_truncated_command_waits_then_completes():
    p = EscPosParser()
    data = EscPos().qr("hello").to_bytes()
    ops = []
    for b in data:
        ops += p.feed(bytes((b,)))
        assert p.buffered <= MAX_BUFFERED
    assert QrStore(b"hello") in ops and ops[-1] == QrPrint()


@given(st.binary(max_size=2000), st.integers(1, 300))
@FUZZ
def test_fuzz_random_bytes(data, chunk):
    p = EscPosParser()
    for i in range(0, len(data), chunk):
        for op in p.feed(data[i:i + chunk]):
            assert isinstance(op, OP_TYPES)
        assert p.buffered <= MAX_BUFFERED


command_prefixes = st.sampled_from([b"\x1b", b"\x1d", b"\x10", b"\x1d(k", b"\x1d(A", b"\x1dv0",
                                    b"\x1d8L", b"\x1b*", b"\x1dk", b"\x1bD", b"\x10\x04", b"\x10\x14",
                                    b"\x1dV", b"\x1d!", b"\x1ba"])
fragments = st.one_of(command_prefixes, st.binary(max_size=12),
                      st.builds(lambda n, body: b"\x1d(k" + n.to_bytes(2, "little") + body,
                                st.integers(0, 65535), st.binary(max_size=40)))


@given(st.lists(fragments, max_size=40), st.integers(1, 50))
@FUZZ
def test_fuzz_truncated_commands_and_huge_lengths(parts, chunk):
    data = b"".join(parts)
    p = EscPosParser()
    seen = []
    for i in range(0, len(data), chunk):
        seen += p.feed(data[i:i + chunk])
        assert p.buffered <= MAX_BUFFERED
    assert all(isinstance(op, OP_TYPES) for op in seen)
    for op in seen:
        if isinstance(op, Oversized):
            assert op.length > MAX_GS_K_LENGTH
        if isinstance(op, QrStore):
            assert len(op.data) <= MAX_GS_K_LENGTH
