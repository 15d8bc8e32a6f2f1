"""The fleet model: what the hall side knows about every kiosk, from verified messages.

Pure: no MQTT, no threads, no I/O. ``apply(Verified)`` and ``reject(Rejection)`` take one
message each and return the :class:`Change`\\ s it caused; ``tick()`` applies the passage of
time (heartbeat timeouts, gaps confirmed as lost). The caller (ops.monitor) owns the lock.
Time comes from an injected clock; ages are monotonic seconds.

What is tracked per kiosk (hall, device):

- **status**: from the retained ``state`` messages, ordered by ``envelope.state_supersedes``
  (state is verified without the replay tracker: the broker re-sends the retained copy and
  the will arrives after the messages sealed behind it). The will shows a dead kiosk
  ``offline`` the moment the broker notices; a kiosk that stops talking while its TCP
  session lingers goes ``offline`` after ``heartbeat_timeout_s`` without any message.
- **gaps**: the replay tracker reports a gap when a sender's seq jumps. A kiosk's seqs are
  shared by all its kinds, and state seqs never pass the tracker, so a seq is *excused* when
  it belongs to a state message seen, or is the will's seq announced by a birth in
  ``extra.will_seq`` (the will is sealed before connecting, so it usually never travels).
  Missing seqs are confirmed lost only after ``gap_grace_s``: QoS 0 and QoS 1 messages and
  the will may arrive out of order, and a late arrival fills its gap.
- **replays, bad signatures, malformed messages**, counted on the device the topic names
  (the sender of an unauthenticated message is unknown; the topic is where it did harm).
- **faults and warnings**: ``device_fault`` / ``device_recovered`` / ``device_warning`` /
  ``device_warning_cleared`` events, and the agent's ``printer_<flag>`` /
  ``printer_<flag>_cleared`` events, change them at once; each telemetry message, a full
  snapshot of peripheral health, reconciles them (events can be missed while the monitor
  was down). One-off failures (``print_failed``) are not conditions: they only show as the
  last event.
- the last telemetry figures, the last ticket (from the ticket topic), the last command
  result.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from edge.clock import SYSTEM_CLOCK, Clock
from hallkiosk.errors import ContractError, ReplayError, SignatureError
from mqtt_topics.envelope import Verified, state_supersedes
from mqtt_topics.topics import parse_topic

#: Missing seqs tracked per kiosk at most; beyond this a gap is counted lost at once.
MAX_MISSING: Final = 1024
#: Excused (state / will) seqs remembered per kiosk.
MAX_EXCUSED: Final = 256
#: Kiosks tracked at most (an attacker with a valid key could otherwise invent ids).
MAX_KIOSKS: Final = 4096
#: Ranges of ticket serials remembered per kiosk (SerialSet): a kiosk's serials run
#: consecutively, so one or two ranges is the normal case; beyond this (a kiosk with a valid
#: key sending scattered serials) the lowest two ranges merge.
MAX_SERIAL_RANGES: Final = 1024

#: Event-name prefixes of conditions that have a matching ``<name>_cleared`` event.
CONDITION_PREFIXES: Final = ("printer_",)

STATUSES: Final = ("unknown", "online", "degraded", "out_of_service", "offline")
PAPER_STATES: Final = ("ok", "near_end", "out", "unknown")


def subject_key(subject: str | None) -> str:
    """An event subject as its telemetry key: ``ticket-printer`` -> ``ticket_printer``."""
    if not subject:
        return "kiosk"
    return "".join(c if c.isalnum() or c == "_" else "_" for c in subject)[:64]


# -- inputs and outputs ---------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Rejection:
    """A message that failed verification. ``reason`` is ``signature``, ``replay`` or
    ``malformed``; ``message`` is the verifier's text (which names fields, never values)."""

    topic: str
    reason: str
    message: str
    hall: str | None = None
    device: str | None = None
    kind: str | None = None

    @classmethod
    def from_error(cls, topic: str, exc: ContractError) -> Rejection:
        if isinstance(exc, SignatureError):
            reason = "signature"
        elif isinstance(exc, ReplayError):
            reason = "replay"
        else:
            reason = "malformed"
        try:
            parts = parse_topic(topic)
        except ContractError:
            return cls(_bounded(topic), reason, str(exc)[:256])
        return cls(topic, reason, str(exc)[:256], parts.hall, parts.device, parts.kind)


