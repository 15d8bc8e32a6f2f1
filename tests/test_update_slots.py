"""A/B slots, the update state machine, the boot guard, the agent's update rules, and
power cuts at every step.

The slots are real venvs built from real bundles (a hallkiosk wheel built from this
checkout with its version bumped), the switch is the real symlink rename, the steps run
as separate processes that SIGKILL themselves at named crash points (HALLKIOSK_CRASH_AT,
as edge.failpoints), and the boot guard runs as deploy's unit runs it: the standalone
slots.py under the base interpreter. The repository is the real TUF one over HTTPS."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from edge.store import KioskStore, TicketNumber
from edge.update.bundle import build_bundle, install, sha256_file
from edge.update.kiosk import KioskUpdates, KioskView, check_args
from edge.update.errors import UpdateRefused
from edge.update.machine import UpdateConfig
from edge.update.slots import Slots, guard
from provisioning.ca import create_hall_ca, load_hall_ca
from provisioning.enroll import issue_broker
from provisioning.release import ReleaseRepository, RepositoryServer
from tests.conftest import wait_for

REPO = Path(__file__).resolve().parents[1]
SLOTS_PY = REPO / "edge" / "update" / "slots.py"
BASE_PYTHON = getattr(sys, "_base_executable", sys.executable)
PACKAGES = ("hallkiosk", "edge", "boards", "mqtt_topics", "provisioning", "emulator", "ops",
            "city")
TARGET = "hallkiosk-0.2.0.tar"
#: Every crash point of the update path, in the order the steps reach them.
CRASH_POINTS = ("update.prepare_begin", "update.download_chunk", "update.download_complete",
                "update.install_wiped", "update.install_venv", "update.install_pip",
                "update.installed", "update.switch_begin", "update.switched", "update.trial",
                "update.commit_begin", "update.committed")


def _wheel(out: Path, version: str) -> Path:
    src = out / f"src-{version}"
    src.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for pkg in PACKAGES:
        shutil.copytree(REPO / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    py = src / "pyproject.toml"
    py.write_text(py.read_text().replace('version = "0.1.0"', f'version = "{version}"', 1))
    init = src / "hallkiosk" / "__init__.py"
    init.write_text(init.read_text().replace('__version__ = "0.1.0"',
                                             f'__version__ = "{version}"', 1))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "--disable-pip-version-check", "-w", str(out),
                    str(src)], check=True, capture_output=True)
    (whl,) = out.glob(f"hallkiosk-{version}-*.whl")
    return whl


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    d = tmp_path_factory.mktemp("bundles")
    return {v: build_bundle(d / f"hallkiosk-{v}.tar", [_wheel(d, v)], v)
            for v in ("0.1.0", "0.2.0")}


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    d = tmp_path_factory.mktemp("ca")
    create_hall_ca(d / "ca", "h1")
    issue_broker(load_hall_ca(d / "ca"), d / "srv", name="updates", ip_addresses=("127.0.0.1",))
    return d / "srv" / "broker.crt", d / "srv" / "broker.key", d / "srv" / "chain.pem"


def _body(ticket: TicketNumber) -> dict:
    return {"ticket_uid": ticket.uid("k07"), "ticket_id": ticket.display}


class Kiosk:
    """A kiosk's disk: /opt/hallkiosk (slot a = 0.1.0, current -> a), its state dir with
    two unacknowledged tickets, its update.toml; and the hall's repository offering 0.2.0."""

    def __init__(self, tmp: Path, tls, bundles) -> None:
        cert, key, chain = tls
        self.tmp = tmp
        self.root = tmp / "opt"
        self.slots = Slots(self.root)
        b0 = bundles["0.1.0"]
        install(self.slots, "a", b0, sha256_file(b0), python=BASE_PYTHON,
                shared_site=Path(sysconfig.get_path("purelib")))
        self.slots.switch("a")
        self.repo = ReleaseRepository(tmp / "repo", tmp / "keys")
        self.repo.init()
        self.repo.add_target(bundles["0.2.0"], name=TARGET, custom={"version": "0.2.0"})
        self.server = RepositoryServer(tmp / "repo", cert, key, port=0).start()
        shutil.copy(tmp / "repo" / "metadata" / "1.root.json", tmp / "update-root.json")
        self.config = tmp / "etc" / "update.toml"
        self.config.parent.mkdir()
        self.config.write_text(
            "[update]\n"
            f'root = "{self.root}"\nrepository = "{self.server.url}"\n'
            f'ca_file = "{chain}"\ntrusted_root = "{tmp / "update-root.json"}"\n'
            f'python = "{BASE_PYTHON}"\nhealth_deadline_s = 60\nmax_trial_boots = 3\n'
            f'shared_site = "{sysconfig.get_path("purelib")}"\n')
        with KioskStore(tmp / "state" / "kiosk.sqlite") as store:
            self.tickets = [store.commit_ticket("A", "07", _body).uid for _ in range(2)]

    def cfg(self) -> UpdateConfig:
        return UpdateConfig.load(self.config)

    def step(self, command: str, *extra: str, crash: str | None = None) -> int:
        """One update step as its own process; -9 when it cut its own power."""
        env = {**os.environ, "HALLKIOSK_CRASH_AT": crash or ""}
        r = subprocess.run([sys.executable, "-m", "edge.update", command, "--config",
                            str(self.config), *extra], env=env, cwd=self.tmp,
                           capture_output=True, text=True, timeout=120)
        return r.returncode

    def boot(self) -> str:
        """What a power-on does before the agent: the guard (system Python, the file alone),
        then the current slot's interpreter must import the agent. Returns its version."""
        subprocess.run([BASE_PYTHON, "-I", str(SLOTS_PY), "guard", "--root", str(self.root)],
                       check=True, capture_output=True, timeout=30)
        r = subprocess.run([str(self.root / "current" / "bin" / "python"), "-c",
                            "import edge.agent, hallkiosk; print(hallkiosk.__version__)"],
                           cwd=self.tmp, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, f"current slot does not run: {r.stderr[-300:]}"
        return r.stdout.strip()

    def state(self) -> dict:
        return self.slots.read_state()

    def tickets_kept(self) -> list[str]:
        with KioskStore(self.tmp / "state" / "kiosk.sqlite") as store:
            return [e.uid for e in store.pending()]

    def close(self) -> None:
        self.server.stop()


@pytest.fixture
def kiosk(tmp_path, tls, bundles):
    k = Kiosk(tmp_path, tls, bundles)
    yield k
    k.close()


def _finish(k: Kiosk, healthy: bool = True, crash: str | None = None) -> list[str]:
    """Drive the update as the agent would after each (re)boot, until it settles. Returns
    the versions each boot came up with."""
    booted = []
    for _ in range(12):
        booted.append(k.boot())
        st = k.state()["state"]
        if st == "preparing":
            k.step("prepare", crash=crash)
        elif st == "installed":
            k.step("switch", crash=crash)
        elif st == "trial" and healthy:
            k.step("commit", crash=crash)
        elif st == "trial":
            continue                                  # the new slot never passes: reboot
        else:
            return booted
        crash = None                                 # one cut per run
    raise AssertionError(f"update did not settle: {k.state()}")


# -- the happy path and the mechanism ------------------------------------------------------
def test_update_installs_switches_and_commits_keeping_the_old_slot(kiosk):
    assert kiosk.step("request", "--target", TARGET, "--version", "0.2.0") == 0
    assert kiosk.step("prepare") == 0
    st = kiosk.state()
    assert st["state"] == "installed" and kiosk.slots.active() == "a"
    assert kiosk.slots.version("b") == "0.2.0"
    # -OO bytecode is in the new slot: the unit's agent never compiles at start.
    assert list((kiosk.root / "slots" / "b").rglob("hallkiosk/__pycache__/cli.*.opt-2.pyc"))
    assert kiosk.step("switch") == 0
    assert os.readlink(kiosk.root / "current") == "slots/b"
    assert kiosk.state()["state"] == "trial"
    assert kiosk.boot() == "0.2.0"
    assert kiosk.step("commit") == 0
    st = kiosk.state()
    assert st["state"] == "committed" and st["committed_slot"] == "b"
    assert kiosk.slots.version("a") == "0.1.0"                  # the old slot is kept
    assert kiosk.tickets_kept() == kiosk.tickets


def test_a_tampered_bundle_fails_the_update_with_its_code(kiosk):
    (served,) = (kiosk.tmp / "repo" / "targets").glob(f"*.{TARGET}")
    data = bytearray(served.read_bytes())
    data[-10] ^= 1
    served.write_bytes(bytes(data))
    kiosk.step("request", "--target", TARGET)
    assert kiosk.step("prepare") == 1
    st = kiosk.state()
    assert (st["state"], st["code"]) == ("failed", "tampered")
    assert kiosk.slots.marker("b") is None and kiosk.slots.active() == "a"


def test_an_unhealthy_trial_is_rolled_back_by_the_guard(kiosk):
    kiosk.step("request", "--target", TARGET)
    kiosk.step("prepare")
    kiosk.step("switch")
    # The new slot's agent never passes its health check: each start is counted by the
    # guard, and the one past max_trial_boots goes back to slot a.
    booted = _finish(kiosk, healthy=False)
    st = kiosk.state()
    assert st["state"] == "rolled_back" and "3 boots" in st["reason"]
    assert booted[-1] == "0.1.0" and kiosk.slots.active() == "a"
    assert kiosk.tickets_kept() == kiosk.tickets


def test_the_guard_rolls_back_after_the_deadline(kiosk):
    kiosk.step("request", "--target", TARGET)
    kiosk.step("prepare")
    kiosk.step("switch")
    st = guard(kiosk.root, now=kiosk.state()["deadline_ms"] + 1)
    assert st["state"] == "rolled_back" and "deadline" in st["reason"]
    assert kiosk.slots.active() == "a"


# -- the agent's rules (edge.update.kiosk) ---------------------------------------------------
IDLE = KioskView(ready=True, link_up=True, reader_ok=True, printer_ok=True, outbox_depth=0,
                 in_session=False)


def _view(**kw) -> KioskView:
    return dataclasses.replace(IDLE, **kw)


def test_never_updates_while_a_citizen_is_in_session_or_a_ticket_is_unacknowledged(kiosk):
    up = KioskUpdates(kiosk.cfg(), slot="a", spawn=lambda argv: None)
    args = {"target": TARGET, "version": "0.2.0"}
    status, reason, detail = up.request(args, _view(in_session=True), "n1")
    assert (status, detail["code"]) == ("failed", "busy") and "session" in reason
    status, reason, detail = up.request(args, _view(outbox_depth=2), "n1")
    assert (status, detail["code"]) == ("failed", "busy") and "unacknowledged" in reason
    assert kiosk.state()["state"] == "idle"
    # Accepted when idle; then a citizen arrives while it installs: the switch waits.
    assert up.request(args, IDLE, "n1")[0] == "done"
    assert kiosk.step("prepare") == 0
    t = up.tick(_view(in_session=True))
    assert t.exit_reason is None and kiosk.slots.active() == "a"
    t = up.tick(_view(outbox_depth=1))
    assert t.exit_reason is None and kiosk.slots.active() == "a"
    t = up.tick(IDLE)
    assert t.exit_reason and "slot b" in t.exit_reason
    assert kiosk.slots.active() == "b" and kiosk.state()["state"] == "trial"
    assert up.fields()["slot"] == "b"


def test_the_new_slot_commits_only_when_every_check_passes(kiosk):
    kiosk.step("request", "--target", TARGET)
    kiosk.step("prepare")
    kiosk.step("switch")
    up = KioskUpdates(kiosk.cfg(), slot="b")
    for bad in ({"ready": False}, {"link_up": False}, {"reader_ok": None},
                {"printer_ok": False}, {"outbox_depth": 1}):
        t = up.tick(_view(**bad))
        assert kiosk.state()["state"] == "trial", bad
    t = up.tick(IDLE)
    assert kiosk.state()["state"] == "committed"
    assert ("update_committed", "info") == t.events[-1][:2]


def test_a_failed_health_check_rolls_back_with_an_event(kiosk):
    kiosk.step("request", "--target", TARGET)
    kiosk.step("prepare")
    kiosk.step("switch")
    deadline = kiosk.state()["deadline_ms"]
    now = [deadline - 1000]
    up = KioskUpdates(kiosk.cfg(), slot="b", wall_ms=lambda: now[0])
    assert up.tick(_view(printer_ok=False)).exit_reason is None
    now[0] = deadline + 1
    t = up.tick(_view(printer_ok=False))
    name, severity, detail = t.events[-1]
    assert (name, severity) == ("update_rolled_back", "fault") and "printer" in detail["reason"]
    assert t.exit_reason and kiosk.slots.active() == "a"
    assert kiosk.boot() == "0.1.0"


def test_refused_release_is_reported_as_an_event(kiosk):
    kiosk.repo.expiry_days["targets"] = -1
    kiosk.repo.add_target(kiosk.tmp / "update-root.json", name="x.json")   # targets now expired
    up = KioskUpdates(kiosk.cfg(), slot="a")          # the real child process
    assert up.request({"target": TARGET}, IDLE, "n2")[0] == "done"
    events = []
    wait_for(lambda: events.extend(up.tick(IDLE).events) or
             any(e[0] == "update_refused" for e in events), timeout_s=60, what="refusal event")
    (refused,) = [e for e in events if e[0] == "update_refused"]
    assert refused[2]["code"] == "expired"
    assert up.fields()["update_code"] == "expired"


def test_a_rollback_by_the_guard_is_reported_once_by_the_next_start(kiosk):
    kiosk.step("request", "--target", TARGET)
    kiosk.step("prepare")
    kiosk.step("switch")
    guard(kiosk.root, now=kiosk.state()["deadline_ms"] + 1)      # no agent ran to say so
    first = KioskUpdates(kiosk.cfg(), slot="a").tick(IDLE)
    assert [e[0] for e in first.events] == ["update_rolled_back"]
    again = KioskUpdates(kiosk.cfg(), slot="a").tick(IDLE)       # the start after that
    assert again.events == ()


class _Exited:
    """A prepare child that has already exited with ``status``: 0 (the repository was
    unreachable, the state still "preparing"), 1 (an uncaught exception), -9 (killed)."""

    def __init__(self, status: int) -> None:
        self.status = status

    def poll(self) -> int:
        return self.status


def _updates_with_children(kiosk, status: int):
    """KioskUpdates whose prepare children all exit with ``status``, on a manual clock:
    (updates, argv of each child spawned, the clock's [now_ms])."""
    spawned, now = [], [1_000_000]
    up = KioskUpdates(kiosk.cfg(), slot="a",
                      spawn=lambda argv: spawned.append(argv) or _Exited(status),
                      wall_ms=lambda: now[0])
    return up, spawned, now


def test_an_unreachable_repository_is_retried_with_backoff(kiosk):
    up, spawned, now = _updates_with_children(kiosk, 0)
    assert up.request({"target": TARGET}, IDLE, "n3")[0] == "done"
    assert len(spawned) == 1
    up.tick(IDLE)                     # the child ended, still "preparing": wait, do not respawn
    up.tick(IDLE)
    assert len(spawned) == 1
    now[0] += 15_001
    up.tick(IDLE)
    assert len(spawned) == 2
    up.tick(IDLE)                     # ended again: the wait doubles
    now[0] += 15_001
    up.tick(IDLE)
    assert len(spawned) == 2
    now[0] += 15_000
    up.tick(IDLE)
    assert len(spawned) == 3


def test_a_prepare_that_keeps_crashing_fails_the_update_with_an_event(kiosk):
    up, spawned, now = _updates_with_children(kiosk, 1)
    assert up.request({"target": TARGET}, IDLE, "n4")[0] == "done"
    events = []
    for _ in range(12):                  # a turn that sees the crash, a turn that respawns
        events += [e[0] for e in up.tick(IDLE).events]
        now[0] += 700_000                # past any backoff
    assert len(spawned) == 3             # three crashes, then no fourth try
    st = kiosk.state()
    assert (st["state"], st["code"]) == ("failed", "install_failed")
    assert "crashed 3 times" in st["reason"]
    assert "update_refused" in events and up.fields()["update_code"] == "install_failed"
    assert kiosk.slots.active() == "a"


def test_a_killed_prepare_is_resumed_not_counted_as_a_crash(kiosk):
    up, spawned, now = _updates_with_children(kiosk, -9)   # SIGKILL: a power cut of the child
    up.request({"target": TARGET}, IDLE, "n5")
    for _ in range(12):
        up.tick(IDLE)
        now[0] += 700_000
    assert len(spawned) >= 5 and kiosk.state()["state"] == "preparing"


def test_update_args_are_checked():
    assert check_args({"target": TARGET, "version": "0.2.0", "deadline_s": 120}) == \
        (TARGET, "0.2.0", 120)
    for bad in ({}, {"target": "../x"}, {"target": TARGET, "deadline_s": 5},
                {"target": TARGET, "url": "http://evil"}):
        with pytest.raises(UpdateRefused):
            check_args(bad)


# -- power cuts ----------------------------------------------------------------------------
@pytest.mark.e2e
@pytest.mark.parametrize("crash", CRASH_POINTS)
def test_power_cut_at_every_step_boots_a_working_slot_and_loses_no_ticket(kiosk, crash):
    assert kiosk.step("request", "--target", TARGET, "--version", "0.2.0") == 0
    cut = False
    for command in ("prepare", "switch", "commit"):
        if kiosk.state()["state"] == "trial":
            assert kiosk.boot() == "0.2.0"            # the agent of slot b starts, then commits
        rc = kiosk.step(command, crash=crash)
        if rc == -signal.SIGKILL:
            cut = True
            break
        assert rc == 0, (command, kiosk.state())
    assert cut, f"{crash} was never reached"
    booted = _finish(kiosk)
    st = kiosk.state()
    assert st["state"] == "committed" and kiosk.slots.active() == "b", st
    assert booted[-1] == "0.2.0"
    assert kiosk.slots.version("a") == "0.1.0"
    assert kiosk.tickets_kept() == kiosk.tickets


def test_power_cut_during_rollback_still_ends_in_the_old_slot(kiosk):
    kiosk.step("request", "--target", TARGET)
    kiosk.step("prepare")
    kiosk.step("switch")
    env = {**os.environ, "HALLKIOSK_CRASH_AT": "update.rolled_back_link"}
    r = subprocess.run([sys.executable, "-m", "edge.update", "rollback", "--config",
                        str(kiosk.config)], env=env, cwd=kiosk.tmp, timeout=60)
    assert r.returncode == -signal.SIGKILL
    assert kiosk.boot() == "0.1.0"
    assert kiosk.state()["state"] == "rolled_back"
    assert json.loads((kiosk.root / "update.json").read_text())["from_slot"] == "a"


def test_the_ab_drop_in_runs_the_guard_before_the_agent_from_current():
    from tests.test_deploy import one, parse_unit

    unit = parse_unit((REPO / "deploy" / "systemd" / "hallkiosk-ab-slots.conf").read_text())
    svc = unit["Service"]
    assert svc["ExecStart"][0] == ""                   # resets the base unit's ExecStart
    assert svc["ExecStart"][1].startswith("/opt/hallkiosk/current/bin/hallkiosk agent ")
    pre = one(svc, "ExecStartPre").split()
    assert pre[:3] == ["/usr/bin/python3", "-I", "/opt/hallkiosk/lib/hallkiosk_slots.py"]
    assert pre[3:] == ["guard", "--root", "/opt/hallkiosk"]
    assert one(svc, "ReadWritePaths") == "/opt/hallkiosk"


@pytest.mark.parametrize("bad", ["../escape.whl", "/abs.whl", "wheels/../../x", "link", "fifo"])
def test_a_bundle_member_that_is_not_a_plain_relative_file_is_refused(tmp_path, bad):
    import io
    import tarfile

    from edge.update.bundle import _extract

    path = tmp_path / "b.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo(bad)
        if bad == "link":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        elif bad == "fifo":
            info.type = tarfile.FIFOTYPE
        else:
            info.size = 1
        tar.addfile(info, io.BytesIO(b"x") if info.isfile() else None)
    with tarfile.open(path) as tar, pytest.raises(UpdateRefused, match="not a plain file"):
        _extract(tar, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path.parent / "escape.whl").exists()


def test_bundles_extract_where_tarfile_has_no_filters(tmp_path, monkeypatch):
    """Debian bookworm's Python 3.11.2 has no extraction filters (3.11.4 added them): the
    slot's install must work there too (the QEMU campaign's guest failed on it)."""
    import tarfile

    from edge.update.bundle import _extract

    wheel = tmp_path / "w" / "hallkiosk-0.2.0-py3-none-any.whl"
    wheel.parent.mkdir()
    wheel.write_bytes(b"PK not really")
    bundle = build_bundle(tmp_path / "b.tar", [wheel], "0.2.0")
    monkeypatch.delattr(tarfile, "data_filter")
    real = tarfile.TarFile.extractall

    def old_extractall(self, path=".", members=None, *, numeric_owner=False):
        return real(self, path, members, numeric_owner=numeric_owner)
    monkeypatch.setattr(tarfile.TarFile, "extractall", old_extractall)
    with tarfile.open(bundle) as tar:
        _extract(tar, tmp_path / "out")
    assert (tmp_path / "out" / "wheels" / wheel.name).read_bytes() == b"PK not really"
