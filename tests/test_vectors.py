"""The contract's test vectors (tests/vectors/envelope_v1.json, docs/mqtt-contract.md
section 11) against this implementation: every tampering the spec names at its step of
section 7, the sequence rules of section 8, and a kiosk's answers to commands (section 3).

The file is what tests/vectors/build.py makes (rebuilt and compared here); its expectations
are written by hand from the contract, so a failure here is a disagreement between the
package and the spec, not a stale file."""

from __future__ import annotations

import importlib.util
import json
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