def _bounded(text: object) -> str:
    shown = text if isinstance(text, str) else repr(text)
    return shown if len(shown) <= 120 else shown[:117] + "..."


@dataclass(frozen=True, slots=True)
class Change:
    """Something that changed about one kiosk. ``what`` is one of: ``seen`` (first message),
    ``status``, ``fault``, ``recovered``, ``warning``, ``warning_cleared``, ``lost``,
    ``replay``, ``bad_signature``, ``malformed``, ``ticket``, ``cmd_result``."""

    hall: str
    device: str
    what: str
    detail: Mapping[str, Any] = field(default_factory=dict)
    mono: float = 0.0


@dataclass(frozen=True, slots=True)
class KioskSnapshot:
    """A consistent copy of one kiosk's view, for the dashboard, metrics and alerts.

    Ages are seconds (monotonic, at snapshot time); None when never seen.
    """

    hall: str
    device: str
    status: str
    status_reason: str | None
    status_age_s: float | None
    last_seen_age_s: float | None
    agent_version: str | None
    session: int | None
    temp_mC: int | None
    load1_x100: int | None
    outbox_depth: int | None
    outbox_oldest_s: int | None
    paper: str | None
    net_up: bool | None
    faults: tuple[tuple[str, str], ...]
    warnings: tuple[tuple[str, str], ...]
    last_ticket_id: str | None
    last_ticket_age_s: float | None
    tickets: int
    messages: Mapping[str, int]
    lost: int
    missing: int
    replays: int
    bad_signatures: int
    malformed: int
    last_event: str | None
    last_cmd_result: Mapping[str, Any] | None
    peripherals: Mapping[str, Mapping[str, Any]]
    # Updates (edge/update; the retained state's extra): which slot runs, the update's
    # state and target, its refusal code; tickets that failed (print_failed, ticket_refused)
    # for a rollout's success rate.
    slot: str | None = None
    update_state: str | None = None
    update_target: str | None = None
    update_code: str | None = None
    ticket_failures: int = 0

    @property
    def online(self) -> bool:
        return self.status in ("online", "degraded", "out_of_service")

    @property
    def trouble(self) -> int:
        """How urgently ops should look at this kiosk: 0 is fine, higher is worse."""
        return trouble_score(self)


def trouble_score(k: KioskSnapshot) -> int:
    score = 0
    if k.status == "offline":
        score += 1000
    elif k.status == "unknown":
        score += 300
    elif k.status == "out_of_service":
        score += 200
    elif k.status == "degraded":
        score += 150
    score += 100 * len(k.faults)
    if k.paper == "out":
        score += 100
    elif k.paper == "near_end":
        score += 20
    score += 10 * len(k.warnings)
    if k.bad_signatures:
        score += 80
    if k.replays:
        score += 10
    if k.lost:
        score += 5
    if k.temp_mC is not None and k.temp_mC >= 75_000:
        score += 50
    if k.outbox_depth:
        score += min(50, 5 * k.outbox_depth)
    return score


# -- the per-kiosk record --------------------------------------------------------------------
@dataclass
class _Kiosk:
    hall: str
    device: str
    verified: bool = False                 # a verified message arrived (not only expected)
    status: str = "unknown"
    status_reason: str | None = None
    status_mono: float | None = None
    heartbeat_lost: bool = False
    state: Verified | None = None
    last_seen_mono: float | None = None
    alive_mono: float | None = None        # heartbeat baseline (retained state sets it once)
    telemetry: dict[str, Any] = field(default_factory=dict)
    faults: dict[str, dict[str, float]] = field(default_factory=dict)
    warnings: dict[str, dict[str, float]] = field(default_factory=dict)
    last_ticket_id: str | None = None
    last_ticket_mono: float | None = None
    ticket_serials: SerialSet = field(default_factory=lambda: SerialSet())
    tickets: int = 0
    messages: dict[str, int] = field(default_factory=dict)
    lost: int = 0
    replays: int = 0
    bad_signatures: int = 0
    malformed: int = 0
    last_event: str | None = None
    last_cmd_result: dict[str, Any] | None = None
    ticket_failures: int = 0
    highest: dict[str, int] = field(default_factory=dict)       # boot -> highest seq seen
    missing: dict[tuple[str, int], float] = field(default_factory=dict)
    excused: dict[tuple[str, int], None] = field(default_factory=dict)


