"""An emulated kiosk: its devices on real ptys, its GPIO on gpiozero's MockFactory, its config
and keys in a work dir, next to a real Mosquitto and the hall's ticket consumer.

Scriptable, for tests and the demo::

    with EmulatedHall(tmp) as hall:
        kiosk = hall.add_kiosk("k07", services=(("A", "Citizen card", "A"), ("B", "Social insurance", "B")))
        kiosk.start_agent()                     # in this process; or kiosk.spawn_agent()
        kiosk.reader.present(Card.valid())
        kiosk.buttons.press("A")
        kiosk.printer.wait_for_tickets(1, 5)
"""

from __future__ import annotations

import base64
import os
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path

from edge.keys import public_b64, write_private_file
from provisioning.emulated import provision_emulated_hall
from emulator.broker import MosquittoBroker, end_process
from emulator.idcard import Card, EmulatedReader
from emulator.printer import EmulatedPrinter

#: A free BCM pin on every shipped board for the cell's indicator LED.
CELL_INDICATOR_PIN = 22

DEFAULT_SERVICES = (("A", "Citizen card", "A"), ("B", "Social insurance", "B"),
                    ("C", "Property registration", "C"))


class Buttons:
    """Press the kiosk's buttons on the MockFactory the agent's gpiozero devices use."""

    def __init__(self, factory, pins: dict[str, int]) -> None:
        self.factory = factory
        self.pins = dict(pins)

    def press(self, role: str, hold_s: float = 0.0) -> None:
        pin = self.factory.pin(self.pins[role])
        pin.drive_low()            # wired to ground with the pull-up: pressed = low
        if hold_s:
            time.sleep(hold_s)     # a human's press duration, not synchronisation
        pin.drive_high()


class Leds:
    def __init__(self, factory, pins: dict[str, int]) -> None:
        self.factory = factory
        self.pins = dict(pins)

    def state(self, role: str) -> bool:
        return bool(self.factory.pin(self.pins[role]).state)


