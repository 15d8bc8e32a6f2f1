"""Signed operator commands at the kiosk: CommandGate with real certificates from the real
enrollment flow, an injected clock, and hypothesis fuzzing of the command/envelope parsers."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge.clock import ManualClock
from edge.commands import (MAX_WINDOW_S, MIN_WINDOW_S, REFUSALS, Command, CommandGate,
                           NonceCache, Refusal)
from hallkiosk.errors import ContractError
from mqtt_topics.envelope import Signer, canonical_bytes, canonical_json, key_id, verify
from mqtt_topics.schemas import validate_body
from mqtt_topics.topics import KioskTopics
from provisioning.emulated import provision_emulated_hall
from provisioning.opsclient import build_command
from provisioning.trust import apply_crl, keyring_from_certs

HALL = "hall-9"
ROOT = Path(__file__).resolve().parents[1]
BOOT = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"


class Seq:
    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> int:
        self.n += 1
        return self.n


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    clock = ManualClock()
    mats = provision_emulated_hall(tmp_path_factory.mktemp("pki"), ["k1", "k2"], hall=HALL,
                                   clock=clock)
    return mats, clock


@pytest.fixture
def env(pki, tmp_path):
    mats, base_clock = pki
    clock = ManualClock(start_wall=base_clock.wall() + 60)
    keyring = keyring_from_certs(mats.chain_file, mats.certs(), mats.crl_file, clock=clock)
    ops = Signer(mats["ops"].key, sender="ops", boot_id=BOOT, next_seq=Seq(), clock=clock)
    gate = CommandGate("k1", keyring, clock, window_s=300, hall=HALL)
    return mats, clock, keyring, ops, gate


def cmd(ops: Signer, clock, device="k1", **kw):
    return build_command(ops, HALL, device, kw.pop("name", "reprint"), kw.pop("args", {"n": 1}),
                         clock=clock, **kw)


def hand_sealed(key: Ed25519PrivateKey, sender: str, topic: str, body: dict, seq: int = 7,
                ts_ms: int = 1) -> bytes:
    """An envelope signed by hand (Signer refuses to seal what the gate must refuse)."""
    env = {"v": 1, "type": "cmd", "sender": sender, "boot": BOOT, "seq": seq, "ts_ms": ts_ms,
           "kid": key_id(key.public_key()), "body": body}
    sig = key.sign(canonical_bytes(topic, env))
    env["sig"] = base64.urlsafe_b64encode(sig).rstrip(b"=").decode()
    return canonical_json(env)


def good_body(clock, target="k1", nonce="n" * 20, ahead_ms=60_000):
    return {"name": "reprint", "args": {}, "target": target, "nonce": nonce,
            "expires_at_ms": int(clock.wall() * 1000) + ahead_ms}


# -- accepted ----------------------------------------------------------------------------
def test_valid_command_is_accepted_and_answered(env):
    mats, clock, keyring, ops, gate = env
    topic, payload, nonce = cmd(ops, clock, args={"copies": 2})
    out = gate.check(payload, topic)
    assert isinstance(out, Command)
    assert (out.name, out.nonce, out.sender, out.args) == ("reprint", nonce, "ops", {"copies": 2})
    body = gate.result_body(out)
    assert body == {"cmd_seq": out.seq, "nonce": nonce, "status": "accepted", "reason": None,
                    "detail": {}}
    validate_body("cmd_result", body)
    done = gate.result_body(out, status="done", detail={"printed": True})
    assert validate_body("cmd_result", done)["status"] == "done"
    assert "copies" not in repr(out)


# -- refused, each with its reason ----------------------------------------------------------
def refused(out, code):
    assert isinstance(out, Refusal), out
    assert out.code == code, out
    return out


def test_replayed_command_refused(env):
    mats, clock, keyring, ops, gate = env
    topic, payload, nonce = cmd(ops, clock)
    first = gate.check(payload, topic)
    assert isinstance(first, Command)
    clock.advance(5)
    r = refused(gate.check(payload, topic), "replayed")
    body = gate.result_body(r)
    # The answer to the replay does not name the command: ops must never read "refused"
    # after "accepted" for the (cmd_seq, nonce) they sent.
    assert (body["status"], body["cmd_seq"], body["nonce"]) == ("refused", None, None)
    assert body["detail"] == {"code": "replayed", "claimed_seq": first.seq,
                              "claimed_nonce": nonce, "claimed_sender": "ops"}
    assert body["reason"].startswith("replayed")
    validate_body("cmd_result", body)
    # A fresh envelope reusing the nonce (a new seq, re-signed) is a replay too.
    topic, payload2, _ = cmd(ops, clock, nonce=nonce)
    assert gate.result_body(refused(gate.check(payload2, topic), "replayed"))["nonce"] is None


def _sealed_with(mats, clock, *, seq: int, boot: str = BOOT, nonce: str):
    """An ops command with a chosen seq and boot (a Signer whose counter says so)."""
    ops = Signer(mats["ops"].key, sender="ops", boot_id=boot, next_seq=lambda: seq, clock=clock)
    return cmd(ops, clock, nonce=nonce)


def test_sequence_rules_apply_to_commands(env):
    """The contract's section 8 for commands, each case the independent verifier found
    executed before: a fresh nonce with an accepted seq, a seq below the window, and a new
    boot's low seq after a higher one."""
    mats, clock, keyring, _, gate = env
    topic, payload, _ = _sealed_with(mats, clock, seq=2000, nonce="a" * 20)
    assert isinstance(gate.check(payload, topic), Command)
    topic, payload, _ = _sealed_with(mats, clock, seq=2000, nonce="b" * 20)
    assert "already seen" in refused(gate.check(payload, topic), "replayed").detail
    topic, payload, _ = _sealed_with(mats, clock, seq=2000 - 1024, nonce="c" * 20)
    assert "older than the window" in refused(gate.check(payload, topic), "replayed").detail
    topic, payload, _ = _sealed_with(mats, clock, seq=1, boot="1" * 32, nonce="d" * 20)
    assert "new boot" in refused(gate.check(payload, topic), "replayed").detail
    # What the rules accept: a late seq inside the window, a gap, a new boot further on.
    for seq, boot, nonce in ((1990, BOOT, "e"), (2500, BOOT, "f"), (2501, "1" * 32, "g")):
        topic, payload, _ = _sealed_with(mats, clock, seq=seq, boot=boot, nonce=nonce * 20)
        assert isinstance(gate.check(payload, topic), Command), seq


