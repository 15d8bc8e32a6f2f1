"""An update across the whole kiosk: a signed ``update`` command over the hall's mTLS
Mosquitto to an agent running from slot a of a real A/B layout, the download from the
hall's TUF repository over HTTPS, the install into slot b, the switch when idle, a restart
(a small supervisor plays systemd: the guard, then ``current/bin/python``), the new
slot's health gate, the commit, and a ticket issued by the new version; a tampered
release refused with an event and the state ops see; and a rollout whose canary's new slot
fails its printer self-test: rolled back by itself, the wave halted, the rest never sent."""

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
from provisioning.release import ReleaseRepository, RepositoryServer
from tests.conftest import wait_for
from tests.test_e2e_commands import ops  # noqa: F401 (the signed ops client fixture)
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


def _repository(tmp_path, tls, bundles):  # noqa: F811
    cert, key, chain = tls
    repo = ReleaseRepository(tmp_path / "repo", tmp_path / "keys")
    repo.init()
    repo.add_target(bundles["0.2.0"], name=TARGET, custom={"version": "0.2.0"})
    server = RepositoryServer(tmp_path / "repo", cert, key, port=0).start()
    shutil.copy(tmp_path / "repo" / "metadata" / "root.json", tmp_path / "update-root.json")
    return repo, server


def _updatable_kiosk(hall, tmp_path, name, server, chain, bundles):  # noqa: F811
    """An emulated kiosk whose agent runs from slot a of its own A/B root, with
    update.toml next to its agent.toml, and its supervisor (not started)."""
    kiosk = hall.add_kiosk(name, services=(("A", "Citizen card", "A"),))
    root = tmp_path / f"opt-{name}"
    slots = Slots(root)
    b0 = bundles["0.1.0"]
    site = Path(sysconfig.get_path("purelib"))
    install(slots, "a", b0, sha256_file(b0), python=BASE_PYTHON, shared_site=site)
    slots.switch("a")
    (kiosk.config_path.parent / "update.toml").write_text(
        "[update]\n"
        f'root = "{root}"\nrepository = "{server.url}"\nca_file = "{chain}"\n'
        f'trusted_root = "{tmp_path / "update-root.json"}"\npython = "{BASE_PYTHON}"\n'
        f'health_deadline_s = 120\nshared_site = "{site}"\n')
    return kiosk, slots, Supervisor(root, kiosk.config_path, tmp_path)


@pytest.fixture
def rig(hall, tmp_path, tls, bundles, ops):  # noqa: F811 (fixtures imported above)
    repo, server = _repository(tmp_path, tls, bundles)
    kiosk, slots, sup = _updatable_kiosk(hall, tmp_path, "u1", server, tls[2], bundles)
    yield kiosk, repo, ops, sup, slots
    sup.stop()
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


def test_a_canary_failing_its_health_check_rolls_back_and_halts_the_wave(hall, tmp_path, tls,
                                                                       bundles, capsys):  # noqa: F811
    """`hallkiosk ops rollout` as ops run it: its monitor (ops.toml, mTLS) watches the kiosks,
    its ops client signs the update commands, the rollout halts when the canary rolls back."""
    from cryptography.hazmat.primitives.serialization import Encoding

    from hallkiosk.cli import main
    from ops.fleet import Fleet
    from mqtt_topics.envelope import verify
    from tests.test_ops_monitor import _ops_toml, enroll_services

    enroll_services(hall, ("mon-roll", "monitor"))      # before the kiosks: a broker restart
    repo, server = _repository(tmp_path, tls, bundles)
    kiosks = {n: _updatable_kiosk(hall, tmp_path, n, server, tls[2], bundles)
              for n in ("w1", "w2")}
    try:
        for _k, _s, sup in kiosks.values():
            sup.start()
        rec = Recorder(hall, f"hall/{hall.hall_id}/kiosk/+/state")
        wait_for(lambda: len({m.topic for m in rec.messages}) == 2, timeout_s=40,
                 what="both kiosks online")
        kiosks["w1"][0].printer.set_silent(True)          # the canary cannot pass its gate
        certs = tmp_path / "certs.pem"
        certs.write_bytes(b"".join(c.public_bytes(Encoding.PEM) for c in hall.pki.certs()))
        conf = _ops_toml(tmp_path / "ops.toml", hall, hall.pki["mon-roll"], certs, "rollout-mon")
        ops_id = hall.pki["ops"]
        rc = main(["ops", "rollout", "--config", str(conf), "--cert", str(ops_id.cert_path),
                   "--key", str(ops_id.key_path), "--target", TARGET, "--version", "0.2.0",
                   "--canaries", "1", "--soak-s", "5", "--wave-deadline-s", "150",
                   "--health-deadline-s", "30", "--wait-s", "1"])
        printed = capsys.readouterr().out
        assert rc == 1, printed
        assert "wave 0: w1" in printed and "wave 1: w2" in printed
        assert "halted in wave 0" in printed and "w1: update rolled_back" in printed
        assert kiosks["w2"][1].read_state()["state"] == "idle"   # never sent a command
        assert kiosks["w1"][1].active() == "a"
        fleet, ring = Fleet(heartbeat_timeout_s=None), hall.pki.keyring()  # with mon-roll's key
        for m in list(hall.auditor.messages):
            if "/kiosk/w1/" in m.topic and not m.topic.endswith(("/cmd", "/alert")):
                fleet.apply(verify(m.payload, m.topic, ring))
        snap = fleet.kiosk(hall.hall_id, "w1")
        assert (snap.slot, snap.update_state, snap.agent_version) == ("a", "rolled_back", "0.1.0")
        # The new slot's own agent rolled back at its deadline, naming the failed check, and
        # the next start was the old slot again.
        ev_rec = Recorder(hall, f"hall/{hall.hall_id}/kiosk/w1/event")
        names = _event_names(ev_rec)
        assert "update_switching" in names and "update_committed" not in names
        (ev,) = [json.loads(m.payload)["body"] for m in ev_rec.messages
                 if json.loads(m.payload)["body"]["name"] == "update_rolled_back"]
        assert ev["severity"] == "fault" and "printer" in ev["detail"]["reason"]
        assert kiosks["w1"][2].starts[:3] == ["slots/a", "slots/b", "slots/a"]
    finally:
        for _k, _s, sup in kiosks.values():
            sup.stop()
        server.stop()
