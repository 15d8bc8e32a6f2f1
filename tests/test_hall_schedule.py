"""The hall day's schedule (hall/arrivals.py): pure, from a seed, no processes."""

from __future__ import annotations

from collections import Counter

import pytest

from hall.arrivals import DAY_S, KINDS, day_schedule, per_minute

HALL = dict(kiosks=50, qr_kiosks=set(range(0, 50, 2)), cell_kiosks=set(range(37, 50)))


def _busiest(seed: int = 1, **kw):
    args = {**HALL, "tickets": 5708, "seed": seed, "min_gap_s": 90, **kw}
    return day_schedule(**args)


def _per_minute_rate(pm: list[int], start_hhmm: str, end_hhmm: str) -> float:
    def minute(hhmm: str) -> int:
        h, m = map(int, hhmm.split(":"))
        return (h - 8) * 60 + m - 30
    a, b = minute(start_hhmm), minute(end_hhmm)
    return sum(pm[a:b]) / (b - a)


@pytest.mark.parametrize("tickets", [0, 1, 137, 5708])
def test_exactly_the_tickets_asked_for(tickets):
    day = _busiest(tickets=tickets)
    assert sum(not a.leaves for a in day) == tickets
    pm = per_minute(day)
    assert len(pm) == 510 and sum(pm) == tickets
    assert [a.t_day_s for a in day] == sorted(a.t_day_s for a in day)


def test_walk_aways_come_on_top_and_are_not_counted():
    day = _busiest()
    walkaways = [a for a in day if a.leaves]
    assert len(walkaways) == round(5708 * 0.03 / 0.97)
    assert per_minute([a for a in day if not a.leaves]) == per_minute(day)
    assert not any(a.leaves for a in _busiest(tickets=500, leave_rate=0))


def test_same_seed_same_day_other_seed_other_day():
    assert _busiest(seed=7) == _busiest(seed=7)
    other = _busiest(seed=8)
    assert [a.t_day_s for a in other] != [a.t_day_s for a in _busiest(seed=7)]
    assert [a.kind for a in other] != [a.kind for a in _busiest(seed=7)]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_day_has_a_morning_and_an_afternoon_peak(seed):
    pm = per_minute(_busiest(seed=seed))
    quiet = max(_per_minute_rate(pm, "08:30", "09:00"), _per_minute_rate(pm, "16:30", "17:00"))
    morning = _per_minute_rate(pm, "09:30", "10:30")
    afternoon = _per_minute_rate(pm, "13:30", "14:30")
    assert morning > quiet and afternoon > quiet
    assert morning > afternoon                      # the afternoon peak is a bit lower
    assert _per_minute_rate(pm, "12:00", "12:30") < afternoon   # the lunch dip


def test_qr_codes_only_at_kiosks_with_a_reader():
    qr = {3, 7, 11, 20, 41}
    day = day_schedule(kiosks=50, qr_kiosks=qr, cell_kiosks=set(), tickets=5708, seed=5,
                       min_gap_s=10)
    by_kind = Counter(a.kind for a in day)
    assert by_kind["appointment"] > 0 and by_kind["eid"] > 0
    assert {a.kiosk for a in day if a.kind != "idcard"} == qr
    assert {a.kiosk for a in day if a.kind == "idcard"} - qr       # cards go everywhere
    card_only = day_schedule(kiosks=4, qr_kiosks=set(), cell_kiosks=set(), tickets=300, seed=5,
                             min_gap_s=10)
    assert {a.kind for a in card_only} == {"idcard"}


@pytest.mark.parametrize("gap", [90, 200])
def test_a_kiosk_serves_one_citizen_at_a_time(gap):
    day = _busiest(min_gap_s=gap)
    times: dict[int, list[float]] = {}
    for a in day:
        times.setdefault(a.kiosk, []).append(a.t_day_s)
    for kiosk, ts in times.items():
        gaps = [b - a for a, b in zip(ts, ts[1:])]
        assert min(gaps) >= gap - 1e-3, (kiosk, min(gaps))


def test_the_least_recently_used_kiosk_takes_the_next_citizen():
    # Least recently used means a light day visits kiosks in turn: no kiosk serves two
    # citizens more than another (taking the first free kiosk would put them all on kiosk 0).
    day = day_schedule(kiosks=10, qr_kiosks=set(), cell_kiosks=set(), tickets=95, seed=2,
                       min_gap_s=30)
    uses = Counter(a.kiosk for a in day)
    assert set(uses) == set(range(10))
    assert max(uses.values()) - min(uses.values()) <= 1


def test_the_mix_and_the_flags_follow_the_arguments():
    day = _busiest()
    kinds = Counter(a.kind for a in day)
    for kind, share in zip(KINDS, (0.6, 0.25, 0.15)):
        assert abs(kinds[kind] / len(day) - share) < 0.02, (kind, kinds)
    staff = sum(a.staff_call for a in day) / len(day)
    assert 0.01 < staff < 0.03
    assert all(a.cell == (a.kiosk in HALL["cell_kiosks"]) for a in day)
    assert {a.service_index for a in day} == {0, 1, 2}
    assert {a.service_index for a in _busiest(tickets=500, services=5)} == set(range(5))
    all_cards = Counter(a.kind for a in _busiest(tickets=500, mix=(1.0, 0.0, 0.0)))
    assert set(all_cards) == {"idcard"}


def test_a_day_that_cannot_fit_is_refused():
    # 5,708 citizens of 300 day seconds each on 50 kiosks: 34,248 s a kiosk, longer than the day.
    assert 5708 * 300 / 50 > DAY_S
    with pytest.raises(ValueError, match="do not fit"):
        _busiest(min_gap_s=300)
    # Five QR kiosks cannot take 40 % of the day's citizens at 90 s each.
    with pytest.raises(ValueError, match="past closing"):
        day_schedule(kiosks=50, qr_kiosks={1, 2, 3, 4, 5}, cell_kiosks=set(), tickets=5708,
                     seed=1, min_gap_s=90)


@pytest.mark.parametrize("bad, match", [
    (dict(tickets=-1), "tickets"),
    (dict(kiosks=0), "kiosks"),
    (dict(services=0), "services"),
    (dict(min_gap_s=-1), "min_gap_s"),
    (dict(mix=(0.6, 0.3, 0.3)), "mix"),
    (dict(mix=(0.5, 0.5)), "mix"),
    (dict(mix=(1.2, -0.1, -0.1)), "mix"),
    (dict(leave_rate=1.0), "leave_rate"),
    (dict(staff_call_rate=-0.1), "staff_call_rate"),
    (dict(qr_kiosks={0, 50}), r"qr_kiosks \[50\]"),
    (dict(cell_kiosks={-1}), r"cell_kiosks \[-1\]"),
])
def test_bad_arguments_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        _busiest(**bad)
