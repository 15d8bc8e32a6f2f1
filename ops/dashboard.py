"""The live fleet dashboard: one row per kiosk, worst first, in 80 columns.

``table(kiosks, alerts)`` builds a rich renderable; ``render(...)`` turns it into plain text
of a given width (what the tests capture, and what ``--plain`` prints when stdout is not a
terminal); ``run_live`` redraws it in place on a terminal, over ssh too (rich only needs
ANSI escapes; no curses, no alternate screen, so the last frame stays in the scrollback).

Colour is a help, never the only signal: states are words (``OFFLINE`` in capitals), paper
``OUT``, and rows are sorted by ``KioskSnapshot.trouble`` so the kiosks that need someone
are at the top whatever the terminal can show.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Iterable, Sequence

from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from ops.alerts import Alert
from ops.fleet import Fleet, KioskSnapshot

_STATUS_STYLE = {
    "online": ("online", "green"),
    "degraded": ("degraded", "yellow"),
    "out_of_service": ("out-svc", "magenta"),
    "offline": ("OFFLINE", "bold red"),
    "unknown": ("unknown", "dim"),
}
_PAPER_STYLE = {"ok": ("ok", "green"), "near_end": ("low", "yellow"), "out": ("OUT", "bold red"),
                "unknown": ("?", "dim")}
#: Alerts listed under the table at most.
MAX_ALERT_LINES = 5


def age(seconds: float | None) -> str:
    """A compact age: 42s, 5m, 3h, 2d; '-' for never."""
    if seconds is None:
        return "-"
    s = int(max(0.0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


def sort_by_trouble(kiosks: Iterable[KioskSnapshot]) -> list[KioskSnapshot]:
    """Worst first; ties by hall then device, so the order is stable between frames."""
    return sorted(kiosks, key=lambda k: (-k.trouble, k.hall, k.device))


def _issues(k: KioskSnapshot) -> Text:
    parts: list[tuple[str, str]] = []
    for subject, fault in k.faults:
        parts.append((f"{subject}:{fault}", "red"))
    for subject, warning in k.warnings:
        if warning != "paper_near_end":           # already in the paper column
            parts.append((f"{subject}:{warning}", "yellow"))
    if k.bad_signatures:
        parts.append((f"badsig {k.bad_signatures}", "bold red"))
    if k.replays:
        parts.append((f"replay {k.replays}", "yellow"))
    if k.lost:
        parts.append((f"lost {k.lost}", "yellow"))
    if k.status in ("offline", "degraded", "out_of_service") and k.status_reason:
        parts.append((k.status_reason, "dim"))
    if k.slot is not None:
        # Slot, version and update state (edge/update), e.g. "b:0.2.0 trial".
        update = k.update_state or "idle"
        style = {"rolled_back": "bold red", "failed": "red", "trial": "yellow"}.get(update, "dim")
        words = f"{k.slot}:{k.agent_version or '?'} {update}"
        if k.update_code:
            words += f"({k.update_code})"
        parts.append((words, style))
    text = Text()
    for i, (words, style) in enumerate(parts):
        if i:
            text.append(" ")
        text.append(words, style=style)
    return text


#: Content widths of the fixed columns (name, header, width); the issues take the rest.
_FIXED = (("State", 8), ("Seen", 4), ("Paper", 5), ("Temp", 4), ("Queue", 5),
          ("Last ticket", 12))


def table(kiosks: Iterable[KioskSnapshot], *, width: int = 80, title: str | None = None) -> Table:
    """The fleet table for a terminal ``width`` columns wide, worst kiosk first."""
    rows = sort_by_trouble(kiosks)
    many_halls = len({k.hall for k in rows}) > 1
    name_w = 16 if many_halls else 10
    # No padding: the box's one-space column separator is the only gap between columns.
    used = name_w + sum(w for _, w in _FIXED) + len(_FIXED) + 1
    issues_w = max(10, width - used)
    t = Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 0), expand=False,
              title=title, title_justify="left", show_edge=False, collapse_padding=False)
    t.add_column("Kiosk", no_wrap=True, overflow="ellipsis", min_width=name_w, max_width=name_w)
    for header, w in _FIXED:
        t.add_column(header, no_wrap=True, overflow="ellipsis", min_width=w, max_width=w,
                     justify="right" if header in ("Seen", "Temp", "Queue") else "left")
    t.add_column("Issues", no_wrap=True, overflow="ellipsis", max_width=issues_w)
    for k in rows:
        name = f"{k.hall}/{k.device}" if many_halls else k.device
        status, status_style = _STATUS_STYLE.get(k.status, (k.status, ""))
        paper, paper_style = _PAPER_STYLE.get(k.paper or "unknown", ("?", "dim"))
        if k.paper is None:
            paper, paper_style = "-", "dim"
        temp = Text("-", style="dim") if k.temp_mC is None else Text(
            f"{k.temp_mC // 1000}C", style="red" if k.temp_mC >= 75_000 else "")
        if k.outbox_depth is None:
            queue_text = Text("-", style="dim")
        else:
            queue_text = Text(str(k.outbox_depth), style="yellow" if k.outbox_depth else "")
        ticket = "-" if k.last_ticket_id is None else (
            f"{k.last_ticket_id} {age(k.last_ticket_age_s)}")
        t.add_row(name, Text(status, style=status_style), age(k.last_seen_age_s),
                  Text(paper, style=paper_style), temp, queue_text, ticket, _issues(k))
    return t


def summary(kiosks: Sequence[KioskSnapshot], alerts: Sequence[Alert]) -> Text:
    counts: dict[str, int] = {}
    for k in kiosks:
        counts[k.status] = counts.get(k.status, 0) + 1
    text = Text(f"{len(kiosks)} kiosk{'' if len(kiosks) == 1 else 's'}:")
    for status in ("online", "degraded", "out_of_service", "offline", "unknown"):
        if counts.get(status):
            label, style = _STATUS_STYLE[status]
            text.append(f" {counts[status]} {label.lower()}", style=style)
    firing = [a for a in alerts if a.state == "firing"]
    text.append(f" | {len(firing)} alerts firing", style="bold red" if firing else "")
    return text


def view(kiosks: Iterable[KioskSnapshot], alerts: Iterable[Alert] = (), *, width: int = 80,
         title: str | None = "hallkiosk fleet") -> Group:
    """Table, summary line and the firing alerts (most severe first)."""
    kiosks = list(kiosks)
    alerts = list(alerts)
    lines: list[Text] = [summary(kiosks, alerts)]
    order = {"critical": 0, "warning": 1, "info": 2}
    firing = sorted((a for a in alerts if a.state == "firing"),
                    key=lambda a: (order.get(a.severity, 3), a.hall, a.device, a.rule))
    for a in firing[:MAX_ALERT_LINES]:
        style = "bold red" if a.severity == "critical" else "yellow"
        lines.append(Text(f"! {a.severity} {a.rule} {a.hall}/{a.device}: {a.message}",
                          style=style, overflow="ellipsis", no_wrap=True))
    if len(firing) > MAX_ALERT_LINES:
        lines.append(Text(f"  ... and {len(firing) - MAX_ALERT_LINES} more", style="dim"))
    return Group(table(kiosks, width=width, title=title), *lines)


def render(fleet: Fleet | Iterable[KioskSnapshot], width: int = 80, *,
           alerts: Iterable[Alert] = (), color: bool = False,
           title: str | None = "hallkiosk fleet") -> str:
    """The dashboard as text of at most ``width`` columns (ANSI colours if ``color``)."""
    kiosks = fleet.snapshot() if isinstance(fleet, Fleet) else list(fleet)
    out = io.StringIO()
    console = Console(file=out, width=width, force_terminal=color, color_system=(
        "standard" if color else None), no_color=not color, legacy_windows=False,
        highlight=False, emoji=False)
    console.print(view(kiosks, alerts, width=width, title=title))
    return out.getvalue()


def run_live(get_view: Callable[[], tuple[list[KioskSnapshot], list[Alert]]], *,
             refresh_s: float = 1.0, stop: threading.Event,
             console: Console | None = None, plain_every_s: float = 10.0) -> None:
    """Redraw until ``stop`` is set: in place on a terminal, else a text frame every
    ``plain_every_s`` (a pipe or a log file gets whole frames, not escape sequences)."""
    console = console or Console(highlight=False, emoji=False)
    if not console.is_terminal:
        while True:
            kiosks, alerts = get_view()
            console.print(render(kiosks, width=min(console.width, 120), alerts=alerts))
            if stop.wait(plain_every_s):
                return
    with Live(console=console, auto_refresh=False, transient=False) as live:
        while True:
            kiosks, alerts = get_view()
            live.update(view(kiosks, alerts, width=console.width), refresh=True)
            if stop.wait(refresh_s):
                return