class EmulatedKiosk:
    def __init__(self, hall: "EmulatedHall", device_id: str, *, prefix: str,
                 services=DEFAULT_SERVICES, board: str = "rpi4b", poll_interval_s: float = 0.1,
                 choose_timeout_s: float = 20.0, clock_trust: str = "assume_synced",
                 qr: bool = False, cell: str | None = None, cell_hold_s: float = 5.0,
                 cell_sensors: tuple[str, ...] = ("pir", "door"), remote_gpio: bool = False,
                 broker_port: int | None = None, keepalive_s: int = 10) -> None:
        """``remote_gpio``: the agent will be spawned (:meth:`spawn_agent`) and its pins are
        driven over edge.gpio's mock-pin socket; otherwise they are this process's
        MockFactory. ``cell_sensors``: any of "pir", "door" (GPIO), "radar" (LD2410 on a pty),
        "node" (the Pico cell node protocol on a pty). ``broker_port``: where the agent
        connects when it is not the broker's own port (a proxy in between)."""
        from gpiozero.pins.mock import MockFactory

        from boards import load_board

        self.hall = hall
        self.device_id = device_id
        self.dir = hall.dir / device_id
        self.dir.mkdir(parents=True, exist_ok=True)
        self.board = load_board(board)
        self.reader = EmulatedReader(self.dir / "dev" / "idcard")
        self.printer = EmulatedPrinter(self.dir / "dev" / "printer", out_dir=self.dir / "tickets")
        # Real enrolment: key generated "on the kiosk", CSR, certificate from the hall CA.
        self.identity = hall.pki.add_kiosk(device_id)
        self.key_path = self.identity.key_path
        self.key = self.identity.key
        hall.trust_kiosk(self.identity)
        self.services = tuple(services)
        # GPIO: the MockFactory the in-process agent's gpiozero devices use; buttons, LEDs and
        # the cell's PIR and door switch are its pins.
        self.gpio_socket = self.dir / "gpio.sock"
        if remote_gpio:
            from emulator.gpio import RemotePins

            self.factory = RemotePins(self.gpio_socket)
        else:
            self.factory = MockFactory()
        self.remote_gpio = remote_gpio
        self.broker_port = broker_port
        self.keepalive_s = keepalive_s
        used = {b for _, _, b in self.services}
        self.buttons = Buttons(self.factory, {r: p for r, p in self.board.service_buttons.items() if r in used})
        self.leds = Leds(self.factory, {r: p for r, p in self.board.service_leds.items() if r in used})
        self.staff_button = (Buttons(self.factory, {"staff": self.board.staff_call_button})
                             if self.board.staff_call_button is not None else None)
        self.camera = self.scanner = None
        if qr:
            from emulator.camera import EmulatedCamera
            from emulator.qrscanner import EmulatedQrScanner

            self.camera = EmulatedCamera(fps=30.0, seed=len(hall.kiosks))
            self.scanner = EmulatedQrScanner(self.dir / "dev" / "qrscanner")
        self.cell = None
        self.cell_hold_s = cell_hold_s
        if cell is not None:
            from emulator.cells import EmulatedCell

            occ = self.board.occupancy
            unknown = set(cell_sensors) - {"pir", "door", "radar", "node"}
            if unknown or not cell_sensors:
                raise ValueError(f"cell sensors: {sorted(unknown) or 'none given'}")
            self.cell_sensors = tuple(cell_sensors)
            self.cell = EmulatedCell(cell, self.dir, factory=self.factory,
                                     pir_pin=occ.get("pir") if "pir" in cell_sensors else None,
                                     door_pin=occ.get("door") if "door" in cell_sensors else None,
                                     indicator_pin=CELL_INDICATOR_PIN,
                                     radar="radar" in cell_sensors, node="node" in cell_sensors)
        self.config_path = self.dir / "agent.toml"
        self.clock_trust = clock_trust
        self._write_config(prefix, board, poll_interval_s, choose_timeout_s)
        self.agent = None
        self._agent_thread: threading.Thread | None = None
        self.proc: subprocess.Popen | None = None

    def _write_config(self, prefix: str, board: str, poll_interval_s: float, choose_timeout_s: float) -> None:
        qr = ""
        if self.scanner is not None:
            qr = (f'[devices.qr_scanner]\nport = "{self.scanner.path}"\n\n'
                  f'[qr]\nbooking_keys = ["{public_b64(self.hall.booking.public_key)}"]\n'
                  f'eid_keys = ["{public_b64(self.hall.eid.public_key)}"]\n')
        cell = ""
        if self.cell is not None:
            c = self.cell
            cell = (f'[cell]\nid = "{c.id}"\nindicator_pin = {CELL_INDICATOR_PIN}\n'
                    f'pir = {str(c.pir_pin is not None).lower()}\n'
                    f'door = {str(c.door_pin is not None).lower()}\n'
                    + (f'radar_port = "{c.radar.path}"\n' if c.radar is not None else '')
                    + (f'node_port = "{c.node.path}"\n' if c.node is not None else '')
                    + f'hold_s = {self.cell_hold_s}\nhold_motion_only_s = {max(10.0, self.cell_hold_s)}\n'
                    f'min_presence_s = 0.3\n')
        services = "\n".join(
            f'[[services]]\ncategory = "{c}"\nname = "{n}"\nbutton = "{b}"\n' for c, n, b in self.services)
        clock_trust = self.clock_trust
        self.config_path.write_text(f"""# generated by hallkiosk's emulator
[kiosk]
device_id = "{self.device_id}"
hall = "{self.hall.hall_id}"
number_prefix = "{prefix}"
board = "{board}"
state_dir = "{self.dir / 'state'}"

[hall]
name = "{self.hall.hall_name}"
citizen_hash_secret_file = "{self.hall.secret_path}"

[broker]
host = "127.0.0.1"
port = {self.broker_port or self.hall.broker.port}
keepalive_s = {self.keepalive_s}
reconnect_min_s = 0.2
reconnect_max_s = 2.0

[keys]
device_key = "{self.key_path}"

[tls]
ca_file = "{self.hall.pki.chain_file}"
cert_file = "{self.identity.cert_path}"
crl_file = "{self.identity.dir / 'crl.pem'}"
trusted_certs = "{self.identity.dir / 'services.pem'}"

[devices.reader]
port = "{self.reader.path}"
poll_interval_s = {poll_interval_s}
timeout_s = 0.5

[devices.printer]
port = "{self.printer.path}"
timeout_s = 0.5

[gpio]
pin_factory = "mock"

[session]
choose_timeout_s = {choose_timeout_s}

[clock]
# The emulator runs on a developer machine whose clock is what it is.
trust = "{clock_trust}"

{qr}
{cell}

{services}""")

    # -- the agent, in this process (GPIO scriptable) -----------------------------------
    def start_agent(self, *, wait_ready_s: float = 10.0):
        from edge.agent import Agent
        from edge.config import load_config

        cfg = load_config(self.config_path)
        self.agent = Agent(cfg, pin_factory=self.factory, frame_source=self.camera)
        self._agent_thread = threading.Thread(target=self.agent.run, name=f"agent-{self.device_id}", daemon=True)
        self._agent_thread.start()
        if not self.agent.ready.wait(wait_ready_s):
            raise RuntimeError(f"agent {self.device_id} not ready within {wait_ready_s} s")
        return self.agent

    def stop_agent(self, timeout_s: float = 10.0) -> None:
        if self.agent is not None:
            self.agent.stop("emulator")
            if self._agent_thread is not None:
                self._agent_thread.join(timeout_s)
            self.agent = None

    # -- the agent as its own process (for crashes, RSS and CPU) -------------------------------
    def spawn_agent(self, *, env: dict[str, str] | None = None, stdout=None) -> subprocess.Popen:
        # As the kiosk's systemd unit runs it: -OO (deploy/systemd/hallkiosk.service).
        full_env = dict(os.environ, PYTHONOPTIMIZE="2")
        if self.remote_gpio:
            from edge.gpio import MOCK_GPIO_ENV

            full_env[MOCK_GPIO_ENV] = str(self.gpio_socket)
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hallkiosk.cli", "agent", "--config", str(self.config_path)],
            env=full_env, stdout=stdout if stdout is not None else subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
        return self.proc

    def close(self) -> None:
        self.stop_agent()
        end_process(self.proc)
        self.reader.close()
        self.printer.close()
        if self.scanner is not None:
            self.scanner.close()
        if self.cell is not None:
            self.cell.close()
        if self.remote_gpio:
            self.factory.close()


