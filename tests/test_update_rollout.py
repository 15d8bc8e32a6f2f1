"""Rollouts in waves (ops.rollout): canaries first; a canary that rolls back, fails its
update, stops ticketing well, or never commits halts the rollout before anyone else gets
the command. Driven with a manual clock and the kiosks' snapshots as the monitor builds
them."""

from __future__ import annotations

import dataclasses

import pytest

from edge.clock import ManualClock
from ops.fleet import KioskSnapshot
from ops.rollout import Rollout, RolloutPlan, drive, plan_waves

DEVICES = [f"k{i:02d}" for i in range(1, 9)]


def snap(device: str, **kw) -> KioskSnapshot:
    base = dict(hall="h1", device=device, status="online", status_reason=None, status_age_s=1.0,
                last_seen_age_s=1.0, agent_version="0.1.0", session=1, temp_mC=None,
                load1_x100=None, outbox_depth=0, outbox_oldest_s=None, paper="ok", net_up=True,
                faults=(), warnings=(), last_ticket_id=None, last_ticket_age_s=None, tickets=0,
                messages={}, lost=0, missing=0, replays=0, bad_signatures=0, malformed=0,
                last_event=None, last_cmd_result=None, peripherals={}, slot="a",
                update_state="idle")
    return KioskSnapshot(**{**base, **kw})


class Fleet:
    """The kiosks as ops see them, moved by the test."""

    def __init__(self) -> None:
        self.kiosks = {d: snap(d) for d in DEVICES}
        self.sent: list[tuple[str, str]] = []     # device, nonce

    def set(self, device: str, **kw) -> None:
        self.kiosks[device] = dataclasses.replace(self.kiosks[device], **kw)

    def commit(self, device: str) -> None:
        self.set(device, update_state="committed", agent_version="0.2.0", slot="b")

    def snaps(self):
        return list(self.kiosks.values())


def _rollout(clock, **kw) -> Rollout:
    plan = RolloutPlan(target="hallkiosk-0.2.0.tar", version="0.2.0", hall="h1",
                       waves=plan_waves(DEVICES, canaries=["k01", "k02"], wave_pct=50),
                       soak_s=60, retry_s=10, wave_deadline_s=600, min_success_pct=90,
                       min_tickets=10, **kw)
    return Rollout(plan, clock=clock)


def _answer(r: Rollout, decision, status="done", **detail):
    for dev, _args, nonce in decision.send:
        r.on_result(dev, {"nonce": nonce, "status": "accepted", "detail": {}})
        r.on_result(dev, {"nonce": nonce, "status": status, "reason": None, "detail": detail})


def test_waves_plan():
    waves = plan_waves(DEVICES, canaries=2, wave_pct=50)
    assert waves == (("k01", "k02"), ("k03", "k04", "k05"), ("k06", "k07", "k08"))
    with pytest.raises(ValueError):
        plan_waves(DEVICES, canaries=["zz"])


def test_a_healthy_rollout_goes_wave_by_wave():
    clock, fleet = ManualClock(), Fleet()
    r = _rollout(clock)
    d = r.step(fleet.snaps())
    assert sorted(dev for dev, *_ in d.send) == ["k01", "k02"]       # canaries only
    assert d.send[0][1] == {"target": "hallkiosk-0.2.0.tar", "version": "0.2.0"}
    _answer(r, d)
    for dev in ("k01", "k02"):
        fleet.commit(dev)
        fleet.set(dev, tickets=20)
    assert r.step(fleet.snaps()).send == ()          # committed, soaking
    clock.advance(61)
    d = r.step(fleet.snaps())
    assert d.wave == 1 and d.state == "running"
    d = r.step(fleet.snaps())
    assert sorted(dev for dev, *_ in d.send) == ["k03", "k04", "k05"]
    _answer(r, d)
    for wave in (("k03", "k04", "k05"), ("k06", "k07", "k08")):
        for dev in wave:
            fleet.commit(dev)
        r.step(fleet.snaps())
        clock.advance(61)
        d = r.step(fleet.snaps())
        if d.state == "running":
            d = r.step(fleet.snaps())
            _answer(r, d)
    assert d.state == "done"


def test_a_canary_that_rolls_back_halts_the_rollout():
    clock, fleet = ManualClock(), Fleet()
    r = _rollout(clock)
    d = r.step(fleet.snaps())
    _answer(r, d)
    fleet.commit("k01")
    fleet.set("k02", update_state="rolled_back")
    d = r.step(fleet.snaps())
    assert d.state == "halted" and "k02: update rolled_back" in d.reason
    clock.advance(3600)
    assert r.step(fleet.snaps()).send == ()          # nobody else is ever sent anything


def test_a_refused_release_halts_with_the_kiosks_code():
    clock, fleet = ManualClock(), Fleet()
    r = _rollout(clock)
    _answer(r, r.step(fleet.snaps()))
    fleet.set("k01", update_state="failed", update_code="tampered")
    d = r.step(fleet.snaps())
    assert d.state == "halted" and "(tampered)" in d.reason


