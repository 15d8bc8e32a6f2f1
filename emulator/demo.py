"""`make demo`: one emulated kiosk in a privacy cell, a real local Mosquitto with the hall's
generated mTLS config, the hall's ticket ledger, and a scripted stream of citizens (ID cards,
appointment and e-ID QR codes, a forged code, the cell's door and PIR, a staff call), shown
live in the terminal. Rendered tickets (text and PNG) are left in the output directory.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from rich.console import Console

from emulator.booking import forge
from emulator.idcard import Card
from emulator.kiosk import EmulatedHall
from hallkiosk.errors import ContractError
from mqtt_topics.envelope import verify

STYLE = {"ticket": "bold green", "ticket_ack": "green", "event": "yellow", "state": "cyan",
         "telemetry": "dim", "cmd": "magenta", "cmd_result": "magenta"}


class Watcher:
    """Prints every message the hall's auditor sees on hall/#, verified, as it arrives."""

    def __init__(self, hall: EmulatedHall, console: Console) -> None:
        self.hall = hall
        self.console = console
        self.t0 = time.monotonic()
        hall.auditor.listeners.append(self._show)

    def _show(self, ev) -> None:
        try:
            v = verify(ev.payload, ev.topic, self.hall.keyring)
            ok, kind, body = "signed ok", v.msg_type, v.body
        except ContractError as exc:
            ok, kind, body = f"REJECTED: {exc}", "?", {}
        topic = ev.topic.split("/kiosk/", 1)[-1]
        self.console.print(f"[dim]{time.monotonic() - self.t0:6.2f}s[/] "
                           f"[{STYLE.get(kind, 'white')}]{kind:10}[/] {topic:18} "
                           f"{_summary(kind, body)} [dim]({ok})[/]", highlight=False)


def _summary(kind: str, body: dict) -> str:
    if kind == "ticket":
        return (f"{body['ticket_id']} {body['priority']} via {body['source']} "
                f"printed={body['printed']} citizen={str(body['citizen'])[:10]}..")
    if kind == "ticket_ack":
        return f"{body['ticket_id']} {body['status']} ledger#{body['ledger_id']}"
    if kind == "event":
        return f"{body['name']} {json.dumps(body['detail'])[:90]}"
    if kind == "state":
        cell = {k: v for k, v in (body.get("extra") or {}).items() if k.startswith("cell.")}
        return f"{body['status']} session={body['session']} {json.dumps(cell) if cell else ''}"
    if kind == "cmd_result":
        return f"{body['status']} {body.get('reason') or ''}"
    return ""


def run_demo(out: Path, citizens: int = 8) -> int:
    console = Console()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    console.rule("hallkiosk demo: an emulated kiosk in a privacy cell, a real Mosquitto (mTLS), the hall ledger")
    with EmulatedHall(out / "hall") as hall:
        console.print(f"hall CA and enrolment: {hall.pki.dir}")
        console.print(f"broker: mosquitto on 127.0.0.1:{hall.broker.port}, generated config "
                      f"{hall.broker.conf_path}")
        Watcher(hall, console)
        hall.start_consumer()
        kiosk = hall.add_kiosk("k07", prefix="07", poll_interval_s=0.3, qr=True, cell="cell-07")
        console.print(f"kiosk k07: reader {kiosk.reader.path}, printer {kiosk.printer.path}, "
                      f"QR scanner {kiosk.scanner.path}, camera emulated, cell-07 PIR+door on MockFactory")
        agent = kiosk.start_agent()
        agent.link.wait_connected(10)
        time.sleep(0.5)
        now = int(time.time())

        def step(title: str) -> None:
            console.print(f"\n[bold]{title}[/]")

        step("a citizen enters cell-07")
        kiosk.cell.enter()
        time.sleep(1.5)
        step("taps a valid ID card and chooses Citizen card")
        kiosk.reader.present(Card.valid())
        _wait(lambda: agent.machine.session is not None, 3)
        kiosk.buttons.press("A")
        kiosk.printer.wait_for_tickets(1, 5)
        time.sleep(1.0)
        step("shows an appointment QR code (Social insurance) to the camera")
        kiosk.camera.show(hall.booking.appointment("B", start_s=now + 600))
        kiosk.printer.wait_for_tickets(2, 5)
        kiosk.camera.hide()
        time.sleep(1.0)
        step("someone scans a forged appointment code")
        kiosk.scanner.scan(forge(hall.booking.appointment("C", start_s=now + 600)))
        time.sleep(1.0)
        step("taps a card with a bad check digit, then an expired one")
        kiosk.reader.present(Card.bad_check_digit())
        time.sleep(1.0)
        kiosk.reader.present(Card.expired())
        time.sleep(1.0)
        step("presses the staff-call button (three times)")
        for _ in range(3):
            kiosk.staff_button.press("staff")
        time.sleep(1.0)
        step("scans an e-ID code from a phone; the printer reports paper near end")
        kiosk.printer.set_paper("near_end")
        card = Card.valid()
        kiosk.scanner.scan(hall.eid.code(card.id_number, now_s=now))
        _wait(lambda: agent.machine.session is not None, 3)
        kiosk.buttons.press("C")
        kiosk.printer.wait_for_tickets(3, 5)
        time.sleep(1.0)
        step("taps a card, then leaves the cell without choosing: the session is wiped")
        kiosk.reader.present(Card.valid())
        _wait(lambda: agent.machine.session is not None, 3)
        kiosk.cell.leave()
        _wait(lambda: agent.machine.session is None, 20)
        time.sleep(1.0)
        extra = max(0, citizens - 8)
        for i in range(extra):
            step(f"citizen {9 + i} taps a valid card")
            kiosk.reader.present(Card.valid())
            _wait(lambda: agent.machine.session is not None, 3)
            kiosk.buttons.press("ABC"[i % 3])
            time.sleep(1.2)
        _wait(lambda: agent.store.depth() == 0, 10)
        console.rule("result")
        for t in kiosk.printer.tickets:
            console.print(f"printed {t.qr_codes[0] if t.qr_codes else '?':10} -> {t.png_path}")
        console.print(f"ledger: {hall.consumer.ledger.count()} tickets acknowledged; "
                      f"kiosk outbox depth {agent.store.depth()}")
        leaks = hall.auditor.leaks(__import__("emulator.idcard", fromlist=["x"]).EmulatedReader.presented)
        console.print(f"payloads scanned for personal data: {len(hall.auditor.messages)}, leaks: {len(leaks)}")
        console.print(f"\nRendered tickets (text and PNG): {kiosk.printer.out_dir}")
    return 0


def _wait(pred, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return False
