"""Signed operator commands: authenticate, check address, order, expiry and replay, answer.

Wiring (the agent): subscribe to ``topics.cmd``; for each LinkMessage on it::

    outcome = gate.check(msg.payload, msg.topic)           # Command | Refusal, never raises
    publisher.send(topics.cmd_result, "cmd_result", gate.result_body(outcome))
    if isinstance(outcome, Refusal):
        publisher.event("command_refused", "warning", "cmd", **gate.refusal_event(outcome))

and, once an accepted Command has run, ``gate.result_body(cmd, status="done" | "failed",
reason=..., detail=...)``. The keyring holds the hall's ops certificates' keys
(provisioning.trust.keyring_from_certs), role ``ops``. The rules are the contract's
(docs/mqtt-contract.md section 3, "cmd"); checks, in order (the first failure is the
refusal's ``code``):

1. ``malformed`` / ``misaddressed``: the topic is this kiosk's cmd topic;
2. the contract's verify, steps 1-12 (type cmd; kid known: else ``unknown_key``, which is
   also what a revoked ops key gets; signature over THIS topic: else ``bad_signature``; the
   ``ops`` role: else ``not_authorised``; schema, body target = topic device: else
   ``misaddressed`` or ``malformed``; the sequence rules of section 8 against every command
   of that sender this kiosk has verified: else ``replayed``);
3. ``expired`` (expires_at_ms passed by the kiosk's wall clock) or ``too_far_future``
   (expires more than ``window_s`` ahead: a command must be fresh, so the replay cache
   never has to remember a nonce for longer than the window);
4. ``replayed``: nonce already seen; ``busy``: the bounded nonce cache is full of unexpired
   nonces (fail closed: forgetting one would re-open its replay).

Every command gets one ``cmd_result``. It names the command (``cmd_seq``, ``nonce``) only
when the command is authentic and new (steps 3-4 and acceptance); a refusal of anything
else (unauthenticated, malformed, or a replay of a command already answered) carries null
for both, the claimed values in ``detail``, so ops never read a second answer, "refused",
for a command they sent.

Replay memory: a nonce is remembered until its command's expiry (at most ``window_s``);
each ops sender's (boot, highest seq, window) as long as the kiosk lives. With
``nonce_file`` both are also written (atomically, before the command is accepted) so a
restart forgets neither; without, the expiry bound alone limits what a restart forgets.

A kiosk whose wall clock is wrong (a Pi without RTC before NTP) refuses everything as
expired or too far ahead: commands wait for a trusted clock, which is the safe side.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from edge.clock import Clock
from hallkiosk.errors import ContractError, ReplayError, RoleError, SignatureError
from mqtt_topics.envelope import Keyring, SequenceTracker, verify
from mqtt_topics.schemas import MAX_PAYLOAD, MAX_SAFE_INT, NONCE
from mqtt_topics.topics import ID_RE, parse_topic, validate_id

log = logging.getLogger("hallkiosk.commands")

OPS_ROLE: Final = "ops"
DEFAULT_WINDOW_S: Final = 300
#: Bounds of ``commands.window_s`` (docs/mqtt-contract.md section 3, check 5): a command
#: older than an hour has no business running on an unattended kiosk, and the ops tools
#: send theirs with a TTL of 60 s (opsclient) or 120 s (rollout).
MIN_WINDOW_S: Final = 1
MAX_WINDOW_S: Final = 3600
DEFAULT_MAX_NONCES: Final = 1024
#: Refusal codes and what they mean (also the documentation of cmd_result reasons).
REFUSALS: Final = {
    "malformed": "not a valid command envelope for this kiosk's cmd topic",
    "misaddressed": "command for another device",
    "unknown_key": "signed by a key this kiosk does not trust (unknown or revoked)",
    "bad_signature": "signature does not verify for this topic",
    "not_authorised": "signer does not hold the ops role",
    "expired": "command expired",
    "too_far_future": "expiry further ahead than the replay window allows",
    "replayed": "already received (its seq or its nonce)",
    "busy": "too many recent commands to remember; retry later",
}
_NONCE_RE: Final = NONCE.pattern
_TEXT_BAD: Final = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\ud800-\udfff]")
_MAX_REASON: Final = 256


@dataclass(frozen=True, slots=True)
class Command:
    """A command that passed every check. ``args`` is left out of repr()."""

    name: str
    nonce: str
    seq: int
    sender: str
    kid: str
    expires_at_ms: int
    args: dict[str, Any] = field(repr=False)


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a command was refused. ``nonce``/``seq``/``sender`` are what the payload CLAIMED
    (None when it did not even carry them); ``authentic`` says the envelope verified and is
    new, so its answer may name it (module docstring). Otherwise they are shown to ops as
    claims, never trusted for anything."""

    code: str
    detail: str
    nonce: str | None = None
    seq: int | None = None
    sender: str | None = None
    authentic: bool = False


