"""Build tests/vectors/envelope_v1.json: the contract's test vectors (docs/mqtt-contract.md
section 11), for a third party to check an implementation from the file alone.

    .venv/bin/python tests/vectors/build.py          # rewrite the file
    .venv/bin/python tests/vectors/build.py --check  # exit 1 if the file is not what this builds

What the file holds:

- ``keys``: fixed Ed25519 seeds (never use them outside tests) with owner, roles and hall;
  ``keyring`` names the ones a receiver trusts (the ``intruder`` key is not among them);
- ``positive``: two envelopes with their canonical bytes, signature and payload;
- ``negative``: one payload per kind of tampering, one or more per verification step of
  section 7 (``step``), each with the error class and a message pattern it must raise;
- ``sequences``: runs of authentic messages from one sender fed to one sequence tracker in
  order (section 8), each with the status it gets or ``ReplayError``;
- ``commands``: one kiosk's gate (its device, hall, wall clock, window and nonce capacity)
  and a run of payloads on its cmd topic, each with the ``cmd_result`` it must produce
  (section 3: status, code, and whether ``cmd_seq``/``nonce`` name the command).

The expectations below are written by hand from the contract, not computed by the package:
the package is checked against them (tests/test_envelope.py, tests/test_commands.py), and
the builder only does the signing. Ed25519 is deterministic, so the file is byte for byte
the same on every run; the test suite rebuilds it and compares.
"""

from __future__ import annotations

import base64
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mqtt_topics.envelope import canonical_bytes, canonical_json, key_id  # noqa: E402

OUT = Path(__file__).with_name("envelope_v1.json")
HALL = "hall-01"
BOOT = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"
BOOT2 = "ffeeddccbbaa99887766554433221100"
NOW_MS = 1_795_000_000_000          # the commands' kiosk wall clock
MAX_INT = 2**53 - 1


def _seed(first: int) -> bytes:
    return bytes(range(first, first + 32))


#: name -> (seed, owner, roles, hall, trusted)
KEYS: dict[str, tuple[bytes, str, tuple[str, ...], str, bool]] = {
    "kiosk-07": (_seed(0x00), "kiosk-07", ("kiosk",), HALL, True),
    "kiosk-08": (_seed(0x20), "kiosk-08", ("kiosk",), HALL, True),
    "ops-1": (_seed(0x40), "ops-1", ("ops",), HALL, True),
    "consumer-1": (_seed(0x60), "consumer-1", ("consumer",), HALL, True),
    "monitor-1": (_seed(0x80), "monitor-1", ("monitor",), HALL, True),
    "kiosk-21": (_seed(0xc0), "kiosk-21", ("kiosk",), "hall-02", True),   # another hall's
    "intruder": (_seed(0xa0), "kiosk-07", ("kiosk",), HALL, False),       # never trusted
}


def _private(name: str) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(KEYS[name][0])


def _public_raw(name: str) -> bytes:
    return _private(name).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _kid(name: str) -> str:
    return key_id(_public_raw(name))


def _b64(sig: bytes) -> str:
    return base64.urlsafe_b64encode(sig).rstrip(b"=").decode("ascii")


def topic(kind: str, device: str = "kiosk-07", hall: str = HALL) -> str:
    suffix = {"ticket_ack": "ticket/ack", "cmd_result": "cmd/result"}.get(kind, kind)
    return f"hall/{hall}/kiosk/{device}/{suffix}"


# -- bodies ----------------------------------------------------------------------------
TICKET = {"appointment_id": None,
          "citizen": "3f2a6c1e9b8d7f40a1c2e3d4b5a69788c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2",
          "clock_trusted": True, "issued_at_ms": 1795000000123, "number": 123, "printed": "yes",
          "priority": "normal", "serial": 1234, "service": "household",
          "service_name": "户籍业务", "source": "idcard", "ticket_id": "A-07-0123",
          "ticket_uid": "kiosk-07:1234", "waiting_ahead": 4}
