"""The signed envelope every MQTT payload of the hall travels in (contract version 1).

Payload: one JSON object with exactly ``v, type, sender, boot, seq, ts_ms, kid, body, sig``.
``sig`` is an Ed25519 signature over::

    b"hallkiosk/1\\n" + topic (UTF-8) + b"\\n" + canonical JSON of the envelope without "sig"

so an envelope copied to another topic no longer verifies. Canonical JSON: keys sorted by
code point at every level, separators "," and ":", no whitespace, UTF-8 (no \\u escapes
except the control characters JSON requires), no floats, integers within +-(2**53-1),
at most MAX_DEPTH levels of nesting. Receivers re-serialize what they parsed; a payload
need not itself be canonical (Signer's payloads are).

Wiring: the agent holds one Signer (its device key, a boot id drawn at start, a durable
sequence reservation); every receiver holds a Keyring (later filled from X.509 certificates)
and one SequenceTracker per subscription it cares about. See docs/mqtt-contract.md.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge.clock import SYSTEM_CLOCK, Clock
from hallkiosk.errors import ContractError, ReplayError, RoleError, SignatureError

from .schemas import (
    FREE_KEY_RE,
    MAX_PAYLOAD,
    MAX_SAFE_INT,
    MESSAGE_TYPES,
    TICKET_UID_RE,
    validate_body,
)
from .topics import (
    KIOSK_KINDS,
    MESSAGE_TYPE_FOR_KIND,
    ROLE_FOR_KIND,
    TopicParts,
    parse_topic,
    validate_id,
)

#: Domain separation: these bytes can never be mistaken for another protocol's signed data.
SIGNING_PREFIX: Final = b"hallkiosk/1\n"
ENVELOPE_VERSION: Final = 1
ENVELOPE_FIELDS: Final = ("v", "type", "sender", "boot", "seq", "ts_ms", "kid", "body", "sig")
#: Deepest nesting of arrays/objects accepted anywhere (envelope = level 1).
MAX_DEPTH: Final = 8

_BOOT_RE: Final = re.compile(r"[0-9a-f]{32}")
_KID_RE: Final = re.compile(r"[0-9a-f]{16}")
# 64 bytes in base64url without padding: 86 characters (the last one carries 4 spare bits).
_SIG_RE: Final = re.compile(r"[A-Za-z0-9_-]{86}")
_SURROGATE_RE: Final = re.compile(r"[\ud800-\udfff]")


# -- canonical form -------------------------------------------------------------------
def _where(path: str, key: str) -> str:
    if FREE_KEY_RE.fullmatch(key):
        return f"{path}.{key}"
    shown = ascii(key)
    return f"{path}[{shown if len(shown) <= 40 else shown[:37] + '...'}]"


def _check_json(value: Any, path: str, depth: int) -> None:
    """Raise ContractError unless ``value`` is in the contract's JSON data model."""
    kind = type(value)
    if value is None or kind is bool:
        return
    if kind is int:
        if not -MAX_SAFE_INT <= value <= MAX_SAFE_INT:
            raise ContractError(f"{path}: integer outside +-(2**53-1)")
    elif kind is str:
        if _SURROGATE_RE.search(value):
            raise ContractError(f"{path}: string holds a lone surrogate (not valid Unicode)")
    elif kind is float:
        raise ContractError(f"{path}: float not allowed (use an int in a named unit)")
    elif kind is list:
        if depth >= MAX_DEPTH:
            raise ContractError(f"{path}: nested deeper than {MAX_DEPTH} levels")
        for i, item in enumerate(value):
            _check_json(item, f"{path}[{i}]", depth + 1)
    elif kind is dict:
        if depth >= MAX_DEPTH:
            raise ContractError(f"{path}: nested deeper than {MAX_DEPTH} levels")
        for key, item in value.items():
            if type(key) is not str:
                raise ContractError(f"{path}: object key is not a string")
            if _SURROGATE_RE.search(key):
                raise ContractError(f"{path}: object key holds a lone surrogate")
            _check_json(item, _where(path, key), depth + 1)
    else:
        raise ContractError(f"{path}: {kind.__name__} is not a JSON value of the contract")


