"""The contract's test vectors (tests/vectors/envelope_v1.json, docs/mqtt-contract.md
section 11) against this implementation: every tampering the spec names at its step of
section 7, the sequence rules of section 8, and a kiosk's answers to commands (section 3).

The file is what tests/vectors/build.py makes (rebuilt and compared here); its expectations
are written by hand from the contract, so a failure here is a disagreement between the
package and the spec, not a stale file."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import pytest

from edge.clock import ManualClock
from edge.commands import REFUSALS, Command, CommandGate
from hallkiosk import errors
from hallkiosk.errors import ReplayError
from mqtt_topics import Keyring, SequenceTracker, verify

ROOT = Path(__file__).resolve().parents[1]
VECTORS = json.loads((ROOT / "tests" / "vectors" / "envelope_v1.json").read_text("utf-8"))
KEYS = VECTORS["keys"]


def _payload(vec: dict[str, Any]) -> bytes:
    if "payload_hex" in vec:
        return bytes.fromhex(vec["payload_hex"])
    return vec["payload"].encode("utf-8")


def _keyring(names) -> Keyring:
    ring = Keyring()
    for name in names:
        k = KEYS[name]
        ring.add(bytes.fromhex(k["public_hex"]), owner=k["owner"], roles=k["roles"],
                 hall=k["hall"])
    return ring


def test_the_file_is_what_the_builder_makes():
    spec = importlib.util.spec_from_file_location("vector_build", ROOT / "tests" / "vectors"
                                                  / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    assert json.loads(build.render()) == VECTORS


def test_keys_are_what_their_seeds_make():
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    from mqtt_topics import key_id
    for name, k in KEYS.items():
        raw = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(k["seed_hex"])) \
            .public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        assert raw.hex() == k["public_hex"] and key_id(raw) == k["kid"], name
    assert "intruder" not in VECTORS["keyring"]
    assert KEYS["intruder"]["owner"] == "kiosk-07"     # it claims a trusted owner


@pytest.mark.parametrize("vec", VECTORS["negative"], ids=lambda v: f"step{v['step']}: {v['name']}")
def test_negative_vector_fails_at_its_step(vec):
    ring = _keyring(VECTORS["keyring"])
    with pytest.raises(getattr(errors, vec["error"]), match=vec["message"]):
        verify(_payload(vec), vec["topic"], ring)


def test_every_step_of_section_7_has_a_vector():
    steps = {v["step"] for v in VECTORS["negative"]}
    assert steps == set(range(1, 12))                 # 12, the sequence rules: below
    assert any(m["expect"] == "ReplayError" for s in VECTORS["sequences"]
               for m in s["messages"])


def test_every_signed_member_changed_after_signing_fails_at_step_6():
    """Issue 16: a change of any signed envelope member that keeps it well formed (step 4)
    and its key known (step 5) is a bad signature (step 6), whatever a later step would say
    of the new value: the same authentic ticket with exactly one member changed."""
    ticket = VECTORS["positive"][0]                  # the ticket the tampering starts from
    authentic = json.loads(ticket["payload"])
    changed = set()
    for v in VECTORS["negative"]:
        if v["step"] != 6 or v["topic"] != ticket["topic"] or "payload" not in v:
            continue
        env = json.loads(v["payload"])
        diff = {k for k in authentic if env.get(k) != authentic[k]}
        if len(diff) == 1 and env.keys() == authentic.keys():
            assert v["error"] == "SignatureError", v["name"]
            assert v["message"] == "bad signature or wrong topic", v["name"]
            changed |= diff
    assert changed == {"type", "sender", "boot", "seq", "ts_ms", "kid", "body", "sig"}
    flipped = next(v for v in VECTORS["negative"] if "bit flipped" in v["name"])
    sig = json.loads(flipped["payload"])["sig"]
    assert len(sig) == 86 and sig[-1] == authentic["sig"][-1]   # still a canonical spelling
    assert sum(a != b for a, b in zip(sig, authentic["sig"])) == 1
    swapped = next(v for v in VECTORS["negative"] if "kid swapped" in v["name"])
    kid = json.loads(swapped["payload"])["kid"]
    owner = next(k for k in KEYS.values() if k["kid"] == kid)
    assert owner["roles"] == ["kiosk"] and owner["owner"] != authentic["sender"]
    assert any(n for n in VECTORS["keyring"] if KEYS[n]["kid"] == kid)        # trusted


def test_step_9_vectors_cover_every_role():
    """A key without the role of the kind, for each of the four roles: a service key on
    a kiosk kind among them (a topic named after the service passes steps 7 and 8)."""
    roles = {}
    for v in VECTORS["negative"]:
        if v["step"] == 9:
            env = json.loads(v["payload"])
            signer = next(k for k in KEYS.values() if k["kid"] == env["kid"])
            wanted = v["message"].split("'")[1]
            assert wanted not in signer["roles"], v["name"]
            roles.setdefault(wanted, set()).update(signer["roles"])
    assert set(roles) == {"kiosk", "consumer", "ops", "monitor"}
    assert roles["kiosk"] >= {"monitor", "ops"}


def _alert_id_rule_broken(alert_id: str, body: dict[str, Any], topic: str) -> str:
    """Which rule of section 9's alert_id an id breaks, judged here from the contract's
    words (not by the package): the first one found."""
    _, hall, _, device, _ = topic.split("/")
    if len(alert_id) > 128:
        return "length"
    parts = alert_id.split(":")
    ident = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,31}")
    if len(parts) != 4 or not all(ident.fullmatch(p) for p in parts[:3]) \
            or not parts[3].isdigit() or not parts[3].isascii():
        return "shape"
    if parts[3] != str(int(parts[3])):
        return "leading zero"
    if parts[0] != body["rule"]:
        return "rule"
    if parts[1] != hall:
        return "hall"
    if parts[2] != device:
        return "device, body.device right" if body["device"] == device else "device"
    if int(parts[3]) != body["since_ms"] // 1000:
        return "second"
    return "none"


def test_every_alert_id_rule_has_a_vector():
    """The contract says the vectors hold every alert_id rule (section 11): each one broken
    alone, by an alert that is otherwise valid and signed by the monitor."""
    broken = set()
    for v in VECTORS["negative"]:
        if v["step"] != 11 or v["message"] != "alert_id":
            continue
        env = json.loads(v["payload"])
        if env["type"] == "alert":
            broken.add(_alert_id_rule_broken(env["body"]["alert_id"], env["body"], v["topic"]))
    assert broken == {"length", "shape", "leading zero", "rule", "hall",
                      "device, body.device right", "second"}


def test_the_contract_states_how_many_vectors_there_are():
    doc = (ROOT / "docs" / "mqtt-contract.md").read_text("utf-8")
    assert f"`negative`: {len(VECTORS['negative'])} payloads" in doc
    assert f"and {len(VECTORS['commands']['steps'])} payloads on its cmd topic" in doc


@pytest.mark.parametrize("vec", VECTORS["positive"], ids=lambda v: v["name"])
def test_positive_vectors_pass_with_the_full_keyring(vec):
    got = verify(vec["payload"].encode("utf-8"), vec["topic"], _keyring(VECTORS["keyring"]))
    assert got.role_checked and got.body == vec["envelope"]["body"]


@pytest.mark.parametrize("run", VECTORS["sequences"], ids=lambda r: r["name"])
def test_sequence_vectors(run):
    ring = _keyring(VECTORS["keyring"])
    tracker = SequenceTracker(window=run["window"])
    got = []
    for m in run["messages"]:
        try:
            got.append(verify(m["payload"].encode("utf-8"), run["topic"], ring,
                              tracker=tracker).seq_status)
        except ReplayError:
            got.append("ReplayError")
    assert got == [m["expect"] for m in run["messages"]]


def test_sequence_vectors_carry_what_they_say():
    for run in VECTORS["sequences"]:
        for m in run["messages"]:
            env = json.loads(m["payload"])
            assert (env["seq"], env["boot"]) == (m["seq"], m["boot"])


def test_command_vectors():
    spec = VECTORS["commands"]
    gate = CommandGate(spec["device"], _keyring(spec["trusted"]),
                       ManualClock(start_wall=spec["now_ms"] / 1000), spec["window_s"],
                       hall=spec["hall"], max_nonces=spec["max_nonces"])
    got, want = [], []
    for step in spec["steps"]:
        payload = _payload(step)
        body = gate.result_body(gate.check(payload, step["topic"]))
        named = body["cmd_seq"] is not None
        if named:      # it names THIS command: its envelope's seq and nonce
            env = json.loads(payload)
            assert (body["cmd_seq"], body["nonce"]) == (env["seq"], env["body"]["nonce"])
        else:
            assert body["nonce"] is None
        got.append((step["name"], body["status"], body["detail"].get("code"), named))
        want.append((step["name"], step["expect"]["status"], step["expect"]["code"],
                     step["expect"]["names_command"]))
    assert got == want


def test_command_vectors_cover_every_refusal_code():
    codes = {s["expect"]["code"] for s in VECTORS["commands"]["steps"]}
    assert codes - {None} == set(REFUSALS)
    assert None in codes                                  # and some are accepted


def test_an_accepted_vector_command_is_a_command():
    spec = VECTORS["commands"]
    gate = CommandGate(spec["device"], _keyring(spec["trusted"]),
                       ManualClock(start_wall=spec["now_ms"] / 1000), spec["window_s"],
                       hall=spec["hall"], max_nonces=spec["max_nonces"])
    step = spec["steps"][0]
    assert step["expect"]["code"] is None
    out = gate.check(_payload(step), step["topic"])
    assert isinstance(out, Command) and out.sender == "ops-1"
