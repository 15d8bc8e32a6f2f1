"""The signed envelope: vectors, seal/verify, rejects, the sequence tracker, fuzzing."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import threading
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.clock import ManualClock
from hallkiosk import errors
from hallkiosk.errors import ContractError, ReplayError, RoleError, SignatureError
from mqtt_topics import (
    MAX_PAYLOAD,
    HallTopics,
    Keyring,
    KioskTopics,
    SequenceTracker,
    Signer,
    canonical_bytes,
    canonical_json,
    key_id,
    state_supersedes,
    validate_body,
    verify,
)

ROOT = Path(__file__).resolve().parents[1]
VECTORS = json.loads((ROOT / "tests" / "vectors" / "envelope_v1.json").read_text("utf-8"))
DOC = ROOT / "docs" / "mqtt-contract.md"
BOOT = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"
BOOT2 = "ffeeddccbbaa99887766554433221100"
T7 = KioskTopics("hall-01", "kiosk-07")
T8 = KioskTopics("hall-01", "kiosk-08")
CONTRACT_ERRORS = (ContractError,)


# -- an independent canonical encoder: written out by hand, not json.dumps --------------
_SHORT = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r",
          "\t": "\\t"}


def _enc_str(s: str) -> str:
    out = []
    for ch in s:
        if ch in _SHORT:
            out.append(_SHORT[ch])
        elif ord(ch) < 0x20:
            out.append("\\u%04x" % ord(ch))
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _enc(v: Any) -> str:
    if v is None:
        return "null"
    if v is True:
        return "true"
    if v is False:
        return "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return _enc_str(v)
    if isinstance(v, list):
        return "[" + ",".join(_enc(x) for x in v) + "]"
    keys = sorted(v, key=lambda k: [ord(c) for c in k])
    return "{" + ",".join(_enc_str(k) + ":" + _enc(v[k]) for k in keys) + "}"


def _signed_bytes(topic: str, envelope: dict[str, Any]) -> bytes:
    return b"hallkiosk/1\n" + topic.encode() + b"\n" + _enc(envelope).encode("utf-8")


def _reversed_members(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _reversed_members(v[k]) for k in reversed(list(v))}
    return v


def _b64url(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).decode().rstrip("=")


# -- keys and sample bodies ----------------------------------------------------------
def _key(n: int) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(bytes([n]) * 32)


K7, K8, KC, KOP = _key(7), _key(8), _key(0xC0), _key(0x0B)


@pytest.fixture
def keyring() -> Keyring:
    ring = Keyring()
    ring.add(K7.public_key(), owner="kiosk-07", roles=["kiosk"])
    ring.add(K8.public_key(), owner="kiosk-08", roles=["kiosk"])
    ring.add(KC.public_key(), owner="consumer-1", roles=["consumer"])
    ring.add(KOP.public_key(), owner="ops-1", roles=["ops"])
    return ring


def _counter(start: int = 1):
    lock = threading.Lock()
    state = [start - 1]

    def next_seq() -> int:
        with lock:
            state[0] += 1
            return state[0]
    return next_seq


def _signer(key=K7, sender="kiosk-07", boot=BOOT, start=1) -> Signer:
    return Signer(key, sender=sender, boot_id=boot, next_seq=_counter(start),
                  clock=ManualClock(start_wall=1_795_000_000.0))


def _forge(key: Ed25519PrivateKey, topic: str, envelope: dict[str, Any], *,
           sign_topic: str | None = None) -> bytes:
    """Sign any envelope (bypassing Signer's checks) with the test's own encoder."""
    env = dict(envelope)
    try:
        data = _signed_bytes(sign_topic or topic, env)
    except (TypeError, UnicodeEncodeError):
        data = b"unencodable"
    env["sig"] = _b64url(key.sign(data))
    return json.dumps(env, ensure_ascii=False).encode("utf-8", "surrogatepass")


def _envelope(msg_type: str, body: Any, *, sender="kiosk-07", key=K7, seq=1) -> dict[str, Any]:
    return {"v": 1, "type": msg_type, "sender": sender, "boot": BOOT, "seq": seq,
            "ts_ms": 1_795_000_000_000, "kid": key_id(key.public_key()), "body": body}


TICKET = {
    "ticket_uid": "kiosk-07:1234", "ticket_id": "A-07-0123", "service": "household",
    "service_name": "Household registration", "number": 123, "serial": 1234,
    "issued_at_ms": 1_795_000_000_123, "clock_trusted": True, "waiting_ahead": 4,
    "priority": "normal", "appointment_id": None, "citizen": "ab" * 32, "source": "idcard",
    "printed": "yes",
}
BODIES: dict[str, dict[str, Any]] = {
    "ticket": TICKET,
    "state": {"status": "online", "session": 3, "agent_version": "0.1.0",
              "since_ms": 1_795_000_000_000, "reason": None, "services": ["household", "tax"],
              "extra": {"board": "pi4", "booths": 2}},
    "telemetry": {"uptime_s": 3600, "temp_mC": 51_234, "printer": {"paper": "ok", "ok": True}},
    "event": {"name": "printer.paper_low", "severity": "warning", "subject": "printer",
              "detail": {"status_byte": 30}},
    "cmd_result": {"cmd_seq": 9, "nonce": "0123456789abcdef", "status": "done", "reason": None,
                   "detail": {"printed": 1, "ids": [1, 2], "more": {"a": None}}},
}
HALL_BODIES: dict[str, tuple[str, Ed25519PrivateKey, dict[str, Any]]] = {
    "ticket_ack": ("consumer-1", KC, {"ticket_uid": "kiosk-07:1234", "ticket_id": "A-07-0123",
                                      "status": "accepted", "ledger_id": 88}),
    "cmd": ("ops-1", KOP, {"name": "reprint", "args": {"ticket_uid": "kiosk-07:1234"},
                           "target": "kiosk-07", "nonce": "Zm9vYmFyYmF6cXV4", "expires_at_ms": 1}),
}


# -- vectors ---------------------------------------------------------------------------
def test_vector_key_and_kid_are_recomputed():
    key = VECTORS["key"]
    private = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(key["seed_hex"]))
    raw = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert raw.hex() == key["public_hex"]
    assert hashlib.sha256(raw).hexdigest()[:16] == key["kid"] == key_id(raw)
    assert key_id(private.public_key()) == key["kid"]


@pytest.mark.parametrize("vec", VECTORS["positive"], ids=lambda v: v["name"])
def test_positive_vector_byte_for_byte(vec):
    private = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(VECTORS["key"]["seed_hex"]))
    expected = vec["canonical"].encode("utf-8")
    # Independently built bytes must equal the file's, and so must the package's, whatever
    # the member order they are given (the file's is already sorted).
    shuffled = _reversed_members(vec["envelope"])
    assert list(shuffled) != sorted(shuffled)
    assert _signed_bytes(vec["topic"], shuffled) == expected
    assert canonical_bytes(vec["topic"], shuffled) == expected
    # Ed25519 is deterministic: the file's signature is THE signature of those bytes.
    assert _b64url(private.sign(expected)) == vec["sig"]
    private.public_key().verify(base64.urlsafe_b64decode(vec["sig"] + "=="), expected)
    payload = dict(vec["envelope"], sig=vec["sig"])
    assert json.loads(vec["payload"]) == payload
    assert vec["payload"].encode("utf-8") == _enc(payload).encode("utf-8")


def test_signer_reproduces_vector_payloads():
    key = VECTORS["key"]
    private = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(key["seed_hex"]))
    first = VECTORS["positive"][0]["envelope"]
    seqs = iter(v["envelope"]["seq"] for v in VECTORS["positive"])
    clock = ManualClock(start_wall=first["ts_ms"] / 1000)
    signer = Signer(private, sender=first["sender"], boot_id=first["boot"],
                    next_seq=lambda: next(seqs), clock=clock)
    for vec in VECTORS["positive"]:
        clock.set_wall(vec["envelope"]["ts_ms"] / 1000)
        payload = signer.seal(vec["topic"], vec["envelope"]["type"], vec["envelope"]["body"])
        assert payload == vec["payload"].encode("utf-8")


@pytest.mark.parametrize("vec", VECTORS["positive"], ids=lambda v: v["name"])
def test_positive_vector_verifies(vec):
    ring = Keyring()
    ring.add(bytes.fromhex(VECTORS["key"]["public_hex"]), owner=VECTORS["key"]["owner"],
             roles=VECTORS["key"]["roles"])
    got = verify(vec["payload"].encode("utf-8"), vec["topic"], ring, require_role="kiosk")
    assert got.body == vec["envelope"]["body"]
    assert (got.seq, got.boot, got.kid) == (vec["envelope"]["seq"], vec["envelope"]["boot"],
                                            VECTORS["key"]["kid"])


def test_spec_carries_the_same_vectors():
    text = DOC.read_text(encoding="utf-8")
    for item in (VECTORS["key"]["seed_hex"], VECTORS["key"]["public_hex"], VECTORS["key"]["kid"]):
        assert item in text
    for vec in VECTORS["positive"]:
        assert vec["sig"] in text
        assert vec["canonical"].split("\n", 2)[2] in text


# -- seal / verify -------------------------------------------------------------------
@pytest.mark.parametrize("msg_type", sorted(BODIES))
def test_kiosk_round_trip(keyring, msg_type):
    signer = _signer()
    topic = T7.topic(msg_type)
    payload = signer.seal(topic, msg_type, BODIES[msg_type])
    assert payload == canonical_json(json.loads(payload))
    got = verify(payload, topic, keyring, tracker=SequenceTracker(), expect_type=msg_type,
                 require_role="kiosk")
    assert (got.msg_type, got.sender, got.topic, got.seq_status) == (msg_type, "kiosk-07",
                                                                     topic, "first")
    assert (got.hall, got.device, got.seq, got.ts_ms) == ("hall-01", "kiosk-07", 1,
                                                          1_795_000_000_000)
    assert got.body == BODIES[msg_type]


@pytest.mark.parametrize("msg_type", sorted(HALL_BODIES))
def test_hall_round_trip(keyring, msg_type):
    sender, key, body = HALL_BODIES[msg_type]
    role = {"ticket_ack": "consumer", "cmd": "ops"}[msg_type]
    payload = _signer(key, sender).seal(T7.topic(msg_type), msg_type, body)
    got = verify(payload, T7.topic(msg_type), keyring, require_role=role)
    assert got.sender == sender and got.body == body and got.seq_status == "unchecked"
    with pytest.raises(SignatureError, match="lacks role 'kiosk'"):
        verify(payload, T7.topic(msg_type), keyring, require_role="kiosk")


def test_role_opt_out_says_role_not_checked(keyring):
    """Section 7 step 9: ``require_role=None`` is the display-only opt-out; the result says
    ``role_checked=False``. Every way that checks a role says True."""
    payload = _signer(KOP, "ops-1").seal(T7.cmd, "cmd", HALL_BODIES["cmd"][2])
    shown = verify(payload, T7.cmd, keyring, require_role=None)
    assert shown.role_checked is False and shown.sender == "ops-1"
    assert verify(payload, T7.cmd, keyring).role_checked is True               # by topic
    assert verify(payload, T7.cmd, keyring, require_role="ops").role_checked is True
    # The opt-out lets a key of the wrong role through (which is why it must not be shown
    # as verified): a kiosk key signing a command.
    forged = _signer(K8, "kiosk-08").seal(T7.cmd, "cmd", HALL_BODIES["cmd"][2])
    with pytest.raises(RoleError, match="lacks role 'ops'"):
        verify(forged, T7.cmd, keyring)
    assert verify(forged, T7.cmd, keyring, require_role=None).role_checked is False


def test_seal_accepts_tuples_and_copies_body(keyring):
    body = dict(BODIES["state"], services=("household",))
    payload = _signer().seal(T7.state, "state", body)
    assert json.loads(payload)["body"]["services"] == ["household"]


def test_bad_signature(keyring):
    payload = _signer().seal(T7.event, "event", BODIES["event"])
    env = json.loads(payload)
    sig = env["sig"]
    env["sig"] = ("B" if sig[0] == "A" else "A") + sig[1:]
    with pytest.raises(SignatureError, match="bad signature or wrong topic"):
        verify(json.dumps(env).encode(), T7.event, keyring)


def test_non_canonical_signature_spelling_is_refused(keyring):
    payload = _signer().seal(T7.event, "event", BODIES["event"])
    env = json.loads(payload)
    last = env["sig"][-1]
    # The final char holds 2 spare bits; a different char with the same top 4 bits
    # decodes to the same 64 bytes.
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    twin = alphabet[alphabet.index(last) ^ 1]
    env["sig"] = env["sig"][:-1] + twin
    with pytest.raises(ContractError, match="not canonical"):
        verify(json.dumps(env).encode(), T7.event, keyring)


def test_wrong_topic(keyring):
    payload = _signer().seal(T7.event, "event", BODIES["event"])
    with pytest.raises(SignatureError, match="bad signature or wrong topic"):
        verify(payload, KioskTopics("hall-02", "kiosk-07").event, keyring)


def test_unknown_key(keyring):
    payload = _signer(_key(99)).seal(T7.event, "event", BODIES["event"])
    with pytest.raises(SignatureError, match="unknown key id"):
        verify(payload, T7.event, keyring)


def test_sender_owner_mismatch(keyring):
    # kiosk-08's key used to claim to be kiosk-07.
    payload = _signer(K8, "kiosk-07").seal(T7.event, "event", BODIES["event"])
    with pytest.raises(SignatureError, match="belongs to 'kiosk-08'"):
        verify(payload, T7.event, keyring)


def test_sender_does_not_own_topic(keyring):
    payload = _forge(K8, T7.event, _envelope("event", BODIES["event"], sender="kiosk-08", key=K8))
    with pytest.raises(SignatureError, match="sender does not own topic"):
        verify(payload, T7.event, keyring)
    with pytest.raises(ContractError, match="sender does not own topic"):
        _signer(K8, "kiosk-08").seal(T7.event, "event", BODIES["event"])


def test_wrong_type_for_topic(keyring):
    payload = _forge(K7, T7.ticket, _envelope("event", BODIES["event"]))
    with pytest.raises(ContractError, match="does not belong on a ticket topic") as info:
        verify(payload, T7.ticket, keyring)
    assert not isinstance(info.value, SignatureError)
    with pytest.raises(ContractError, match="does not belong"):
        _signer().seal(T7.ticket, "event", BODIES["event"])
    good = _signer().seal(T7.event, "event", BODIES["event"])
    with pytest.raises(ContractError, match="where 'ticket' was expected"):
        verify(good, T7.event, keyring, expect_type="ticket")


def test_float_in_body(keyring):
    body = dict(BODIES["telemetry"], temp_C=51.2)
    with pytest.raises(ContractError, match=r"telemetry\.body\.temp_C: float not allowed"):
        _signer().seal(T7.telemetry, "telemetry", body)
    with pytest.raises(ContractError, match="float not allowed"):
        verify(_forge(K7, T7.telemetry, _envelope("telemetry", body)), T7.telemetry, keyring)
    with pytest.raises(ContractError, match="floats are not allowed"):
        validate_body("ticket", dict(TICKET, waiting_ahead=4.0))


def test_unknown_field(keyring):
    body = dict(BODIES["event"], sevrity="info")
    with pytest.raises(ContractError, match=r"unknown field 'sevrity' \(did you mean 'severity'"):
        _signer().seal(T7.event, "event", body)
    with pytest.raises(ContractError, match="unknown field"):
        verify(_forge(K7, T7.event, _envelope("event", body)), T7.event, keyring)
    env = dict(_envelope("event", BODIES["event"]), extra=1)
    with pytest.raises(ContractError, match="envelope: unknown field"):
        verify(_forge(K7, T7.event, env), T7.event, keyring)


def test_oversized_payload(keyring):
    big = {"uptime_s": 1, **{f"k{i}": "x" * 256 for i in range(62)}}
    with pytest.raises(ContractError, match="exceeds 16384"):
        _signer().seal(T7.telemetry, "telemetry", big)
    with pytest.raises(ContractError, match="exceeds 16384"):
        verify(b" " * (MAX_PAYLOAD + 1), T7.telemetry, keyring)
    assert len(_forge(K7, T7.telemetry, _envelope("telemetry", big))) > MAX_PAYLOAD


def test_schema_errors_carry_the_path_and_not_the_value():
    secret = "110101199003077777"
    with pytest.raises(ContractError) as info:
        validate_body("ticket", dict(TICKET, waiting_ahead=-1, citizen=secret))
    text = str(info.value)
    assert "ticket.body.waiting_ahead: expected int >= 0" in text
    assert "ticket.body.citizen: expected 64 lowercase hex chars | null" in text
    assert secret not in text


def test_verified_repr_hides_the_body(keyring):
    got = verify(_signer().seal(T7.ticket, "ticket", TICKET), T7.ticket, keyring)
    assert TICKET["citizen"] not in repr(got) and "kiosk-07" in repr(got)


@pytest.mark.parametrize("payload, match", [
    (b"\xff\xfe{}", "UTF-8"),
    (b"{", "not JSON"),
    (b"[]", "expected a JSON object"),
    (b'{"v":1,"v":1}', "duplicate"),
    (b'{"v":NaN}', "NaN"),
    (b"[" * 5000 + b"]" * 5000, "nested"),
    (b"1" * 5000, "number too long"),
    (b'{"v":2}', "missing"),
])
def test_malformed_payloads(keyring, payload, match):
    with pytest.raises(ContractError, match=match):
        verify(payload, T7.event, keyring)


def test_cross_checks_between_body_and_topic(keyring):
    _, key, body = HALL_BODIES["cmd"]
    with pytest.raises(ContractError, match="target"):
        _signer(key, "ops-1").seal(T8.cmd, "cmd", body)
    forged = _forge(KOP, T8.cmd, _envelope("cmd", body, sender="ops-1", key=KOP))
    with pytest.raises(ContractError, match="target"):
        verify(forged, T8.cmd, keyring)
    _, key, ack = HALL_BODIES["ticket_ack"]
    with pytest.raises(ContractError, match="not a ticket of the topic's device"):
        _signer(key, "consumer-1").seal(T8.ticket_ack, "ticket_ack", ack)
    with pytest.raises(ContractError, match="serial part differs"):
        validate_body("ticket", dict(TICKET, serial=1235))


def test_keyring_rules():
    ring = Keyring()
    entry = ring.add(K7.public_key(), owner="kiosk-07", roles=["kiosk"])
    assert ring.get(entry.kid) == entry and entry.kid in ring and len(ring) == 1
    with pytest.raises(ContractError, match="already belongs"):
        ring.add(K7.public_key(), owner="kiosk-08", roles=["kiosk"])
    with pytest.raises(ContractError, match="not one string"):
        ring.add(K8.public_key(), owner="kiosk-08", roles="kiosk")
    ring.remove(entry.kid)
    ring.remove(entry.kid)
    with pytest.raises(SignatureError, match="unknown key id"):
        ring.get(entry.kid)


# -- sequence tracker ----------------------------------------------------------------
TRACKER_CASES = {
    "first": ([("b1", 5)], [("first", 0)]),
    "ok": ([("b1", 5), ("b1", 6)], [("first", 0), ("ok", 0)]),
    "gap": ([("b1", 5), ("b1", 9)], [("first", 0), ("gap", 3)]),
    "late fills gap": ([("b1", 5), ("b1", 9), ("b1", 7)], [("first", 0), ("gap", 3), ("late", 0)]),
    "replay": ([("b1", 5), ("b1", 5)], [("first", 0), "replay"]),
    "late twice": ([("b1", 5), ("b1", 9), ("b1", 7), ("b1", 7)],
                   [("first", 0), ("gap", 3), ("late", 0), "replay"]),
    "too old": ([("b1", 10), ("b1", 14), ("b1", 10), ("b1", 11)],
                [("first", 0), ("gap", 3), "replay", ("late", 0)]),
    "below first": ([("b1", 10), ("b1", 9)], [("first", 0), ("late", 0)]),
    "window edge": ([("b1", 1), ("b1", 2), ("b1", 3), ("b1", 4), ("b1", 5), ("b1", 1)],
                    [("first", 0), ("ok", 0), ("ok", 0), ("ok", 0), ("ok", 0), "replay"]),
    "new boot": ([("b1", 5), ("b2", 100), ("b2", 101)],
                 [("first", 0), ("new_boot", 0), ("ok", 0)]),
    "new boot not higher": ([("b1", 5), ("b2", 5), ("b2", 3), ("b1", 6)],
                            [("first", 0), "replay", "replay", ("ok", 0)]),
    "old boot after new": ([("b1", 5), ("b2", 10), ("b1", 6)],
                           [("first", 0), ("new_boot", 0), "replay"]),
    "refusal changes nothing": ([("b1", 5), ("b1", 5), ("b1", 6)],
                                [("first", 0), "replay", ("ok", 0)]),
}


@pytest.mark.parametrize("name", list(TRACKER_CASES))
def test_tracker_table(name):
    steps, expected = TRACKER_CASES[name]
    tracker = SequenceTracker(window=4)
    for (boot, seq), want in zip(steps, expected, strict=True):
        if want == "replay":
            with pytest.raises(ReplayError):
                tracker.check("kiosk-07", boot, seq)
        else:
            assert tracker.check("kiosk-07", boot, seq) == want, (name, boot, seq)


def test_tracker_senders_are_independent():
    tracker = SequenceTracker()
    assert tracker.check("a", BOOT, 5) == ("first", 0)
    assert tracker.check("b", BOOT, 5) == ("first", 0)
    tracker.forget("a")
    assert tracker.check("a", BOOT, 5) == ("first", 0)
    assert tracker.highest("b") == 5


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=60), st.integers(1, 10))
def test_tracker_matches_a_plain_model(seqs, window):
    tracker = SequenceTracker(window=window)
    seen: set[int] = set()
    highest = 0
    for seq in seqs:
        if seen and (seq in seen or seq <= highest - window):
            with pytest.raises(ReplayError):
                tracker.check("s", BOOT, seq)
            continue
        status, missing = tracker.check("s", BOOT, seq)
        if not seen:
            assert status == "first"
        elif seq == highest + 1:
            assert (status, missing) == ("ok", 0)
        elif seq > highest:
            assert (status, missing) == ("gap", seq - highest - 1)
        else:
            assert status == "late"
        seen.add(seq)
        highest = max(highest, seq)


def test_tracker_is_thread_safe():
    tracker = SequenceTracker(window=4096)
    accepted: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def worker() -> None:
        start.wait()
        for seq in range(1, 1001):
            try:
                tracker.check("s", BOOT, seq)
            except ReplayError:
                continue
            with lock:
                accepted.append(seq)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert sorted(accepted) == list(range(1, 1001))


def test_verify_uses_tracker_last(keyring):
    tracker = SequenceTracker()
    signer = _signer()
    good = signer.seal(T7.event, "event", BODIES["event"])
    env = json.loads(good)
    env["body"]["severity"] = "fault"
    with pytest.raises(SignatureError):
        verify(json.dumps(env).encode(), T7.event, keyring, tracker=tracker)
    assert tracker.highest("kiosk-07") is None
    assert verify(good, T7.event, keyring, tracker=tracker).seq_status == "first"
    with pytest.raises(ReplayError):
        verify(good, T7.event, keyring, tracker=tracker)
    signer.seal(T7.event, "event", BODIES["event"])  # seq 2 lost on the way
    third = verify(signer.seal(T7.event, "event", BODIES["event"]), T7.event, keyring,
                   tracker=tracker)
    assert (third.seq_status, third.missing) == ("gap", 1)
    restarted = _signer(boot=BOOT2, start=1001).seal(T7.event, "event", BODIES["event"])
    assert verify(restarted, T7.event, keyring, tracker=tracker).seq_status == "new_boot"


# -- state ordering (will and retained re-delivery) ----------------------------------
def test_state_supersedes_handles_will_and_retained(keyring):
    signer = _signer()
    will = verify(signer.seal(T7.state, "state", dict(BODIES["state"], status="offline")),
                  T7.state, keyring)
    online = verify(signer.seal(T7.state, "state", BODIES["state"]), T7.state, keyring)
    assert will.seq < online.seq
    assert state_supersedes(None, online)
    assert state_supersedes(online, will)       # the will ends its own connection
    assert not state_supersedes(will, online)   # offline is final for that session
    assert not state_supersedes(online, online)  # retained copy delivered again
    nxt = verify(signer.seal(T7.state, "state", dict(BODIES["state"], session=4)),
                 T7.state, keyring)
    assert state_supersedes(will, nxt)
    assert not state_supersedes(nxt, will)      # an old connection's will arrives late


# -- fuzzing: only the ContractError family ever escapes ----------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=20,
)


def _verify_contained(payload: bytes, topic: str, keyring: Keyring, **kw: Any) -> None:
    try:
        verify(payload, topic, keyring, tracker=SequenceTracker(), **kw)
    except CONTRACT_ERRORS:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_fuzz_verify_bytes(payload):
    ring = Keyring()
    ring.add(K7.public_key(), owner="kiosk-07", roles=["kiosk"])
    _verify_contained(payload, T7.event, ring)


@settings(max_examples=300, deadline=None)
@given(json_values, st.booleans())
def test_fuzz_verify_json_values(value, as_envelope):
    ring = Keyring()
    ring.add(K7.public_key(), owner="kiosk-07", roles=["kiosk"])
    if as_envelope:
        env = _envelope("event", BODIES["event"])
        env[sorted(env)[len(repr(value)) % len(env)]] = value
        env["sig"] = value if isinstance(value, str) else _b64url(bytes(64))
        value = env
    payload = json.dumps(value).encode("utf-8")
    _verify_contained(payload, T7.event, ring)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(BODIES)), json_values, st.sampled_from(["replace", "merge"]))
def test_fuzz_verify_signed_bodies(msg_type, value, how):
    # Correctly signed, so the fuzz reaches the schema checks behind the signature.
    ring = Keyring()
    ring.add(K7.public_key(), owner="kiosk-07", roles=["kiosk"])
    body: Any = value
    if how == "merge" and isinstance(value, dict):
        body = {**copy.deepcopy(BODIES[msg_type]), **value}
    payload = _forge(K7, T7.topic(msg_type), _envelope(msg_type, body))
    _verify_contained(payload, T7.topic(msg_type), ring, require_role="kiosk")


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_fuzz_canonical_json_is_contract_error_or_valid(value):
    try:
        out = canonical_json(value)
    except CONTRACT_ERRORS:
        return
    assert out == _enc(value).encode("utf-8")
    assert json.loads(out) == value


def test_hall_filters_match_kiosk_topics():
    # A consumer subscribed to the hall filter receives exactly the kiosk's topic.
    h = HallTopics("hall-01")
    assert h.all_tickets.replace("+", "kiosk-07") == T7.ticket


# -- the fast path of step 3 agrees with the full walk ------------------------------------------
_json_values = st.recursive(
    st.none() | st.booleans()
    | st.integers(min_value=-(2**60), max_value=2**60)
    | st.sampled_from([2**53 - 1, 2**53, -(2**53 - 1), -(2**53), 10**15, 10**16])
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
    | st.sampled_from(["\ud800", "a\udfffb", "\U0001f600", "ok"]),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=4) | st.just("\udc00"), children, max_size=3),
    max_leaves=30)


def _careful_verdict(text: str) -> str | None:
    from mqtt_topics.envelope import _CAREFUL_DECODER, _check_json

    try:
        _check_json(_CAREFUL_DECODER.decode(text), "envelope", 0)
    except ContractError as exc:
        return str(exc)
    return None


@settings(max_examples=400, deadline=None)
@given(value=_json_values, ascii_only=st.booleans())
def test_fast_json_checks_accept_and_refuse_exactly_what_the_full_walk_does(value, ascii_only):
    from mqtt_topics.envelope import _parse

    text = json.dumps(value, ensure_ascii=ascii_only)
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError:
        return                      # a lone surrogate cannot even be sent as UTF-8
    expected = _careful_verdict(text)
    try:
        _parse(raw)
    except ContractError as exc:
        assert expected is not None, f"fast path refused what the walk accepts: {exc}"
        assert str(exc) == expected
    else:
        assert expected is None, f"fast path accepted what the walk refuses: {expected}"


@pytest.mark.parametrize("depth", [6, 7, 8, 9, 12])
def test_fast_json_checks_bound_the_depth(depth):
    from mqtt_topics.envelope import MAX_DEPTH, _parse

    text = "[" * depth + "1" + "]" * depth
    if depth <= MAX_DEPTH:
        assert _parse(text.encode()) is not None
    else:
        with pytest.raises(ContractError, match="nested deeper"):
            _parse(text.encode())


# -- the schemas' fast acceptance agrees with their full check ---------------------------------
_LEAF = st.one_of(
    st.none(), st.booleans(), st.integers(-2**60, 2**60), st.floats(allow_nan=False),
    st.sampled_from([0, 1, -1, 2**53 - 1, 2**53, -(2**53 - 1), -(2**53), 1234]),
    st.text(st.sampled_from("aZ09_-.:/ \t\n\x00\x7f\u00e9\ud800"), max_size=70),
    st.sampled_from(["ok", "yes", "normal", "idcard", "warning", "ab" * 32, "kiosk-07:1234",
                     "0123456789abcdef"]))
_JSONISH = st.recursive(
    _LEAF,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text("abz_09.-", min_size=0, max_size=8), inner,
                                            max_size=4)),
    max_leaves=12)
_ALL_BODIES = {**BODIES, **{t: body for t, (_, _, body) in HALL_BODIES.items()}}


def _mutate(body: Any, data: st.DataObject) -> Any:
    """``body`` with one change somewhere inside: a value replaced, a key dropped or added,
    a list item added."""
    body = copy.deepcopy(body)
    node: Any = body
    while True:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        if not keys:
            break
        key = data.draw(st.sampled_from(keys))
        child = node[key]
        if isinstance(child, (dict, list)) and child and data.draw(st.booleans()):
            node = child
            continue
        action = data.draw(st.sampled_from(["replace", "drop", "add"]))
        if action == "replace":
            node[key] = data.draw(_JSONISH)
        elif action == "drop" and isinstance(node, dict):
            del node[key]
        elif isinstance(node, dict):
            node[data.draw(st.text("abcxyz_T09.-", max_size=10))] = data.draw(_JSONISH)
        else:
            node.append(data.draw(_JSONISH))
        break
    return body


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(sorted(_ALL_BODIES)), st.integers(0, 3), st.data())
def test_schema_accepts_exactly_what_check_finds_no_problem_in(msg_type, changes, data):
    from mqtt_topics.schemas import SCHEMAS

    body = _ALL_BODIES[msg_type]
    for _ in range(changes):
        body = _mutate(body, data)
    problems: list[str] = []
    SCHEMAS[msg_type].check(body, "b", problems)
    assert SCHEMAS[msg_type].accepts(body) == (not problems), problems
    assert SCHEMAS[msg_type].compiled()(body) == (not problems), problems
    if not problems:
        assert validate_body(msg_type, body, owned=True) is body
        assert validate_body(msg_type, body) == body
    else:
        with pytest.raises(ContractError):
            validate_body(msg_type, body, owned=True)


def _specs() -> list[Any]:
    """Every spec inside the v1 schemas (each once), the schemas themselves included."""
    from mqtt_topics.schemas import SCHEMAS, AnyOf, ListOf, MapOf, Nullable, Scalar, Struct

    found: dict[int, Any] = {}
    todo: list[Any] = list(SCHEMAS.values())
    while todo:
        spec = todo.pop()
        if id(spec) in found:
            continue
        found[id(spec)] = spec
        if isinstance(spec, Struct):
            todo += [f.spec for f in spec.fields] + ([spec.extra] if spec.extra else [])
        elif isinstance(spec, Nullable):
            todo.append(spec.inner)
        elif isinstance(spec, ListOf):
            todo.append(spec.item)
        elif isinstance(spec, MapOf):
            todo.append(spec.value)
        elif isinstance(spec, AnyOf):
            todo += list(spec.options)
        elif isinstance(spec, Scalar):
            todo.append(spec._text)
    return sorted(found.values(), key=repr)


_SPECS = _specs()


@settings(max_examples=1500, deadline=None)
@given(st.sampled_from(_SPECS), st.one_of(_LEAF, _JSONISH))
def test_every_spec_accepts_exactly_what_its_check_finds_no_problem_in(spec, value):
    problems: list[str] = []
    spec.check(value, "v", problems)
    assert spec.accepts(value) == (not problems), (spec, problems)
    assert spec.compiled()(value) == (not problems), (spec, problems)


def _edges(spec: Any) -> list[Any]:
    """Values on each side of every bound a spec states (generated values seldom land there)."""
    from mqtt_topics.schemas import Int, ListOf, MapOf, Str, Struct

    out: list[Any] = [None, True, 0, 1.0, "", [], {}]
    if isinstance(spec, Int):
        out += [spec.min - 1, spec.min, spec.max, spec.max + 1]
    elif isinstance(spec, Str):
        out += ["a" * n for n in (spec.min_len - 1, spec.min_len, spec.max_len, spec.max_len + 1)
                if n >= 0] + list(spec.enum or ()) + ["0" * spec.max_len, "\x00"]
    elif isinstance(spec, ListOf):
        out += [["a"] * (spec.max_items + 1), ["ab", "ab"], ["ab", "cd"],
                [1] * spec.max_items, [None] * spec.max_items]
    elif isinstance(spec, MapOf):
        out += [{f"k{i}": 1 for i in range(n)} for n in (spec.max_items, spec.max_items + 1)]
        out += [{"a b": 1}, {"k": {"x": 1}}, {"k": [1]}]
    elif isinstance(spec, Struct):
        example = next((b for b in _ALL_BODIES.values()
                        if {f.name for f in spec.fields if f.required} <= set(b)), None)
        if example is not None:
            out += [example, {**example, "zz_extra": 1},
                    {k: v for k, v in list(example.items())[1:]}]
            out += [{**example, **{f"x{i}": 1 for i in range(n)}} for n in (62, 63, 64)]
    return out


@pytest.mark.parametrize("spec", _SPECS, ids=lambda s: type(s).__name__)
def test_compiled_specs_agree_on_every_bound(spec):
    for value in _edges(spec):
        problems: list[str] = []
        spec.check(value, "v", problems)
        assert spec.compiled()(value) == (not problems), (spec, value, problems)


def test_duplicate_keys_refused_at_any_depth():
    topic = T7.telemetry
    for text in ('{"a":1,"a":2}', '{"body":{"x":{"k":1,"k":1}}}'):
        with pytest.raises(ContractError, match="duplicate object key"):
            verify(text.encode(), topic, Keyring())


def test_fast_acceptance_runs_the_cross_field_rule():
    from mqtt_topics.schemas import SCHEMAS

    body = dict(TICKET, ticket_uid=f"kiosk-07:{TICKET['serial'] + 1}")
    assert not SCHEMAS["ticket"].accepts(body)
    assert not SCHEMAS["ticket"].compiled()(body)
    assert SCHEMAS["ticket"].compiled()(dict(TICKET))
    with pytest.raises(ContractError, match="serial part differs"):
        validate_body("ticket", body, owned=True)
    assert SCHEMAS["ticket"].accepts(dict(TICKET))


# -- one way to the signed bytes: rebuilt from what was parsed ---------------------------------
@settings(max_examples=150, deadline=None)
@given(data=st.data(), msg_type=st.sampled_from(["telemetry", "event", "state", "ticket"]))
def test_any_spelling_of_a_signed_envelope_verifies_and_any_change_does_not(data, msg_type):
    """Members reordered, whitespace, \\u escapes, ``sig`` moved: each is re-serialized to
    the signed bytes (accepted, same body); a changed value never verifies either way."""
    import random

    ring = Keyring()
    ring.add(K7.public_key(), owner="kiosk-07", roles=["kiosk"])
    topic = T7.topic(msg_type)
    env = json.loads(_signer().seal(topic, msg_type, BODIES[msg_type]))
    rng = random.Random(data.draw(st.integers(0, 2**32)))

    def shuffled(value):
        if isinstance(value, dict):
            items = [(k, shuffled(v)) for k, v in value.items()]
            rng.shuffle(items)
            return dict(items)
        return [shuffled(v) for v in value] if isinstance(value, list) else value

    seps = data.draw(st.sampled_from([(",", ":"), (", ", ": "), (" ,", " : ")]))
    text = json.dumps(shuffled(env), separators=seps, ensure_ascii=data.draw(st.booleans()))
    got = verify(text.encode(), topic, ring)
    assert got.body == BODIES[msg_type]

    changed = copy.deepcopy(env)
    # Every member the signature covers whose change leaves a well-formed envelope of a
    # known key ("kid" would name an unknown key, "v" and "type" fail before the signature).
    key = data.draw(st.sampled_from(["body", "boot", "sender", "seq", "ts_ms"]))
    if key == "body":
        first = sorted(changed["body"])[0]
        value = changed["body"][first]
        changed["body"][first] = value + "x" if isinstance(value, str) else "xxx"
    elif isinstance(changed[key], int):
        changed[key] += 1
    else:
        changed[key] = changed[key][:-1] + ("0" if changed[key][-1] != "0" else "1")
    with pytest.raises(SignatureError, match="bad signature"):
        verify(json.dumps(shuffled(changed), separators=seps).encode(), topic, ring)


def test_a_nested_copy_of_the_sig_member_is_not_taken_for_it(keyring):
    """The top-level ``sig`` spelled with an escape and the same text put into the body: the
    cut finds the nested copy, those bytes were never signed, and the re-serialized
    envelope (which now has a changed body) does not verify either."""
    payload = _signer().seal(T7.event, "event", BODIES["event"])
    sig = json.loads(payload)["sig"]
    member = f',"sig":"{sig}"'.encode()
    respelled = payload.replace(member, f',"\\u0073ig":"{sig}"'.encode())
    detail_end = respelled.index(b"}", respelled.index(b'"detail":{'))   # a flat object
    forged = respelled[:detail_end] + member + respelled[detail_end:]
    assert forged.count(member) == 1
    with pytest.raises(SignatureError, match="bad signature"):
        verify(forged, T7.event, keyring)


def test_bytes_the_owner_signed_that_are_not_canonical_are_refused(keyring):
    """The key's owner signed non-canonical text (members unsorted, spaces) and the payload
    carries exactly that text plus the sig member: refused, as every conforming verifier
    refuses it (docs/mqtt-contract.md section 5 step 6: one way to the signed bytes)."""
    from mqtt_topics.envelope import SIGNING_PREFIX

    env = json.loads(_signer().seal(T7.event, "event", BODIES["event"]))
    del env["sig"]
    text = json.dumps(dict(reversed(list(env.items()))), separators=(", ", ": ")).encode()
    sig = base64.urlsafe_b64encode(K7.sign(SIGNING_PREFIX + T7.event.encode() + b"\n" + text)
                                   ).rstrip(b"=")
    payload = text[:-1] + b',"sig":"' + sig + b'"}'
    with pytest.raises(SignatureError, match="bad signature"):
        verify(payload, T7.event, keyring)


def test_sig_spelling_rule_is_the_round_trip_rule(keyring):
    """Step 4 tests the last character's 4 unused bits instead of encoding again: for every
    possible last character both rules give the same answer, and a refused spelling is a
    ContractError of step 4, never a SignatureError."""
    from mqtt_topics.envelope import _b64url

    payload = _signer().seal(T7.event, "event", BODIES["event"])
    sig = json.loads(payload)["sig"]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    canonical = []
    for last in alphabet:
        spelled = sig[:-1] + last
        round_trip = _b64url(base64.urlsafe_b64decode(spelled + "==")) == spelled
        changed = payload.replace(sig.encode(), spelled.encode())
        if spelled == sig:
            assert round_trip and verify(changed, T7.event, keyring).seq == 1
        elif round_trip:            # a canonical spelling of other signature bytes
            with pytest.raises(SignatureError, match="bad signature"):
                verify(changed, T7.event, keyring)
        else:
            with pytest.raises(ContractError, match="4 unused bits") as caught:
                verify(changed, T7.event, keyring)
            assert not isinstance(caught.value, SignatureError)
        canonical += [last] if round_trip else []
    assert len(canonical) == 4


@pytest.mark.parametrize("change, words", [
    (lambda p: p.replace(b'"severity":"warning"', b'"severity":"warning","severity":"warning"'),
     "duplicate object key"),
    (lambda p: p.replace(b'"seq":1', b'"seq":1.0'), "float not allowed"),
    (lambda p: p.replace(b'"seq":1', b'"seq":90071992547409910'), "integer outside"),
    (lambda p: p.replace(b'"name":"', b'"name":"\\ud800'), "lone surrogate"),
    (lambda p: p.replace(b'"v":1', b'"v":1,"x":1'), "unknown field"),
])
def test_a_changed_payload_reports_what_the_contract_order_finds_first(keyring, change, words):
    """A signed payload changed so that step 3 or 4 refuses it: the first problem in the
    contract's order is worded, not the signature."""
    payload = change(_signer().seal(T7.event, "event", BODIES["event"]))
    with pytest.raises(ContractError, match=words) as caught:
        verify(payload, T7.event, keyring)
    assert not isinstance(caught.value, SignatureError)
