"""`make demo`: one emulated kiosk, a real local broker, the hall's ticket consumer, and a
scripted stream of citizens, shown live in the terminal. Rendered tickets (text and PNG) are
left in the output directory.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from rich.console import Console

from edge.mqtt import LinkMessage, MqttLink
from emulator.idcard import Card
from emulator.kiosk import EmulatedHall
from hallkiosk.errors import ContractError
from mqtt_topics.envelope import verify

STYLE = {"ticket": "bold green", "ticket_ack": "green", "event": "yellow", "state": "cyan",
         "telemetry": "dim", "cmd": "magenta", "cmd_result": "magenta"}


class Watcher:
    """Subscribes to the whole hall and prints every message, verified, as it arrives."""

    def __init__(self, hall: EmulatedHall, console: Console) -> None:
        self.hall = hall
        self.console = console
        self.t0 = time.monotonic()
        self.link = MqttLink(client_id="demo-watcher", host="127.0.0.1", port=hall.broker.port,
                             sink=self._sink, subscriptions=((f"hall/{hall.hall_id}/#", 1),))
        self.link.start()
        self.link.wait_connected(10)

    def _sink(self, ev) -> None:
        if not isinstance(ev, LinkMessage):
            return
        try:
            v = verify(ev.payload, ev.topic, self.hall.keyring)
            ok, kind, body = "signed ok", v.msg_type, v.body
        except ContractError as exc:
            ok, kind, body = f"REJECTED: {exc}", "?", {}
        self.console.print(f"[dim]{time.monotonic() - self.t0:7.2f}s[/] "
                           f"[{STYLE.get(kind, 'white')}]{kind:10}[/] {ev.topic}  "
                           f"{_summary(kind, body)}  [dim]({ok})[/]", highlight=False)

    def close(self) -> None:
        self.link.stop()


def _summary(kind: str, body: dict) -> str:
    if kind == "ticket":
        return (f"{body['ticket_id']} service={body['service']} printed={body['printed']} "
                f"citizen={str(body['citizen'])[:12]}...")
    if kind == "ticket_ack":
        return f"{body['ticket_id']} {body['status']} ledger#{body['ledger_id']}"
    if kind == "event":
        return f"{body['name']} {json.dumps(body['detail'])}"
    if kind == "state":
        return f"{body['status']} session={body['session']}"
    return ""


def run_demo(out: Path, citizens: int = 8) -> int:
    console = Console()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    console.rule("hallkiosk demo: one emulated kiosk, a real Mosquitto, the hall ledger")
    with EmulatedHall(out / "hall") as hall:
        console.print(f"broker: mosquitto on 127.0.0.1:{hall.broker.port} (config {hall.broker.conf_path})")
        watcher = Watcher(hall, console)
        hall.start_consumer()
        kiosk = hall.add_kiosk("k07", prefix="07", poll_interval_s=0.3)
        console.print(f"kiosk k07: reader on {kiosk.reader.path}, printer on {kiosk.printer.path}, "
                      f"buttons on MockFactory")
        agent = kiosk.start_agent()
        agent.link.wait_connected(10)
        time.sleep(0.5)
        script = _script(citizens)
        for i, (label, card, button, note) in enumerate(script, 1):
            console.print(f"\n[bold]citizen {i}[/]: {label}")
            before = len(kiosk.printer.tickets)
            if note == "paper_near_end":
                kiosk.printer.set_paper("near_end")
            kiosk.reader.present(card)
            if button:
                _wait(lambda: agent.machine.session is not None, 3)
                kiosk.buttons.press(button)
                kiosk.printer.wait_for_tickets(before + 1, 5)
            time.sleep(1.2)
        _wait(lambda: agent.store.depth() == 0, 10)
        console.rule("result")
        for t in kiosk.printer.tickets:
            console.print(f"printed {t.qr_codes[0] if t.qr_codes else '?':10} -> {t.png_path}")
        console.print(f"ledger: {hall.consumer.ledger.count()} tickets acknowledged; "
                      f"kiosk outbox depth {agent.store.depth()}")
        console.print(f"\nRendered tickets (text and PNG): {kiosk.printer.out_dir}")
        watcher.close()
    return 0


def _script(n: int):
    services = ["A", "B", "C"]
    base = [
        ("taps a valid ID card, chooses Citizen card", Card.valid(), "A", None),
        ("taps a valid ID card, chooses Social insurance", Card.valid(), "B", None),
        ("taps a card with a bad check digit", Card.bad_check_digit(), None, None),
        ("taps an expired card", Card.expired(), None, None),
        ("taps a card the reader cannot read", Card.unreadable(), None, None),
        ("taps a valid card; the printer reports paper near end", Card.valid(), "C", "paper_near_end"),
    ]
    script = list(base)
    i = 0
    while len(script) < n:
        script.append((f"taps a valid ID card, chooses service {services[i % 3]}", Card.valid(), services[i % 3], None))
        i += 1
    return script[:max(n, len(base))]


def _wait(pred, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return False