def test_only_an_authentic_new_command_is_named_in_its_refusal(env):
    mats, clock, keyring, ops, gate = env
    topic, payload, nonce = cmd(ops, clock, ttl_s=10)
    clock.advance(11)
    r = refused(gate.check(payload, topic), "expired")
    body = gate.result_body(r)
    assert (body["cmd_seq"], body["nonce"]) == (r.seq, nonce) and body["detail"] == {
        "code": "expired"}
    forged = json.loads(payload)
    forged["body"]["args"] = {"n": 9}
    body = gate.result_body(gate.check(json.dumps(forged).encode(), topic))
    assert (body["cmd_seq"], body["nonce"], body["detail"]["code"]) == (None, None,
                                                                         "bad_signature")
    assert body["detail"]["claimed_nonce"] == nonce


def test_expired_and_too_far_future_refused(env):
    mats, clock, keyring, ops, gate = env
    topic, payload, _ = cmd(ops, clock, ttl_s=10)
    clock.advance(11)
    r = refused(gate.check(payload, topic), "expired")
    assert "ms ago" in r.detail
    topic, payload, _ = cmd(ops, clock, ttl_s=301)
    refused(gate.check(payload, topic), "too_far_future")
    topic, payload, _ = cmd(ops, clock, ttl_s=299)
    assert isinstance(gate.check(payload, topic), Command)


def test_misaddressed_commands_refused(env):
    mats, clock, keyring, ops, gate = env
    # A valid command for k2, delivered to k1's gate.
    topic, payload, _ = cmd(ops, clock, device="k2")
    refused(gate.check(payload, topic), "misaddressed")
    # Signed for k1's topic but naming k2 as target.
    t1 = KioskTopics(HALL, "k1").cmd
    payload = hand_sealed(mats["ops"].key, "ops", t1, good_body(clock, target="k2"))
    r = refused(gate.check(payload, t1), "misaddressed")
    assert gate.result_body(r)["status"] == "refused"
    # k2's envelope moved to k1's topic: the signature covers the topic.
    _, payload, _ = cmd(ops, clock, device="k2")
    refused(gate.check(payload, t1), "bad_signature")
    # Another hall's topic.
    refused(gate.check(payload, KioskTopics("hall-0", "k1").cmd), "misaddressed")


