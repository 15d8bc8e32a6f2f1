"""The hall day's report (hall/report.py): the PNG byte for byte, the plot, the summary."""

from __future__ import annotations

import json
import struct
import zlib

import pytest

from hall.report import (BG, BOTTOM_PANEL, HEIGHT, P50, P99, TOP_PANEL, WIDTH, _x, percentile,
                         plot_day, render_terminal, write_png, write_report)


def _chunks(data: bytes):
    """(type, body) of each chunk, after checking the signature and every CRC."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    out, pos = [], 8
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        assert data[pos + 8 + length:pos + 12 + length] == struct.pack(">I", zlib.crc32(kind + body))
        out.append((kind, body))
        pos += 12 + length
    return out


def _decode(data: bytes):
    """(width, height, rows of RGB bytes) of a PNG as write_png makes it."""
    chunks = _chunks(data)
    assert chunks[0][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    width, height, depth, colour, comp, filt, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, colour, comp, filt, interlace) == (8, 2, 0, 0, 0)
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    stride = 1 + 3 * width
    assert len(raw) == height * stride
    assert all(raw[y * stride] == 0 for y in range(height))          # filter 0 on every row
    return width, height, [raw[y * stride + 1:(y + 1) * stride] for y in range(height)]


def _pixel(rows, x: int, y: int):
    return tuple(rows[y][3 * x:3 * x + 3])


def test_write_png_is_a_valid_png_of_the_pixels_given(tmp_path):
    w, h = 7, 3
    pixels = bytearray(b"".join(bytes([(x * 30) % 256, y * 80, 200]) for y in range(h)
                                for x in range(w)))
    write_png(tmp_path / "t.png", w, h, pixels)
    width, height, rows = _decode((tmp_path / "t.png").read_bytes())
    assert (width, height) == (7, 3)
    assert b"".join(rows) == bytes(pixels)
    assert _pixel(rows, 6, 2) == (180, 160, 200)


def test_write_png_refuses_a_buffer_of_the_wrong_size(tmp_path):
    with pytest.raises(ValueError, match="4x2"):
        write_png(tmp_path / "t.png", 4, 2, bytearray(4 * 2 * 3 - 1))
    with pytest.raises(ValueError):
        write_png(tmp_path / "t.png", 0, 2, bytearray())


def _plot(tmp_path, minutes, points=()):
    plot_day(tmp_path / "day.png", minutes, list(points))
    width, height, rows = _decode((tmp_path / "day.png").read_bytes())
    assert (width, height) == (WIDTH, HEIGHT)
    return rows


def _column(rows, x: int, panel: tuple[int, int]):
    top, bottom = panel
    return [_pixel(rows, x, y) for y in range(top, bottom)]      # above the time axis


def test_bars_stand_under_busy_minutes_only(tmp_path):
    minutes = [0] * 510
    minutes[100], minutes[200] = 10, 5
    rows = _plot(tmp_path, minutes)
    busy = [c != BG for c in _column(rows, _x(100) + 1, TOP_PANEL)]
    half = [c != BG for c in _column(rows, _x(200) + 1, TOP_PANEL)]
    assert any(busy) and busy[-1]                     # the bar stands on the axis
    assert sum(half) == pytest.approx(sum(busy) / 2, abs=2)
    assert all(c == BG for c in _column(rows, _x(300) + 1, TOP_PANEL))
    assert all(c == BG for c in _column(rows, _x(100) + 1, BOTTOM_PANEL))   # no latency given


def test_latency_lines_p99_above_p50(tmp_path):
    # One 10-minute bucket (09:40-09:50) with a slow tail: p50 100 ms, p99 1,000 ms.
    points = [(4000.0 + i, 100.0) for i in range(90)] + [(4100.0 + i, 1000.0) for i in range(10)]
    rows = _plot(tmp_path, [0] * 510, points)
    column = _column(rows, _x(4000 // 600 * 10 + 5), BOTTOM_PANEL)
    p50_at = [y for y, c in enumerate(column) if c == P50]
    p99_at = [y for y, c in enumerate(column) if c == P99]
    assert p50_at and p99_at
    assert max(p99_at) < min(p50_at)                  # rows count down: p99 drawn higher


def test_report_json_round_trips(tmp_path):
    report = {"tickets_issued": 5708, "lost": 0, "ok": True,
              "tap_to_ticket_ms": {"p50": 151.2, "p99": 412.0, "n": 5708},
              "faults": [{"name": "paper_out", "target": "k-03", "at_wall_s": 12.5,
                          "detail": {"refilled_after_s": 20}}]}
    paths = write_report(tmp_path / "out", report, [3] * 510, [(60.0, 150.0)])
    assert set(paths) == {"json", "png"}
    text = paths["json"].read_text()
    assert json.loads(text) == report
    assert text == json.dumps(report, indent=2, sort_keys=True) + "\n"
    _decode(paths["png"].read_bytes())


FULL = {
    "citizens": 5885, "served": 5708, "walked_away": 177, "tickets_issued": 5708,
    "tickets_printed": 5708, "tickets_in_ledger": 5708, "lost": 0, "duplicated": 0,
    "printed_twice": 0, "outbox_left": 0, "walked_away_leaving_a_ticket": 45,
    "tickets_beyond_served": 0,
    "tap_to_ticket_ms": {"p50": 151.2, "p99": 412.7, "n": 5708},
    "blackhole": {"seconds": 30, "connections_dropped": 50, "detect_max_s": 17.9,
                  "within_2_keepalives": True},
    "spec": {"keepalive_s": 10},
    "agent_rss_mib": {"min": 41.2, "median": 43.0, "max": 47.9},
    "agent_cpu_pct": {"min": 0.4, "median": 0.7, "max": 2.1},
    "hall_cpu_pct_of_2_cores": 38.5,
    "faults": [{"name": "agent_kill9", "target": "k-07", "at_wall_s": 300.0,
                "detail": {"back_after_s": 1.8}}],
    "ok": True,
}


def test_the_summary_carries_the_figures():
    text = render_terminal(FULL)
    for figure in ("tickets issued 5708", "in the ledger 5708", "lost 0", "duplicated 0",
                   "printed twice 0", "p50 151.2 ms", "p99 412.7 ms", "slowest after 17.9 s",
                   "2 keepalives of 10 s: True", "41.2/43.0/47.9", "0.4/0.7/2.1", "38.5 %",
                   "agent_kill9 on k-07", "back_after_s=1.8",
                   "left in the tray by walk-aways 45, taken by nobody else 0"):
        assert figure in text, figure
    assert text.splitlines()[-1].startswith("PASS")


def test_a_lost_ticket_is_a_fail_whatever_ok_says():
    last = render_terminal({**FULL, "lost": 2}).splitlines()[-1]
    assert last.startswith("FAIL") and "lost 2" in last
    assert render_terminal({**FULL, "ok": False}).splitlines()[-1].startswith("FAIL")


def test_missing_figures_read_n_a():
    text = render_terminal({})
    assert "tickets issued n/a" in text and "p99 n/a ms" in text
    assert text.splitlines()[-1].startswith("FAIL")
    assert "n/a" in render_terminal({"blackhole": None, "faults": [{"name": "blackhole"}]})


def test_percentile_is_nearest_rank():
    data = [40, 15, 50, 35, 20]                       # unsorted on purpose
    assert [percentile(data, p) for p in (0, 5, 20, 21, 40, 50, 99, 100)] == \
        [15, 15, 15, 20, 20, 35, 50, 50]
    assert percentile(range(1, 1001), 99) == 990
    assert percentile([7.5], 99) == 7.5
    for p in (-1, 101):
        with pytest.raises(ValueError):
            percentile(data, p)
    with pytest.raises(ValueError):
        percentile([], 50)