class SerialSet:
    """The ticket serials seen from one kiosk, as sorted disjoint ranges [lo, hi].

    A re-send is counted once however late it comes (a ticket_uid is "{device}:{serial}"
    and a kiosk's serials only grow, across a lost store too: edge.store), in a few ints per
    kiosk rather than a set of every uid. Exact, as the ledger's dedupe on ticket_uid is.
    """

    __slots__ = ("_lo", "_hi")

    def __init__(self) -> None:
        self._lo: list[int] = []
        self._hi: list[int] = []

    def add(self, n: int) -> bool:
        """True when ``n`` is new (and is now remembered)."""
        lo, hi = self._lo, self._hi
        i = bisect.bisect_right(lo, n) - 1
        if i >= 0 and n <= hi[i]:
            return False
        left = i >= 0 and hi[i] == n - 1
        right = i + 1 < len(lo) and lo[i + 1] == n + 1
        if left and right:
            hi[i] = hi[i + 1]
            del lo[i + 1], hi[i + 1]
        elif left:
            hi[i] = n
        elif right:
            lo[i + 1] = n
        else:
            lo.insert(i + 1, n)
            hi.insert(i + 1, n)
            if len(lo) > MAX_SERIAL_RANGES:
                hi[0] = hi[1]
                del lo[1], hi[1]
        return True

    def __contains__(self, n: int) -> bool:
        i = bisect.bisect_right(self._lo, n) - 1
        return i >= 0 and n <= self._hi[i]

    @property
    def ranges(self) -> int:
        return len(self._lo)


def _require_role_checked(v: Verified, where: str) -> None:
    """The fleet only takes fully verified messages: ``verify(..., require_role=None)`` (a
    display-only opt-out, docs/mqtt-contract.md section 7 step 9) would let any trusted key,
    a consumer's or an ops console's, speak for a kiosk. A caller mistake: raise at once."""
    if not v.role_checked:
        raise ContractError(f"Fleet.{where}: {v.msg_type} on {v.topic} was verified without "
                            f"its role check (require_role=None); verify it with the role "
                            f"of its kind")


def _hall_device(v: Verified) -> tuple[str, str]:
    if v.hall and v.device:
        return v.hall, v.device
    parts = parse_topic(v.topic)
    return parts.hall, parts.device


