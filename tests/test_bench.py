"""The bench's own parsing and printing (the figures themselves come from `make bench`)."""

from __future__ import annotations

import argparse

import pytest

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


def _stage(per_s, per_process, unverified=(0,), rejected=(0,), reasons=None):
    return {"per_s": per_s, "per_process_per_s": per_process, "runs_unverified": list(unverified),
            "runs_rejected": list(rejected), "rejected": reasons or {"signature": 0}}


def test_summary_lines():
    figures = {"idle_memory_kib": {"hallkiosk_agent": {"VmRSS": 30720}, "mqtt_io": None,
                                   "note": "mqtt-io not measured: x"},
               "ops_ingest": {"cpus": 2, "repeats": 3, "city_load_per_s": 2000,
                              "one_process_vs_city_load": 2.5,
                              "one_process_2_workers": _stage(4000, [4000]),
                              "processes": {"1": _stage(5000, [5000]),
                                            "2": _stage(7000, [3600, 3500])},
                              "scaling_vs_one_process": {"2": 1.4}},
               "tap_to_ticket_ms": {"p50": 160.0, "p99": 310.0, "n": 200,
                                    "poll_interval_ms": 300.0}}
    text = summary(figures)
    assert "  1 process: 5,000 (per process 5,000)\n" in text
    assert "  2 processes: 7,000 (per process 3,600, 3,500); scaling 1.4x" in text
    assert "city's load (2,000 msg/s): 2.5x\n" in text and "WARNING" not in text
    assert "p99 310.0 ms" in text and "(mqtt-io not measured: x)" in text


def test_summary_flags_a_stage_that_lost_or_rejected_messages():
    ops = {"cpus": 4, "repeats": 2, "city_load_per_s": 2000, "one_process_vs_city_load": 0.9,
           "one_process_2_workers": _stage(1900, [1900]),
           "processes": {"1": _stage(1800, [1800]),
                         "4": _stage(6000, [1500, 1500, None, 1600], unverified=(0, 12),
                                     rejected=(0, 3), reasons={"signature": 0, "replay": 3})},
           "scaling_vs_one_process": {"4": 3.3}}
    text = summary({"ops_ingest": ops})
    assert "per process 1,500, 1,500, -, 1,600" in text
    assert "2,000 msg/s): 0.9x (does NOT clear it)" in text
    warnings = [line for line in text.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1
    assert warnings[0].startswith("WARNING: 4 processes did not verify every message")
    assert "unverified per run [0, 12], rejected per run [0, 3]" in warnings[0]
    assert "'replay': 3" in warnings[0]


def test_combine_results_counts_what_did_not_verify():
    from emulator.bench_ops import combine_results

    run = combine_results([
        {"received": 600, "verified": 598, "rejected": {"signature": 0, "replay": 2},
         "first": 10.0, "last": 12.0},
        {"received": 390, "verified": 390, "rejected": {"signature": 0, "replay": 0},
         "first": 10.5, "last": 11.5},
        {"received": 0, "verified": 0, "rejected": {}, "first": None, "last": None}], of=1000)
    assert run["processes"] == 3 and run["verified"] == 988 and run["received"] == 990
    assert run["unverified"] == 12 and run["rejected"] == {"signature": 0, "replay": 2}
    assert run["seconds"] == 2.0 and run["per_s"] == 494
    assert run["per_process_verified"] == [598, 390, 0]
    assert run["per_process_per_s"] == [299, 390, None]


def test_process_counts_option():
    from emulator.bench_ops import parse_proc_counts

    assert parse_proc_counts("2,1") == (1, 2)
    assert parse_proc_counts("4") == (1, 4)
    assert parse_proc_counts("1, 2,4,2") == (1, 2, 4)
    for bad in ("", "0,2", "two"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_proc_counts(bad)


def test_bench_command_takes_ops_procs():
    from hallkiosk.cli import build_parser

    args = build_parser(tools=False).parse_args(["bench", "--ops-procs", "1,2,4"])
    assert args.ops_procs == (1, 2, 4)
    assert build_parser(tools=False).parse_args(["bench"]).ops_procs == (1, 2)