def test_forged_commands_refused(env):
    mats, clock, keyring, ops, gate = env
    topic, payload, nonce = cmd(ops, clock)
    env_obj = json.loads(payload)
    env_obj["body"]["args"] = {"n": 2}                  # changed after signing
    r = refused(gate.check(json.dumps(env_obj).encode(), topic), "bad_signature")
    assert r.nonce == nonce and gate.result_body(r) is not None
    stranger = Ed25519PrivateKey.generate()             # a key no CA certified
    payload = hand_sealed(stranger, "ops", topic, good_body(clock))
    refused(gate.check(payload, topic), "unknown_key")
    # A kiosk key (trusted, but role kiosk) cannot command another kiosk.
    payload = hand_sealed(mats["k2"].key, "k2", topic, good_body(clock))
    refused(gate.check(payload, topic), "not_authorised")
    # Claiming to be ops with k2's key: the key's owner is k2.
    payload = hand_sealed(mats["k2"].key, "ops", topic, good_body(clock, nonce="m" * 20))
    refused(gate.check(payload, topic), "bad_signature")


def test_revoked_ops_key_refused_once_crl_loaded(pki, tmp_path):
    mats, base_clock = pki
    clock = ManualClock(start_wall=base_clock.wall() + 60)
    local = provision_emulated_hall(tmp_path / "h", ["k1"], hall=HALL, clock=clock)
    keyring = keyring_from_certs(local.chain_file, local.certs(), local.crl_file, clock=clock)
    ops = Signer(local["ops"].key, sender="ops", boot_id=BOOT, next_seq=Seq(), clock=clock)
    gate = CommandGate("k1", keyring, clock)
    topic, payload, _ = cmd(ops, clock)
    assert isinstance(gate.check(payload, topic), Command)
    local.revoke("ops")
    removed = apply_crl(keyring, local.chain_file, local.certs(), local.crl_file, clock=clock)
    assert removed == [key_id(local["ops"].key.public_key())]
    topic, payload, _ = cmd(ops, clock)
    refused(gate.check(payload, topic), "unknown_key")
    # And a keyring built afresh with the CRL never trusts it.
    fresh = keyring_from_certs(local.chain_file, local.certs(), local.crl_file, clock=clock)
    assert removed[0] not in fresh
    assert sorted(fresh.get(kid).owner for kid in fresh) == ["auditor", "k1", "ledger"]
    assert fresh.get(key_id(local["auditor"].key.public_key())).roles == {"monitor"}


def test_nonces_survive_a_restart_with_a_nonce_file(env, tmp_path):
    mats, clock, keyring, ops, _ = env
    path = tmp_path / "state" / "cmd-nonces.json"
    gate = CommandGate("k1", keyring, clock, nonce_file=path)
    topic, payload, _ = cmd(ops, clock)
    assert isinstance(gate.check(payload, topic), Command)
    assert path.stat().st_mode & 0o077 == 0
    restarted = CommandGate("k1", keyring, clock, nonce_file=path)
    refused(restarted.check(payload, topic), "replayed")
    # The ops sender's sequence is remembered too: its seq again with a fresh nonce.
    seq = json.loads(payload)["seq"]
    again = Signer(mats["ops"].key, sender="ops", boot_id=BOOT, next_seq=lambda: seq,
                   clock=clock)
    topic, payload2, _ = cmd(again, clock, nonce="z" * 20)
    assert "already seen" in refused(restarted.check(payload2, topic), "replayed").detail
    # Without the file a restart forgets, and only expiry bounds the replay.
    assert isinstance(CommandGate("k1", keyring, clock).check(payload, topic), Command)
    clock.advance(61)
    refused(CommandGate("k1", keyring, clock).check(payload, topic), "expired")
    path.write_text("{not json")
    assert len(NonceCache(8, path)) == 0


def test_full_nonce_cache_fails_closed_then_frees_on_expiry(env):
    mats, clock, keyring, ops, _ = env
    gate = CommandGate("k1", keyring, clock, max_nonces=2)
    for _ in range(2):
        topic, payload, _ = cmd(ops, clock, ttl_s=30)
        assert isinstance(gate.check(payload, topic), Command)
    topic, payload, _ = cmd(ops, clock, ttl_s=30)
    refused(gate.check(payload, topic), "busy")
    clock.advance(31)
    topic, payload, _ = cmd(ops, clock, ttl_s=30)
    assert isinstance(gate.check(payload, topic), Command)