class EmulatedHall:
    """A hall: one broker, its ticket consumer (ledger), its secret, and kiosks."""

    def __init__(self, workdir: str | os.PathLike[str], *, hall_id: str = "citizen-home",
                 hall_name: str = "Citizen Home Service Centre",
                 extra_services: tuple[tuple[str, str], ...] = ()) -> None:
        """``extra_services``: (id, role) identities enrolled besides the defaults (ledger,
        ops, auditor), before the broker's ACLs are generated."""
        self.dir = Path(workdir).absolute()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.hall_id = hall_id
        self.hall_name = hall_name
        self.secret_path = self.dir / "citizen.secret"
        write_private_file(self.secret_path, base64.b64encode(secrets.token_bytes(32)) + b"\n")
        # The real provisioning flow: hall CA, service certificates, the broker's generated
        # TLS config with per-device ACLs; kiosks are enrolled as they are added.
        from provisioning.emulated import DEFAULT_SERVICES as SERVICE_IDS

        self.pki = provision_emulated_hall(self.dir / "pki", hall=hall_id,
                                           services=SERVICE_IDS + tuple(extra_services))
        self.ledger_id = "ledger"
        self.ledger_key = self.pki["ledger"].key
        # The hall's keyring, from certificates (chain and CRL checked): kiosks, the ledger
        # (consumer) and ops, so one keyring verifies everything seen on the hall's topics.
        self.keyring = self.pki.keyring()
        self.broker = MosquittoBroker(self.dir / "broker", conf_text=self.pki.broker_conf_text)
        # The hall's online booking (appointment QR codes) and an e-ID issuer (citizens'
        # own QR codes), each with its own Ed25519 key the kiosks are configured to trust.
        from emulator.booking import BookingService, EidIssuer

        self.booking = BookingService(hall_id)
        self.eid = EidIssuer()
        self.auditor: "Auditor | None" = None
        self.kiosks: dict[str, EmulatedKiosk] = {}
        self.consumer = None
        self._prefixes = iter(range(1, 100))

    def trust_kiosk(self, identity) -> None:
        from provisioning.trust import keyring_from_certs

        keyring_from_certs(self.pki.chain_file, [identity.cert_path], self.pki.crl_file,
                           roles=("kiosk",), keyring=self.keyring)

    def tls_for(self, ident: str):
        """mTLS settings to connect as one of the hall's enrolled identities."""
        return self.pki.tls_for(ident)

    def start(self) -> "EmulatedHall":
        self.broker.start()
        self.auditor = Auditor(self)
        return self

    def link(self, ident: str, sink, subscriptions=(), **kw):
        """An MQTT link authenticated as ``ident`` (the broker forces client id = CN, so one
        identity has one connection at a time)."""
        from edge.mqtt import MqttLink

        link = MqttLink(client_id=ident, host="127.0.0.1", port=self.broker.port, sink=sink,
                        subscriptions=tuple(subscriptions), tls=self.tls_for(ident),
                        reconnect_min_s=0.1, reconnect_max_s=1.0, name=ident, **kw)
        link.start()
        return link

    def add_kiosk(self, device_id: str, **kwargs) -> EmulatedKiosk:
        prefix = kwargs.pop("prefix", f"{next(self._prefixes):02d}")
        k = EmulatedKiosk(self, device_id, prefix=prefix, **kwargs)
        self.kiosks[device_id] = k
        return k

    def start_consumer(self, on_ticket=None, group: str | None = None):
        from ops.consumer import TicketConsumer

        self.consumer = TicketConsumer(service_id=self.ledger_id, hall=self.hall_id, key=self.ledger_key,
                                       keyring=self.keyring, state_dir=self.dir / "ledger",
                                       host="127.0.0.1", port=self.broker.port, group=group,
                                       on_ticket=on_ticket, tls=self.tls_for(self.ledger_id)).start()
        if not self.consumer.link.wait_connected(10):
            raise RuntimeError("ticket consumer did not connect")
        return self.consumer

    def stop_consumer(self) -> None:
        if self.consumer is not None:
            self.consumer.stop()
            self.consumer = None

    def close(self) -> None:
        for k in self.kiosks.values():
            k.close()
        self.stop_consumer()
        if self.auditor is not None:
            self.auditor.close()
        self.broker.stop()

    def __enter__(self) -> "EmulatedHall":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


