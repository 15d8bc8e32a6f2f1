"""The hall day's parts on their own: the day's schedule, the report and its PNG, and the
blackhole relay (against a real Mosquitto, with paho's own keepalive)."""

from __future__ import annotations

import threading
from collections import Counter

import paho.mqtt.client as paho
import pytest

from hall.arrivals import DAY_S, day_schedule, density, per_minute
from hall.blackhole import BlackholeProxy
from hall.report import render_terminal, write_report
from tests.conftest import wait_for

QR = set(range(0, 50, 2))
CELLS = set(range(13))


def _day(seed=1, tickets=5708, **kw):
    return day_schedule(kiosks=50, qr_kiosks=QR, cell_kiosks=CELLS, tickets=tickets, seed=seed,
                        min_gap_s=90, **kw)


def test_the_day_has_its_tickets_peaks_and_mix():
    day = _day()
    assert sum(1 for a in day if not a.leaves) == 5708
    walkaways = [a for a in day if a.leaves]
    assert 100 < len(walkaways) < 300
    pm = per_minute(day)
    assert sum(pm) == 5708 and len(pm) == 510
    rate = lambda a, b: sum(pm[a:b]) / (b - a)
    morning, afternoon = rate(60, 120), rate(300, 360)       # 09:30-10:30, 13:30-14:30
    for quiet in (rate(0, 30), rate(480, 510)):              # 08:30-09:00, 16:30-17:00
        assert morning > 2 * quiet and afternoon > 1.5 * quiet
    assert morning > afternoon
    kinds = Counter(a.kind for a in day)
    assert abs(kinds["idcard"] / len(day) - 0.6) < 0.03
    assert abs(kinds["appointment"] / len(day) - 0.25) < 0.03
    assert all(a.kiosk in QR for a in day if a.kind != "idcard")
    assert all(a.cell == (a.kiosk in CELLS) for a in day)
    assert any(a.staff_call for a in day)
    assert [a.t_day_s for a in day] == sorted(a.t_day_s for a in day)


def test_days_that_cannot_be_are_refused():
    with pytest.raises(ValueError, match="do not fit"):
        day_schedule(kiosks=2, qr_kiosks=set(), cell_kiosks=set(), tickets=1000, seed=1, min_gap_s=60)
    with pytest.raises(ValueError, match="mix"):
        _day(tickets=10, mix=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError):
        day_schedule(kiosks=0, qr_kiosks=set(), cell_kiosks=set(), tickets=1, seed=1, min_gap_s=1)
    with pytest.raises(ValueError, match="indexes"):
        day_schedule(kiosks=2, qr_kiosks={5}, cell_kiosks=set(), tickets=1, seed=1, min_gap_s=1)
    assert density(0) == 0 and density(DAY_S) == 0 and density(5400) > density(900)


def test_report_files_and_terminal_summary(tmp_path):
    import json

    rep = {"tickets_issued": 12, "lost": 1, "ok": False, "tap_to_ticket_ms": {"p50": 150.0}}
    paths = write_report(tmp_path, rep, [1] * 510, [(60.0, 100.0)])
    assert json.loads(paths["json"].read_text()) == rep
    text = render_terminal(rep)
    assert "tickets issued 12" in text and "lost 1" in text and "p50 150.0 ms" in text
    assert text.splitlines()[-1].startswith("FAIL")
    assert render_terminal({**rep, "lost": 0, "ok": True}).splitlines()[-1].startswith("PASS")


# -- the blackhole relay ----------------------------------------------------------------------
def _client(port: int, name: str, keepalive: int = 60):
    events = {"connected": threading.Event(), "disconnected": threading.Event(),
              "subscribed": threading.Event(), "msgs": []}
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=name)
    c.on_connect = lambda *a: events["connected"].set()
    c.on_disconnect = lambda *a: events["disconnected"].set()
    c.on_subscribe = lambda *a: events["subscribed"].set()
    c.on_message = lambda _c, _u, m: events["msgs"].append(m.payload)
    c.reconnect_delay_set(0.2, 1)
    c.connect("127.0.0.1", port, keepalive=keepalive)
    c.loop_start()
    assert events["connected"].wait(10)
    return c, events


def test_the_relay_carries_messages(broker):
    with BlackholeProxy(broker.host, broker.port) as proxy:
        sub, sev = _client(broker.port, "sub")
        sub.subscribe("t/#", 1)
        assert sev["subscribed"].wait(5)
        pub, _ = _client(proxy.port, "pub")
        pub.publish("t/1", b"through the relay", qos=1).wait_for_publish(5)
        wait_for(lambda: sev["msgs"], 10, "the message through the relay")
        assert sev["msgs"] == [b"through the relay"]
        assert proxy.connections == 1 and proxy.bytes_up > 0
        for c in (sub, pub):
            c.disconnect()
            c.loop_stop()


@pytest.mark.e2e
def test_a_blackhole_is_detected_by_keepalive_and_then_heals(broker):
    with BlackholeProxy(broker.host, broker.port) as proxy:
        c, ev = _client(proxy.port, "k1", keepalive=2)
        proxy.blackhole(True)
        # No FIN or RST: for one keepalive the client notices nothing.
        assert not ev["disconnected"].wait(1.5)
        assert ev["disconnected"].wait(10), "keepalive never noticed the blackhole"
        wait_for(proxy.closed_by_client_during_blackhole, 5, "the client's close recorded")
        (detected,) = proxy.closed_by_client_during_blackhole()
        assert 1.5 <= detected <= 2 * 2 + 1
        assert proxy.open_at_blackhole == 1
        ev["connected"].clear()
        proxy.blackhole(False)
        assert ev["connected"].wait(10), "no reconnection through the healed relay"
        sub, sev = _client(broker.port, "sub")
        sub.subscribe("t/#", 1)
        assert sev["subscribed"].wait(5)
        c.publish("t/2", b"after", qos=1).wait_for_publish(5)
        wait_for(lambda: sev["msgs"], 10, "a message after the blackhole")
        for x in (c, sub):
            x.disconnect()
            x.loop_stop()


def test_the_relay_is_loopback_only():
    with pytest.raises(ValueError, match="loopback"):
        BlackholeProxy("192.0.2.1", 1883)
    with pytest.raises(ValueError, match="loopback"):
        BlackholeProxy("127.0.0.1", 1883, listen_host="0.0.0.0")
