"""Telemetry collectors over files the tests write, the contract body, health events."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.clock import ManualClock
from edge.printer.escpos import PrinterStatus
from edge.telemetry import (
    HealthChanges,
    SystemPaths,
    TelemetryBuilder,
    TelemetryError,
    TelemetrySchedule,
    disk_kib,
    link_health,
    parse_loadavg,
    parse_meminfo,
    parse_throttled,
    parse_uptime_s,
    printer_health,
    read_links,
    read_throttled,
    telemetry_key,
)
from hallkiosk.errors import ContractError
from mqtt_topics.schemas import validate_body

MEMINFO = """MemTotal:        3884096 kB
MemFree:          201000 kB
MemAvailable:    2123456 kB
Buffers:           81234 kB
"""


def fake_system(root: Path, *, temp: str = "51234\n", throttled: str | None = None) -> SystemPaths:
    (root / "thermal").mkdir(parents=True)
    (root / "thermal" / "temp").write_text(temp)
    (root / "loadavg").write_text("0.52 1.07 12.30 2/345 6789\n")
    (root / "meminfo").write_text(MEMINFO)
    (root / "uptime").write_text("86461.93 170000.10\n")
    net = root / "net"
    for name, oper, carrier, physical in (("lo", "unknown", "1", False), ("eth0", "up", "1", True),
                                          ("wlan0", "down", None, True),
                                          ("veth12", "up", "1", False)):
        (net / name).mkdir(parents=True)
        (net / name / "operstate").write_text(oper + "\n")
        if carrier is not None:
            (net / name / "carrier").write_text(carrier + "\n")
        if physical:
            (net / name / "device").mkdir()
    thr = root / "get_throttled"
    if throttled is not None:
        thr.write_text(throttled)
    return SystemPaths(thermal=root / "thermal" / "temp", loadavg=root / "loadavg",
                       meminfo=root / "meminfo", uptime=root / "uptime", net=net,
                       throttled=thr, disk=root)


def statvfs_fake(path: str):
    return SimpleNamespace(f_blocks=1000, f_bavail=250, f_frsize=4096)


# -- parsers ------------------------------------------------------------------------------
def test_parsers_give_exact_integers():
    assert parse_loadavg("0.52 1.07 12.30 2/345 6789") == (52, 107, 1230)
    assert parse_loadavg("garbage") is None
    assert parse_meminfo(MEMINFO) == {"mem_total_kib": 3884096, "mem_avail_kib": 2123456}
    assert parse_uptime_s("86461.93 170000.10") == 86461
    assert parse_uptime_s("") is None
    assert disk_kib(Path("/"), statvfs_fake) == (4000, 1000)


def test_disk_of_a_missing_path_is_none(tmp_path):
    assert disk_kib(tmp_path / "nope") is None
    assert disk_kib(tmp_path) is not None


@pytest.mark.parametrize("text, raw, on", [
    ("throttled=0x0\n", 0, set()),
    ("throttled=0x50005\n", 0x50005, {"under_voltage", "throttled", "under_voltage_occurred",
                                      "throttled_occurred"}),
    ("50000", 0x50000, {"under_voltage_occurred", "throttled_occurred"}),
    ("0xE000A", 0xE000A, {"freq_capped", "soft_temp_limit", "freq_capped_occurred",
                          "throttled_occurred", "soft_temp_limit_occurred"}),
])
def test_parse_throttled_bits(text, raw, on):
    flags = parse_throttled(text)
    assert flags["raw"] == raw
    assert {k for k, v in flags.items() if v is True} == on


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=0xFFFFFFFF))
def test_parse_throttled_round_trips_any_value(raw):
    flags = parse_throttled(f"throttled=0x{raw:x}\n")
    assert flags["raw"] == raw
    assert flags["under_voltage"] is bool(raw & 1)
    assert flags["soft_temp_limit_occurred"] is bool(raw >> 19 & 1)


@pytest.mark.parametrize("text", ["", "throttled=", "throttled=0xZZ", "VCHI init failed"])
def test_parse_throttled_refuses_garbage(text):
    assert parse_throttled(text) is None


def test_read_throttled_prefers_sysfs_then_vcgencmd(tmp_path):
    calls = []

    def run(argv, **kw):
        calls.append((argv, kw))
        return subprocess.CompletedProcess(argv, 0, stdout="throttled=0x4\n", stderr="")

    sysfs = tmp_path / "get_throttled"
    sysfs.write_text("1\n")
    assert read_throttled(sysfs, vcgencmd="/usr/bin/vcgencmd", run=run)["under_voltage"] is True
    assert calls == []
    flags = read_throttled(tmp_path / "missing", vcgencmd="/usr/bin/vcgencmd", run=run)
    assert flags["throttled"] is True and flags["raw"] == 4
    argv, kw = calls[0]
    assert argv == ["/usr/bin/vcgencmd", "get_throttled"] and kw["timeout"] > 0
    assert read_throttled(tmp_path / "missing", vcgencmd=None) is None


def test_read_throttled_survives_a_hanging_or_failing_vcgencmd(tmp_path):
    def hang(argv, **kw):
        raise subprocess.TimeoutExpired(argv, kw["timeout"])

    def fail(argv, **kw):
        return subprocess.CompletedProcess(argv, 255, stdout="", stderr="VCHI initialization failed")

    assert read_throttled(None, vcgencmd="/x/vcgencmd", run=hang) is None
    assert read_throttled(None, vcgencmd="/x/vcgencmd", run=fail) is None


def test_links_report_physical_interfaces_only(tmp_path):
    paths = fake_system(tmp_path)
    assert read_links(paths.net) == {"eth0": "up", "wlan0": "down"}
    (paths.net / "eth0" / "operstate").write_text("down\n")
    (paths.net / "eth0" / "carrier").write_text("0\n")
    assert read_links(paths.net)["eth0"] == "no_carrier"
    assert read_links(tmp_path / "absent") == {}


def test_links_fall_back_to_virtual_interfaces(tmp_path):
    net = tmp_path / "net"
    (net / "veth0").mkdir(parents=True)
    (net / "veth0" / "operstate").write_text("up\n")
    (net / "br-x.1").mkdir()
    (net / "br-x.1" / "operstate").write_text("unknown\n")
    (net / "br-x.1" / "carrier").write_text("1\n")
    assert read_links(net) == {"br_x_1": "up", "veth0": "up"}


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=100))
def test_telemetry_key_is_always_a_valid_key(name):
    key = telemetry_key(name)
    validate_body("telemetry", {"uptime_s": 0, key: 1} if key != "uptime_s" else {"uptime_s": 1})


# -- peripheral health ---------------------------------------------------------------------
def test_printer_health_from_status():
    fine = PrinterStatus(answered=frozenset({1, 2, 3, 4}))
    assert printer_health(fine) == {"ok": True, "online": True, "paper": "ok",
                                     "cover_open": False, "fault": None, "warning": None}
    low = PrinterStatus(paper_near_end=True, answered=frozenset({1, 2, 3, 4}))
    assert printer_health(low)["paper"] == "near_end"
    assert printer_health(low)["warning"] == "paper_near_end"
    out = PrinterStatus(paper_out=True, cover_open=True, answered=frozenset({1, 2, 3, 4}))
    h = printer_health(out)
    assert h["ok"] is False and h["paper"] == "out" and h["fault"] == "cover_open"
    assert printer_health(PrinterStatus(answered=frozenset({1})))["paper"] == "unknown"


def test_a_silent_printer_is_not_healthy():
    h = printer_health(None)
    assert h["ok"] is False and h["fault"] == "no_answer" and h["paper"] == "unknown"
    assert printer_health(None, error="gone")["fault"] == "gone"


def test_health_changes_emit_faults_and_recoveries_once():
    hc = HealthChanges()
    assert hc.update("ticket-printer", {"ok": True, "fault": None, "warning": None}) == []
    ev = hc.update("ticket-printer", {"ok": True, "fault": None, "warning": "paper_near_end"})
    assert [(e.name, e.severity, e.detail) for e in ev] == [
        ("device_warning", "warning", {"warning": "paper_near_end"})]
    assert hc.update("ticket-printer", {"ok": True, "fault": None, "warning": "paper_near_end"}) == []
    ev = hc.update("ticket-printer", {"ok": False, "fault": "paper_out", "warning": None})
    assert [(e.name, e.detail) for e in ev] == [
        ("device_fault", {"fault": "paper_out"}), ("device_warning_cleared",
                                                   {"warning": "paper_near_end"})]
    ev = hc.update("ticket-printer", {"ok": False, "fault": "cover_open"})
    assert [(e.name, e.detail) for e in ev] == [("device_fault", {"fault": "cover_open"})]
    ev = hc.update("ticket-printer", {"ok": True, "fault": None})
    assert [(e.name, e.severity, e.subject, e.detail) for e in ev] == [
        ("device_recovered", "info", "ticket-printer", {"fault": "cover_open"})]
    # A device faulty from its first report is a fault at once.
    assert [e.name for e in hc.update("idcard-reader", link_health(False, "gone"))] == [
        "device_fault"]


def test_health_events_are_valid_event_bodies():
    hc = HealthChanges()
    for e in hc.update("ticket-printer", {"fault": "x" * 300, "warning": "paper_near_end"}):
        validate_body("event", {"name": e.name, "severity": e.severity, "subject": e.subject,
                                "detail": e.detail})


# -- the builder --------------------------------------------------------------------------------
def builder(tmp_path, **kw) -> TelemetryBuilder:
    paths = kw.pop("paths", None) or fake_system(tmp_path, throttled="0x50005\n")
    return TelemetryBuilder(agent_version="0.1.0", config_hash="ab" * 32, paths=paths,
                            clock=kw.pop("clock", ManualClock()), find_vcgencmd=False,
                            statvfs=statvfs_fake, **kw)


def test_builder_assembles_a_valid_body(tmp_path):
    fine = PrinterStatus(paper_near_end=True, answered=frozenset({1, 2, 3, 4}))
    b = builder(tmp_path, outbox=lambda: (3, 42.7),
                peripherals={"ticket-printer": lambda: printer_health(fine),
                             "idcard-reader": lambda: link_health(True)})
    body = b.build()
    assert validate_body("telemetry", body) == body
    assert body["uptime_s"] == 86461 and body["temp_mC"] == 51234
    assert (body["load1_x100"], body["load5_x100"], body["load15_x100"]) == (52, 107, 1230)
    assert body["mem_avail_kib"] == 2123456 and body["disk_avail_kib"] == 1000
    assert body["throttle"]["under_voltage"] is True and body["throttle"]["raw"] == 0x50005
    assert body["net"] == {"eth0": "up", "wlan0": "down"} and body["net_up"] is True
    assert body["agent_version"] == "0.1.0" and body["config_hash"] == "ab" * 32
    assert body["outbox_depth"] == 3 and body["outbox_oldest_s"] == 42
    assert body["ticket_printer"]["paper"] == "near_end"
    assert body["idcard_reader"] == {"ok": True, "fault": None, "warning": None}
    assert b.last_health["ticket-printer"]["warning"] == "paper_near_end"
    assert not any(type(v) is float for v in body.values())


def test_builder_on_a_machine_without_sources(tmp_path):
    clock = ManualClock()
    empty = SystemPaths(thermal=tmp_path / "t", loadavg=tmp_path / "l", meminfo=tmp_path / "m",
                        uptime=tmp_path / "u", net=tmp_path / "n", throttled=tmp_path / "g",
                        disk=tmp_path / "missing")
    b = TelemetryBuilder(agent_version="0.1.0", config_hash="0" * 64, paths=empty, clock=clock,
                         find_vcgencmd=False)
    clock.advance(12)
    body = b.build()
    # uptime_s is required: the agent's own uptime stands in for the system's.
    assert body["uptime_s"] == 12 and body["agent_uptime_s"] == 12
    for key in ("temp_mC", "load1_x100", "mem_total_kib", "disk_total_kib", "throttle"):
        assert key not in body
    assert body["net"] == {} and body["net_up"] is False


def test_a_failing_or_bad_probe_never_stops_telemetry(tmp_path):
    def boom():
        raise OSError("port vanished")

    b = builder(tmp_path, outbox=lambda: 1 / 0, peripherals={
        "ticket-printer": boom,
        "camera": lambda: {"fps": 29.97},                 # a float: refused by the contract
        "scanner": lambda: {"bad key!": 1},
    })
    body = b.build()
    assert body["ticket_printer"] == {"ok": False, "fault": "health_check_failed", "warning": None}
    assert body["camera"]["fault"] == "bad_health_report"
    assert body["scanner"]["fault"] == "bad_health_report"
    assert "outbox_depth" not in body


def test_builder_refuses_bad_wiring(tmp_path):
    with pytest.raises(TelemetryError, match="collides"):
        builder(tmp_path / "a", peripherals={"net": lambda: {}})
    b = builder(tmp_path / "b", peripherals={"cell-1": lambda: {}})
    with pytest.raises(TelemetryError, match="already used"):
        b.add_peripheral("cell.1", lambda: {})
    with pytest.raises(TelemetryError):
        b.add_peripheral("bad subject", lambda: {})
    with pytest.raises(TelemetryError, match="at most"):
        builder(tmp_path / "x", peripherals={f"cell-{i}": dict for i in range(40)})


def test_vcgencmd_runs_at_most_every_throttle_interval(tmp_path):
    runs = []

    def run(argv, **kw):
        runs.append(argv)
        return subprocess.CompletedProcess(argv, 0, stdout="throttled=0x0\n", stderr="")

    clock = ManualClock()
    paths = fake_system(tmp_path)            # no sysfs file: vcgencmd is used
    b = TelemetryBuilder(agent_version="0.1.0", config_hash="0" * 64, paths=paths, clock=clock,
                         vcgencmd="/opt/vc/bin/vcgencmd", run=run, throttle_every_s=60,
                         statvfs=statvfs_fake)
    for _ in range(3):
        assert b.build()["throttle"]["raw"] == 0
        clock.advance(20)
    assert len(runs) == 1
    clock.advance(1)
    b.build()
    assert len(runs) == 2


def test_body_too_big_for_the_contract_is_refused(tmp_path):
    b = builder(tmp_path, peripherals={"p": lambda: {f"k{i}": i for i in range(40)}})
    # 40 members in one nested object: the probe is refused, the body still valid.
    assert b.build()["p"]["fault"] == "bad_health_report"


def test_real_proc_files_parse_on_this_machine():
    b = TelemetryBuilder(agent_version="0.1.0", config_hash="0" * 64, find_vcgencmd=False)
    body = b.build()
    assert body["uptime_s"] > 0
    if os.path.exists("/proc/loadavg"):
        assert body["load1_x100"] >= 0
    with pytest.raises(ContractError):
        validate_body("telemetry", {**body, "temp": 1.5})


# -- the schedule ---------------------------------------------------------------------------------
def test_schedule_is_drift_free_and_does_not_burst():
    clock = ManualClock()
    s = TelemetrySchedule(30, clock=clock, first_after_s=5)
    assert not s.due()
    clock.advance(5)
    assert s.due() and not s.due()
    assert s.next_deadline() == clock.monotonic() + 30
    clock.advance(31)                      # a little late: the next one keeps the grid
    assert s.due()
    assert s.next_deadline() == 1000 + 5 + 60
    clock.advance(500)                     # a long stall: one message, not sixteen
    assert s.due() and not s.due()
    assert s.next_deadline() == clock.monotonic() + 30
    with pytest.raises(TelemetryError):
        TelemetrySchedule(0, clock=clock)