class Auditor:
    """Sees every message on the hall's topics (identity 'auditor', role monitor), so tests
    can prove that no published payload ever carries a citizen's name, ID number or address."""

    def __init__(self, hall: EmulatedHall) -> None:
        from edge.mqtt import LinkMessage

        self._kind = LinkMessage
        self.messages: list = []
        self.listeners: list = []        # called with each message (the demo prints them)
        self._lock = threading.Lock()
        self.link = hall.link("auditor", self._sink, ((f"hall/{hall.hall_id}/#", 1),))
        self.link.wait_connected(10)

    def _sink(self, ev) -> None:
        if isinstance(ev, self._kind):
            with self._lock:
                self.messages.append(ev)
            for listener in list(self.listeners):
                try:
                    listener(ev)
                except Exception:  # a listener bug must not stop the audit
                    import logging
                    logging.getLogger("emulator").exception("auditor listener failed")

    def leaks(self, cards) -> list[str]:
        """Topics of payloads that contain any presented card's personal data."""
        needles = set()
        for c in cards:
            needles.update(x for x in (c.name, c.id_number, c.address) if x)
            needles.update(x.encode("unicode_escape").decode() for x in (c.name, c.address) if x)
        with self._lock:
            msgs = list(self.messages)
        return [m.topic for m in msgs
                if any(n in m.payload.decode("utf-8", "replace") for n in needles)]

    def close(self) -> None:
        self.link.stop()


__all__ = ["Card", "EmulatedHall", "EmulatedKiosk", "Buttons", "Leds"]
