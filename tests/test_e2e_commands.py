"""Signed ops commands to a running agent over mTLS: accepted ones run and are answered,
forged, replayed, expired and misaddressed ones are refused with a reason and an event."""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from emulator.idcard import Card
from provisioning.opsclient import OpsClient
from tests.conftest import wait_for
from tests.test_e2e_ticket import Recorder, _event_names, _last_state

pytestmark = pytest.mark.e2e


@pytest.fixture
def ops(hall, tmp_path):
    client = OpsClient(ops_id="ops", hall=hall.hall_id, key=hall.pki["ops"].key,
                       keyring=hall.keyring, tls=hall.tls_for("ops"), host="127.0.0.1",
                       port=hall.broker.port, state_dir=tmp_path / "ops-state").start()
    yield client
    client.stop()


def _statuses(results) -> list[str]:
    return [r.body["status"] for r in results]


def test_out_of_service_reprint_and_back(hall, ops):
    rec = Recorder(hall, f"hall/{hall.hall_id}/#")
    kiosk = hall.add_kiosk("c1", services=(("A", "Citizen card", "A"),))
    agent = kiosk.start_agent()
    wait_for(lambda: _last_state(rec)["status"] == "online", what="online")

    kiosk.reader.present(Card.valid())
    assert kiosk.printer.wait_for_tickets(1, 10)

    _, _, nonce = ops.send("c1", "out_of_service", {"reason": "cleaning"})
    assert _statuses(ops.wait_result(nonce, count=2)) == ["accepted", "done"]
    wait_for(lambda: _last_state(rec)["status"] == "out_of_service", what="out of service")
    assert "cleaning" in _last_state(rec)["reason"]
    kiosk.reader.present(Card.valid())
    wait_for(lambda: "citizen_refused" in _event_names(rec), what="citizen refused")

    _, _, nonce = ops.send("c1", "reprint_last")
    assert _statuses(ops.wait_result(nonce, count=2)) == ["accepted", "done"]
    assert kiosk.printer.wait_for_tickets(2, 10)
    assert "Reprint" in kiosk.printer.tickets[1].text and "A-01-0001" in kiosk.printer.tickets[1].text

    _, _, nonce = ops.send("c1", "back_in_service")
    assert _statuses(ops.wait_result(nonce, count=2)) == ["accepted", "done"]
    wait_for(lambda: _last_state(rec)["status"] == "online", what="back online")

    _, _, nonce = ops.send("c1", "diagnostics")
    done = ops.wait_result(nonce, count=2)[-1]
    assert done.body["status"] == "done" and done.body["detail"]["mode"] == "online"
    assert agent.store.depth() in (0, 1)


def test_replayed_expired_misaddressed_and_forged_commands_are_refused(hall, ops):
    rec = Recorder(hall, f"hall/{hall.hall_id}/#")
    kiosk = hall.add_kiosk("c2", services=(("A", "Citizen card", "A"),))
    kiosk.start_agent()
    wait_for(lambda: _last_state(rec)["status"] == "online", what="online")

    topic, payload, nonce = ops.send("c2", "diagnostics")
    assert ops.wait_result(nonce, count=2)
    # Replayed: the same signed bytes again.
    ops.link.publish(topic, payload, qos=1)
    # Refused in an answer that names no command, so the command keeps its two answers.
    replay = ops.wait_unattributed(lambda v: v.body["detail"].get("claimed_nonce") == nonce)
    assert replay is not None and replay.body["reason"].startswith("replayed")
    assert (replay.body["cmd_seq"], replay.body["nonce"]) == (None, None)
    assert [r.body["status"] for r in ops.results(nonce)] == ["accepted", "done"]
    # Expired.
    _, _, nonce = ops.send("c2", "restart", expires_at_ms=int(hall_clock_ms() - 60_000))
    res = ops.wait_result(nonce)
    assert res and res[0].body["status"] == "refused" and "expired" in res[0].body["reason"]
    # Forged: signed by a key the hall never enrolled, claiming to be ops.
    from mqtt_topics.envelope import Signer
    forger = Signer(Ed25519PrivateKey.generate(), sender="ops", boot_id="0" * 32,
                    next_seq=iter(range(10**9, 10**10)).__next__)
    body = {"name": "restart", "args": {}, "target": "c2", "nonce": "F" * 24,
            "expires_at_ms": int(hall_clock_ms() + 60_000)}
    ops.link.publish(topic, forger.seal(topic, "cmd", body), qos=1)
    wait_for(lambda: "command_refused" in _event_names(rec) and
             any(json.loads(m.payload)["body"]["detail"].get("code") == "unknown_key"
                 for m in rec.of_kind("/event")
                 if json.loads(m.payload)["body"]["name"] == "command_refused"),
             what="forged command refused as unknown_key")
    codes = {json.loads(m.payload)["body"]["detail"]["code"] for m in rec.of_kind("/event")
             if json.loads(m.payload)["body"]["name"] == "command_refused"}
    assert {"replayed", "expired", "unknown_key"} <= codes
    assert kiosk.agent is not None and not kiosk.agent._stopping.is_set()   # nothing obeyed


