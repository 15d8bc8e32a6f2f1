"""The city tier end to end (short version of `make city`): a real 3-node NATS cluster
(JetStream + MQTT gateway) on loopback, real hall Mosquittos bridged to it over mTLS,
kiosks signing real envelopes, the hall ledgers and the city ledger; a node killed, the
city cut off from every hall, a hall broker restarted; and one hall's bridge cut while the
others run on. Acknowledged tickets lost must be 0 in both tiers,
and every re-sent ticket must be a duplicate the ledgers removed."""

from __future__ import annotations

import pytest

from city.bridge import render_bridge_conf
from city.cluster import find_nats_server
from city.faults import run_bridge_cut, run_faults
from city.harness import CityRun
from edge.mqtt import TlsSettings


def test_bridge_conf_lists_every_node_and_directions():
    conf = render_bridge_conf("hall1", [("127.0.0.1", 1), ("127.0.0.1", 2)],
                              TlsSettings("/c/ca.pem", "/c/b.crt", "/c/b.key"))
    assert "address 127.0.0.1:1 127.0.0.1:2" in conf.splitlines()
    assert "round_robin false" in conf.splitlines()
    assert "topic hall/hall1/kiosk/+/ticket out 1" in conf.splitlines()
    assert "topic hall/hall1/kiosk/+/ticket/ack in 1" in conf.splitlines()
    assert "topic hall/hall1/kiosk/+/cmd in 1" in conf.splitlines()
    assert "topic hall/hall1/kiosk/+/telemetry out 0" in conf.splitlines()
    # Nothing the hall's ledger publishes goes out: no ack loops between the tiers.
    assert not any(line.endswith(("ticket/ack out 1", "ticket/ack both 1")) for line in conf.splitlines())


@pytest.mark.e2e
@pytest.mark.timeout(400)
def test_city_faults_lose_no_acknowledged_ticket(tmp_path):
    find_nats_server()
    # The city is cut off at every hall's uplink while the cluster runs; `make city` stops the
    # whole cluster instead (docs/city.md says why the short test does not).
    with CityRun(tmp_path / "city", halls=3, kiosks_per_hall=2, central_ops=2,
                 uplink_relays=True) as run:
        fig = run_faults(run, per_kiosk=2, cut_s=3.0, city_down="cut")
    assert fig["acked"] == fig["tickets_issued"]
    # Central ops (two `hallkiosk ops run` processes on the cluster, the halls split between
    # them) saw every hall once, every kiosk online, and counted what the city ledger holds.
    assert fig["central_instances"] == 2
    assert fig["central_halls_watched_once"], fig
    assert fig["central_kiosks_online"] == 6
    # Never more than the city ledger (re-sends counted once, however late), and nothing
    # missing but tickets of the window when the whole city tier restarted: NATS then may
    # not reload a monitor's MQTT session ("loading session record ... timeout" in its log)
    # and what was queued for it is gone (docs/city.md, "Not done yet").
    for hall, (seen, rows) in fig["central_disagree"].items():
        assert seen < rows, (hall, seen, rows)
    missing = sum(rows - seen for seen, rows in fig["central_disagree"].values())
    assert missing <= fig["tickets_during_cut"], fig["central_disagree"]
    assert fig["lost_hall"] == 0
    assert fig["lost_city"] == 0
    assert fig["tickets_in_city_ledger"] == fig["tickets_issued"]
    assert fig["rows_hall"] == fig["rows_city"] == fig["tickets_issued"]
    assert fig["duplicates_removed_city"] >= 6 and fig["duplicates_removed_hall"] >= 6


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_one_halls_bridge_cut_loses_nothing_and_spares_the_others(tmp_path):
    find_nats_server()
    with CityRun(tmp_path / "city", halls=2, kiosks_per_hall=2, uplink_relays=True) as run:
        fig = run_bridge_cut(run, cut_s=4.0)
    # The cut hall's broker kept serving its kiosks (its ledger acked every ticket), the
    # city acked none of them until the cut ended and then all, and the other hall's
    # tickets crossed to the city throughout.
    assert fig["bridge_cut_tickets_held"] >= 2
    assert fig["bridge_cut_city_acked_during_cut"] == 0
    assert fig["bridge_cut_other_halls_city_acked"] >= 2
    assert fig["bridge_cut_relay_resets"] >= 1
    assert fig["acked"] == fig["tickets_issued"] == fig["tickets_in_city_ledger"]
    assert fig["lost_hall"] == 0 and fig["lost_city"] == 0