class Fleet:
    """Every kiosk of the halls a monitor watches. Not thread-safe: one owner (a lock).

    ``heartbeat_timeout_s``: a kiosk that sent nothing for this long is offline (None turns
    it off, e.g. until kiosks publish telemetry). ``gap_grace_s``: how long a missing seq may
    still arrive before it counts as lost. ``track_gaps=False`` for a monitor that only sees
    a share of the traffic (shared subscriptions), where every other message is "missing".
    """

    def __init__(self, *, clock: Clock = SYSTEM_CLOCK, heartbeat_timeout_s: float | None = 90.0,
                 gap_grace_s: float = 10.0, track_gaps: bool = True,
                 max_kiosks: int = MAX_KIOSKS) -> None:
        self.clock = clock
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.gap_grace_s = gap_grace_s
        self.track_gaps = track_gaps
        self.max_kiosks = max_kiosks
        self._kiosks: dict[tuple[str, str], _Kiosk] = {}
        #: Rejections whose topic names no tracked kiosk, per hall ("" when no hall parsed).
        self.unattributed: dict[str, int] = {}
        self.dropped_kiosks = 0

    # -- bookkeeping ------------------------------------------------------------------------
    def expect(self, hall: str, device: str) -> None:
        """Track a kiosk before it ever speaks (from the inventory): it shows as unknown."""
        self._kiosk(hall, device, create=True)

    def _kiosk(self, hall: str, device: str, *, create: bool) -> _Kiosk | None:
        k = self._kiosks.get((hall, device))
        if k is None and create:
            if len(self._kiosks) >= self.max_kiosks:
                self.dropped_kiosks += 1
                return None
            k = _Kiosk(hall, device)
            self._kiosks[(hall, device)] = k
        return k

    def __len__(self) -> int:
        return len(self._kiosks)

    def __contains__(self, key: object) -> bool:
        return key in self._kiosks

    def _set_status(self, k: _Kiosk, status: str, reason: str | None, now: float,
                    changes: list[Change]) -> None:
        if status == k.status and reason == k.status_reason:
            return
        old = k.status
        k.status, k.status_reason = status, reason
        if status != old:
            k.status_mono = now
            changes.append(Change(k.hall, k.device, "status",
                                  {"old": old, "new": status, "reason": reason}, now))

    # -- verified messages ---------------------------------------------------------------------
    def apply(self, v: Verified, *, retained: bool = False) -> list[Change]:
        """Fold one verified message in. ``retained``: a retained copy the broker re-sent on
        subscribe (it proves nothing about the kiosk being alive now).

        Raises ContractError for a message verified without its role check
        (``role_checked`` False): the fleet never calls such a message verified."""
        _require_role_checked(v, "apply")
        now = self.clock.monotonic()
        hall, device = _hall_device(v)
        changes: list[Change] = []
        k = self._kiosk(hall, device, create=True)
        if k is None:
            return changes
        if not k.verified:
            k.verified = True
            changes.append(Change(hall, device, "seen", {"type": v.msg_type}, now))
        k.messages[v.msg_type] = k.messages.get(v.msg_type, 0) + 1
        if retained:
            if k.alive_mono is None:
                k.alive_mono = now
        else:
            k.last_seen_mono = k.alive_mono = now
        if self.track_gaps:
            self._account_seq(k, v, now)

        if v.msg_type == "state":
            self._on_state(k, v, now, changes)
        else:
            if k.heartbeat_lost and not retained:
                k.heartbeat_lost = False
                self._restore_status(k, now, changes)
            elif k.status == "unknown":
                self._set_status(k, "online", "traffic without a state message", now, changes)
            handler = _HANDLERS.get(v.msg_type)
            if handler is not None:
                handler(self, k, v, now, changes)
        return changes

    def ledger_ticket(self, v: Verified) -> list[Change]:
        """A ticket the hall's ledger consumer verified on its own link: counted once with the
        ones this monitor saw itself (dedupe on ticket_uid, as for re-sends).

        The monitor's own subscription can miss a ticket the ledger has: Mosquitto forgets
        every session when it is killed between snapshots, a kiosk that reconnects before the
        monitor publishes into no subscription of the monitor's, and the kiosk re-sends only
        what the ledger has not acknowledged. The ledger is the hall's record, so the
        dashboard counts what it holds. Nothing else is taken from it: liveness and sequence
        accounting stay the monitor's own view. Raises ContractError, as ``apply`` does, for
        a message verified without its role check."""
        _require_role_checked(v, "ledger_ticket")
        hall, device = _hall_device(v)
        changes: list[Change] = []
        k = self._kiosk(hall, device, create=True)
        if k is not None:
            self._on_ticket(k, v, self.clock.monotonic(), changes)
        return changes

    def _restore_status(self, k: _Kiosk, now: float, changes: list[Change]) -> None:
        if k.state is not None and k.state.body["status"] == "offline":
            return  # the kiosk said goodbye; only a new state brings it back
        if k.state is not None:
            self._set_status(k, k.state.body["status"], k.state.body.get("reason"), now, changes)
        else:
            self._set_status(k, "online", "traffic after silence", now, changes)

    def _on_state(self, k: _Kiosk, v: Verified, now: float, changes: list[Change]) -> None:
        if k.state is not None and k.state.topic != v.topic:
            k.state = None  # same device id under another hall topic cannot happen (key per hall)
        if not state_supersedes(k.state, v):
            return
        k.state = v
        k.heartbeat_lost = False
        self._set_status(k, v.body["status"], v.body.get("reason"), now, changes)

    def _on_telemetry(self, k: _Kiosk, v: Verified, now: float, changes: list[Change]) -> None:
        # Not copied: verify() parsed this body for this message alone (snapshots copy).
        k.telemetry = v.body
        for key, value in v.body.items():
            if isinstance(value, dict) and ("fault" in value or "warning" in value):
                self._reconcile(k, key, value.get("fault"), k.faults, "fault", "recovered",
                                now, changes)
                self._reconcile(k, key, value.get("warning"), k.warnings, "warning",
                                "warning_cleared", now, changes)

    def _reconcile(self, k: _Kiosk, subject: str, word: Any, table: dict[str, dict[str, float]],
                   on: str, off: str, now: float, changes: list[Change]) -> None:
        current = table.get(subject)
        if current is None:
            if not (isinstance(word, str) and word):
                return            # nothing was raised and nothing is: the common case
            current = {}
        wanted = {word} if isinstance(word, str) and word else set()
        for gone in [w for w in current if w not in wanted]:
            del current[gone]
            changes.append(Change(k.hall, k.device, off, {"subject": subject, on: gone}, now))
        for new in wanted - set(current):
            current[new] = now
            changes.append(Change(k.hall, k.device, on, {"subject": subject, on: new}, now))
        if current:
            table[subject] = current
        else:
            table.pop(subject, None)

    def _on_event(self, k: _Kiosk, v: Verified, now: float, changes: list[Change]) -> None:
        body = v.body
        name, subject, detail = body["name"], subject_key(body["subject"]), body["detail"]
        k.last_event = f"{name} ({body['severity']})"
        if name in TICKET_FAILURES:
            k.ticket_failures += 1
        if name == "device_fault":
            self._raise(k, k.faults, subject, detail.get("fault") or name, "fault", now, changes)
        elif name == "device_recovered":
            self._clear(k, k.faults, subject, detail.get("fault"), "fault", "recovered", now,
                        changes)
        elif name == "device_warning":
            self._raise(k, k.warnings, subject, detail.get("warning") or name, "warning", now,
                        changes)
        elif name == "device_warning_cleared":
            self._clear(k, k.warnings, subject, detail.get("warning"), "warning",
                        "warning_cleared", now, changes)
        elif name.startswith(CONDITION_PREFIXES):
            # The agent's own condition events: printer_<flag> raised with severity fault or
            # warning, printer_<flag>_cleared when the flag drops (edge.agent._on_printer).
            prefix = next(p for p in CONDITION_PREFIXES if name.startswith(p))
            if name.endswith("_cleared"):
                word = name[len(prefix):-len("_cleared")]
                self._clear(k, k.faults, subject, word, "fault", "recovered", now, changes)
                self._clear(k, k.warnings, subject, word, "warning", "warning_cleared", now,
                            changes)
            elif body["severity"] == "fault":
                self._raise(k, k.faults, subject, name[len(prefix):], "fault", now, changes)
            elif body["severity"] == "warning":
                self._raise(k, k.warnings, subject, name[len(prefix):], "warning", now, changes)

    def _raise(self, k: _Kiosk, table: dict[str, dict[str, float]], subject: str, word: Any,
               on: str, now: float, changes: list[Change]) -> None:
        word = str(word)[:64]
        current = table.setdefault(subject, {})
        if word not in current:
            current[word] = now
            changes.append(Change(k.hall, k.device, on, {"subject": subject, on: word}, now))

    def _clear(self, k: _Kiosk, table: dict[str, dict[str, float]], subject: str, word: Any,
               on: str, off: str, now: float, changes: list[Change]) -> None:
        current = table.get(subject)
        if not current:
            return
        if isinstance(word, str) and word:
            gone = [word] if word in current else []
        else:
            gone = list(current)  # a recovery that names nothing clears the whole device
        for w in gone:
            del current[w]
            changes.append(Change(k.hall, k.device, off, {"subject": subject, on: w}, now))
        if not current:
            del table[subject]

    def _on_ticket(self, k: _Kiosk, v: Verified, now: float, changes: list[Change]) -> None:
        uid = v.body["ticket_uid"]
        k.last_ticket_mono = now
        if not k.ticket_serials.add(int(uid.rpartition(":")[2])):
            return  # a re-send of a ticket already counted
        k.tickets += 1
        k.last_ticket_id = v.body["ticket_id"]
        changes.append(Change(k.hall, k.device, "ticket", {"ticket_id": v.body["ticket_id"]}, now))

    def _on_cmd_result(self, k: _Kiosk, v: Verified, now: float, changes: list[Change]) -> None:
        b = v.body
        k.last_cmd_result = {"nonce": b["nonce"], "cmd_seq": b["cmd_seq"], "status": b["status"],
                             "reason": b["reason"]}
        changes.append(Change(k.hall, k.device, "cmd_result", dict(k.last_cmd_result), now))

    # -- sequence accounting -----------------------------------------------------------------
    def _account_seq(self, k: _Kiosk, v: Verified, now: float) -> None:
        key = (v.boot, v.seq)
        if v.msg_type == "state":
            self._excuse(k, key)
            will_seq = (v.body.get("extra") or {}).get("will_seq")
            if type(will_seq) is int and will_seq >= 1:
                self._excuse(k, (v.boot, will_seq))
            return
        if v.boot not in k.highest:
            k.highest = {v.boot: v.seq}   # a new boot: the old boot's numbers are history
        elif v.seq > k.highest[v.boot]:
            k.highest[v.boot] = v.seq
        if v.seq_status == "gap" and v.missing > 0:
            first = v.seq - v.missing
            for seq in range(first, v.seq):
                gap_key = (v.boot, seq)
                if gap_key in k.excused:
                    continue
                if len(k.missing) >= MAX_MISSING:
                    # Too many to watch individually: count them lost now.
                    k.lost += 1
                    continue
                k.missing[gap_key] = now
        elif v.seq_status == "late":
            k.missing.pop(key, None)

    def _excuse(self, k: _Kiosk, key: tuple[str, int]) -> None:
        k.missing.pop(key, None)
        k.excused[key] = None
        while len(k.excused) > MAX_EXCUSED:
            del k.excused[next(iter(k.excused))]

    # -- rejected messages --------------------------------------------------------------------
    def reject(self, r: Rejection) -> list[Change]:
        """Count a message that failed verification on the kiosk its topic names."""
        now = self.clock.monotonic()
        k = self._kiosks.get((r.hall, r.device)) if r.hall and r.device else None
        if k is None:
            hall = r.hall or ""
            self.unattributed[hall] = self.unattributed.get(hall, 0) + 1
            return []
        what = {"signature": "bad_signature", "replay": "replay"}.get(r.reason, "malformed")
        if what == "bad_signature":
            k.bad_signatures += 1
        elif what == "replay":
            k.replays += 1
        else:
            k.malformed += 1
        return [Change(k.hall, k.device, what, {"kind": r.kind, "message": r.message}, now)]

    # -- time --------------------------------------------------------------------------------
    def tick(self) -> list[Change]:
        """Heartbeat timeouts and gaps confirmed lost, as of the clock's now."""
        now = self.clock.monotonic()
        changes: list[Change] = []
        for k in self._kiosks.values():
            if (self.heartbeat_timeout_s is not None and k.status in ("online", "degraded",
                                                                       "out_of_service")
                    and k.alive_mono is not None
                    and now - k.alive_mono > self.heartbeat_timeout_s):
                k.heartbeat_lost = True
                self._set_status(k, "offline", f"silent for more than "
                                 f"{self.heartbeat_timeout_s:g} s", now, changes)
            if k.missing:
                expired = [key for key, t in k.missing.items() if now - t >= self.gap_grace_s]
                for key in expired:
                    del k.missing[key]
                if expired:
                    k.lost += len(expired)
                    changes.append(Change(k.hall, k.device, "lost", {"count": len(expired)}, now))
        return changes

    def next_deadline(self) -> float | None:
        """The earliest monotonic time at which ``tick()`` may change something."""
        deadlines: list[float] = []
        for k in self._kiosks.values():
            if (self.heartbeat_timeout_s is not None and k.alive_mono is not None
                    and k.status in ("online", "degraded", "out_of_service")):
                deadlines.append(k.alive_mono + self.heartbeat_timeout_s)
            if k.missing:
                deadlines.append(min(k.missing.values()) + self.gap_grace_s)
        return min(deadlines) if deadlines else None

    # -- reading -----------------------------------------------------------------------------
    def snapshot(self, hall: str | None = None) -> list[KioskSnapshot]:
        now = self.clock.monotonic()
        return [self._snap(k, now) for k in self._kiosks.values()
                if hall is None or k.hall == hall]

    def kiosk(self, hall: str, device: str) -> KioskSnapshot | None:
        k = self._kiosks.get((hall, device))
        return None if k is None else self._snap(k, self.clock.monotonic())

    def _snap(self, k: _Kiosk, now: float) -> KioskSnapshot:
        t = k.telemetry
        peripherals = {key: dict(value) for key, value in t.items() if isinstance(value, dict)
                       and key not in ("net", "throttle")}
        faults = tuple(sorted((s, w) for s, ws in k.faults.items() for w in ws))
        warnings = tuple(sorted((s, w) for s, ws in k.warnings.items() for w in ws))
        state = k.state.body if k.state is not None else {}
        extra = state.get("extra") or {}
        return KioskSnapshot(
            hall=k.hall, device=k.device, status=k.status, status_reason=k.status_reason,
            status_age_s=None if k.status_mono is None else now - k.status_mono,
            last_seen_age_s=None if k.last_seen_mono is None else now - k.last_seen_mono,
            agent_version=state.get("agent_version") or _text(t.get("agent_version")),
            session=state.get("session"),
            temp_mC=_int(t.get("temp_mC")), load1_x100=_int(t.get("load1_x100")),
            outbox_depth=_int(t.get("outbox_depth")),
            outbox_oldest_s=_int(t.get("outbox_oldest_s")),
            paper=_paper(peripherals, faults, warnings),
            net_up=t.get("net_up") if isinstance(t.get("net_up"), bool) else None,
            faults=faults, warnings=warnings, last_ticket_id=k.last_ticket_id,
            last_ticket_age_s=None if k.last_ticket_mono is None else now - k.last_ticket_mono,
            tickets=k.tickets, messages=dict(k.messages), lost=k.lost, missing=len(k.missing),
            replays=k.replays, bad_signatures=k.bad_signatures, malformed=k.malformed,
            last_event=k.last_event,
            last_cmd_result=None if k.last_cmd_result is None else dict(k.last_cmd_result),
            peripherals=peripherals, slot=_text(extra.get("slot")),
            update_state=_text(extra.get("update_state")),
            update_target=_text(extra.get("update_target")),
            update_code=_text(extra.get("update_code")), ticket_failures=k.ticket_failures)


