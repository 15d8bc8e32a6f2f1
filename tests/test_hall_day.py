"""The hall day, short (``make hall`` is the full one): real agent processes on one real
Mosquitto (mTLS, generated ACLs) behind a blackhole-able loopback proxy, the ops monitor
with its ledger, citizens on the day's shape, and every fault once: paper out, a reader
unplugged, an agent kill -9, the broker SIGKILLed, a 12 s blackhole, a stuck cell sensor.
Nothing may be lost, duplicated or printed twice, and the monitor must agree with the
ledger."""

from __future__ import annotations

import json

import pytest

from hall.run import HallRunError, HallSpec, run_hall_day


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_a_short_hall_day_loses_nothing(tmp_path):
    spec = HallSpec(kiosks=6, cells=3, tickets=150, speed=250.0, seed=7, keepalive_s=5,
                    blackhole_s=15.0)
    report = run_hall_day(spec, tmp_path / "out")
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    assert on_disk["tickets_issued"] == report["tickets_issued"]
    assert (tmp_path / "out" / "day.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["served"] == 150 and report["not_served"] == 0
    assert report["lost"] == 0
    assert report["duplicated"] == 0
    assert report["printed_twice"] == 0
    assert report["outbox_left"] == 0
    # Every ticket printed is in the ledger, and the ledger holds nothing else.
    assert report["tickets_printed"] >= 150
    assert report["tickets_issued"] == report["tickets_printed"] + report["issued_not_printed"]
    assert report["ledger_says_printed_wrongly"] == 0
    # A ticket nobody served took is one an appointment walk-away left in the tray (the kiosk
    # prints without a button for a code) or one a citizen left behind when moving on.
    assert report["walked_away_leaving_a_ticket"] <= report["walked_away"]
    assert report["tickets_beyond_served"] <= report["moved_to_another_kiosk"]
    assert report["ops"]["agree_with_ledger"], report["ops"]
    faults = {f["name"]: f for f in report["faults"]}
    assert set(faults) == {"paper_out", "reader_unplug", "agent_kill9", "broker_sigkill",
                           "blackhole", "cell_sensor_stuck"}
    assert not any("error" in f["detail"] for f in faults.values()), faults
    bh = report["blackhole"]
    assert bh["connections_dropped"] >= 1 and bh["within_2_keepalives"], bh
    assert report["tap_to_ticket_ms"]["n"] == 150
    assert report["ok"] is True


def test_a_day_that_cannot_show_blackhole_detection_is_refused():
    with pytest.raises(HallRunError, match="2 keepalives"):
        HallSpec(keepalive_s=10, blackhole_s=15).check()
    with pytest.raises(HallRunError, match="cells"):
        HallSpec(kiosks=3, cells=4).check()