EVENT = {"detail": {"0": 0, "Zeta": -2, "_x": "line1\nline2\t\"q\" \\ é 😀", "a-b": None,
                    "a.b": True, "zeta": 1},
         "name": "printer.paper_low", "severity": "warning", "subject": "printer"}
TELEMETRY = {"uptime_s": 3600, "temp_mC": 48250, "printer": {"online": True, "paper": "ok"}}
TICKET_ACK = {"ticket_uid": "kiosk-07:1234", "ticket_id": "A-07-0123", "status": "accepted",
              "ledger_id": 9001}
CMD_RESULT = {"cmd_seq": 7, "nonce": "n-0000000000000007", "status": "done", "reason": None,
              "detail": {}}
ALERT = {"alert_id": f"paper_out:{HALL}:kiosk-07:1795000000", "rule": "paper_out",
         "kind": "paper", "severity": "warning", "state": "firing", "device": "kiosk-07",
         "value": None, "since_ms": 1795000000500, "message": "printer out of paper"}


# Ids are at most 32 characters, so a well-shaped alert_id is at most 3 x 32 + 16 digits + 3
# colons = 115 characters: one of 129 is refused however its parts look.
_ALERT_ID_HEAD = f"paper_out:{HALL}:kiosk-07:1795000000:"
ALERT_ID_129 = _ALERT_ID_HEAD + "x" * (129 - len(_ALERT_ID_HEAD))


def cmd_body(nonce: str, *, device: str = "kiosk-07", expires_in_ms: int = 60_000,
             name: str = "reboot") -> dict[str, Any]:
    return {"name": name, "args": {}, "target": device, "nonce": nonce,
            "expires_at_ms": NOW_MS + expires_in_ms}


# -- sealing ---------------------------------------------------------------------------
def envelope(key: str, msg_type: str, body: Any, *, seq: int, sender: str | None = None,
             boot: str = BOOT, ts_ms: int = 1795000000123) -> dict[str, Any]:
    return {"v": 1, "type": msg_type, "sender": sender or KEYS[key][1], "boot": boot,
            "seq": seq, "ts_ms": ts_ms, "kid": _kid(key), "body": body}


def sign(key: str, on_topic: str, env: dict[str, Any]) -> str:
    return _b64(_private(key).sign(canonical_bytes(on_topic, env)))


def sealed(key: str, on_topic: str, env: dict[str, Any]) -> dict[str, Any]:
    return dict(env, sig=sign(key, on_topic, env))


def text(obj: dict[str, Any]) -> str:
    return canonical_json(obj).decode("utf-8")


def good(kind: str = "ticket", *, key: str = "kiosk-07", device: str = "kiosk-07",
         seq: int = 42, body: Any = None, **kw: Any) -> tuple[str, dict[str, Any]]:
    """An authentic payload (as a dict) for ``kind`` on ``device``'s topic."""
    bodies = {"ticket": TICKET, "event": EVENT, "telemetry": TELEMETRY,
              "ticket_ack": TICKET_ACK, "cmd_result": CMD_RESULT, "alert": ALERT,
              "cmd": cmd_body("n-vector-good-0001")}
    t = topic(kind, device)
    return t, sealed(key, t, envelope(key, kind, bodies[kind] if body is None else body,
                                      seq=seq, **kw))


# -- positive vectors (unchanged since the contract was published) ----------------------
def positives() -> list[dict[str, Any]]:
    out = []
    for name, kind, body, seq, ts in (
            ("ticket with non-ASCII text", "ticket", TICKET, 42, 1795000000123),
            ("event: key order and string escapes", "event", EVENT, 43, 1795000001123)):
        t = topic(kind)
        env = envelope("kiosk-07", kind, body, seq=seq, ts_ms=ts)
        sig = sign("kiosk-07", t, env)
        out.append({"name": name, "topic": t, "envelope": env,
                    "canonical": canonical_bytes(t, env).decode("utf-8"), "sig": sig,
                    "payload": text(dict(env, sig=sig))})
    return out


