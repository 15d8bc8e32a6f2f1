"""The hall day's report: report.json, the terminal summary and day.png.

The plot is drawn here and written as a PNG with zlib and struct (an 8-bit RGB image,
filter 0 per row): plotting libraries are not project dependencies, and two panels of bars
and lines do not need one. Top panel: tickets per minute, 08:30 to 17:00 (grey bars).
Bottom panel: tap-to-ticket latency per 10-minute bucket, p50 (blue) and p99 (red), on a
scale from 0 to the day's maximum p99. Hour ticks and labels on both time axes, each
panel's title and its scale's top value in a 5x7 bitmap font (``_FONT``).

The report dict (built by hall.run.HallDay._report; every key may be missing, and a missing
or None figure renders as "n/a"):

- counts: citizens, served, walked_away, moved_to_another_kiosk, not_served,
  tickets_issued, tickets_printed, tickets_in_ledger, issued_not_printed, lost, duplicated,
  printed_twice, outbox_left
- tap_to_ticket_ms: {p50, p99, max: ms, n: tickets measured}
- blackhole: {seconds, connections_open, connections_dropped, detect_max_s, detect_p50_s,
  within_2_keepalives: bool}; spec.keepalive_s: the agents' MQTT keepalive, s
- agent_rss_mib, agent_cpu_pct: {min, median, max} over the agents that lived all day
- hall_cpu_pct_of_2_cores: machine CPU, % of all cores; cores; harness_cpu_pct: % of one
- ops: {metrics_tickets, dashboard_tickets, agree_with_ledger: bool}
- faults: [{name, target, at_wall_s, detail: {outcome key: value}}]
- ok: bool, the run's own verdict
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from pathlib import Path

WIDTH, HEIGHT = 1000, 600
BG, AXIS, BAR = (255, 255, 255), (40, 40, 40), (150, 150, 150)
P50, P99 = (30, 90, 200), (200, 40, 40)


def percentile(values, p: float) -> float:
    """Nearest-rank percentile: the smallest value with at least p % of values at or below.

    Always one of ``values`` (no interpolation); p from 0 to 100, p 0 gives the minimum.
    """
    if not 0 <= p <= 100:
        raise ValueError(f"percentile {p}: p must be from 0 to 100")
    v = sorted(values)
    if not v:
        raise ValueError("percentile of no values")
    rank = max(1, math.ceil(p / 100 * len(v)))
    return v[min(rank, len(v)) - 1]


def write_png(path, width: int, height: int, pixels: bytearray) -> None:
    """``pixels``: width*height*3 bytes, RGB, rows top to bottom."""
    if width < 1 or height < 1:
        raise ValueError(f"a {width}x{height} image: both sides must be at least 1")
    if len(pixels) != width * height * 3:
        raise ValueError(f"pixel buffer of {len(pixels)} bytes for a {width}x{height} RGB image "
                         f"({width * height * 3})")
    raw = b"".join(b"\x00" + bytes(pixels[y * width * 3:(y + 1) * width * 3]) for y in range(height))

    # PNG spec: each chunk is length, type, data, CRC-32 of type + data. IHDR: width, height,
    # bit depth 8, colour type 2 (RGB), deflate, filter method 0, no interlace.
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
    Path(path).write_bytes(png)


class _Canvas:
    def __init__(self, w: int, h: int) -> None:
        self.w, self.h = w, h
        self.px = bytearray(BG * (w * h))

    def dot(self, x: int, y: int, c) -> None:
        if 0 <= x < self.w and 0 <= y < self.h:
            i = (y * self.w + x) * 3
            self.px[i:i + 3] = bytes(c)

    def rect(self, x0: int, y0: int, x1: int, y1: int, c) -> None:
        for y in range(max(0, min(y0, y1)), min(self.h, max(y0, y1) + 1)):
            for x in range(max(0, min(x0, x1)), min(self.w, max(x0, x1) + 1)):
                self.dot(x, y, c)

    def text(self, x: int, y: int, s: str, c) -> int:
        """Draws ``s`` with its top left at (x, y); returns the x after it."""
        for ch in s:
            for col, bits in enumerate(_FONT.get(ch, ())):
                for row in range(7):
                    if bits >> row & 1:
                        self.dot(x + col, y + row, c)
            x += 6
        return x

    def line(self, x0: int, y0: int, x1: int, y1: int, c) -> None:
        n = max(abs(x1 - x0), abs(y1 - y0), 1)
        for i in range(n + 1):
            x = round(x0 + (x1 - x0) * i / n)
            y = round(y0 + (y1 - y0) * i / n)
            self.rect(x, y, x + 1, y + 1, c)


#: 5x7 glyphs, five columns left to right, bit 0 the top row (the classic glcdfont layout);
#: only what the plot writes.
_FONT = {ch: bytes.fromhex(h) for ch, h in zip("0123456789:-/. acekimnopst", (
    "3e5149453e", "00427f4000", "4261514946", "2141454b31", "1814127f10", "2745454539",
    "3c4a494930", "0171090503", "3649494936", "064949291e", "0036360000", "0808080808",
    "2010080402", "0060600000", "0000000000", "2054545478", "3844444420", "3854545418",
    "7f10284400", "00447d4000", "7c04180478", "7c08040478", "3844444438", "7c14141408",
    "4854545420", "043f444020"))}

#: Panels: (top, bottom) pixel rows; the plot area spans x from LEFT to RIGHT.
LEFT, RIGHT = 60, WIDTH - 20
TOP_PANEL, BOTTOM_PANEL = (20, 280), (330, 580)
DAY_MIN = 510


def _x(minute: float) -> int:
    return LEFT + round((RIGHT - LEFT) * minute / DAY_MIN)


def _axes(cv: _Canvas, panel: tuple[int, int], title: str, top_value: str) -> None:
    top, bottom = panel
    cv.rect(LEFT, top, LEFT, bottom, AXIS)
    cv.rect(LEFT, bottom, RIGHT, bottom, AXIS)
    cv.text(LEFT, top - 12, title, AXIS)
    cv.rect(LEFT - 4, top + 5, LEFT, top + 5, AXIS)        # the scale's top, as drawn below
    cv.text(LEFT - 8 - 6 * len(top_value), top + 2, top_value, AXIS)
    for hour in range(9):                       # 08:30 + n hours, then 17:00
        x = _x(30 + 60 * hour) if hour < 8 else _x(DAY_MIN)
        cv.rect(x, bottom, x, bottom + 6, AXIS)
        label = f"{9 + hour}:00"
        cv.text(x - 3 * len(label), bottom + 9, label, AXIS)


def plot_day(path, tickets_per_minute: list[int], latency_points: list[tuple[float, float]]) -> None:
    """Writes day.png (WIDTH x HEIGHT): tickets per day minute (index 0 is 08:30) above,
    p50/p99 of ``latency_points`` ((t_day_s, tap_to_ticket_ms)) per 10 minutes below."""
    cv = _Canvas(WIDTH, HEIGHT)
    top, bottom = TOP_PANEL
    peak = max(tickets_per_minute, default=0) or 1
    _axes(cv, TOP_PANEL, "tickets/min", str(peak))
    for m, n in enumerate(tickets_per_minute[:DAY_MIN]):
        if n:
            h = round((bottom - top - 5) * n / peak)
            cv.rect(_x(m) + 1, bottom - h, max(_x(m) + 1, _x(m + 1) - 1), bottom - 1, BAR)
    top, bottom = BOTTOM_PANEL
    buckets: dict[int, list[float]] = {}
    for t, ms in latency_points:
        buckets.setdefault(int(t // 600), []).append(ms)
    series = sorted((b, percentile(v, 50), percentile(v, 99)) for b, v in buckets.items())
    scale = max((s[2] for s in series), default=1.0) or 1.0
    _axes(cv, BOTTOM_PANEL, "tap-to-ticket ms", f"{scale:.0f}")
    x = cv.text(LEFT + 6 * 20, top - 12, "p50", P50)
    cv.text(x + 6, top - 12, "p99", P99)
    for idx, colour in ((1, P50), (2, P99)):
        pts = [(_x(s[0] * 10 + 5), bottom - round((bottom - top - 5) * s[idx] / scale))
               for s in series]
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            cv.line(x0, y0, x1, y1, colour)
        for x, y in pts:
            cv.rect(x - 2, y - 2, x + 2, y + 2, colour)
    write_png(path, WIDTH, HEIGHT, cv.px)


def _g(d: dict, *keys, default="n/a"):
    for k in keys:
        if not isinstance(d, dict) or d.get(k) is None:
            return default
        d = d[k]
    return d


def render_terminal(report: dict) -> str:
    """The human summary, one figure group a line, the verdict (PASS or FAIL) last."""
    r = report
    lines = [
        "hall day report",
        f"  citizens {_g(r, 'citizens')}, served {_g(r, 'served')}, walked away "
        f"{_g(r, 'walked_away')}, moved to another kiosk {_g(r, 'moved_to_another_kiosk')}, "
        f"not served {_g(r, 'not_served')}",
        f"  tickets left in the tray by walk-aways {_g(r, 'walked_away_leaving_a_ticket')}, "
        f"taken by nobody else {_g(r, 'tickets_beyond_served')}",
        f"  tickets issued {_g(r, 'tickets_issued')}, printed {_g(r, 'tickets_printed')}, in the "
        f"ledger {_g(r, 'tickets_in_ledger')} (issued, not printed {_g(r, 'issued_not_printed')})",
        f"  lost {_g(r, 'lost')}, duplicated {_g(r, 'duplicated')}, printed twice "
        f"{_g(r, 'printed_twice')}, outbox left {_g(r, 'outbox_left')}",
        f"  tap-to-ticket p50 {_g(r, 'tap_to_ticket_ms', 'p50')} ms, p99 "
        f"{_g(r, 'tap_to_ticket_ms', 'p99')} ms over {_g(r, 'tap_to_ticket_ms', 'n')} tickets",
        f"  blackhole {_g(r, 'blackhole', 'seconds')} s: {_g(r, 'blackhole', 'connections_dropped')} "
        f"connections given up by their clients, slowest after {_g(r, 'blackhole', 'detect_max_s')} s "
        f"(within 2 keepalives of {_g(r, 'spec', 'keepalive_s')} s: "
        f"{_g(r, 'blackhole', 'within_2_keepalives')})",
        f"  agent RSS MiB min/median/max {_g(r, 'agent_rss_mib', 'min')}/"
        f"{_g(r, 'agent_rss_mib', 'median')}/{_g(r, 'agent_rss_mib', 'max')}; agent CPU % "
        f"{_g(r, 'agent_cpu_pct', 'min')}/{_g(r, 'agent_cpu_pct', 'median')}/"
        f"{_g(r, 'agent_cpu_pct', 'max')}",
        f"  whole machine CPU {_g(r, 'hall_cpu_pct_of_2_cores')} % of {_g(r, 'cores')} cores "
        f"(harness {_g(r, 'harness_cpu_pct')} % of one)",
        f"  ops: metrics {_g(r, 'ops', 'metrics_tickets')}, dashboard "
        f"{_g(r, 'ops', 'dashboard_tickets')}, agree with the ledger "
        f"{_g(r, 'ops', 'agree_with_ledger')}",
    ]
    faults = r.get("faults") or []
    lines.append(f"  faults injected: {len(faults)}")
    for f in faults:
        f = f if isinstance(f, dict) else {"name": str(f)}
        detail = ", ".join(f"{k}={v}" for k, v in sorted((f.get("detail") or {}).items()))
        lines.append(f"  fault {_g(f, 'name')} on {_g(f, 'target')} at {_g(f, 'at_wall_s')} s: "
                     f"{detail or 'n/a'}")
    lines.append(_verdict(r))
    return "\n".join(lines)


def _verdict(r: dict) -> str:
    # The run's own ok is the verdict, but a report that counts a lost, duplicated or twice
    # printed ticket never reads PASS, whatever ok says.
    bad = [f"{k.replace('_', ' ')} {r[k]}" for k in ("lost", "duplicated", "printed_twice")
           if isinstance(r.get(k), (int, float)) and r[k] > 0]
    if r.get("ok") is True and not bad:
        return "PASS: nothing lost, duplicated or printed twice"
    return "FAIL: " + (", ".join(bad) if bad else "the run's checks did not hold (ok is not true)")


def write_report(out_dir, report: dict, tickets_per_minute: list[int],
                 latency_points: list[tuple[float, float]]) -> dict[str, Path]:
    """Writes out_dir/report.json (indent 2, sorted keys) and out_dir/day.png; returns
    {"json": path, "png": path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "png": out / "day.png"}
    paths["json"].write_text(json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")
    plot_day(paths["png"], tickets_per_minute, latency_points)
    return paths
