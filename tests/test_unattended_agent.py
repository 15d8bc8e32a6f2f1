"""The agent as systemd runs it: a real process, sd_notify over a real datagram socket,
SIGTERM and SIGHUP, degraded modes and recovery, against the emulator and a real broker."""

from __future__ import annotations

import json
import signal
import socket

import pytest

from emulator.idcard import Card
from tests.conftest import wait_for
from tests.test_e2e_ticket import Recorder, _event_names, _last_state

pytestmark = pytest.mark.e2e


class NotifySocket:
    def __init__(self, path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages: list[str] = []

    def collect(self) -> list[str]:
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except (socket.timeout, BlockingIOError):
                return self.messages

    def seen(self, field: str) -> bool:
        return any(field in m.split("\n") for m in self.collect())

    def close(self) -> None:
        self.sock.close()


def test_ready_watchdog_and_clean_stop(hall, tmp_path):
    rec = Recorder(hall, f"hall/{hall.hall_id}/#")
    hall.start_consumer()
    kiosk = hall.add_kiosk("u1", services=(("A", "Citizen card", "A"),))
    ns = NotifySocket(tmp_path / "notify")
    proc = kiosk.spawn_agent(env={"NOTIFY_SOCKET": ns.path, "WATCHDOG_USEC": "1000000"})
    wait_for(lambda: ns.seen("READY=1"), what="READY=1")
    wait_for(lambda: sum("WATCHDOG=1" in m for m in ns.collect()) >= 3, timeout_s=15,
             what="watchdog pings every WATCHDOG_USEC/2")
    assert any(m.startswith("STATUS=") or "\nSTATUS=" in m for m in ns.messages)
    wait_for(lambda: _last_state(rec)["status"] == "online", what="birth")

    kiosk.reader.present(Card.valid())
    assert kiosk.printer.wait_for_tickets(1, 10)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0
    assert ns.seen("STOPPING=1")
    wait_for(lambda: _last_state(rec)["status"] == "offline", what="offline state")
    assert _last_state(rec)["reason"] == "agent stopped"
    ns.close()
    rec.close()


def test_sighup_refuses_a_bad_config_and_applies_a_good_one(hall):
    rec = Recorder(hall, f"hall/{hall.hall_id}/#")
    hall.start_consumer()
    kiosk = hall.add_kiosk("u2", services=(("A", "Citizen card", "A"),))
    proc = kiosk.spawn_agent()
    wait_for(lambda: _last_state(rec)["status"] == "online", what="online")
    good = kiosk.config_path.read_text()

    kiosk.config_path.write_text(good.replace("choose_timeout_s", "chose_timeout_s"))
    proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "config_reload_refused" in _event_names(rec), what="refusal event")
    body = [json.loads(m.payload)["body"] for m in rec.of_kind("/event")
            if json.loads(m.payload)["body"]["name"] == "config_reload_refused"][0]
    assert "did you mean 'choose_timeout_s'" in body["detail"]["first"]
    kiosk.reader.present(Card.valid())                  # still serving on the old config
    assert kiosk.printer.wait_for_tickets(1, 10)

    kiosk.config_path.write_text(good.replace('name = "Citizen card"', 'name = "Citizen card desk"'))
    proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "config_reloaded" in _event_names(rec), what="reload accepted")
    wait_for(lambda: kiosk.reader.commands and True, what="reader polled again")
    kiosk.reader.present(Card.valid())
    assert kiosk.printer.wait_for_tickets(2, 15)
    assert "Citizen card desk" in kiosk.printer.tickets[1].text
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0
    rec.close()


def test_reader_unplugged_takes_the_kiosk_out_of_service_and_back(hall):
    rec = Recorder(hall, f"hall/{hall.hall_id}/#")
    kiosk = hall.add_kiosk("u3", services=(("A", "Citizen card", "A"),))
    agent = kiosk.start_agent()
    wait_for(lambda: _last_state(rec)["status"] == "online", what="online")
    kiosk.reader.unplug()
    wait_for(lambda: "device_fault" in _event_names(rec), what="fault event")
    # No camera or scanner on this kiosk: without the reader nobody can be identified.
    wait_for(lambda: _last_state(rec)["status"] == "out_of_service", what="out of service")
    kiosk.reader.replug()
    wait_for(lambda: "device_recovered" in _event_names(rec), timeout_s=5, what="recovery event")
    wait_for(lambda: _last_state(rec)["status"] == "online", what="back online")
    kiosk.reader.present(Card.valid())
    assert kiosk.printer.wait_for_tickets(1, 10)
    assert agent.store.depth() in (0, 1)
    rec.close()
