"""The day's citizens, from a seed: when they come, to which kiosk, with what.

The hall opens 08:30 and closes 17:00 (30,600 s). Arrivals follow the shape service halls
report: quiet after opening, a morning peak around 10:00, a dip at lunch, a lower afternoon
peak around 14:00, tailing off before closing. The density (``density``) is a base of 0.25
plus two Gaussian bumps, 10:00 (weight 1, sd 0.9 h) and 14:00 (weight 0.75, sd 0.9 h),
times a linear ramp over the first and the last half hour. Times are drawn from it by
inverse CDF over one-second steps, uniform within the second.

A kiosk serves one citizen at a time: two arrivals at one kiosk are at least ``min_gap_s``
day seconds apart (the caller passes its session length times the speed-up). Each arrival
goes to the free kiosk that has been idle longest; when none is free it waits (its time
moves later) for the first that frees, so the last citizens may arrive after 17:00
(``per_minute`` counts them in the last minute). QR kinds (appointment, e-ID) only go to
kiosks with a QR reader; with none, every citizen uses the ID card.

A day is refused (ValueError) when the citizens, walk-aways included, would keep every
kiosk busy for more than 80 % of the day (``citizens * min_gap_s / kiosks``): the peaks
need the headroom. The check after the draw refuses a queue that runs an hour past closing
(the QR kiosks alone can be short of room on a day of many QR codes).
"""

from __future__ import annotations

import bisect
import functools
import math
import random
from dataclasses import dataclass

DAY_S = 30600            # 08:30 to 17:00
OPEN_H = 8.5
KINDS = ("idcard", "appointment", "eid")
#: (peak hour, width in hours, weight): the morning peak is the day's busiest.
PEAKS = ((10.0, 0.9, 1.0), (14.0, 0.9, 0.75))
BASE = 0.25
#: Share of the day every kiosk may be busy, at most (the rest is the peaks' headroom).
BUSY_MAX = 0.8


def density(t_day_s: float) -> float:
    """Relative arrival rate at ``t_day_s`` seconds after opening (unnormalised)."""
    h = OPEN_H + t_day_s / 3600
    ramp = min(1.0, t_day_s / 1800, (DAY_S - t_day_s) / 1800)   # the first and last half hour
    return max(0.0, ramp) * (BASE + sum(w * math.exp(-((h - c) / s) ** 2 / 2) for c, s, w in PEAKS))


@dataclass(frozen=True)
class Arrival:
    t_day_s: float             # day seconds since 08:30 (may pass 30,600 when the queue is long)
    kiosk: int                 # index into the hall's kiosks
    kind: str                  # one of KINDS
    service_index: int         # the button pressed; for QR kinds, the service in the code
    leaves: bool = False       # walks away before a button: no ticket (an appointment
                               # code needs no button: its ticket prints and stays in the tray)
    staff_call: bool = False   # also presses the staff-call button
    cell: bool = False         # the kiosk stands in a privacy cell


@functools.cache
def _cdf() -> tuple[float, ...]:
    acc, out = 0.0, []
    for t in range(DAY_S):
        acc += density(t + 0.5)
        out.append(acc)
    return tuple(x / acc for x in out)


def day_schedule(*, kiosks: int, qr_kiosks: set[int], cell_kiosks: set[int], tickets: int,
                 seed: int, services: int = 3, mix: tuple[float, float, float] = (0.6, 0.25, 0.15),
                 leave_rate: float = 0.03, staff_call_rate: float = 0.02,
                 min_gap_s: float) -> list[Arrival]:
    """``tickets`` ticket-producing arrivals plus walk-aways on top, sorted by time.

    ``mix``: shares of (idcard, appointment, eid), summing to 1; ``leave_rate``: share of all
    citizens who walk away; ``staff_call_rate``: share who press the staff-call button.
    ValueError for bad arguments and for a day that does not fit (module docstring).
    """
    if kiosks < 1 or tickets < 0 or services < 1 or min_gap_s < 0:
        raise ValueError("kiosks and services must be >= 1, tickets and min_gap_s >= 0")
    if len(mix) != 3 or any(m < 0 for m in mix) or abs(sum(mix) - 1) > 1e-9:
        raise ValueError(f"mix {mix}: three shares (idcard, appointment, eid) summing to 1")
    if not 0 <= leave_rate < 1 or not 0 <= staff_call_rate <= 1:
        raise ValueError("leave_rate must be in [0, 1), staff_call_rate in [0, 1]")
    for name, given in (("qr_kiosks", qr_kiosks), ("cell_kiosks", cell_kiosks)):
        bad = sorted(k for k in given if not 0 <= k < kiosks)
        if bad:
            raise ValueError(f"{name} {bad}: not kiosk indexes (0 to {kiosks - 1})")
    rng = random.Random(seed)
    walkaways = round(tickets * leave_rate / (1 - leave_rate))
    total = tickets + walkaways
    if total * min_gap_s / kiosks > DAY_S * BUSY_MAX:
        raise ValueError(f"{total} citizens {min_gap_s:.0f} s apart do not fit {kiosks} kiosks in "
                         f"a day: fewer tickets, more kiosks or a lower speed")
    cdf = _cdf()
    times = sorted(bisect.bisect_left(cdf, rng.random()) + rng.random() for _ in range(total))
    leaving = set(rng.sample(range(total), walkaways))
    qr = sorted(qr_kiosks)
    free_at = [0.0] * kiosks      # day second each kiosk is free again
    out = []
    for n, t in enumerate(times):
        kind = rng.choices(KINDS, weights=mix)[0] if qr else "idcard"
        pool = qr if kind != "idcard" else range(kiosks)
        k = min(pool, key=lambda i: (max(free_at[i], t), free_at[i]))
        start = max(t, free_at[k])
        free_at[k] = start + min_gap_s
        out.append(Arrival(round(start, 3), k, kind, rng.randrange(services), n in leaving,
                           rng.random() < staff_call_rate, k in cell_kiosks))
    if out and max(a.t_day_s for a in out) >= DAY_S + 3600:
        raise ValueError("the queue runs more than an hour past closing: the day does not fit")
    out.sort(key=lambda a: a.t_day_s)
    return out


def per_minute(arrivals: list[Arrival]) -> list[int]:
    """Ticket-producing arrivals per minute of the day (510 entries)."""
    counts = [0] * (DAY_S // 60)
    for a in arrivals:
        if not a.leaves:
            counts[min(len(counts) - 1, int(a.t_day_s // 60))] += 1
    return counts