@dataclass(frozen=True, slots=True)
class _Peek:
    seq: int | None = None
    nonce: str | None = None
    sender: str | None = None
    kid: str | None = None
    target: object = None
    complete: bool = False


def _peek(payload: object) -> _Peek:
    """Best-effort, unauthenticated look at a payload: what to echo in a refusal."""
    if not isinstance(payload, (bytes, bytearray)) or len(payload) > MAX_PAYLOAD:
        return _Peek()
    try:
        obj = json.loads(bytes(payload).decode("utf-8"))
    except (ValueError, RecursionError):
        return _Peek()
    if type(obj) is not dict:
        return _Peek()
    seq = obj.get("seq")
    seq = seq if type(seq) is int and 1 <= seq <= MAX_SAFE_INT else None
    body = obj.get("body")
    body = body if type(body) is dict else {}
    nonce = body.get("nonce")
    nonce = nonce if type(nonce) is str and _NONCE_RE.fullmatch(nonce) else None
    sender = obj.get("sender")
    sender = sender if type(sender) is str and ID_RE.fullmatch(sender) else None
    kid = obj.get("kid") if type(obj.get("kid")) is str else None
    complete = all(k in obj for k in ("v", "type", "sender", "boot", "seq", "ts_ms", "kid",
                                      "body", "sig"))
    return _Peek(seq, nonce, sender, kid, body.get("target"), complete)


def _text(value: str) -> str:
    value = _TEXT_BAD.sub("?", value)
    return value if len(value) <= _MAX_REASON else value[:_MAX_REASON - 3] + "..."


class NonceCache:
    """nonce -> expiry (ms), bounded, and the ops senders' sequence tracker; optionally
    mirrored to a JSON file.

    Nonces leave once their expiry has passed. The file is rewritten atomically on every
    change (commands are rare: an fsync each is cheap); a damaged file is logged and
    ignored, since expiry still bounds replays.
    """

    def __init__(self, max_entries: int = DEFAULT_MAX_NONCES, path: Path | None = None,
                 tracker: SequenceTracker | None = None) -> None:
        if type(max_entries) is not int or max_entries < 1:
            raise ValueError("NonceCache: max_entries must be an int >= 1")
        self.max_entries = max_entries
        self.path = Path(path) if path is not None else None
        self.tracker = tracker if tracker is not None else SequenceTracker()
        self._seen: dict[str, int] = {}
        if self.path is not None:
            self._load()

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text("utf-8"))
            items = data["nonces"].items()
            self._seen = {n: int(e) for n, e in items
                          if type(n) is str and _NONCE_RE.fullmatch(n) and type(e) is int}
            self.tracker.restore(data.get("senders"))
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            log.warning("nonce file %s unreadable; starting empty (expiry still bounds "
                        "replays)", self.path)

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, json.dumps({"nonces": self._seen, "senders": self.tracker.export()},
                                    sort_keys=True).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)

    def purge(self, now_ms: int) -> None:
        self._seen = {n: e for n, e in self._seen.items() if e >= now_ms}

    def __contains__(self, nonce: object) -> bool:
        return nonce in self._seen

    def __len__(self) -> int:
        return len(self._seen)

    def full(self) -> bool:
        return len(self._seen) >= self.max_entries

    def add(self, nonce: str, expires_at_ms: int) -> None:
        self._seen[nonce] = expires_at_ms
        self.save()