#: Events that mean a citizen did not get a ticket (edge.citizens).
TICKET_FAILURES = frozenset({"print_failed", "ticket_refused"})


def _int(value: Any) -> int | None:
    return value if type(value) is int else None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _paper(peripherals: Mapping[str, Mapping[str, Any]], faults: Iterable[tuple[str, str]],
           warnings: Iterable[tuple[str, str]]) -> str | None:
    """Paper state: events first (they are newer than the last telemetry), then telemetry."""
    if any(w in ("paper_out", "paper_end") for _, w in faults):
        return "out"
    if any(w == "paper_near_end" for _, w in warnings):
        return "near_end"
    for health in peripherals.values():
        paper = health.get("paper")
        if paper in PAPER_STATES:
            return paper
    return None


_HANDLERS: Final[dict[str, Callable[[Fleet, _Kiosk, Verified, float, list[Change]], None]]] = {
    "telemetry": Fleet._on_telemetry,
    "event": Fleet._on_event,
    "ticket": Fleet._on_ticket,
    "cmd_result": Fleet._on_cmd_result,
}

__all__ = ["CONDITION_PREFIXES", "Change", "Fleet", "KioskSnapshot", "PAPER_STATES",
           "Rejection", "STATUSES", "subject_key", "trouble_score"]
