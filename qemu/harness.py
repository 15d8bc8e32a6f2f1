"""Boot the cached image on qemu-system-aarch64 next to an emulated hall, and drive it.

Wiring of one boot (everything on this machine; the guest reaches nothing else)::

    host                                             guest (-M virt, cortex-a72)
    EmulatedHall: Mosquitto 127.0.0.1:<port>  <-- relay.py <-- guestfwd 10.0.2.100:8883
                  ledger (ticket consumer)                     (user net, restrict=on)
    EmulatedReader  pty  <-- -chardev serial --> pci-serial 00:10.0 -> /dev/hallkiosk/idcard
    EmulatedPrinter pty  <-- -chardev serial --> pci-serial 00:11.0 -> /dev/hallkiosk/printer
    EmulatedNode pty     <-- -chardev serial --> pci-serial 00:12.0 -> /dev/hallkiosk/cellnode
    seed.img (provisioning bundle, keys) ------> virtio-blk /dev/vdb -> /etc/hallkiosk
    overlay.qcow2 (backed by the cached rootfs.img) -> virtio-blk /dev/vda (root)
    qga.sock  <------------------------------------> qemu-guest-agent (systemctl, journalctl)
    console.log <----------------------------------- ttyAMA0 (kernel, systemd, autologin root)

The guest's agent is the one deploy/install.sh installed, started by systemd from the
deploy/ unit; it cannot tell its UARTs and broker from a kiosk's. Usage::

    img = find_image()
    with EmulatedHall(tmp) as hall, QemuKiosk(img, hall, tmp / "vm") as vm:
        vm.boot()
        first = vm.wait_first_signed(120)          # seconds from QEMU start
        vm.tap(Card.valid()); vm.kiosk.printer.wait_for_tickets(1, 60)

``python -m qemu.harness boot [--console]`` boots one VM by hand (docs/qemu.md).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from hallkiosk.errors import ContractError, HallkioskError

from .bundle import GUEST_BROKER_HOST, GUEST_BROKER_PORT, make_seed_disk, write_guest_bundle
from .image import BuiltImage, find_image
from .qga import ExecResult, GuestAgent

RELAY = Path(__file__).resolve().parent / "relay.py"
#: PCI slots of the kiosk's UARTs; qemu/guest/90-hallkiosk-qemu.rules names them by slot.
SERIAL_SLOTS = {"idcard": 0x10, "printer": 0x11, "cellnode": 0x12, "qrscanner": 0x13}
AGENT_UNIT = "hallkiosk.service"
#: Message kinds that can count as "the agent is up": the retained birth state, or (once the
#: agent publishes it) the first telemetry report.
FIRST_MESSAGE_KINDS = ("state", "telemetry")
#: The hall identity (role monitor) the harness watches the kiosk's topics with.
WATCHER_ID = "qemu-watch"


def admit_guest(hall) -> None:
    """Make an emulator.kiosk.EmulatedHall reachable from a guest, before anything connects.

    The broker's certificate names the addresses kiosks use to reach it; a guest reaches it
    as GUEST_BROKER_HOST, so the broker is re-issued a certificate that names that address
    too (``hallkiosk provision issue-broker --ip``, as a hall would for its network), and the
    harness's own monitor identity is enrolled. One broker restart applies both (the
    generated ACLs are per user). Safe to call twice.
    """
    from provisioning.enroll import issue_broker

    pki = hall.pki
    if WATCHER_ID in pki.identities:
        return
    pki.add_service(WATCHER_ID, "monitor")
    issue_broker(pki.ca, pki.broker_dir, dns_names=("localhost",),
                 ip_addresses=("127.0.0.1", GUEST_BROKER_HOST), clock=pki.clock)
    pki.regenerate_broker_config()
    hall.broker.stop()
    hall.broker.start()


class HarnessError(HallkioskError, RuntimeError):
    """The VM did not do what the harness waited for (the message names it and the logs)."""


@dataclass(frozen=True, slots=True)
class Seen:
    """One message the host's broker delivered: arrival (monotonic s), topic, raw payload,
    and its verified envelope (None if it did not verify: the reason is in ``error``)."""

    at: float
    topic: str
    payload: bytes
    verified: object | None
    error: str | None

    @property
    def kind(self) -> str:
        """The contract's kind of the topic (state, ticket, ticket_ack, ...), "" if none."""
        from mqtt_topics.topics import parse_topic

        try:
            return parse_topic(self.topic).kind
        except ContractError:
            return ""