def canonical_json(value: Any) -> bytes:
    """Canonical UTF-8 JSON of ``value`` (see the module docstring); ContractError if impossible."""
    _check_json(value, "value", 0)
    return _canonical_checked(value)


# Python's encoder with these options is exactly the canonical form once _check_json has
# excluded floats, big ints, non-str keys and surrogates: sort_keys orders str by code point,
# and ensure_ascii=False escapes only '"', '\\' and U+0000-U+001F.
_CANONICAL_ENCODER: Final = json.JSONEncoder(ensure_ascii=False, sort_keys=True,
                                             separators=(",", ":"), allow_nan=False)


def _canonical_checked(value: Any) -> bytes:
    """canonical_json for a value already known to pass _check_json."""
    return _CANONICAL_ENCODER.encode(value).encode("utf-8")


def canonical_bytes(topic: str, envelope: dict[str, Any]) -> bytes:
    """The bytes an envelope's signature covers: prefix, topic, newline, canonical JSON.

    ``envelope`` is the envelope WITHOUT its "sig" field.
    """
    if not isinstance(topic, str) or "\n" in topic or _SURROGATE_RE.search(topic):
        raise ContractError("topic: cannot be part of signed bytes")
    if "sig" in envelope:
        raise ContractError("canonical_bytes: pass the envelope without its 'sig' field")
    return SIGNING_PREFIX + topic.encode("utf-8") + b"\n" + canonical_json(envelope)


# -- keys -----------------------------------------------------------------------------
def raw_public(key: Any) -> bytes:
    """The 32 raw bytes of an Ed25519 public key given as raw bytes, a ``cryptography``
    Ed25519PublicKey, or the private key whose public half it is (ValueError otherwise)."""
    if isinstance(key, (bytes, bytearray)):
        if len(key) != 32:
            raise ValueError("an Ed25519 public key is 32 raw bytes")
        return bytes(key)
    if isinstance(key, Ed25519PrivateKey):
        key = key.public_key()
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"expected an Ed25519 key or its 32 raw bytes, found "
                         f"{type(key).__name__}")
    return key.public_bytes_raw()


def _raw_public(public_key: Any) -> bytes:
    if isinstance(public_key, Ed25519PrivateKey):
        raise ContractError("public key: expected an Ed25519PublicKey or its 32 raw bytes")
    try:
        return raw_public(public_key)
    except ValueError:
        raise ContractError("public key: expected an Ed25519PublicKey or its 32 raw bytes") \
            from None


def key_id(public_key: Any) -> str:
    """16 lowercase hex: the first 8 bytes of SHA-256 over the raw 32-byte public key."""
    return hashlib.sha256(_raw_public(public_key)).digest()[:8].hex()


@dataclass(frozen=True, slots=True)
class KeyEntry:
    """A public key the hall trusts, who owns it (a device or service id), its roles, and
    the hall it belongs to (its certificate's O; None: the receiver's own hall only)."""

    kid: str
    owner: str
    roles: frozenset[str]
    public_key: Ed25519PublicKey = field(repr=False, compare=False)
    hall: str | None = None