def test_a_malformed_command_is_answered_and_reported(env):
    mats, clock, keyring, ops, gate = env
    topic = KioskTopics(HALL, "k1").cmd
    r = refused(gate.check(b"\xff not json", topic), "malformed")
    body = gate.result_body(r)           # answered all the same, naming no command
    assert (body["cmd_seq"], body["nonce"], body["detail"]) == (None, None,
                                                               {"code": "malformed"})
    validate_body("cmd_result", body)
    ev = gate.refusal_event(r)
    assert ev["code"] == "malformed" and ev["nonce"] is None
    assert set(REFUSALS) >= {"malformed", "misaddressed", "unknown_key", "bad_signature",
                             "not_authorised", "expired", "too_far_future", "replayed", "busy"}
    refused(gate.check(b"{}", KioskTopics(HALL, "k1").state), "malformed")
    refused(gate.check(b"{}", "not/a/topic"), "malformed")


def test_constructor_rejects_bad_arguments(env):
    mats, clock, keyring, *_ = env
    with pytest.raises(ContractError):
        CommandGate("k/1", keyring, clock)
    with pytest.raises(ValueError):
        CommandGate("k1", keyring, clock, window_s=0)
    with pytest.raises(ValueError):
        NonceCache(0)
    # A gate without a role would verify with require_role=None: any trusted key obeyed.
    with pytest.raises(ContractError, match="role"):
        CommandGate("k1", keyring, clock, role=None)


def test_window_is_one_hour_at_most(env):
    """Issue 16: one maximum command expiry (3600 s) in the gate, the config and the docs."""
    mats, clock, keyring, ops, _ = env
    gate = CommandGate("k1", keyring, clock, window_s=MAX_WINDOW_S, hall=HALL)
    topic, payload, _ = cmd(ops, clock, ttl_s=3600)
    assert isinstance(gate.check(payload, topic), Command)
    topic, payload, _ = cmd(ops, clock, ttl_s=3600.001)
    refused(gate.check(payload, topic), "too_far_future")
    for too_long in (MAX_WINDOW_S + 1, 24 * 3600):
        with pytest.raises(ValueError, match="3600"):
            CommandGate("k1", keyring, clock, window_s=too_long)
    contract = (ROOT / "docs" / "mqtt-contract.md").read_text("utf-8")
    assert f"`commands.window_s`, {MIN_WINDOW_S} to {MAX_WINDOW_S} s)" in contract
    assert "24 h" not in contract
    example = (ROOT / "docs" / "agent.example.toml").read_text("utf-8")
    assert f"window_s = 300               # {MIN_WINDOW_S}-{MAX_WINDOW_S}:" in example


# -- fuzzing ------------------------------------------------------------------------------
FUZZ = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
json_scalars = st.none() | st.booleans() | st.integers(-2**60, 2**60) | st.text(max_size=20) \
    | st.floats(allow_nan=False)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=12)


@FUZZ
@given(st.binary(max_size=400))
def test_fuzz_gate_random_bytes(env, data):
    mats, clock, keyring, ops, gate = env
    out = gate.check(data, KioskTopics(HALL, "k1").cmd)
    assert isinstance(out, Refusal) and out.code in REFUSALS
    validate_body("cmd_result", gate.result_body(out))


@FUZZ
@given(st.dictionaries(st.sampled_from(["v", "type", "sender", "boot", "seq", "ts_ms", "kid",
                                        "body", "sig", "x"]), json_values, max_size=10),
       st.dictionaries(st.sampled_from(["name", "args", "target", "nonce", "expires_at_ms"]),
                       json_values, max_size=6))
def test_fuzz_gate_envelope_shapes(env, envelope, body):
    mats, clock, keyring, ops, gate = env
    envelope = dict(envelope)
    envelope["body"] = body
    payload = json.dumps(envelope).encode()
    out = gate.check(payload, KioskTopics(HALL, "k1").cmd)
    assert isinstance(out, Refusal)
    validate_body("cmd_result", gate.result_body(out))   # what the kiosk publishes is valid
    with pytest.raises(ContractError):
        verify(payload, KioskTopics(HALL, "k1").cmd, keyring, expect_type="cmd")


@FUZZ
@given(st.data())
def test_fuzz_gate_mutated_valid_command(env, data):
    mats, clock, keyring, ops, _ = env
    gate = CommandGate("k1", keyring, clock)
    ops = Signer(mats["ops"].key, sender="ops", boot_id=BOOT, next_seq=Seq(), clock=clock)
    topic, payload, _ = cmd(ops, clock)     # same length every example: seq 1, fixed clock
    pos = data.draw(st.integers(0, len(payload) - 1))
    mutated = bytearray(payload)
    mutated[pos] = data.draw(st.integers(0, 255))
    out = gate.check(bytes(mutated), topic)
    if isinstance(out, Command):
        # Only a change that leaves the signed meaning intact may pass.
        assert json.loads(mutated) == json.loads(payload)
    else:
        assert out.code in REFUSALS