class Recorder:
    """Every message on the kiosk's topics, verified against the hall's keyring as it arrives.

    Waiting is on a condition variable notified per message: no polling.
    """

    def __init__(self, hall, device_id: str) -> None:
        self.hall = hall
        self.messages: list[Seen] = []
        self._cond = threading.Condition()
        self.link = hall.link(WATCHER_ID, self._sink,
                              ((f"hall/{hall.hall_id}/kiosk/{device_id}/#", 1),))
        if not self.link.wait_connected(10):
            raise HarnessError("the recorder could not connect to the hall's broker")

    def _sink(self, ev) -> None:
        # On paho's thread: never raise.
        from edge.mqtt import LinkMessage
        from mqtt_topics.envelope import verify

        if not isinstance(ev, LinkMessage):
            return
        now = time.monotonic()
        try:
            v, err = verify(ev.payload, ev.topic, self.hall.keyring), None
        except ContractError as exc:
            v, err = None, f"{type(exc).__name__}: {exc}"
        except Exception as exc:   # a bug in a check must not kill paho's thread
            v, err = None, f"{type(exc).__name__}: {exc}"
        with self._cond:
            self.messages.append(Seen(now, ev.topic, ev.payload, v, err))
            self._cond.notify_all()

    def wait(self, predicate: Callable[[Seen], bool], timeout_s: float, what: str,
             *, since: int = 0) -> Seen:
        """The first message from index ``since`` on that satisfies ``predicate``."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            i = since
            while True:
                while i < len(self.messages):
                    m = self.messages[i]
                    i += 1
                    if predicate(m):
                        return m
                left = deadline - time.monotonic()
                if left <= 0:
                    raise HarnessError(f"timed out after {timeout_s} s waiting for {what}")
                self._cond.wait(left)

    def mark(self) -> int:
        with self._cond:
            return len(self.messages)

    def signed(self, kind: str) -> list[Seen]:
        with self._cond:
            return [m for m in self.messages if m.verified is not None and m.kind == kind]

    def unverified(self) -> list[Seen]:
        with self._cond:
            return [m for m in self.messages if m.verified is None]

    def close(self) -> None:
        if self.link is not None:
            self.link.stop()
            self.link = None


def is_first_signed(kind: str) -> Callable[[Seen], bool]:
    if kind not in FIRST_MESSAGE_KINDS:
        raise ValueError(f"first message kind must be one of {FIRST_MESSAGE_KINDS}, not {kind!r}")

    def pred(m: Seen) -> bool:
        if m.verified is None or m.kind != kind:
            return False
        return kind != "state" or m.verified.body["status"] == "online"
    return pred


class QemuKiosk:
    """One emulated kiosk board running the installed agent, wired to ``hall``.

    ``first_message`` picks what "the agent is up" means for :meth:`wait_first_signed`:
    "telemetry" (its first signed report) or "state" (the retained online state). CPU, cores and memory default to
    the figures the issue measured on (``-M virt -cpu cortex-a72 -smp 2 -m 1024``).
    """

    def __init__(self, image: BuiltImage, hall, workdir: str | os.PathLike[str], *,
                 device_id: str = "k07", prefix: str = "07",
                 services: Sequence[tuple[str, str, str]] = (("A", "Citizen card", "A"),),
                 cell: str | None = "c1", first_message: str = "telemetry", cpu: str = "cortex-a72", smp: int = 2,
                 mem_mb: int = 1024, console: str = "file", append: str = "",
                 qemu: str = "qemu-system-aarch64") -> None:
        if first_message not in FIRST_MESSAGE_KINDS:
            raise ValueError(f"first_message must be one of {FIRST_MESSAGE_KINDS}")
        if console not in ("file", "stdio"):
            raise ValueError("console must be 'file' or 'stdio'")
        self.image = image
        self.hall = hall
        self.dir = Path(workdir).absolute()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.device_id = device_id
        self.first_message = first_message
        self.cpu, self.smp, self.mem_mb = cpu, smp, mem_mb
        self.console = console
        self.append = append
        self.qemu = qemu
        # Unix socket paths are limited to 108 bytes: keep them short, outside workdir.
        self._sockdir = Path(tempfile.mkdtemp(prefix="hkq-"))
        self.qga_path = self._sockdir / "qga.sock"
        self.console_log = self.dir / "console.log"
        self.qemu_log = self.dir / "qemu.log"
        admit_guest(hall)
        self.kiosk = hall.add_kiosk(device_id, prefix=prefix, services=tuple(services))
        # The privacy cell's Pico sensor node, on the third UART (no GPIO sensors: the virt
        # board has no header for the agent's PIR and door pins).
        self.cell = None
        cell_toml = ""
        if cell is not None:
            from emulator.cells import EmulatedCell

            self.cell = EmulatedCell(cell, self.dir / "cell", node=True)
            cell_toml = (f'[cell]\nid = "{cell}"\npir = false\ndoor = false\n'
                         'node_port = "/dev/hallkiosk/cellnode"\n')
        self.seed = make_seed_disk(
            write_guest_bundle(self.dir / "seed", hall.pki, self.kiosk.identity,
                               hall_name=hall.hall_name, prefix=prefix, services=services,
                               secret=hall.secret_path.read_bytes(), extra_toml=cell_toml),
            self.dir / "seed.img")
        self.overlay = self.dir / "overlay.qcow2"
        self.recorder: Recorder | None = None
        self.proc: subprocess.Popen | None = None
        self.started_at: float | None = None
        self._ga: GuestAgent | None = None
        self._qemu_logf = None

    # -- the command line ---------------------------------------------------------------------
    def serial_devices(self) -> dict[str, str]:
        """role -> host pty path of the emulated device behind it."""
        devices = {"idcard": self.kiosk.reader.path, "printer": self.kiosk.printer.path}
        if self.cell is not None:
            devices["cellnode"] = self.cell.node.path
        return devices

    def qemu_argv(self) -> list[str]:
        relay = f"{shlex.quote(sys.executable)} {shlex.quote(str(RELAY))} 127.0.0.1 {self.hall.broker.port}"
        if "," in relay:
            raise HarnessError(f"a comma in {relay!r} would break QEMU's option syntax")
        cmdline = " ".join(x for x in ("console=ttyAMA0 root=/dev/vda rw panic=-1", self.append) if x)
        argv = [self.qemu, "-M", "virt", "-cpu", self.cpu, "-smp", str(self.smp), "-m", str(self.mem_mb),
                "-display", "none", "-no-reboot",
                "-kernel", str(self.image.kernel), "-initrd", str(self.image.initrd), "-append", cmdline,
                # Root: a per-run overlay, so the cached image is never written.
                "-drive", f"if=none,id=root,file={self.overlay},format=qcow2,discard=unmap",
                "-device", "virtio-blk-pci,drive=root,addr=0x4",
                "-drive", f"if=none,id=seed,file={self.seed},format=raw,readonly=on",
                "-device", "virtio-blk-pci,drive=seed,addr=0x5",
                # restrict=on: no packet leaves the guest except through the guestfwd rule,
                # and that rule ends at the test broker on the host's loopback.
                "-netdev", f"user,id=net0,restrict=on,guestfwd=tcp:{GUEST_BROKER_HOST}:"
                           f"{GUEST_BROKER_PORT}-cmd:{relay}",
                "-device", "virtio-net-pci,netdev=net0,addr=0x3,romfile=",
                "-device", "virtio-rng-pci,addr=0x6",
                "-device", "virtio-serial-pci,id=vser,addr=0x7",
                "-chardev", f"socket,id=qga0,path={self.qga_path},server=on,wait=off",
                "-device", "virtserialport,bus=vser.0,chardev=qga0,name=org.qemu.guest_agent.0"]
        for role, path in self.serial_devices().items():
            argv += ["-chardev", f"serial,id={role},path={path}",
                     "-device", f"pci-serial,chardev={role},addr={SERIAL_SLOTS[role]:#x}"]
        if self.console == "stdio":
            argv += ["-chardev", f"stdio,id=con0,mux=on,signal=off,logfile={self.console_log}",
                     "-serial", "chardev:con0", "-mon", "chardev=con0"]
        else:
            argv += ["-serial", f"file:{self.console_log}", "-monitor", "none"]
        return argv

    # -- lifecycle ------------------------------------------------------------------------------
    def boot(self, *, fresh: bool = True) -> None:
        """Start QEMU (the broker must be running); returns at once. ``fresh=False`` keeps
        the overlay of the previous boot: the disk as a power cut left it (qemu.update_campaign)."""
        if fresh or not self.overlay.exists():
            self.overlay.unlink(missing_ok=True)
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b",
                            str(self.image.rootfs), str(self.overlay)], check=True)
        self.recorder = Recorder(self.hall, self.device_id)
        argv = self.qemu_argv()
        (self.dir / "qemu.argv").write_text(shlex.join(argv) + "\n")
        self._qemu_logf = self.qemu_log.open("wb")
        self.started_at = time.monotonic()
        stdio = None if self.console == "stdio" else self._qemu_logf
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL if stdio else None,
                                     stdout=stdio, stderr=self._qemu_logf)

    def since_start(self, t: float) -> float:
        if self.started_at is None:
            raise HarnessError("the VM was not started")
        return round(t - self.started_at, 2)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise HarnessError(f"QEMU exited with {self.proc.returncode}; see {self.qemu_log} "
                               f"and {self.console_log}")

    def wait_first_signed(self, timeout_s: float) -> float:
        """Seconds from QEMU's start to the first signed message of ``first_message`` kind."""
        m = self._wait(is_first_signed(self.first_message), timeout_s,
                       f"the first signed {self.first_message} message")
        return self.since_start(m.at)

    def _wait(self, pred: Callable[[Seen], bool], timeout_s: float, what: str, *, since: int = 0) -> Seen:
        """Recorder.wait in slices, so a QEMU that died is reported at once, not at the deadline."""
        if self.recorder is None:
            raise HarnessError("the VM was not started")
        deadline = time.monotonic() + timeout_s
        while True:
            self._check_alive()
            try:
                return self.recorder.wait(pred, min(2.0, max(0.0, deadline - time.monotonic())),
                                          what, since=since)
            except HarnessError:
                if time.monotonic() >= deadline:
                    raise HarnessError(f"timed out after {timeout_s} s waiting for {what}; "
                                       f"console: {self.console_log}") from None

    def wait_online(self, timeout_s: float, *, since: int = 0, not_boot: str | None = None) -> Seen:
        """The next signed online state (from another agent boot than ``not_boot``)."""
        def pred(m: Seen) -> bool:
            return (m.verified is not None and m.kind == "state"
                    and m.verified.body["status"] == "online" and m.verified.boot != not_boot)
        return self._wait(pred, timeout_s, "a signed online state", since=since)

    # -- inside the guest ---------------------------------------------------------------------
    @property
    def guest(self) -> GuestAgent:
        if self._ga is None:
            self._ga = GuestAgent(str(self.qga_path))
        return self._ga

    def wait_guest_agent(self, timeout_s: float) -> float:
        """Seconds from QEMU's start until qemu-ga in the guest answers."""
        self._check_alive()
        self.guest.wait_ready(timeout_s)
        return self.since_start(time.monotonic())

    def exec(self, argv: list[str], timeout_s: float = 60.0) -> ExecResult:
        self._check_alive()
        return self.guest.exec(argv, timeout_s=timeout_s)

    def unit_props(self, *names: str) -> dict[str, str]:
        r = self.exec(["/bin/systemctl", "show", AGENT_UNIT, "-p", ",".join(names)])
        if not r.ok:
            raise HarnessError(f"systemctl show failed: {r.stderr.strip()}")
        return dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)

    def kill_agent(self) -> ExecResult:
        """``systemctl kill -s KILL`` the agent: a crash systemd must recover from."""
        return self.exec(["/bin/systemctl", "kill", "-s", "KILL", AGENT_UNIT])

    def wait_restarted(self, old_pid: str, timeout_s: float, poll_s: float = 0.5) -> dict[str, str]:
        """Unit properties once systemd runs the agent again under a new PID."""
        deadline = time.monotonic() + timeout_s
        while True:
            props = self.unit_props("MainPID", "NRestarts", "ActiveState", "SubState")
            if props.get("MainPID") not in ("0", old_pid) and props.get("ActiveState") == "active":
                return props
            if time.monotonic() > deadline:
                raise HarnessError(f"agent not restarted within {timeout_s} s: {props}")
            time.sleep(poll_s)     # systemd in the guest has no event we can wait on from here

    def journal(self, unit: str = AGENT_UNIT) -> str:
        r = self.exec(["/bin/journalctl", "-u", unit, "-o", "short-monotonic", "--no-pager"])
        return r.stdout

    def poweroff(self, timeout_s: float = 90.0) -> float:
        """Clean shutdown from inside: ``systemctl poweroff``, so systemd stops the agent with
        SIGTERM and PSCI turns the board off; returns the seconds until QEMU exited.

        Not qga's guest-shutdown: it runs ``shutdown -h +0``, which asks logind (over D-Bus)
        to schedule the shutdown, and a kiosk image has neither.
        """
        self._check_alive()
        t0 = time.monotonic()
        # Started, not waited for: the guest agent itself is stopped on the way down.
        self.guest.call("guest-exec", {"path": "/bin/systemctl", "arg": ["poweroff"]})
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise HarnessError(f"the guest did not power off within {timeout_s} s; "
                               f"console: {self.console_log}") from None
        return round(time.monotonic() - t0, 2)

    def tap(self, card) -> None:
        """A citizen lays ``card`` on the reader."""
        self.kiosk.reader.present(card)

    def close(self) -> None:
        if self._ga is not None:
            self._ga.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)      # QEMU quits at once on SIGTERM
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._qemu_logf is not None:
            self._qemu_logf.close()
        if self.recorder is not None:
            self.recorder.close()
        if self.cell is not None:
            self.cell.close()
        self.overlay.unlink(missing_ok=True)
        shutil.rmtree(self._sockdir, ignore_errors=True)

    def __enter__(self) -> "QemuKiosk":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- by hand ---------------------------------------------------------------------------------------
