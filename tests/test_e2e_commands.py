"""Signed ops commands to a running agent over mTLS: accepted ones run and are answered,
forged, replayed, expired and misaddressed ones are refused with a reason and an event."""

from __future__ import annotations

import base64
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


def test_malformed_commands_are_refused_and_the_next_valid_one_runs(hall, ops):
    """Issue 16: the kiosk answers every message on its cmd topic over the real broker,
    malformed ones included (docs/mqtt-contract.md section 3): text that is not JSON, and an
    envelope signed by the hall's ops key whose body breaks the cmd schema, are each
    answered ``refused`` with code ``malformed`` (reason ``malformed: ...``, no command
    named) and a ``command_refused`` event; neither moves the ops sender's sequence state,
    so the next valid command, with a lower seq, is obeyed."""
    from mqtt_topics.envelope import canonical_bytes, canonical_json
    from mqtt_topics.schemas import MAX_SAFE_INT as MAX_SEQ
    rec = Recorder(hall, f"hall/{hall.hall_id}/#")
    kiosk = hall.add_kiosk("c4", services=(("A", "Citizen card", "A"),))
    kiosk.start_agent()
    wait_for(lambda: _last_state(rec)["status"] == "online", what="online")
    topic = f"hall/{hall.hall_id}/kiosk/c4/cmd"

    def refused_malformed(predicate) -> dict:
        got = ops.wait_unattributed(lambda v: v.sender == "c4" and predicate(v.body))
        assert got is not None, "no refusal"
        body = got.body
        assert (body["status"], body["cmd_seq"], body["nonce"]) == ("refused", None, None)
        assert body["detail"]["code"] == "malformed"
        assert body["reason"].startswith("malformed: ")
        return body

    # 1. Not JSON: nothing to claim, so the answer carries no claimed_* at all.
    ops.publish_raw(topic, b"{not json")
    body = refused_malformed(lambda b: b["detail"].get("code") == "malformed"
                             and "claimed_nonce" not in b["detail"])
    assert "not JSON" in body["reason"]
    assert set(body["detail"]) == {"code"}

    # 2. Authentic (the hall's ops key, signed for this topic) but the body breaks the cmd
    #    schema: an unknown member. Sealed by hand, since Signer.seal refuses such a body.
    #    Its seq is the highest there is: were it tracked, the valid command below (the ops
    #    client's own counter, same boot) would be refused as replayed.
    nonce = "schema-nonce-000001"
    env = {"v": 1, "type": "cmd", "sender": "ops", "boot": ops.signer.boot_id,
           "seq": MAX_SEQ, "ts_ms": int(hall_clock_ms()), "kid": ops.signer.kid,
           "body": {"name": "restart", "args": {}, "target": "c4", "nonce": nonce,
                    "expires_at_ms": int(hall_clock_ms() + 60_000), "force": True}}
    sig = hall.pki["ops"].key.sign(canonical_bytes(topic, env))
    env["sig"] = base64.urlsafe_b64encode(sig).rstrip(b"=").decode("ascii")
    ops.publish_raw(topic, canonical_json(env))
    body = refused_malformed(lambda b: b["detail"].get("claimed_nonce") == nonce)
    assert "force" in body["reason"]
    assert (body["detail"]["claimed_seq"], body["detail"]["claimed_sender"]) == (MAX_SEQ, "ops")
    assert ops.results(nonce) == []                         # never named: nothing obeyed

    # Each refusal also made a command_refused event with the code.
    def refused_events() -> list[dict]:
        return [json.loads(m.payload)["body"]["detail"] for m in rec.of_kind("/event")
                if json.loads(m.payload)["body"]["name"] == "command_refused"]

    wait_for(lambda: [e["code"] for e in refused_events()].count("malformed") >= 2,
             what="two command_refused events")
    assert any(e.get("nonce") == nonce for e in refused_events())

    # 3. The next valid command (a lower seq from the ops client's own counter) runs.
    _, payload, nonce = ops.send("c4", "diagnostics")
    assert json.loads(payload)["seq"] < MAX_SEQ
    done = ops.wait_result(nonce, count=2)
    assert _statuses(done) == ["accepted", "done"]
    assert done[-1].body["detail"]["mode"] == "online"
    assert kiosk.agent is not None and not kiosk.agent._stopping.is_set()
