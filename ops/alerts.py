"""Alert rules over the fleet, and where alerts go (the log, and a pluggable publisher).

A rule is data (from ops.toml, see ops.config): a ``kind`` and its figures. Two families:

- **conditions** on a kiosk's current view, firing once the condition has held ``after_s``
  and resolving when it no longer holds: ``offline`` (status offline; the time counts from
  when the kiosk went offline), ``paper`` (paper at ``level`` ``out`` or ``near_end`` or
  worse), ``temperature`` (``temp_mC >= threshold``), ``outbox_backlog`` (``outbox_depth >=
  threshold`` or ``outbox_oldest_s >= max_age_s``), ``fault`` (any active device fault);
- **counts** of fleet changes within ``window_s``: ``gaps`` (messages confirmed lost),
  ``bad_signature``, ``replay``, ``malformed``; firing when at least ``threshold`` happened in
  the window, resolving when the window no longer holds that many.

Wiring (ops.monitor): every Change list from ``Fleet.apply/reject/tick`` goes to
``AlertEngine.observe``; about once a second ``AlertEngine.evaluate(fleet.snapshot())``
returns the transitions, each handed to ``AlertSink.emit``. The sink logs every transition
and, when given a ``publish`` function, hands it ``alert.body()`` (the contract's ``alert``
body) for the kiosk's ``hall/{h}/kiosk/{d}/alert`` topic; the monitor signs and publishes it
there with its own key (role ``monitor``, docs/mqtt-contract.md).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from edge.clock import SYSTEM_CLOCK, Clock
from hallkiosk.errors import ConfigError
from hallkiosk.errors import ContractError
from mqtt_topics.schemas import ALERT_KINDS, ALERT_SEVERITIES, MAX_STR
from mqtt_topics.topics import KioskTopics, validate_id
from ops.fleet import Change, KioskSnapshot

log = logging.getLogger("hallkiosk.ops.alerts")

CONDITION_KINDS: Final = ("offline", "paper", "temperature", "outbox_backlog", "fault")
#: Count kinds and the Change.what each one counts.
COUNT_KINDS: Final = {"gaps": "lost", "bad_signature": "bad_signature", "replay": "replay",
                      "malformed": "malformed"}
KINDS: Final = CONDITION_KINDS + tuple(COUNT_KINDS)
SEVERITIES: Final = ALERT_SEVERITIES
assert set(KINDS) == set(ALERT_KINDS), "ops.alerts and the contract's alert kinds drifted"
#: Count events remembered per kiosk and kind (a flood must not grow memory).
MAX_COUNT_EVENTS: Final = 4096


@dataclass(frozen=True, slots=True)
class AlertRule:
    """One rule. ``name`` is an id (1-32 of A-Z a-z 0-9 _ -), unique among the rules.

    Figures: ``after_s`` (conditions: how long the condition must hold), ``threshold``
    (temperature in milli-degrees C, backlog depth, or how many counted changes),
    ``max_age_s`` (outbox_backlog: oldest unacknowledged ticket), ``window_s`` (counts),
    ``level`` (paper: ``out`` or ``near_end``).
    """

    name: str
    kind: str
    severity: str = "warning"
    after_s: float = 0.0
    threshold: int | None = None
    max_age_s: float | None = None
    window_s: float = 300.0
    level: str = "out"

    def __post_init__(self) -> None:
        try:
            validate_id("alert rule name", self.name)
        except ContractError as exc:
            raise ConfigError(str(exc)) from None
        if self.kind not in KINDS:
            raise ConfigError(f"alert rule {self.name!r}: unknown kind {self.kind!r} "
                              f"(one of {', '.join(KINDS)})")
        if self.severity not in SEVERITIES:
            raise ConfigError(f"alert rule {self.name!r}: severity must be one of "
                              f"{', '.join(SEVERITIES)}")
        if self.kind == "temperature" and self.threshold is None:
            raise ConfigError(f"alert rule {self.name!r}: temperature needs threshold (mC)")
        if self.kind == "outbox_backlog" and self.threshold is None and self.max_age_s is None:
            raise ConfigError(f"alert rule {self.name!r}: outbox_backlog needs threshold "
                              "and/or max_age_s")
        if self.kind == "paper" and self.level not in ("out", "near_end"):
            raise ConfigError(f"alert rule {self.name!r}: level must be 'out' or 'near_end'")


#: Used when ops.toml lists no [[alerts]].
DEFAULT_RULES: Final = (
    AlertRule("kiosk_offline", "offline", "critical", after_s=60),
    AlertRule("paper_out", "paper", "critical", level="out"),
    AlertRule("paper_low", "paper", "warning", level="near_end", after_s=60),
    AlertRule("hot", "temperature", "warning", after_s=120, threshold=80_000),
    AlertRule("outbox_backlog", "outbox_backlog", "warning", threshold=10, max_age_s=300),
    AlertRule("device_fault", "fault", "warning", after_s=10),
    AlertRule("lost_messages", "gaps", "warning", threshold=10, window_s=600),
    AlertRule("bad_signature", "bad_signature", "critical", threshold=1, window_s=600),
    AlertRule("replays", "replay", "warning", threshold=5, window_s=600),
)


@dataclass(frozen=True, slots=True)
class Alert:
    """A transition of one rule on one kiosk: ``state`` is ``firing`` or ``resolved``.

    ``alert_id`` is the same for the firing and the resolution of one episode, and the same
    on every monitor instance that sees it (it is built from the rule, the kiosk and the
    wall-clock second the episode began), so a receiver can dedupe.
    """

    alert_id: str
    rule: str
    kind: str
    severity: str
    state: str
    hall: str
    device: str
    value: int | None
    since_ms: int
    message: str

    @property
    def topic(self) -> str:
        """Where the alert is published: the alert topic of the kiosk it is about."""
        return KioskTopics(self.hall, self.device).alert

    def body(self) -> dict[str, Any]:
        """The contract's ``alert`` body (message cut to the contract's text limit)."""
        message = self.message if len(self.message) <= MAX_STR else self.message[:MAX_STR - 3] + "..."
        return {"alert_id": self.alert_id, "rule": self.rule, "kind": self.kind,
                "severity": self.severity, "state": self.state, "device": self.device,
                "value": self.value, "since_ms": self.since_ms, "message": message}


class AlertEngine:
    """Evaluates rules; remembers which alerts are firing. Not thread-safe (one owner)."""

    def __init__(self, rules: Iterable[AlertRule] = DEFAULT_RULES, *,
                 clock: Clock = SYSTEM_CLOCK) -> None:
        self.rules = tuple(rules)
        names = [r.name for r in self.rules]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ConfigError(f"alert rules: duplicate name(s) {', '.join(sorted(dup))}")
        self.clock = clock
        self._pending: dict[tuple[str, str, str], float] = {}
        self._firing: dict[tuple[str, str, str], Alert] = {}
        self._counts: dict[tuple[str, str, str], deque[float]] = {}

    @property
    def firing(self) -> list[Alert]:
        return list(self._firing.values())

    def observe(self, changes: Iterable[Change]) -> None:
        """Record the changes count rules count (lost messages weigh their count)."""
        counted = set(COUNT_KINDS.values())
        for c in changes:
            if c.what not in counted:
                continue
            times = self._counts.setdefault((c.hall, c.device, c.what),
                                            deque(maxlen=MAX_COUNT_EVENTS))
            weight = int(c.detail.get("count", 1)) if c.what == "lost" else 1
            times.extend([c.mono] * max(1, min(weight, MAX_COUNT_EVENTS)))

    def _count(self, hall: str, device: str, what: str, window_s: float, now: float) -> int:
        times = self._counts.get((hall, device, what))
        if not times:
            return 0
        while times and times[0] < now - window_s:
            times.popleft()
        return len(times)

    def evaluate(self, kiosks: Iterable[KioskSnapshot]) -> list[Alert]:
        """Transitions since the last call (firing or resolved), in rule order per kiosk."""
        now = self.clock.monotonic()
        wall = self.clock.wall()
        out: list[Alert] = []
        seen: set[tuple[str, str, str]] = set()
        for k in kiosks:
            for rule in self.rules:
                key = (rule.name, k.hall, k.device)
                seen.add(key)
                holds, value, held_s, message = self._check(rule, k, now)
                if not holds:
                    self._pending.pop(key, None)
                    alert = self._firing.pop(key, None)
                    if alert is not None:
                        out.append(_resolved(alert, value))
                    continue
                start = self._pending.setdefault(key, now)
                held = max(now - start, held_s or 0.0)
                if key in self._firing or held < rule.after_s:
                    continue
                since_ms = max(0, int((wall - held) * 1000))
                alert = Alert(f"{rule.name}:{k.hall}:{k.device}:{since_ms // 1000}", rule.name,
                              rule.kind, rule.severity, "firing", k.hall, k.device, value,
                              since_ms, message)
                self._firing[key] = alert
                out.append(alert)
        for key in [key for key in self._firing if key not in seen]:
            out.append(_resolved(self._firing.pop(key), None))   # the kiosk left the fleet
        return out

    def _check(self, rule: AlertRule, k: KioskSnapshot, now: float
               ) -> tuple[bool, int | None, float | None, str]:
        """(condition holds, value, how long it has held if the fleet knows, message)."""
        kind = rule.kind
        if kind == "offline":
            holds = k.status == "offline"
            age = k.status_age_s
            return holds, None if age is None else int(age), age, (
                f"offline ({k.status_reason or 'no reason given'})")
        if kind == "paper":
            bad = ("out",) if rule.level == "out" else ("out", "near_end")
            return k.paper in bad, None, None, f"paper {k.paper}"
        if kind == "temperature":
            t = k.temp_mC
            return (t is not None and t >= (rule.threshold or 0)), t, None, (
                f"CPU at {t} mC (limit {rule.threshold})")
        if kind == "outbox_backlog":
            depth, oldest = k.outbox_depth, k.outbox_oldest_s
            holds = ((rule.threshold is not None and depth is not None and depth >= rule.threshold)
                     or (rule.max_age_s is not None and oldest is not None
                         and oldest >= rule.max_age_s))
            return holds, depth, None, f"{depth} unacknowledged tickets, oldest {oldest} s"
        if kind == "fault":
            faults = ", ".join(f"{s}:{f}" for s, f in k.faults)
            return bool(k.faults), len(k.faults), None, f"device faults: {faults}"
        count = self._count(k.hall, k.device, COUNT_KINDS[kind], rule.window_s, now)
        return count >= (rule.threshold or 1), count, None, (
            f"{count} {kind.replace('_', ' ')} in {rule.window_s:g} s")


def _resolved(alert: Alert, value: int | None) -> Alert:
    return Alert(alert.alert_id, alert.rule, alert.kind, alert.severity, "resolved", alert.hall,
                 alert.device, value, alert.since_ms, alert.message)


class AlertSink:
    """Where alert transitions go: the log always, ``publish(topic, body)`` when given.

    ``publish`` is called with ``Alert.topic`` and ``Alert.body()``; it must not
    block for long (the monitor calls it from its tick thread), and if it raises the failure
    is logged and the alert still counts as emitted. ``history`` keeps the latest alerts.
    """

    def __init__(self, publish: Callable[[str, Mapping[str, Any]], None] | None = None, *,
                 logger: logging.Logger = log, keep: int = 200) -> None:
        self.publish = publish
        self.log = logger
        self.history: deque[Alert] = deque(maxlen=keep)

    def emit(self, alert: Alert) -> None:
        self.history.append(alert)
        if alert.state == "firing":
            level = logging.ERROR if alert.severity == "critical" else (
                logging.WARNING if alert.severity == "warning" else logging.INFO)
        else:
            level = logging.INFO
        self.log.log(level, "alert %s %s hall=%s kiosk=%s severity=%s id=%s: %s", alert.rule,
                     alert.state, alert.hall, alert.device, alert.severity, alert.alert_id,
                     alert.message)
        if self.publish is None:
            return
        try:
            self.publish(alert.topic, alert.body())
        except Exception:  # an alert channel down must not stop the monitor
            self.log.warning("alert %s not published", alert.alert_id, exc_info=True)

    def emit_all(self, alerts: Iterable[Alert]) -> None:
        for alert in alerts:
            self.emit(alert)