def test_central_ops_config_splits_halls_and_speaks_311(tmp_path):
    from city.central import render_central_ops_toml, split_halls
    from ops.config import parse_ops_config
    import tomllib

    assert split_halls(["h1", "h2", "h3", "h4", "h5"], 2) == [["h1", "h3", "h5"], ["h2", "h4"]]
    with pytest.raises(ValueError):
        split_halls(["h1"], 2)
    for name in ("chain.pem", "k.pem", "c.crt", "c.key"):
        (tmp_path / name).write_text("x")
    text = render_central_ops_toml(
        instance="central-1", halls=["h1", "h3"], addresses=[("127.0.0.1", 1), ("127.0.0.1", 2)],
        tls=TlsSettings(str(tmp_path / "chain.pem"), str(tmp_path / "c.crt"),
                        str(tmp_path / "c.key")),
        hall_trust={h: (tmp_path / "chain.pem", tmp_path / "k.pem") for h in ("h1", "h3")},
        state_dir=tmp_path / "st", metrics_port=0)
    cfg = parse_ops_config(tomllib.loads(text), source="central.toml", base_dir=tmp_path)
    assert cfg.broker.protocol == "3.1.1"
    assert cfg.broker.nodes == (("127.0.0.1", 2),)
    assert [h.hall for h in cfg.trust.halls] == ["h1", "h3"]
    assert not cfg.ledger.enabled


@pytest.mark.e2e
def test_city_ledger_moves_on_from_a_node_that_refuses_connections(tmp_path):
    """A dead node refuses TCP: paho reports that to on_connect_fail (not on_disconnect),
    and the ledger must go on to the next node rather than retry the dead one forever
    (the cause of a CI failure of the fault test)."""
    from city.ledger import CityLedger, HallTrust
    from emulator.broker import MosquittoBroker, free_port
    from provisioning.emulated import provision_emulated_hall
    from tests.conftest import wait_for

    mats = provision_emulated_hall(tmp_path / "hall", [], hall="hall1")
    broker = MosquittoBroker(tmp_path / "broker", conf_text=mats.broker_conf_text).start()
    try:
        dead = free_port()
        led = CityLedger(client_id="ledger", halls=[HallTrust("hall1", mats.keyring(), "ledger",
                                                              mats["ledger"].key)],
                         state_dir=tmp_path / "led", addresses=[("127.0.0.1", dead),
                                                                (broker.host, broker.port)],
                         tls=mats.tls_for("ledger")).start()
        try:
            wait_for(led._client.is_connected, 20, "the ledger connected to the live node")
        finally:
            led.stop()
    finally:
        broker.stop()


def test_provision_bridge_conf_command(tmp_path, capsys):
    from hallkiosk.cli import main

    for name in ("ca.pem", "b.crt", "b.key"):
        (tmp_path / name).write_text("x")
    out = tmp_path / "bridge.conf"
    rc = main(["provision", "bridge-conf", "--hall", "hall7", "--city-node", "127.0.0.1:1884",
               "--city-node", "127.0.0.1:1885", "--cafile", str(tmp_path / "ca.pem"),
               "--certfile", str(tmp_path / "b.crt"), "--keyfile", str(tmp_path / "b.key"),
               "--out", str(out)])
    assert rc == 0
    lines = out.read_text().splitlines()
    assert "connection city-hall7" in lines
    assert "address 127.0.0.1:1884 127.0.0.1:1885" in lines
    assert f"bridge_certfile {tmp_path / 'b.crt'}" in lines