class Keyring:
    """kid -> KeyEntry. Reads take no lock: writers swap in a new dict (copy on write)."""

    def __init__(self) -> None:
        self._write_lock = threading.Lock()
        self._entries: dict[str, KeyEntry] = {}

    def add(self, public_key: Any, *, owner: str, roles: Iterable[str],
            hall: str | None = None) -> KeyEntry:
        """Trust ``public_key`` for ``owner`` with ``roles``; re-adding replaces the roles.

        ``hall``: the one hall whose topics this key may sign (section 6 of the contract);
        a keyring that serves several halls (the city's ops) must give it for every key.
        The same key for a different owner or hall is refused (ContractError): a kid names
        one owner in one hall.
        """
        raw = _raw_public(public_key)
        validate_id("key owner", owner)
        if hall is not None:
            validate_id("hall", hall)
        if isinstance(roles, str):
            raise ContractError("roles: expected an iterable of role names, not one string")
        role_set = frozenset(validate_id("role", r) for r in roles)
        entry = KeyEntry(key_id(raw), owner, role_set, Ed25519PublicKey.from_public_bytes(raw),
                         hall)
        with self._write_lock:
            old = self._entries.get(entry.kid)
            if old is not None and old.owner != owner:
                raise ContractError(f"key {entry.kid} already belongs to {old.owner!r}")
            if old is not None and old.hall != hall:
                raise ContractError(f"key {entry.kid} already belongs to hall {old.hall!r}")
            entries = dict(self._entries)
            entries[entry.kid] = entry
            self._entries = entries
        return entry

    def get(self, kid: str) -> KeyEntry:
        """The entry for ``kid``; SignatureError "unknown key id ..." if there is none."""
        entry = self._entries.get(kid)
        if entry is None:
            raise SignatureError(f"unknown key id {kid}")
        return entry

    def find(self, kid: str) -> KeyEntry | None:
        return self._entries.get(kid)

    def remove(self, kid: str) -> None:
        """Stop trusting ``kid`` (no error if it was not there)."""
        with self._write_lock:
            if kid in self._entries:
                entries = dict(self._entries)
                del entries[kid]
                self._entries = entries

    def __contains__(self, kid: object) -> bool:
        return kid in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


#: The characters whose 6 bits end in 4 zero bits: the 86th character of 64 bytes in
#: base64url carries 2 data bits and 4 unused ones, which must be zero.
_LAST_SIG_CHARS: Final = frozenset("AQgw")


_URLSAFE_TO_STD: Final = bytes.maketrans(b"-_", b"+/")


def _decode_sig(sig: str) -> bytes:
    """The 64 signature bytes of a ``sig`` that step 4 accepted (alphabet, length, last
    character): every spelling that passes decodes, and to one value only."""
    return binascii.a2b_base64(sig.encode("ascii").translate(_URLSAFE_TO_STD) + b"==")


# -- checks shared by sealing and verifying ------------------------------------------
def _check_type_for_topic(msg_type: str, parts: TopicParts) -> None:
    expected = MESSAGE_TYPE_FOR_KIND[parts.kind]
    if msg_type != expected:
        raise ContractError(f"type {msg_type!r} does not belong on a {parts.kind} topic "
                            f"(expected {expected!r})")


def _check_body_against_topic(msg_type: str, body: dict[str, Any], parts: TopicParts) -> None:
    """Relations between a valid body and its topic (the sender already owns kiosk kinds)."""
    if msg_type == "cmd" and body["target"] != parts.device:
        raise ContractError("cmd.body.target: differs from the device of the topic")
    if msg_type == "alert":
        if body["device"] != parts.device:
            raise ContractError("alert.body.device: differs from the device of the topic")
        _check_alert_id(body, parts)
    if msg_type in ("ticket", "ticket_ack"):
        match = TICKET_UID_RE.fullmatch(body["ticket_uid"])
        owner = match.group(1) if match else None
        if owner != parts.device:
            raise ContractError(f"{msg_type}.body.ticket_uid: not a ticket of the topic's device")


#: ``{rule}:{hall}:{device}:{unix second}`` (contract section 9, alert): three ids, which
#: cannot hold ``:``, and the second the episode began in decimal without leading zeros.
_ALERT_ID_RE: Final = re.compile(r"([A-Za-z0-9_][A-Za-z0-9_-]{0,31}):([A-Za-z0-9_][A-Za-z0-9_-]"
                                 r"{0,31}):([A-Za-z0-9_][A-Za-z0-9_-]{0,31}):(0|[1-9][0-9]{0,15})")


