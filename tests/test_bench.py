"""The bench's own parsing and printing (the figures themselves come from `make bench`)."""

from __future__ import annotations

from emulator.bench import summary
from emulator.bench_mqttio import MQTTIO_VERSION, mqttio_config, parse_kib_fields, side_by_side

STATUS = """Name:\tpython
VmPeak:\t  120000 kB
VmRSS:\t   31744 kB
RssAnon:\t   20480 kB
RssFile:\t   11264 kB
RssShmem:\t       0 kB
"""


def test_kib_fields_from_proc_status():
    assert parse_kib_fields(STATUS, ("VmRSS", "RssAnon", "RssFile")) == {
        "VmRSS": 31744, "RssAnon": 20480, "RssFile": 11264}
    assert parse_kib_fields(STATUS, ("Pss",)) == {}
    assert parse_kib_fields("VmRSS:\t  x kB\nVmRSS:\t 5 kB\n", ("VmRSS",)) == {"VmRSS": 5}


def test_side_by_side_table():
    text = side_by_side({"VmRSS": 31744, "Pss": 25600, "RssAnon": 20480, "RssFile": 11264},
                        {"VmRSS": 38912, "Pss": None, "RssAnon": 26624, "RssFile": 12288})
    rows = [line.split() for line in text.splitlines()]
    assert rows[0][-1] == MQTTIO_VERSION
    assert rows[1] == ["RSS", "31.0", "38.0"]
    assert rows[2] == ["PSS", "25.0", "-"]
    missing = side_by_side({"VmRSS": 1024}, None, "mqtt-io not measured: no network")
    assert missing.splitlines()[1].split() == ["RSS", "1.0", "-"]
    assert missing.endswith("(mqtt-io not measured: no network)")


def test_mqttio_config_names_every_pin_and_port():
    cfg = mqttio_config(host="127.0.0.1", port=18883, client_id="mqttio1",
                        topic_prefix="hall/h/kiosk/mqttio1/io", ca="/c/ca.pem", cert="/c/a.crt",
                        key="/c/a.key", inputs={"button_a": 5, "staff_call": 26},
                        outputs={"led_a": 6}, streams={"reader": "/d/reader"})
    assert "  port: 18883\n" in cfg and '    keyfile: "/c/a.key"\n' in cfg
    assert cfg.count("    module: pins\n") == 3 and cfg.count("    module: serial\n") == 1
    assert "    pin: 26\n" in cfg and '    device: "/d/reader"\n' in cfg


def test_summary_lines():
    figures = {"idle_memory_kib": {"hallkiosk_agent": {"VmRSS": 30720}, "mqtt_io": None,
                                   "note": "mqtt-io not measured: x"},
               "ops_ingest": {"cpus": 2, "one_process": {"per_s": 5000},
                              "two_processes": {"per_s": 7000, "seconds": 2.0,
                                                "per_process": [7000, 7000]},
                              "two_vs_one_process": 1.4},
               "tap_to_ticket_ms": {"p50": 160.0, "p99": 310.0, "n": 200,
                                    "poll_interval_ms": 300.0}}
    text = summary(figures)
    assert "1 process 5,000" in text and "per process [3500, 3500]" in text
    assert "2.5x" in text and "p99 310.0 ms" in text
    assert "(mqtt-io not measured: x)" in text