class CommandGate:
    """Decides, for one kiosk, whether a command payload is to be obeyed.

    ``keyring`` holds the ops keys (role ``role``); ``clock.wall()`` judges expiry;
    ``window_s`` (1 to 3600 s) bounds how far ahead a command may expire (and so how long a
    nonce is remembered). Thread-safe; ``check`` never raises.
    """

    def __init__(self, device_id: str, keyring: Keyring, clock: Clock,
                 window_s: float = DEFAULT_WINDOW_S, *, hall: str | None = None,
                 role: str = OPS_ROLE, max_nonces: int = DEFAULT_MAX_NONCES,
                 nonce_file: Path | None = None) -> None:
        self.device_id = validate_id("device", device_id)
        self.hall = validate_id("hall", hall) if hall is not None else None
        if isinstance(window_s, bool) or not MIN_WINDOW_S <= window_s <= MAX_WINDOW_S:
            raise ValueError(f"CommandGate: window_s must be within {MIN_WINDOW_S} .. "
                             f"{MAX_WINDOW_S} s, not {window_s!r}")
        self.keyring = keyring
        self.clock = clock
        self.window_ms = int(window_s * 1000)
        # Never None: verify(require_role=None) would skip step 9 and obey any trusted key.
        self.role = validate_id("role", role)
        self._nonces = NonceCache(max_nonces, nonce_file)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"CommandGate(device={self.device_id!r}, window_ms={self.window_ms})"

    def check(self, payload: bytes, topic: str) -> Command | Refusal:
        try:
            return self._check(payload, topic)
        except Exception as exc:  # a gate that raises would leave a command unanswered
            log.exception("command gate failed")
            return Refusal("malformed", _text(f"internal error: {type(exc).__name__}"))

    def _check(self, payload: bytes, topic: str) -> Command | Refusal:
        peek = _peek(payload)

        def refuse(code: str, detail: str | None = None, *, authentic: bool = False) -> Refusal:
            return Refusal(code, _text(detail or REFUSALS[code]), peek.nonce, peek.seq,
                           peek.sender, authentic)

        try:
            parts = parse_topic(topic)
        except ContractError as exc:
            return refuse("malformed", str(exc))
        if parts.kind != "cmd":
            return refuse("malformed", f"not a cmd topic ({parts.kind})")
        if parts.device != self.device_id or (self.hall is not None and parts.hall != self.hall):
            return refuse("misaddressed", "cmd topic of another device")
        with self._lock:
            try:
                v = verify(payload, topic, self.keyring, expect_type="cmd",
                           require_role=self.role, tracker=self._nonces.tracker)
            except RoleError:
                return refuse("not_authorised")
            except ReplayError as exc:
                return refuse("replayed", str(exc))
            except SignatureError as exc:
                if peek.kid is None or peek.kid not in self.keyring:
                    return refuse("unknown_key")
                return refuse("bad_signature", str(exc))
            except ContractError as exc:
                if peek.complete and isinstance(peek.target, str) \
                        and peek.target != self.device_id:
                    return refuse("misaddressed")
                return refuse("malformed", str(exc))
            # Authentic and new by its seq: the tracker moved, and is kept before answering.
            self._nonces.save()
            body = v.body
            now_ms = int(self.clock.wall() * 1000)
            expires = body["expires_at_ms"]
            if expires <= now_ms:
                return refuse("expired", f"expired {now_ms - expires} ms ago", authentic=True)
            if expires > now_ms + self.window_ms:
                return refuse("too_far_future", f"expires {expires - now_ms} ms ahead, window "
                                                f"is {self.window_ms} ms", authentic=True)
            self._nonces.purge(now_ms)
            if body["nonce"] in self._nonces:
                return refuse("replayed", "nonce already used")
            if self._nonces.full():
                return refuse("busy", authentic=True)
            self._nonces.add(body["nonce"], expires)
        return Command(body["name"], body["nonce"], v.seq, v.sender, v.kid, expires,
                       body["args"])

    # -- answers ---------------------------------------------------------------------
    @staticmethod
    def result_body(outcome: Command | Refusal, *, status: str | None = None,
                    reason: str | None = None, detail: dict[str, Any] | None = None
                    ) -> dict[str, Any]:
        """The cmd_result body answering ``outcome``: every command gets one.

        A Refusal names its command only when ``authentic`` (module docstring); otherwise
        ``cmd_seq`` and ``nonce`` are null and what the payload claimed is in ``detail``
        (``claimed_seq``, ``claimed_nonce``, ``claimed_sender``, where it carried them).
        For a Command, ``status`` defaults to "accepted" (later "done" / "failed").
        """
        if isinstance(outcome, Refusal):
            named = outcome.authentic and outcome.seq is not None and outcome.nonce is not None
            detail: dict[str, Any] = {"code": outcome.code}
            if not named:
                detail.update((k, v) for k, v in (("claimed_seq", outcome.seq),
                                                   ("claimed_nonce", outcome.nonce),
                                                   ("claimed_sender", outcome.sender))
                              if v is not None)
            return {"cmd_seq": outcome.seq if named else None,
                    "nonce": outcome.nonce if named else None, "status": "refused",
                    "reason": _text(f"{outcome.code}: {outcome.detail}"), "detail": detail}
        status = status or "accepted"
        if status not in ("accepted", "done", "failed"):
            raise ValueError(f"result_body: status {status!r} for an accepted command")
        return {"cmd_seq": outcome.seq, "nonce": outcome.nonce, "status": status,
                "reason": _text(reason) if reason is not None else None,
                "detail": dict(detail or {})}

    @staticmethod
    def refusal_event(refusal: Refusal) -> dict[str, str | int | None]:
        """Detail for the ``command_refused`` event (flat, bounded, no payload content)."""
        return {"code": refusal.code, "sender_claimed": refusal.sender,
                "nonce": refusal.nonce, "cmd_seq": refusal.seq,
                "reason": _text(refusal.detail)}