def _check_alert_id(body: dict[str, Any], parts: TopicParts) -> None:
    """The alert_id names the body's rule, the topic's hall and device, and since_ms's second:
    monitors that see one episode derive the same id, and receivers dedupe on it."""
    match = _ALERT_ID_RE.fullmatch(body["alert_id"])
    if match is None:
        raise ContractError("alert.body.alert_id: expected {rule}:{hall}:{device}:{unix s}")
    rule, hall, device, second = match.groups()
    if rule != body["rule"]:
        raise ContractError("alert.body.alert_id: its rule differs from body.rule")
    if hall != parts.hall or device != parts.device:
        raise ContractError("alert.body.alert_id: names another hall or device than the topic")
    if int(second) != body["since_ms"] // 1000:
        raise ContractError("alert.body.alert_id: its second differs from body.since_ms")


# -- signing --------------------------------------------------------------------------
class Signer:
    """Seals bodies into signed envelopes for one sender.

    ``next_seq()`` returns the next sequence number (>= 1), strictly increasing for the life
    of the sender's identity and never reused across restarts (reserve blocks in durable
    state); it is called once per ``seal`` and must be thread-safe if seal is called from
    several threads. ``boot_id`` is 32 lowercase hex drawn fresh at each process start
    (``secrets.token_hex(16)``). ``ts_ms`` comes from ``clock.wall()``.
    """

    __slots__ = ("_key", "_sender", "_boot", "_next_seq", "_clock", "kid")

    def __init__(self, private_key: Any, *, sender: str, boot_id: str,
                 next_seq: Callable[[], int], clock: Clock = SYSTEM_CLOCK) -> None:
        if not isinstance(private_key, Ed25519PrivateKey):
            raise ContractError("Signer: expected an Ed25519PrivateKey")
        if not isinstance(boot_id, str) or not _BOOT_RE.fullmatch(boot_id):
            raise ContractError("Signer: boot_id must be 32 lowercase hex chars")
        if not callable(next_seq):
            raise ContractError("Signer: next_seq must be callable")
        self._key = private_key
        self._sender = validate_id("sender", sender)
        self._boot = boot_id
        self._next_seq = next_seq
        self._clock = clock
        self.kid = key_id(private_key.public_key())

    @property
    def sender(self) -> str:
        return self._sender

    @property
    def boot_id(self) -> str:
        return self._boot

    def __repr__(self) -> str:
        return f"Signer(sender={self._sender!r}, kid={self.kid!r}, boot={self._boot!r})"

    def seal(self, topic: str, msg_type: str, body: dict[str, Any]) -> bytes:
        """Validate ``body``, sign it for ``topic`` and return the compact UTF-8 payload.

        Raises ContractError for a body, topic or type that verify() would refuse; a
        sequence number may then already be consumed (a gap is legitimate).
        """
        parts = parse_topic(topic)
        _check_type_for_topic(msg_type, parts)
        if parts.kind in KIOSK_KINDS and parts.device != self._sender:
            raise ContractError(f"sender does not own topic: {self._sender!r} cannot publish "
                                f"on {parts.device!r}'s {parts.kind} topic")
        clean = validate_body(msg_type, body)
        _check_body_against_topic(msg_type, clean, parts)
        seq = self._next_seq()
        if type(seq) is not int or not 1 <= seq <= MAX_SAFE_INT:
            raise ContractError("Signer: next_seq() must return an int in [1, 2**53-1]")
        envelope: dict[str, Any] = {
            "v": ENVELOPE_VERSION,
            "type": msg_type,
            "sender": self._sender,
            "boot": self._boot,
            "seq": seq,
            "ts_ms": int(self._clock.wall() * 1000),
            "kid": self.kid,
            "body": clean,
        }
        envelope["sig"] = _b64url(self._key.sign(canonical_bytes(topic, envelope)))
        payload = canonical_json(envelope)
        if len(payload) > MAX_PAYLOAD:
            raise ContractError(f"{msg_type} payload of {len(payload)} bytes exceeds "
                                f"{MAX_PAYLOAD}")
        return payload