# -- negative vectors ------------------------------------------------------------------
def _neg(name: str, step: int, on_topic: str, payload: str | bytes, error: str,
         message: str) -> dict[str, Any]:
    vec: dict[str, Any] = {"name": name, "step": step, "topic": on_topic, "error": error,
                           "message": message}
    if isinstance(payload, bytes):
        vec["payload_hex"] = payload.hex()
    else:
        vec["payload"] = payload
    return vec


def _with(obj: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = dict(obj)
    for k, v in changes.items():
        if v is _DROP:
            out.pop(k)
        else:
            out[k] = v
    return out


_DROP = object()


def _resigned(key: str, on_topic: str, obj: dict[str, Any], **changes: Any) -> str:
    """``obj`` with ``changes``, signed again: an authentic payload whose only fault is the
    change (for the steps after the signature)."""
    env = {k: v for k, v in _with(obj, **changes).items() if k != "sig"}
    return text(sealed(key, on_topic, env))


def negatives() -> list[dict[str, Any]]:
    t, tk = good("ticket")
    tk_text = text(tk)
    sig = tk["sig"]
    n = []
    # step 1: the topic
    n.append(_neg("wildcard topic", 1, "hall/hall-01/kiosk/+/ticket", tk_text,
                  "ContractError", "wildcard"))
    n.append(_neg("unknown topic kind", 1, "hall/hall-01/kiosk/kiosk-07/tickets", tk_text,
                  "ContractError", "topic"))
    n.append(_neg("topic outside the tree", 1, "hall/hall-01/ops/alert", tk_text,
                  "ContractError", "topic"))
    # step 2: size (a valid envelope padded with whitespace past 16384 bytes)
    n.append(_neg("payload of 16385 bytes", 2, t, tk_text[:-1] + " " * (16385 - len(
        tk_text.encode("utf-8"))) + "}", "ContractError", "exceeds 16384"))
    # step 3: text and JSON
    n.append(_neg("not UTF-8", 3, t, tk_text.replace("户籍", "XX").encode("utf-8")
                  .replace(b"XX", b"\xff\xfe"), "ContractError", "UTF-8"))
    n.append(_neg("UTF-8 byte order mark", 3, t, b"\xef\xbb\xbf" + tk_text.encode("utf-8"),
                  "ContractError", "BOM|byte order"))
    n.append(_neg("not JSON", 3, t, tk_text[:-1], "ContractError", "JSON"))
    n.append(_neg("not an object", 3, t, "[" + tk_text + "]", "ContractError", "object"))
    n.append(_neg("duplicate key", 3, t, tk_text[:-1] + ',"seq":43}', "ContractError",
                  "duplicate"))
    n.append(_neg("NaN", 3, t, tk_text.replace('"waiting_ahead":4', '"waiting_ahead":NaN'),
                  "ContractError", "NaN"))
    n.append(_neg("float with integral value", 3, t,
                  tk_text.replace('"waiting_ahead":4', '"waiting_ahead":4.0'),
                  "ContractError", "float"))
    n.append(_neg("exponent", 3, t, tk_text.replace('"waiting_ahead":4', '"waiting_ahead":4e0'),
                  "ContractError", "float"))
    n.append(_neg("integer above 2^53-1", 3, t,
                  tk_text.replace('"waiting_ahead":4', f'"waiting_ahead":{MAX_INT + 1}'),
                  "ContractError", "outside"))
    n.append(_neg("nesting deeper than 8 levels", 3, t,
                  tk_text.replace('"appointment_id":null',
                                  '"appointment_id":' + "[" * 8 + "1" + "]" * 8),
                  "ContractError", "deep|depth|nest"))
    n.append(_neg("lone surrogate", 3, t,
                  tk_text.replace('"ticket_id":"A-07-0123"', '"ticket_id":"A-07-\\ud800"'),
                  "ContractError", "surrogate"))
    # step 4: the nine members, their types and forms
    n.append(_neg("member missing (ts_ms)", 4, t, text(_with(tk, ts_ms=_DROP)),
                  "ContractError", "ts_ms"))
    n.append(_neg("extra member", 4, t, text(_with(tk, note="hi")), "ContractError", "note"))
    n.append(_neg("version 2", 4, t, text(_with(tk, v=2)), "ContractError", "v"))
    n.append(_neg("seq 0", 4, t, text(_with(tk, seq=0)), "ContractError", "seq"))
    n.append(_neg("seq as a string", 4, t, text(_with(tk, seq="42")), "ContractError", "seq"))
    n.append(_neg("seq as a boolean", 4, t, text(_with(tk, seq=True)), "ContractError", "seq"))
    n.append(_neg("boot in upper case", 4, t, text(_with(tk, boot=BOOT.upper())),
                  "ContractError", "boot"))
    n.append(_neg("boot too short", 4, t, text(_with(tk, boot=BOOT[:-2])), "ContractError",
                  "boot"))
    n.append(_neg("negative ts_ms", 4, t, text(_with(tk, ts_ms=-1)), "ContractError",
                  "ts_ms"))
    n.append(_neg("kid of 15 characters", 4, t, text(_with(tk, kid=tk["kid"][:15])),
                  "ContractError", "kid"))
    n.append(_neg("sender not an id", 4, t, text(_with(tk, sender="kiosk 07")),
                  "ContractError", "sender"))
    n.append(_neg("body not an object", 4, t, text(_with(tk, body=[])), "ContractError",
                  "body"))
    n.append(_neg("sig with padding", 4, t, text(_with(tk, sig=sig + "==")),
                  "ContractError", "sig"))
    n.append(_neg("sig in the standard alphabet", 4, t,
                  text(_with(tk, sig=sig.replace("-", "+").replace("_", "/"))),
                  "ContractError", "sig"))
    n.append(_neg("sig of 85 characters", 4, t, text(_with(tk, sig=sig[:-1])),
                  "ContractError", "sig"))
    last = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_".index(sig[-1])
    n.append(_neg("sig with its 4 unused bits set", 4, t,
                  text(_with(tk, sig=sig[:-1] + "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuv"
                             "wxyz0123456789-_"[last | 1])),
                  "ContractError", "unused bits"))
    # step 5: the key
    n.append(_neg("unknown kid (a key the hall never trusted)", 5, t,
                  text(sealed("intruder", t, envelope("intruder", "ticket", TICKET, seq=42))),
                  "SignatureError", "unknown key id"))
    # step 6: the signature over THIS topic
    n.append(_neg("same envelope on another topic", 6, topic("ticket", hall="hall-02"),
                  tk_text, "SignatureError", "bad signature or wrong topic"))
    n.append(_neg("same envelope on another kiosk's topic", 6, topic("ticket", "kiosk-08"),
                  tk_text, "SignatureError", "bad signature or wrong topic"))
    n.append(_neg("body changed after signing", 6, t,
                  text(_with(tk, body=dict(TICKET, waiting_ahead=3))),
                  "SignatureError", "bad signature or wrong topic"))
    n.append(_neg("seq changed after signing", 6, t, text(_with(tk, seq=43)),
                  "SignatureError", "bad signature or wrong topic"))
    # Every member but sig is signed, ts_ms included (never checked, but not changeable);
    # each change below keeps the member well formed (step 4) and its kid known (step 5).
    n.append(_neg("ts_ms changed after signing", 6, t, text(_with(tk, ts_ms=tk["ts_ms"] + 1)),
                  "SignatureError", "bad signature or wrong topic"))
    n.append(_neg("boot changed after signing", 6, t, text(_with(tk, boot=BOOT2)),
                  "SignatureError", "bad signature or wrong topic"))
    # Another trusted sender's id: the signature fails (step 6) before the key's owner is
    # compared with the sender (step 7).
    n.append(_neg("sender changed after signing", 6, t, text(_with(tk, sender="kiosk-08")),
                  "SignatureError", "bad signature or wrong topic"))
    # A valid type of another kind: the signature fails (step 6) before the type is
    # compared with the topic (step 10).
    n.append(_neg("type changed after signing", 6, t, text(_with(tk, type="event")),
                  "SignatureError", "bad signature or wrong topic"))
    # kiosk-08's key is trusted with the same role: the signature fails (step 6) before the
    # key's owner is compared with the sender (step 7).
    n.append(_neg("kid swapped to another trusted key of the same role", 6, t,
                  text(_with(tk, kid=_kid("kiosk-08"))),
                  "SignatureError", "bad signature or wrong topic"))
    raw_sig = bytearray(base64.urlsafe_b64decode(sig + "=="))
    raw_sig[10] ^= 0x01          # byte 10: characters 13-14, far from the last one's spare bits
    n.append(_neg("one signature bit flipped (still canonical base64url)", 6, t,
                  text(_with(tk, sig=_b64(bytes(raw_sig)))),
                  "SignatureError", "bad signature or wrong topic"))
    n.append(_neg("signature over non-canonical text", 6, t,
                  text(_with(tk, sig=_b64(_private("kiosk-07").sign(
                      b"hallkiosk/1\n" + t.encode() + b"\n"
                      + json.dumps({k: v for k, v in tk.items() if k != "sig"},
                                   ensure_ascii=False).encode("utf-8"))))),
                  "SignatureError", "bad signature or wrong topic"))
    n.append(_neg("signature without the signing prefix", 6, t,
                  text(_with(tk, sig=_b64(_private("kiosk-07").sign(
                      canonical_bytes(t, {k: v for k, v in tk.items() if k != "sig"})
                      [len(b"hallkiosk/1\n"):])))),
                  "SignatureError", "bad signature or wrong topic"))
    # step 7: owner and hall of the key
    t8 = topic("ticket", "kiosk-08")
    n.append(_neg("kiosk-07's key claiming to be kiosk-08", 7, t8,
                  text(sealed("kiosk-07", t8, envelope("kiosk-07", "ticket",
                                                       dict(TICKET, ticket_uid="kiosk-08:1234"),
                                                       seq=42, sender="kiosk-08"))),
                  "SignatureError", "belongs to"))
    t21 = topic("ticket", "kiosk-21")
    n.append(_neg("another hall's key on this hall's topic", 7, t21,
                  text(sealed("kiosk-21", t21, envelope(
                      "kiosk-21", "ticket", dict(TICKET, ticket_uid="kiosk-21:1234"),
                      seq=42))),
                  "SignatureError", "belongs to hall"))
    # step 8: the sender owns the kiosk topic
    n.append(_neg("kiosk-07 publishing on kiosk-08's ticket topic", 8, t8,
                  text(sealed("kiosk-07", t8, envelope("kiosk-07", "ticket", TICKET, seq=42))),
                  "SignatureError", "sender does not own topic"))
    # step 9: the role
    tc = topic("cmd")
    n.append(_neg("a kiosk key signing a command", 9, tc,
                  text(sealed("kiosk-08", tc, envelope("kiosk-08", "cmd",
                                                       cmd_body("n-vector-role-0001"), seq=5))),
                  "RoleError", "lacks role 'ops'"))
    ta = topic("ticket_ack")
    n.append(_neg("an ops key acknowledging a ticket", 9, ta,
                  text(sealed("ops-1", ta, envelope("ops-1", "ticket_ack", TICKET_ACK, seq=5))),
                  "RoleError", "lacks role 'consumer'"))
    tal = topic("alert")
    n.append(_neg("a consumer key raising an alert", 9, tal,
                  text(sealed("consumer-1", tal, envelope("consumer-1", "alert", ALERT, seq=5))),
                  "RoleError", "lacks role 'monitor'"))
    # A service key on a kiosk kind: service ids share the namespace of device ids
    # (section 1), so a topic named after the service passes steps 7 and 8; only its role
    # keeps it from speaking as a kiosk.
    for name, signer, kind, body in (
            ("a monitor key publishing a kiosk event on a topic of its own name", "monitor-1",
             "event", EVENT),
            ("an ops key publishing a command result on a topic of its own name", "ops-1",
             "cmd_result", CMD_RESULT)):
        own = topic(kind, signer)
        n.append(_neg(name, 9, own, text(sealed(signer, own, envelope(signer, kind, body,
                                                                       seq=5))),
                      "RoleError", "lacks role 'kiosk'"))
    # step 10: the type of the topic's kind
    n.append(_neg("an event body typed event on the ticket topic", 10, t,
                  _resigned("kiosk-07", t, tk, type="event", body=EVENT),
                  "ContractError", "type"))
    # step 11: the body's schema and its relations to the topic
    for name, body, message in (
            ("ticket with an unknown member", dict(TICKET, extra=1), "extra"),
            ("ticket without waiting_ahead", _with(TICKET, waiting_ahead=_DROP),
             "waiting_ahead"),
            ("ticket priority not in its set", dict(TICKET, priority="vip"), "priority"),
            ("ticket_uid of another device", dict(TICKET, ticket_uid="kiosk-08:1234"),
             "ticket_uid"),
            ("ticket_uid not matching serial", dict(TICKET, ticket_uid="kiosk-07:1235"),
             "ticket_uid"),
            ("citizen in upper-case hex", dict(TICKET, citizen=TICKET["citizen"].upper()),
             "citizen"),
            ("control character in text", dict(TICKET, service_name="a\x07b"),
             "service_name")):
        n.append(_neg(name, 11, t, _resigned("kiosk-07", t, tk, body=body), "ContractError",
                      message))
    te = topic("event")
    _, ev = good("event")
    n.append(_neg("event detail nested", 11, te,
                  _resigned("kiosk-07", te, ev, body=dict(EVENT, detail={"a": {"b": 1}})),
                  "ContractError", "detail"))
    tt = topic("telemetry")
    _, tm = good("telemetry")
    n.append(_neg("telemetry nested key with a dot", 11, tt,
                  _resigned("kiosk-07", tt, tm, body=dict(TELEMETRY, printer={"pa.per": "ok"})),
                  "ContractError", "printer"))
    n.append(_neg("telemetry nested two levels", 11, tt,
                  _resigned("kiosk-07", tt, tm,
                            body=dict(TELEMETRY, printer={"paper": {"level": 1}})),
                  "ContractError", "printer"))
    n.append(_neg("telemetry without uptime_s", 11, tt,
                  _resigned("kiosk-07", tt, tm, body=_with(TELEMETRY, uptime_s=_DROP)),
                  "ContractError", "uptime_s"))
    _, ack = good("ticket_ack", key="consumer-1")
    n.append(_neg("ticket_ack for another device's ticket", 11, ta,
                  _resigned("consumer-1", ta, ack,
                            body=dict(TICKET_ACK, ticket_uid="kiosk-08:1234")),
                  "ContractError", "ticket_uid"))
    _, cm = good("cmd", key="ops-1")
    n.append(_neg("command whose target is another device", 11, tc,
                  _resigned("ops-1", tc, cm, body=cmd_body("n-vector-good-0001",
                                                           device="kiosk-08")),
                  "ContractError", "target"))
    n.append(_neg("command nonce too short", 11, tc,
                  _resigned("ops-1", tc, cm, body=cmd_body("short")), "ContractError",
                  "nonce"))
    tr = topic("cmd_result")
    _, cr = good("cmd_result")
    n.append(_neg("cmd_result accepted without naming its command", 11, tr,
                  _resigned("kiosk-07", tr, cr, body=dict(CMD_RESULT, cmd_seq=None, nonce=None,
                                                          status="accepted")),
                  "ContractError", "cmd_seq|nonce"))
    n.append(_neg("cmd_result with a nonce but no cmd_seq", 11, tr,
                  _resigned("kiosk-07", tr, cr, body=dict(CMD_RESULT, cmd_seq=None,
                                                          status="refused")),
                  "ContractError", "cmd_seq|nonce"))
    _, al = good("alert", key="monitor-1")
    for name, body in (
            ("alert_id with another second", dict(ALERT, alert_id=f"paper_out:{HALL}:kiosk-07:"
                                                                  "1795000001")),
            ("alert_id with a leading zero", dict(ALERT, alert_id=f"paper_out:{HALL}:kiosk-07:"
                                                                  "01795000000")),
            ("alert_id of another rule", dict(ALERT, alert_id=f"offline:{HALL}:kiosk-07:"
                                                              "1795000000")),
            ("alert_id of another hall", dict(ALERT, alert_id="paper_out:hall-02:kiosk-07:"
                                                              "1795000000")),
            ("alert_id of another device (body.device is the topic's)",
             dict(ALERT, alert_id=f"paper_out:{HALL}:kiosk-08:1795000000")),
            ("alert_id without its second", dict(ALERT, alert_id=f"paper_out:{HALL}:kiosk-07")),
            ("alert_id of 129 characters", dict(ALERT, alert_id=ALERT_ID_129))):
        n.append(_neg(name, 11, tal, _resigned("monitor-1", tal, al, body=body),
                      "ContractError", "alert_id"))
    n.append(_neg("alert about another device", 11, tal,
                  _resigned("monitor-1", tal, al, body=dict(
                      ALERT, device="kiosk-08", alert_id=f"paper_out:{HALL}:kiosk-08:1795000000")),
                  "ContractError", "device"))
    return n


# -- sequences (section 8) --------------------------------------------------------------
def sequences() -> list[dict[str, Any]]:
    def msg(seq: int, boot: str = BOOT) -> str:
        return text(good("event", seq=seq, boot=boot)[1])

    def run(name: str, steps: list[tuple[int, str, str]]) -> dict[str, Any]:
        return {"name": name, "topic": topic("event"), "window": 1024,
                "messages": [{"seq": s, "boot": b, "payload": msg(s, b), "expect": e}
                             for s, b, e in steps]}

    return [
        run("in order, a gap, a late fill, a duplicate", [
            (10, BOOT, "first"), (11, BOOT, "ok"), (15, BOOT, "gap"), (13, BOOT, "late"),
            (13, BOOT, "ReplayError"), (15, BOOT, "ReplayError"), (16, BOOT, "ok")]),
        run("below the window", [
            (2000, BOOT, "first"), (977, BOOT, "late"), (976, BOOT, "ReplayError"),
            (3100, BOOT, "gap"), (2076, BOOT, "ReplayError")]),
        run("a new boot", [
            (100, BOOT, "first"), (101, BOOT, "ok"), (1000, BOOT2, "new_boot"),
            (1001, BOOT2, "ok"), (101, BOOT, "ReplayError"), (1002, BOOT, "new_boot")]),
        run("a new boot may not go back", [
            (500, BOOT, "first"), (1, BOOT2, "ReplayError"), (500, BOOT2, "ReplayError"),
            (501, BOOT, "ok")]),
    ]


# -- commands (section 3) ---------------------------------------------------------------
def commands() -> dict[str, Any]:
    tc = topic("cmd")

    def cmd(seq: int, nonce: str, *, key: str = "ops-1", boot: str = BOOT,
            on_topic: str = tc, **body_kw: Any) -> str:
        return text(sealed(key, on_topic, envelope(key, "cmd", cmd_body(nonce, **body_kw),
                                                   seq=seq, boot=boot)))

    def step(name: str, payload: str | bytes, code: str | None, named: bool,
             on_topic: str = tc, status: str = "refused") -> dict[str, Any]:
        s: dict[str, Any] = {"name": name, "topic": on_topic,
                             "expect": {"status": "accepted" if code is None else status,
                                        "code": code, "names_command": named}}
        if isinstance(payload, bytes):
            s["payload_hex"] = payload.hex()
        else:
            s["payload"] = payload
        return s

    first = cmd(10, "n-cmd-0000000010")
    other_kiosk = topic("cmd", "kiosk-08")
    forged = json.loads(cmd(40, "n-cmd-0000000040"))
    forged["body"]["args"] = {"mode": "factory_reset"}
    steps = [
        step("accepted", first, None, True),
        step("the same payload again", first, "replayed", False),
        step("a fresh nonce with the accepted seq", cmd(10, "n-cmd-0000000011"), "replayed",
             False),
        step("the next seq with the accepted nonce", cmd(11, "n-cmd-0000000010"), "replayed",
             False),
        step("a new seq and nonce after that", cmd(12, "n-cmd-0000000012"), None, True),
        step("a lower seq not seen yet (late, within the window)", cmd(9, "n-cmd-0000000009"),
             None, True),
        step("far ahead, then below the window", cmd(2000, "n-cmd-0000002000"), None, True),
        step("seq below the replay window", cmd(900, "n-cmd-0000000900"), "replayed", False),
        step("a new boot's seq 1 after a higher one", cmd(1, "n-cmd-0000000001", boot=BOOT2),
             "replayed", False),
        step("a new boot with a higher seq", cmd(2001, "n-cmd-0000002001", boot=BOOT2), None,
             True),
        step("expired", cmd(2002, "n-cmd-0000002002", expires_in_ms=0), "expired", True),
        step("expires beyond the 300 s window", cmd(2003, "n-cmd-0000002003",
                                                    expires_in_ms=300_001),
             "too_far_future", True),
        step("expires at the window's edge", cmd(2004, "n-cmd-0000002004",
                                                 expires_in_ms=300_000), None, True),
        step("nonce capacity reached (fail closed)", cmd(2005, "n-cmd-0000002005"), "busy",
             True),
        step("not JSON", "{not json", "malformed", False),
        step("not a cmd topic", cmd(2006, "n-cmd-0000002006"), "malformed", False,
             on_topic=topic("event")),
        step("another kiosk's cmd topic", cmd(2007, "n-cmd-0000002007", on_topic=other_kiosk),
             "misaddressed", False, on_topic=other_kiosk),
        step("another hall's cmd topic", cmd(2008, "n-cmd-0000002008"), "misaddressed",
             False, on_topic=topic("cmd", hall="hall-02")),
        step("target another device, signed for this topic",
             cmd(2009, "n-cmd-0000002009", device="kiosk-08"), "misaddressed", False),
        step("a key the kiosk does not trust", cmd(50, "n-cmd-0000000050", key="intruder"),
             "unknown_key", False),
        step("args changed after signing", text(forged), "bad_signature", False),
        step("signed for another kiosk's topic", cmd(2010, "n-cmd-0000002010",
                                                     on_topic=other_kiosk),
             "bad_signature", False),
        step("signed by a kiosk key", cmd(60, "n-cmd-0000000060", key="kiosk-08"),
             "not_authorised", False),
    ]
    return {"device": "kiosk-07", "hall": HALL, "now_ms": NOW_MS, "window_s": 300,
            "max_nonces": 6, "trusted": ["ops-1", "kiosk-08"], "steps": steps}


def build() -> dict[str, Any]:
    return {
        "contract": "hallkiosk MQTT contract v1, signed envelope",
        "note": "Built by tests/vectors/build.py (the expectations are written by hand from "
                "docs/mqtt-contract.md; the builder only signs). Keys: never use outside tests.",
        "signing_prefix": "hallkiosk/1\n",
        "key": {"seed_hex": KEYS["kiosk-07"][0].hex(), "public_hex": _public_raw("kiosk-07").hex(),
                "kid": _kid("kiosk-07"), "owner": "kiosk-07", "roles": ["kiosk"]},
        "keys": {name: {"seed_hex": seed.hex(), "public_hex": _public_raw(name).hex(),
                        "kid": _kid(name), "owner": owner, "roles": list(roles), "hall": hall}
                 for name, (seed, owner, roles, hall, _) in KEYS.items()},
        "keyring": [name for name, spec in KEYS.items() if spec[4]],
        "positive": positives(),
        "negative": negatives(),
        "sequences": sequences(),
        "commands": commands(),
    }


def render() -> str:
    return json.dumps(build(), ensure_ascii=False, indent=1) + "\n"


def main(argv: list[str]) -> int:
    text_out = render()
    if "--check" in argv:
        same = OUT.read_text("utf-8") == text_out
        print(f"{OUT}: {'up to date' if same else 'differs from what build.py makes'}")
        return 0 if same else 1
    OUT.write_text(text_out, "utf-8")
    print(f"wrote {OUT} ({len(text_out)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
