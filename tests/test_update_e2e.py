"""An update across the whole kiosk: a signed ``update`` command over the hall's mTLS
Mosquitto to an agent running from slot a of a real A/B layout, the download from the
hall's TUF repository over HTTPS, the install into slot b, the switch when idle, a restart
(a small supervisor plays systemd: the guard, then ``current/bin/python``), the new
slot's health gate, the commit, and a ticket issued by the new version. And a tampered
release refused with an event and the state ops see."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import threading
from pathlib import Path

import pytest

from edge.update.bundle import install, sha256_file
from edge.update.slots import Slots
from emulator.idcard import Card
from provisioning.opsclient import OpsClient
from provisioning.release import ReleaseRepository, RepositoryServer
from tests.conftest import wait_for
from tests.test_e2e_ticket import Recorder, _event_names
from tests.test_update_slots import BASE_PYTHON, SLOTS_PY, TARGET, bundles, tls  # noqa: F401

pytestmark = pytest.mark.e2e


class Supervisor:
    """systemd's part on a kiosk: before each start the guard, then the agent from
    whatever slot ``current`` points at; Restart=always."""

    def __init__(self, root: Path, config: Path, cwd: Path) -> None:
        self.root, self.config, self.cwd = root, config, cwd
        self.starts: list[str] = []
        self.proc: subprocess.Popen | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Supervisor:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            subprocess.run([BASE_PYTHON, "-I", str(SLOTS_PY), "guard", "--root", str(self.root)],
                           check=True, capture_output=True)
            self.starts.append(os.readlink(self.root / "current"))
            self.proc = subprocess.Popen(
                [str(self.root / "current" / "bin" / "python"), "-m", "hallkiosk.cli", "agent",
                 "--config", str(self.config)], cwd=self.cwd,
                env={**os.environ, "PYTHONOPTIMIZE": "2"},
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.proc.wait()

    def stop(self) -> None:
        self._stop.set()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)
        self._thread.join(20)


@pytest.fixture
def rig(hall, tmp_path, tls, bundles):  # noqa: F811 (fixtures imported above)
    cert, key, chain = tls
    kiosk = hall.add_kiosk("u1", services=(("A", "Citizen card", "A"),))
    root = tmp_path / "opt"
    slots = Slots(root)
    b0 = bundles["0.1.0"]
    site = Path(sysconfig.get_path("purelib"))
    install(slots, "a", b0, sha256_file(b0), python=BASE_PYTHON, shared_site=site)
    slots.switch("a")
    repo = ReleaseRepository(tmp_path / "repo", tmp_path / "keys")
    repo.init()
    repo.add_target(bundles["0.2.0"], name=TARGET, custom={"version": "0.2.0"})
    server = RepositoryServer(tmp_path / "repo", cert, key, port=0).start()
    shutil.copy(tmp_path / "repo" / "metadata" / "root.json", tmp_path / "update-root.json")
    (kiosk.config_path.parent / "update.toml").write_text(
        "[update]\n"
        f'root = "{root}"\nrepository = "{server.url}"\nca_file = "{chain}"\n'
        f'trusted_root = "{tmp_path / "update-root.json"}"\npython = "{BASE_PYTHON}"\n'
        f'health_deadline_s = 120\nshared_site = "{site}"\n')
    ops = OpsClient(ops_id="ops", hall=hall.hall_id, key=hall.pki["ops"].key,
                    keyring=hall.keyring, tls=hall.tls_for("ops"), host="127.0.0.1",
                    port=hall.broker.port, state_dir=tmp_path / "ops-state").start()
    sup = Supervisor(root, kiosk.config_path, tmp_path)
    yield kiosk, repo, ops, sup, slots
    sup.stop()
    ops.stop()
    server.stop()


def _state(rec) -> dict:
    states = rec.of_kind("/state")
    return json.loads(states[-1].payload)["body"] if states else {}


def test_signed_update_over_mqtt_switches_commits_and_issues_tickets(hall, rig):
    kiosk, _repo, ops, sup, slots = rig
    rec = Recorder(hall, f"hall/{hall.hall_id}/kiosk/u1/#")
    hall.start_consumer()
    sup.start()
    wait_for(lambda: _state(rec).get("status") == "online", timeout_s=30, what="online")
    st = _state(rec)
    assert st["agent_version"] == "0.1.0" and st["extra"]["slot"] == "a"

    kiosk.reader.present(Card.valid())
    assert kiosk.printer.wait_for_tickets(1, 15)
    wait_for(lambda: rec.of_kind("/ticket/ack"), timeout_s=15, what="first ticket acked")

    _, _, nonce = ops.send("u1", "update", {"target": TARGET, "version": "0.2.0"}, ttl_s=120)
    answers = ops.wait_result(nonce, count=2, timeout_s=15)
    assert [a.body["status"] for a in answers] == ["accepted", "done"], answers
    assert answers[1].body["detail"]["to_slot"] == "b"

    wait_for(lambda: _state(rec).get("agent_version") == "0.2.0"
             and _state(rec).get("extra", {}).get("update_state") == "committed",
             timeout_s=120, what="0.2.0 committed")
    st = _state(rec)
    assert st["status"] == "online" and st["extra"]["slot"] == "b"
    assert sup.starts[:2] == ["slots/a", "slots/b"]
    assert slots.read_state()["state"] == "committed" and slots.version("a") == "0.1.0"
    names = _event_names(rec)
    for name in ("update_installed", "update_switching", "update_committed"):
        assert name in names, names

    # The new slot serves citizens; nothing issued before was lost.
    kiosk.reader.present(Card.valid())
    assert kiosk.printer.wait_for_tickets(2, 15)
    wait_for(lambda: len(rec.of_kind("/ticket/ack")) >= 2, timeout_s=15, what="second ack")
    acked = {json.loads(m.payload)["body"]["ticket_uid"] for m in rec.of_kind("/ticket/ack")}
    assert len(acked) == 2


def test_tampered_release_is_refused_with_an_event_and_the_kiosk_keeps_its_slot(hall, rig):
    kiosk, _repo, ops, sup, slots = rig
    (served,) = _repo.targets_dir.glob(f"*.{TARGET}")
    data = bytearray(served.read_bytes())
    data[500] ^= 0x55
    served.write_bytes(bytes(data))
    rec = Recorder(hall, f"hall/{hall.hall_id}/kiosk/u1/#")
    sup.start()
    wait_for(lambda: _state(rec).get("status") == "online", timeout_s=30, what="online")
    _, _, nonce = ops.send("u1", "update", {"target": TARGET}, ttl_s=120)
    assert [a.body["status"] for a in ops.wait_result(nonce, count=2, timeout_s=15)] == \
        ["accepted", "done"]
    wait_for(lambda: "update_refused" in _event_names(rec), timeout_s=60, what="refusal event")
    (ev,) = [json.loads(m.payload)["body"] for m in rec.of_kind("/event")
             if json.loads(m.payload)["body"]["name"] == "update_refused"]
    assert ev["severity"] == "warning" and ev["detail"]["code"] == "tampered"
    wait_for(lambda: _state(rec).get("extra", {}).get("update_code") == "tampered",
             timeout_s=15, what="state shows the refusal")
    assert slots.active() == "a" and sup.starts == ["slots/a"]


def test_a_release_that_fails_its_health_check_rolls_back_by_itself(hall, rig):
    kiosk, _repo, ops, sup, slots = rig
    rec = Recorder(hall, f"hall/{hall.hall_id}/kiosk/u1/#")
    sup.start()
    wait_for(lambda: _state(rec).get("status") == "online", timeout_s=30, what="online")
    # The printer stops answering: no slot can pass the printer self-test. The running slot
    # keeps its job (degraded); the new one must not be committed.
    kiosk.printer.set_silent(True)
    _, _, nonce = ops.send("u1", "update", {"target": TARGET, "deadline_s": 30}, ttl_s=120)
    assert [a.body["status"] for a in ops.wait_result(nonce, count=2, timeout_s=15)] == \
        ["accepted", "done"]
    wait_for(lambda: "update_rolled_back" in _event_names(rec), timeout_s=120,
             what="rolled back")
    (ev,) = [json.loads(m.payload)["body"] for m in rec.of_kind("/event")
             if json.loads(m.payload)["body"]["name"] == "update_rolled_back"]
    assert ev["severity"] == "fault" and "printer" in ev["detail"]["reason"]
    assert "update_committed" not in _event_names(rec)
    wait_for(lambda: _state(rec).get("agent_version") == "0.1.0"
             and _state(rec).get("extra", {}).get("update_state") == "rolled_back"
             and len(sup.starts) >= 3, timeout_s=60, what="back on slot a")
    assert sup.starts[:3] == ["slots/a", "slots/b", "slots/a"]
    assert slots.active() == "a" and _state(rec)["extra"]["slot"] == "a"
    kiosk.printer.set_silent(False)
