"""Power cuts during updates of the real arm64 image (``make qemu-update``; docs/updates.md).

One VM, one persistent disk (the qcow2 overlay is kept between boots), the hall's mTLS
broker and ledger, and the hall's TUF repository over HTTPS (a second guestfwd rule: the
guest still reaches nothing but the host's loopback services), served at a hall Wi-Fi's
pace (``--rate-kib-s``) so that cuts land in the download too. At the first boot the guest
is converted to the A/B layout (``GUEST_SETUP``: slot a runs the installed 0.1.0, the unit
gets deploy/systemd/hallkiosk-ab-slots.conf with its root moved to /opt/hallkiosk-ab).

First one update runs without a cut (the baseline): its phases (command to installed,
switch, online from the new slot, committed) are timed, and unless ``--max-delay-s`` is
given the cuts are drawn over that whole span. Then, ``--cuts`` times:

1. a card tap gives a ticket, acknowledged by the ledger (an update never starts with a
   ticket unacknowledged);
2. ops send the signed ``update`` command to a release the kiosk has never had (0.3.0,
   0.4.0, ...; into whichever slot is not running), or nothing when the previous update is
   still under way (it resumes by itself);
3. after a random delay the QEMU process is killed (SIGKILL: a power cut); the update
   phase last reported before the cut is recorded;
4. the VM boots again from the same disk: the agent must come back online (from either
   slot) within the boot limit.

At the end the update is left to finish, one more ticket is issued, and every printed
ticket must be in the ledger exactly once. Figures go to ``--out`` (report.json).
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import time
from pathlib import Path

from qemu.bundle import GUEST_BROKER_HOST, make_seed_disk
from qemu.harness import RELAY, HarnessError, QemuKiosk

REPO = Path(__file__).resolve().parents[1]
REPO_PORT = 8443
AB_ROOT = "/opt/hallkiosk-ab"


def versions(cuts: int) -> list[str]:
    """One release per update: the baseline's, and one for every cut (at most one command
    per cut). Each is new to the kiosk, so every update downloads its bundle: with two
    releases alternating, the kiosk kept both in its downloads after the first round, an
    update took 3 s instead of 33 and most cuts landed after the commit."""
    return [f"0.{n}.0" for n in range(2, cuts + 3)]
#: deploy/install.sh's venv on bookworm (Python 3.11): the dependencies slots share here.
GUEST_SITE = "/opt/hallkiosk/lib/python3.11/site-packages"

#: Run once in the guest (as root, through the guest agent): the A/B layout around the
#: package deploy/install.sh installed. Slot a is a venv that reaches that install's
#: site-packages (the same shared-site arrangement as the update tests), so it runs 0.1.0.
GUEST_SETUP = f"""set -eu
R={AB_ROOT}
SITE=$(/opt/hallkiosk/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
mkdir -p $R/slots $R/lib
/usr/bin/python3 -m venv --system-site-packages --without-pip $R/slots/a
PUR=$($R/slots/a/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
echo "$SITE" > "$PUR/_hallkiosk_shared_site.pth"
printf '#!%s\\nimport sys\\nfrom hallkiosk.cli import main\\nsys.exit(main())\\n' \\
    "$R/slots/a/bin/python" > $R/slots/a/bin/hallkiosk
chmod 0755 $R/slots/a/bin/hallkiosk
echo '{{"version": "0.1.0", "sha256": "-", "bundle": "deploy/install.sh"}}' \\
    > $R/slots/a/hallkiosk-slot.json
ln -sfn slots/a $R/current
install -m 0644 /etc/hallkiosk/hallkiosk_slots.py $R/lib/hallkiosk_slots.py
chown -R hallkiosk:hallkiosk $R
mkdir -p /etc/systemd/system/hallkiosk.service.d
sed 's#/opt/hallkiosk#{AB_ROOT}#g' /etc/hallkiosk/ab-slots.conf \\
    > /etc/systemd/system/hallkiosk.service.d/ab-slots.conf
sync
systemctl daemon-reload
systemctl restart hallkiosk
"""


def throttled_handler(rate_bps: int):
    """The repository's handler, sending bundles at ``rate_bps`` (metadata at full speed):
    a 0.4 MB bundle over loopback arrives in milliseconds, a cut could never land in it."""
    from provisioning.release import RepositoryHandler

    class Throttled(RepositoryHandler):
        def copyfile(self, source, outputfile) -> None:  # type: ignore[override]
            if "/targets/" not in self.path:
                return super().copyfile(source, outputfile)
            remaining = None if self._range is None else self._range[1] - self._range[0] + 1
            block = max(1024, rate_bps // 8)
            while remaining is None or remaining > 0:
                data = source.read(block if remaining is None else min(block, remaining))
                if not data:
                    break
                outputfile.write(data)
                if remaining is not None:
                    remaining -= len(data)
                time.sleep(len(data) / rate_bps)

    return Throttled


class UpdateVM(QemuKiosk):
    """QemuKiosk plus the repository's port forwarded, and the update files on the seed."""

    repo_port: int = 0

    def qemu_argv(self) -> list[str]:
        argv = super().qemu_argv()
        i = argv.index("-netdev") + 1
        relay = f"{shlex.quote(sys.executable)} {shlex.quote(str(RELAY))} 127.0.0.1 {self.repo_port}"
        argv[i] += f",guestfwd=tcp:{GUEST_BROKER_HOST}:{REPO_PORT}-cmd:{relay}"
        return argv

    def add_seed_files(self, files: dict[str, bytes]) -> None:
        bundle = self.dir / "seed" / "bundle"
        for name, data in files.items():
            (bundle / name).write_bytes(data)
        self.seed = make_seed_disk(self.dir / "seed", self.dir / "seed.img")

    def cut(self) -> None:
        """Power cut: SIGKILL the QEMU process; drop what belonged to that boot."""
        self.proc.kill()
        self.proc.wait(10)
        if self._ga is not None:
            self._ga.close()
            self._ga = None
        if self.recorder is not None:
            self.recorder.close()
            self.recorder = None
        if self._qemu_logf is not None:
            self._qemu_logf.close()
            self._qemu_logf = None


def _state(vm: QemuKiosk, since: int = 0) -> dict:
    states = [m for m in vm.recorder.signed("state")[since:]]
    return states[-1].verified.body if states else {}


def _update_events(vm: QemuKiosk) -> list[str]:
    return [m.verified.body["name"] for m in vm.recorder.signed("event")
            if m.verified.body["name"].startswith("update_")]


def _ticket(vm: QemuKiosk, consumer, printed: int, what: str) -> str:
    """A card tap, its ticket printed and in the hall ledger; then the kiosk reads the ack."""
    from emulator.idcard import Card

    vm.tap(Card.valid())
    if not vm.kiosk.printer.wait_for_tickets(printed, 60):
        raise HarnessError(f"{what}: no ticket printed")
    uid = vm.kiosk.printer.tickets[-1].qr_codes[0]
    deadline = time.monotonic() + 60
    while not consumer.ledger.lookup(uid):
        if time.monotonic() > deadline:
            raise HarnessError(f"{what}: ticket {uid} not in the ledger")
        time.sleep(0.2)
    time.sleep(1.5)          # the kiosk reads the ack: outbox empty again
    return uid


def _baseline(vm: QemuKiosk, ops, target: str, timeout_s: float) -> dict:
    """One update without a cut: seconds from the command to each phase."""
    mark = vm.recorder.mark()
    t0 = time.monotonic()
    ops.send(vm.device_id, "update", {"target": f"hallkiosk-{target}.tar", "version": target},
             ttl_s=120)
    end = vm.recorder.wait(lambda m: m.verified is not None and m.kind == "event"
                           and m.verified.body["name"] in ("update_committed",
                                                           "update_rolled_back",
                                                           "update_refused"),
                           timeout_s, "the baseline update to end", since=mark)
    if end.verified.body["name"] != "update_committed":
        raise HarnessError(f"baseline update did not commit: {end.verified.body}")
    phases: dict[str, float] = {}
    with vm.recorder._cond:
        seen = vm.recorder.messages[mark:]
    for m in seen:
        if m.verified is None:
            continue
        body = m.verified.body
        if m.kind == "event" and body["name"].startswith("update_"):
            phases.setdefault(body["name"][len("update_"):], round(m.at - t0, 1))
        elif m.kind == "state" and body["status"] == "online" and "switching" in phases \
                and body.get("agent_version") == target:
            phases.setdefault("online_new_slot", round(m.at - t0, 1))
    return phases


def run(out: Path, *, cuts: int, seed: int, max_delay_s: float | None, boot_limit_s: float,
        rate_kib_s: int = 32) -> dict:
    import shutil

    from edge.update.bundle import build_bundle
    from emulator.kiosk import EmulatedHall
    from provisioning.enroll import issue_broker
    from provisioning.opsclient import OpsClient
    from provisioning.release import ReleaseRepository, RepositoryServer
    from qemu.image import find_image
    from tests.test_update_slots import _wheel

    img = find_image()
    if img is None:
        raise HarnessError("no QEMU image for this tree: run `make qemu-image`")
    rng = random.Random(seed)
    out = out.absolute()
    shutil.rmtree(out / "work", ignore_errors=True)
    work = out / "work"
    work.mkdir(parents=True)
    report: dict = {"image": img.key, "seed": seed, "cuts": [], "rate_kib_s": rate_kib_s}
    bundles = {v: build_bundle(work / f"hallkiosk-{v}.tar", [_wheel(work / "wheels", v)], v)
               for v in versions(cuts)}
    report["bundle_bytes"] = {v: b.stat().st_size for v, b in bundles.items()}
    with EmulatedHall(work / "hall") as hall:
        srv = work / "updates-tls"
        issue_broker(hall.pki.ca, srv, name="updates", ip_addresses=(GUEST_BROKER_HOST,))
        repo = ReleaseRepository(work / "repo", work / "keys")
        repo.init()
        for v, b in bundles.items():
            repo.add_target(b, name=f"hallkiosk-{v}.tar", custom={"version": v})
        server = RepositoryServer(work / "repo", srv / "broker.crt", srv / "broker.key",
                                  port=0, handler=throttled_handler(rate_kib_s * 1024)).start()
        consumer = hall.start_consumer()
        ops = OpsClient(ops_id="ops", hall=hall.hall_id, key=hall.pki["ops"].key,
                        keyring=hall.keyring, tls=hall.tls_for("ops"), host="127.0.0.1",
                        port=hall.broker.port, state_dir=work / "ops-state").start()
        vm = UpdateVM(img, hall, work / "vm", cell=None, first_message="state")
        vm.repo_port = server.port
        update_toml = (
            "[update]\n"
            f'root = "{AB_ROOT}"\nrepository = "https://{GUEST_BROKER_HOST}:{REPO_PORT}"\n'
            'ca_file = "/etc/hallkiosk/ca-chain.pem"\n'
            'trusted_root = "/etc/hallkiosk/update-root.json"\n'
            'python = "/usr/bin/python3"\nhealth_deadline_s = 600\nmax_trial_boots = 3\n'
            f'shared_site = "{GUEST_SITE}"\n')
        vm.add_seed_files({
            "update.toml": update_toml.encode(),
            "update-root.json": (work / "repo" / "metadata" / "root.json").read_bytes(),
            "hallkiosk_slots.py": (REPO / "edge" / "update" / "slots.py").read_bytes(),
            "ab-slots.conf": (REPO / "deploy" / "systemd" / "hallkiosk-ab-slots.conf").read_bytes(),
            "ab-setup.sh": GUEST_SETUP.encode()})
        printer = vm.kiosk.printer
        try:
            vm.boot()
            t0 = time.monotonic()
            vm.wait_online(boot_limit_s)
            report["first_boot_online_s"] = round(time.monotonic() - t0, 1)
            vm.wait_guest_agent(120)
            r = vm.exec(["/bin/sh", "/etc/hallkiosk/ab-setup.sh"], timeout_s=300)
            if not r.ok:
                raise HarnessError(f"A/B setup failed: {r.stderr[-500:]}")
            vm.recorder.wait(lambda m: m.verified is not None and m.kind == "state"
                             and m.verified.body.get("extra", {}).get("slot") == "a",
                             180, "online from slot a", since=0)
            printed = 1
            _ticket(vm, consumer, printed, "before the baseline")
            report["baseline_s"] = base = _baseline(vm, ops, versions(cuts)[0], 1200)
            print(json.dumps({"baseline_s": base}), flush=True)
            if max_delay_s is None:
                max_delay_s = round(base["committed"] * 1.1, 1)
            report["max_delay_s"] = max_delay_s
            target = None
            unused = versions(cuts)[1:]
            for i in range(cuts):
                # 1. a ticket, acknowledged.
                printed += 1
                _ticket(vm, consumer, printed, f"cut {i}")
                # 2. the update command, unless one is under way.
                st = _state(vm).get("extra", {})
                busy = st.get("update_state") in ("preparing", "installed", "switching", "trial")
                if not busy:
                    target = unused.pop(0)
                    ops.send(vm.device_id, "update",
                             {"target": f"hallkiosk-{target}.tar", "version": target},
                             ttl_s=120)
                # 3. the cut.
                delay = rng.uniform(0.0, max_delay_s)
                time.sleep(delay)
                events = _update_events(vm)
                before = _state(vm)
                vm.cut()
                cut = {"i": i, "delay_s": round(delay, 1), "target": target,
                       "sent": not busy, "last_event": events[-1] if events else None,
                       "state_before": before.get("extra", {}).get("update_state"),
                       "slot_before": before.get("extra", {}).get("slot"),
                       "version_before": before.get("agent_version")}
                # 4. the boot from the same disk.
                vm.boot(fresh=False)
                t0 = time.monotonic()
                online = vm.wait_online(boot_limit_s)
                body = online.verified.body
                cut.update(online_after_s=round(time.monotonic() - t0, 1),
                           version_after=body["agent_version"],
                           slot_after=body.get("extra", {}).get("slot"),
                           state_after=body.get("extra", {}).get("update_state"))
                report["cuts"].append(cut)
                print(json.dumps(cut), flush=True)
            # Let the last update settle, then one more ticket.
            vm.recorder.wait(lambda m: m.verified is not None and m.kind == "state"
                             and m.verified.body["status"] == "online"
                             and m.verified.body.get("extra", {}).get("update_state")
                             in ("committed", "rolled_back", "failed", "idle"),
                             1200, "the last update settled")
            printed += 1
            _ticket(vm, consumer, printed, "after the campaign")
            uids = [t.qr_codes[0] for t in printer.tickets]
            deadline = time.monotonic() + 120
            while not all(consumer.ledger.lookup(u) for u in uids):
                if time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            missing = [u for u in uids if not consumer.ledger.lookup(u)]
            final = _state(vm)
            by_state: dict[str, int] = {}
            for c in report["cuts"]:
                by_state[str(c["state_before"])] = by_state.get(str(c["state_before"]), 0) + 1
            report.update(tickets_printed=len(uids), tickets_in_ledger=len(uids) - len(missing),
                          tickets_lost=len(missing), distinct_tickets=len(set(uids)),
                          final_version=final.get("agent_version"),
                          final_slot=final.get("extra", {}).get("slot"),
                          final_update_state=final.get("extra", {}).get("update_state"),
                          boots_online=sum(1 for c in report["cuts"] if c["version_after"]),
                          cuts_by_state=by_state,
                          slot_changed_by_cut=sum(1 for c in report["cuts"]
                                                  if c["slot_after"] != c["slot_before"]),
                          online_after_cut_max_s=max((c["online_after_s"] for c in report["cuts"]),
                                                     default=None),
                          update_events=sorted(set(_update_events(vm))))
        finally:
            if vm.running:
                try:       # what the guest says, for a failed campaign's post-mortem
                    for name, argv in (("update.json", ["/bin/cat", f"{AB_ROOT}/update.json"]),
                                       ("journal", ["/bin/journalctl", "-u", "hallkiosk",
                                                    "--no-pager", "-n", "80"])):
                        res = vm.exec(argv, timeout_s=30)
                        report.setdefault("guest", {})[name] = (res.stdout + res.stderr)[-6000:]
                except Exception as exc:  # a post-mortem must not hide the failure itself
                    report.setdefault("guest", {})["error"] = str(exc)
            (out / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True))
            vm.close()
            ops.stop()
            server.stop()
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qemu.update_campaign")
    p.add_argument("--out", type=Path, default=Path("qemu-out/update"))
    p.add_argument("--cuts", type=int, default=20)
    p.add_argument("--seed", type=int, default=15)
    p.add_argument("--max-delay-s", type=float, default=None,
                   help="cut at most this long after the command (default: 1.1 x the "
                        "baseline update's duration)")
    p.add_argument("--rate-kib-s", type=int, default=32,
                   help="the repository's bundle download rate (a hall Wi-Fi's pace)")
    p.add_argument("--boot-limit-s", type=float, default=180.0)
    args = p.parse_args(argv)
    report = run(args.out, cuts=args.cuts, seed=args.seed, max_delay_s=args.max_delay_s,
                 boot_limit_s=args.boot_limit_s, rate_kib_s=args.rate_kib_s)
    ok = (len(report["cuts"]) == args.cuts and report.get("tickets_lost") == 0
          and report.get("distinct_tickets") == report.get("tickets_printed")
          and report.get("boots_online") == args.cuts)
    print(json.dumps({k: v for k, v in report.items() if k != "cuts"}, indent=2, sort_keys=True))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