# -- replay and gap tracking ---------------------------------------------------------
class _Track:
    __slots__ = ("boot", "highest", "seen")

    def __init__(self, boot: str, seq: int) -> None:
        self.boot = boot
        self.highest = seq
        self.seen = 1  # bit i set: seq (highest - i) was accepted


class SequenceTracker:
    """Per sender: boot id, highest seq, and a bitmap of the last ``window`` seqs.

    ``check`` answers ("first" | "ok" | "gap" | "new_boot" | "late", missing) or raises
    ReplayError; it changes state only when it accepts. State lives in memory: a restarted
    receiver sees every sender as "first" again (ticket dedupe on ticket_uid covers that).
    """

    def __init__(self, window: int = 1024) -> None:
        if type(window) is not int or window < 1:
            raise ContractError("SequenceTracker: window must be an int >= 1")
        self.window = window
        self._mask = (1 << window) - 1
        self._lock = threading.Lock()
        self._tracks: dict[str, _Track] = {}

    def check(self, sender: str, boot: str, seq: int) -> tuple[str, int]:
        if type(seq) is not int or seq < 1:
            raise ContractError("SequenceTracker: seq must be an int >= 1")
        with self._lock:
            track = self._tracks.get(sender)
            if track is None:
                self._tracks[sender] = _Track(boot, seq)
                return "first", 0
            if boot != track.boot:
                if seq <= track.highest:
                    raise ReplayError(f"{sender}: new boot with seq {seq} <= highest seen "
                                      f"{track.highest}")
                # Senders reserve seq blocks, so a restart skips numbers legitimately.
                self._tracks[sender] = _Track(boot, seq)
                return "new_boot", 0
            if seq > track.highest:
                step = seq - track.highest
                track.seen = ((track.seen << step) | 1) & self._mask
                track.highest = seq
                return ("ok", 0) if step == 1 else ("gap", step - 1)
            offset = track.highest - seq
            if offset >= self.window:
                raise ReplayError(f"{sender}: seq {seq} older than the window of "
                                  f"{self.window} below {track.highest}")
            if track.seen >> offset & 1:
                raise ReplayError(f"{sender}: seq {seq} already seen")
            track.seen |= 1 << offset
            return "late", 0

    def export(self) -> dict[str, list[Any]]:
        """sender -> [boot, highest, bitmap]: plain JSON for a receiver that must remember
        its senders across restarts (a kiosk's command gate)."""
        with self._lock:
            return {s: [t.boot, t.highest, t.seen] for s, t in self._tracks.items()}

    def restore(self, state: Any) -> int:
        """Take back what ``export`` gave (a file read at start); entries that are not of
        that shape are skipped. Returns how many senders were restored."""
        if type(state) is not dict:
            return 0
        restored = 0
        with self._lock:
            for sender, item in state.items():
                if (type(sender) is str and type(item) is list and len(item) == 3
                        and type(item[0]) is str and _BOOT_RE.fullmatch(item[0])
                        and type(item[1]) is int and 1 <= item[1] <= MAX_SAFE_INT
                        and type(item[2]) is int and item[2] >= 0):
                    track = _Track(item[0], item[1])
                    track.seen = (item[2] | 1) & self._mask
                    self._tracks[sender] = track
                    restored += 1
        return restored

    def forget(self, sender: str) -> None:
        """Drop what is known of ``sender`` (e.g. when its key is removed)."""
        with self._lock:
            self._tracks.pop(sender, None)

    def highest(self, sender: str) -> int | None:
        with self._lock:
            track = self._tracks.get(sender)
            return None if track is None else track.highest