def hall_clock_ms() -> float:
    import time
    return time.time() * 1000


def test_commands_that_break_the_sequence_rules_are_refused_across_a_restart(hall, ops):
    """Issue 16: a fresh nonce with an accepted seq, a seq below the replay window, and a new
    boot's seq 1 after a higher one are all refused as replayed, answered without naming a
    command, and the kiosk keeps the ops sender's sequence state over a restart."""
    from mqtt_topics.envelope import Signer
    kiosk = hall.add_kiosk("c3", services=(("A", "Citizen card", "A"),))
    kiosk.start_agent()
    rec = Recorder(hall, f"hall/{hall.hall_id}/#")
    wait_for(lambda: _last_state(rec)["status"] == "online", what="online")
    topic, payload, nonce = ops.send("c3", "diagnostics")
    assert _statuses(ops.wait_result(nonce, count=2)) == ["accepted", "done"]
    sent = json.loads(payload)

    def sealed(seq: int, boot: str, nonce: str) -> bytes:
        signer = Signer(hall.pki["ops"].key, sender="ops", boot_id=boot, next_seq=lambda: seq)
        return signer.seal(topic, "cmd", {"name": "diagnostics", "args": {}, "target": "c3",
                                          "nonce": nonce,
                                          "expires_at_ms": int(hall_clock_ms() + 60_000)})

    def refused(nonce: str) -> dict:
        got = ops.wait_unattributed(lambda v: v.body["detail"].get("claimed_nonce") == nonce)
        assert got is not None, f"no answer claiming {nonce}"
        assert (got.body["cmd_seq"], got.body["nonce"], got.body["status"]) == (
            None, None, "refused")
        return got.body

    # 1. the accepted seq with a fresh nonce
    ops.link.publish(topic, sealed(sent["seq"], sent["boot"], "fresh-nonce-0000001"), qos=1)
    assert refused("fresh-nonce-0000001")["detail"]["code"] == "replayed"
    # 2. far ahead (accepted), then below the window of 1024
    ahead = sent["seq"] + 5000
    ops.link.publish(topic, sealed(ahead, sent["boot"], "ahead-nonce-0000001"), qos=1)
    assert _statuses(ops.wait_result("ahead-nonce-0000001", count=2)) == ["accepted", "done"]
    ops.link.publish(topic, sealed(ahead - 1024, sent["boot"], "below-nonce-0000001"), qos=1)
    assert refused("below-nonce-0000001")["detail"]["code"] == "replayed"
    # 3. after a restart of the agent: a new ops boot's seq 1 is still below what it saw
    kiosk.stop_agent()
    kiosk.start_agent()
    wait_for(lambda: sum(1 for m in rec.of_kind("/state")
                         if json.loads(m.payload)["body"]["status"] == "online") >= 2,
             timeout_s=20, what="online again after the restart")
    ops.link.publish(topic, sealed(1, "ab" * 16, "newboot-nonce-00001"), qos=1)
    assert refused("newboot-nonce-00001")["detail"]["code"] == "replayed"
    # ... and the same fresh-nonce replay of the accepted seq is still refused
    ops.link.publish(topic, sealed(sent["seq"], sent["boot"], "fresh-nonce-0000002"), qos=1)
    assert refused("fresh-nonce-0000002")["detail"]["code"] == "replayed"
    # A new boot above everything is a legitimate restart of ops: obeyed.
    ops.link.publish(topic, sealed(ahead + 1, "cd" * 16, "newboot-nonce-00002"), qos=1)
    assert _statuses(ops.wait_result("newboot-nonce-00002", count=2)) == ["accepted", "done"]