def test_a_canary_whose_ticket_success_drops_halts_the_rollout():
    clock, fleet = ManualClock(), Fleet()
    fleet.set("k01", tickets=100, ticket_failures=1)        # before: fine
    r = _rollout(clock)
    _answer(r, r.step(fleet.snaps()))
    fleet.commit("k01")
    fleet.commit("k02")
    fleet.set("k01", tickets=108, ticket_failures=4)        # since the wave: 8 of 11 = 73 %
    d = r.step(fleet.snaps())
    assert d.state == "halted" and "ticket success 8/11" in d.reason


def test_a_canary_that_never_commits_halts_at_the_deadline():
    clock, fleet = ManualClock(), Fleet()
    r = _rollout(clock)
    _answer(r, r.step(fleet.snaps()))
    fleet.commit("k01")
    fleet.set("k02", update_state="trial", agent_version="0.2.0")
    clock.advance(601)
    d = r.step(fleet.snaps())
    assert d.state == "halted" and "k02" in d.reason and "deadline" in d.reason


def test_busy_kiosks_are_asked_again_and_a_failed_command_halts():
    clock, fleet = ManualClock(), Fleet()
    r = _rollout(clock)
    d = r.step(fleet.snaps())
    first = {dev: nonce for dev, _a, nonce in d.send}
    _answer(r, d, status="failed", code="busy")
    assert r.step(fleet.snaps()).send == ()
    clock.advance(11)
    d = r.step(fleet.snaps())
    again = {dev: nonce for dev, _a, nonce in d.send}
    assert sorted(again) == ["k01", "k02"] and all(again[k] != first[k] for k in again)
    r.on_result("k01", {"nonce": again["k01"], "status": "refused", "reason": "expired: x",
                        "detail": {}})
    d = r.step(fleet.snaps())
    assert d.state == "halted" and "k01: command refused" in d.reason


def test_drive_sends_through_the_given_client():
    clock, fleet = ManualClock(), Fleet()
    r = _rollout(clock)
    sent, results = [], []

    def send(dev, name, args, nonce):
        sent.append((dev, name))
        results.append((dev, {"nonce": nonce, "status": "done", "reason": None, "detail": {}}))
        fleet.commit(dev)

    def take():
        out = list(results)
        results.clear()
        return out

    def wait(s):
        clock.advance(s)
        return False

    d = drive(r, send=send, snapshots=fleet.snaps, results=take, wait=wait, turn_s=30)
    assert d.state == "done"
    assert [dev for dev, _ in sent][:2] == ["k01", "k02"] and len(sent) == 8
    assert {name for _, name in sent} == {"update"}


def _rollout_conf(tmp_path, halls=("hall1",)):
    """An ops.toml for ``ops rollout`` on an emulated hall's PKI; nothing listens on its port
    (the refusals below happen before any connection)."""
    from cryptography.hazmat.primitives.serialization import Encoding

    from provisioning.emulated import provision_emulated_hall

    mats = provision_emulated_hall(tmp_path / "hall", ["k1"], hall="hall1")
    certs = tmp_path / "certs.pem"
    certs.write_bytes(b"".join(c.public_bytes(Encoding.PEM) for c in mats.certs()))
    mon = mats["auditor"]
    conf = tmp_path / "ops.toml"
    conf.write_text(f"""
[ops]
instance = "roll"
halls = {list(halls)!r}
state_dir = "{tmp_path / 'state'}"
[broker]
port = 1
tls_ca_file = "{mats.chain_file}"
tls_cert_file = "{mon.cert_path}"
tls_key_file = "{mon.key_path}"
[keys]
ca_chain = "{mats.chain_file}"
certs = ["{certs}"]
crl = "{mats.crl_file}"
[ledger]
enabled = false
[metrics]
enabled = false
""".replace("'", '"'))
    return mats, conf


@pytest.mark.parametrize("case", ["monitor_cert", "two_halls", "other_hall"])
def test_ops_rollout_refuses_what_cannot_be_right_before_connecting(tmp_path, capsys, case):
    from hallkiosk.cli import main

    mats, conf = _rollout_conf(tmp_path, ("hall1", "hall2") if case == "two_halls" else ("hall1",))
    ident = mats["auditor"] if case == "monitor_cert" else mats["ops"]
    argv = ["ops", "rollout", "--config", str(conf), "--cert", str(ident.cert_path),
            "--key", str(ident.key_path), "--target", "hallkiosk-0.2.0.tar", "--version", "0.2.0"]
    if case == "other_hall":
        argv += ["--hall", "hall9"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    expected = {"monitor_cert": "role 'monitor'; commands need an ops certificate",
                "two_halls": "watches 2 halls; name one with --hall",
                "other_hall": "hall 'hall9' is not one ops.toml watches"}[case]
    assert expected in err, err