# -- verifying ------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Verified:
    """A message that passed every check. ``seq_status`` is "unchecked" without a tracker.

    ``body`` is left out of repr(): it may carry a citizen's pseudonym.
    """

    msg_type: str
    sender: str
    boot: str
    seq: int
    ts_ms: int
    kid: str
    body: dict[str, Any] = field(repr=False)
    topic: str
    seq_status: str
    missing: int
    hall: str = ""
    device: str = ""
    role_checked: bool = True


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Duplicate keys parse differently across JSON libraries (first wins, last wins,
    # error): the signed meaning would depend on the verifier's language.
    obj = dict(pairs)      # in C; a repeated key leaves fewer entries than pairs
    if len(obj) != len(pairs):
        raise ContractError("payload: duplicate object key")
    return obj


def _no_constant(name: str) -> Any:
    raise ContractError(f"payload: {name} is not JSON")


class _FloatSeen(Exception):
    """Raised by the fast decoder at the first float: the careful path takes over."""


def _no_float(text: str) -> Any:
    raise _FloatSeen


# Fast path of step 3 (the wire is almost always clean): a decoder that stops at a float,
# and a scan of the text for what could break the other rules: a run of 16+ digits (an
# integer beyond 2**53-1 needs 16), or a \uD8xx-\uDFxx escape (the only way JSON text can
# carry a lone surrogate: UTF-8 itself cannot). Either finding, or more than MAX_DEPTH
# brackets, sends the value through the full _check_json walk, which says exactly where the
# problem is; the fast path never accepts what the walk would refuse.
_FAST_DECODER: Final = json.JSONDecoder(object_pairs_hook=_no_duplicate_keys,
                                        parse_constant=_no_constant, parse_float=_no_float)
_CAREFUL_DECODER: Final = json.JSONDecoder(object_pairs_hook=_no_duplicate_keys,
                                           parse_constant=_no_constant)
# (bytes.translate + a substring search: far cheaper than a regex over the text.)
_DIGITS_AS_ZERO: Final = bytes(0x30 if 0x30 <= b <= 0x39 else 0x20 for b in range(256))
_SIXTEEN_DIGITS: Final = b"0" * 16
_SURROGATE_ESCAPE_RE: Final = re.compile(r"\\u[dD][89a-fA-F]")


def _suspect(raw: bytes, text: str) -> bool:
    """Whether the text could hold a big integer or a surrogate escape (conservative)."""
    return (_SIXTEEN_DIGITS in raw.translate(_DIGITS_AS_ZERO)
            or (b"\\u" in raw and _SURROGATE_ESCAPE_RE.search(text) is not None))


def _depth_ok(value: Any) -> bool:
    """Whether no container in ``value`` (the top one at depth 0) sits at MAX_DEPTH or deeper."""
    level = [value]
    for _ in range(MAX_DEPTH):
        nxt = []
        for v in level:
            items = v.values() if type(v) is dict else v
            nxt.extend(i for i in items if type(i) is dict or type(i) is list)
        if not nxt:
            return True
        level = nxt
    return False


def _parse(raw: bytes) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ContractError("payload: not valid UTF-8") from None
    if text.startswith("\ufeff"):
        raise ContractError("payload: starts with a byte order mark (BOM)")
    try:
        try:
            obj = _FAST_DECODER.decode(text)
            careful = (_suspect(raw, text)
                       or (text.count("{") + text.count("[") > MAX_DEPTH
                           and type(obj) in (dict, list) and not _depth_ok(obj)))
        except _FloatSeen:
            obj, careful = _CAREFUL_DECODER.decode(text), True
    except ContractError:
        raise  # from the hooks (it is a ValueError too, so it must pass first)
    except json.JSONDecodeError as exc:
        raise ContractError(f"payload: not JSON ({exc.msg} at char {exc.pos})") from None
    except RecursionError:
        raise ContractError("payload: nested too deeply") from None
    except ValueError:
        # int() refuses numbers of more than 4300 digits.
        raise ContractError("payload: number too long") from None
    if careful:
        _check_json(obj, "envelope", 0)
    return obj


_FIELD_SET: Final = frozenset(ENVELOPE_FIELDS)
#: (sender, boot, kid) of envelopes that passed step 4: a sender repeats them in every
#: message, and a set lookup is cheaper than three pattern matches. Bounded like the parsed
#: topics (emptied when full).
_GOOD_HEADERS: set[tuple[Any, Any, Any]] = set()
_GOOD_HEADERS_MAX = 4096


def _check_fields(obj: Any) -> None:
    if type(obj) is not dict:
        raise ContractError("envelope: expected a JSON object")
    if obj.keys() != _FIELD_SET:
        missing = [f for f in ENVELOPE_FIELDS if f not in obj]
        unknown = sorted(k for k in obj if k not in ENVELOPE_FIELDS)
        shown = [ascii(k)[:40] for k in unknown[:5]]
        raise ContractError("envelope: " + "; ".join(
            ([f"missing {', '.join(missing)}"] if missing else [])
            + ([f"unknown field(s) {', '.join(shown)}"] if unknown else [])))
    if type(obj["v"]) is not int or obj["v"] != ENVELOPE_VERSION:
        raise ContractError(f"envelope.v: expected {ENVELOPE_VERSION}")
    if obj["type"] not in MESSAGE_TYPES:
        raise ContractError("envelope.type: expected one of " + ", ".join(MESSAGE_TYPES))
    sender, boot, kid = obj["sender"], obj["boot"], obj["kid"]
    header = (sender, boot, kid)
    # Known only if all three are str (a list or dict would not hash): the same checks in
    # the same order otherwise, so the first problem found is still the one reported.
    known = type(sender) is str and type(boot) is str and type(kid) is str \
        and header in _GOOD_HEADERS
    if not known:
        try:
            validate_id("sender", sender)
        except ContractError as exc:
            raise ContractError(f"envelope.sender: {exc}") from None
        if type(boot) is not str or not _BOOT_RE.fullmatch(boot):
            raise ContractError("envelope.boot: expected 32 lowercase hex chars")
    if type(obj["seq"]) is not int or obj["seq"] < 1:
        raise ContractError("envelope.seq: expected int >= 1")
    if type(obj["ts_ms"]) is not int or obj["ts_ms"] < 0:
        raise ContractError("envelope.ts_ms: expected int >= 0")
    if not known:
        if type(kid) is not str or not _KID_RE.fullmatch(kid):
            raise ContractError("envelope.kid: expected 16 lowercase hex chars")
        if len(_GOOD_HEADERS) >= _GOOD_HEADERS_MAX:
            _GOOD_HEADERS.clear()
        _GOOD_HEADERS.add(header)
    if type(obj["body"]) is not dict:
        raise ContractError("envelope.body: expected an object")
    sig = obj["sig"]
    if type(sig) is not str or not _SIG_RE.fullmatch(sig):
        raise ContractError("envelope.sig: expected 86 chars of base64url without padding")
    if sig[-1] not in _LAST_SIG_CHARS:
        raise ContractError("envelope.sig: not canonical base64url (the last character's 4 "
                            "unused bits are not zero)")


def _authenticate(raw: bytes, topic: str, keyring: Keyring,
                  parts: TopicParts) -> tuple[dict[str, Any], KeyEntry]:
    """Steps 3-6 of the contract: the parsed envelope and its key entry, or raise.

    One way only: the signed bytes are rebuilt from the parsed envelope (canonical JSON
    without ``sig``), never taken from the payload text, so every conforming verifier
    accepts exactly the same payloads (docs/mqtt-contract.md section 5 step 6).
    """
    obj = _parse(raw)
    _check_fields(obj)
    sig = _decode_sig(obj["sig"])
    entry = keyring.get(obj["kid"])
    # The topic passed parse_topic (ids cannot hold a newline) and the payload step 3, so the
    # signed bytes are built without checking either again.
    signed = (SIGNING_PREFIX + topic.encode("utf-8") + b"\n"
              + _canonical_checked({k: v for k, v in obj.items() if k != "sig"}))
    try:
        entry.public_key.verify(sig, signed)
    except InvalidSignature:
        raise SignatureError(f"bad signature or wrong topic (kid {obj['kid']}, topic "
                             f"{parts.kind} of {parts.device})") from None
    return obj, entry


#: ``verify(require_role=...)``'s default: the role the contract names for the topic's kind.
BY_TOPIC: Final = "by-topic"


def verify(payload: bytes, topic: str, keyring: Keyring, *,
           tracker: SequenceTracker | None = None, expect_type: str | None = None,
           require_role: str | None = BY_TOPIC) -> Verified:
    """Verify a payload received on ``topic``; return what it says or raise.

    Raises ContractError (malformed, wrong type or body), SignatureError (key, signature,
    ownership, hall, role) or ReplayError (tracker), all of the ContractError family; checks
    run in the order of docs/mqtt-contract.md and the tracker is consulted last, so nothing
    unauthenticated ever changes its state.

    The signer's role (step 9) is checked by default: the role the contract names for the
    topic's kind (``ROLE_FOR_KIND``), or ``require_role`` if given. ``require_role=None`` is
    the explicit opt-out for tools that only display messages; the result then says
    ``role_checked=False`` and must not be shown as "signed ok".
    """
    parts = parse_topic(topic)
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise ContractError("payload: expected bytes")
    if len(payload) > MAX_PAYLOAD:
        raise ContractError(f"payload: {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    obj, entry = _authenticate(bytes(payload), topic, keyring, parts)
    sender, msg_type, kid = obj["sender"], obj["type"], obj["kid"]
    if entry.owner != sender:
        raise SignatureError(f"key {kid} belongs to {entry.owner!r}, not to sender {sender!r}")
    if entry.hall is not None and entry.hall != parts.hall:
        raise SignatureError(f"key {kid} of {sender!r} belongs to hall {entry.hall!r}, not "
                             f"to {parts.hall!r}")
    if parts.kind in KIOSK_KINDS and parts.device != sender:
        raise SignatureError(f"sender does not own topic: {sender!r} on {parts.device!r}'s "
                             f"{parts.kind} topic")
    role = ROLE_FOR_KIND[parts.kind] if require_role == BY_TOPIC else require_role
    if role is not None and role not in entry.roles:
        raise RoleError(f"key {kid} of {sender!r} lacks role {role!r}")

    _check_type_for_topic(msg_type, parts)
    if expect_type is not None and msg_type != expect_type:
        raise ContractError(f"type {msg_type!r} where {expect_type!r} was expected")
    body = validate_body(msg_type, obj["body"], owned=True)   # parsed here, held by no one
    _check_body_against_topic(msg_type, body, parts)

    status, missing = ("unchecked", 0)
    if tracker is not None:
        status, missing = tracker.check(sender, obj["boot"], obj["seq"])
    return Verified(msg_type, sender, obj["boot"], obj["seq"], obj["ts_ms"], kid, body, topic,
                    status, missing, parts.hall, parts.device, role is not None)


def state_supersedes(current: Verified | None, candidate: Verified) -> bool:
    """Whether ``candidate`` should replace ``current`` as a kiosk's known state.

    State is verified WITHOUT a tracker (the broker re-delivers the retained copy on every
    subscribe, and the will was sealed at connect time but arrives later), so order comes
    from the body: within one connection (same boot and session) "offline" is final and
    otherwise the higher seq wins; across connections the higher seq wins, since seqs
    increase across restarts. A will of an older connection therefore loses to the state
    of a newer one.
    """
    if candidate.msg_type != "state" or (current is not None and current.msg_type != "state"):
        raise ContractError("state_supersedes: both messages must be state messages")
    if current is None:
        return True
    if current.topic != candidate.topic:
        raise ContractError("state_supersedes: messages of different kiosks")
    if (current.boot, current.seq) == (candidate.boot, candidate.seq):
        return False
    same_connection = (current.boot == candidate.boot
                       and current.body["session"] == candidate.body["session"])
    if same_connection:
        if current.body["status"] == "offline":
            return False
        if candidate.body["status"] == "offline":
            return True
    return candidate.seq > current.seq