def _boot_by_hand(args: argparse.Namespace) -> int:
    from emulator.kiosk import EmulatedHall

    img = find_image()
    if img is None:
        print("no image for this tree in the cache: run `make qemu-image` first", file=sys.stderr)
        return 1
    work = Path(args.workdir or tempfile.mkdtemp(prefix="hallkiosk-qemu-"))
    with EmulatedHall(work / "hall") as hall:
        with QemuKiosk(img, hall, work / "vm", console="stdio" if args.console else "file") as vm:
            hall.start_consumer()       # after QemuKiosk: admit_guest restarts the broker
            vm.boot()
            if not args.console:
                print(f"booting; watch the console with:  tail -f {vm.console_log}", flush=True)
                print(f"broker 127.0.0.1:{hall.broker.port}; Ctrl-C stops the VM", flush=True)
                try:
                    t = vm.wait_first_signed(args.timeout)
                    print(f"first signed {vm.first_message} message {t} s after QEMU started",
                          flush=True)
                    vm.proc.wait()
                except KeyboardInterrupt:
                    pass
            else:
                # The console is this terminal (Ctrl-A x quits QEMU, Ctrl-A c its monitor).
                vm.proc.wait()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qemu.harness")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("boot", help="boot the cached image next to an emulated hall")
    b.add_argument("--console", action="store_true",
                   help="the guest's serial console on this terminal (autologin root; Ctrl-A x quits)")
    b.add_argument("--workdir", help="keep logs here (default: a new temp dir)")
    b.add_argument("--timeout", type=float, default=300.0)
    b.set_defaults(func=_boot_by_hand)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
