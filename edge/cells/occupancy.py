"""Is a privacy cell occupied? A pure state machine on an injected clock.

Inputs (the agent's main loop feeds them; nothing here does I/O or starts a thread):

- :meth:`OccupancyMachine.update` ``(sensor, value)``: a sensor's new level. For a MOTION
  sensor (PIR) and a PRESENCE sensor (LD2410 radar) ``value`` is "sees someone"; for a DOOR
  sensor (reed switch, already debounced) it is "door closed".
- :meth:`~OccupancyMachine.set_available`: a sensor's transport came or went (radar unplugged,
  node heartbeat lost). An unavailable sensor does not vote.
- :meth:`~OccupancyMachine.set_session`: whether a kiosk session is active in the cell.
- :meth:`~OccupancyMachine.tick`: time passed; call it at :meth:`~OccupancyMachine.next_deadline`.

Each call returns the outputs it caused, in order: :class:`SensorFault` /
:class:`SensorRecovered`, then :class:`Transition`. None of them carries personal data.

States and rules (timings in :class:`Timings`, all seconds of ``clock.monotonic()``):

    VACANT --presence for min_presence_s (at once for a session)--> OCCUPIED
    OCCUPIED --no presence--> LEAVING
    LEAVING --presence--> OCCUPIED
    LEAVING --no presence for the hold--> VACANT

- Presence is the OR of the voting sensors, absence the AND: one sensor seeing someone is
  enough, and the cell is empty only when every voter agrees. A door edge (opened or shut) is
  presence for ``door_pulse_s``: someone is at the door right now; the door's position alone
  says nothing (a closed door may hide an empty cell).
- The hold is ``hold_s`` while a PRESENCE sensor (the radar, which sees still people) votes,
  and the longer ``hold_motion_only_s`` when only PIRs and doors vote, because a PIR misses a
  citizen sitting still.
- An active kiosk session is presence (the citizen is at the screen, however still they sit)
  with one exception, so that a cell can still become vacant and end a session a citizen
  walked away from: a door edge during the session suspends the session's claim until a
  MOTION or PRESENCE sensor sees someone again (a rising edge) or a new session starts. If
  the citizen stayed, a sensor sees them move; if they left, the hold runs out and the
  agent ends the session and wipes its data.
- Voters are the sensors that are available, have reported a level and have no stuck or
  flapping fault. With no voter left, presence is the session claim alone.

Fault rules (each reported once when it starts, and again as recovered when it ends):

- **stuck**: a MOTION or PRESENCE sensor has said "someone" continuously for
  ``stuck_after_s`` (default 30 min) with no corroboration: no other voter saw anyone and no
  session was active at any moment of that time. A citizen who sits through half an hour
  without touching the kiosk, moving for the PIR or opening the door is far rarer than a PIR
  held high by a draught or a radar seeing a coat on a hook. Recovers when the sensor says
  "nobody" (a sensor that never changes while the cell is idle is not a fault: empty cells
  are normal for days).
- **flapping**: more than ``flap_max_changes`` level changes within ``flap_window_s``
  (default 40 per 60 s: a healthy HC-SR501 PIR, with its ~2.5 s hold and ~2.5 s lock-out,
  makes at most ~24, a door a couple per visit). Recovers when the same window holds at most
  half that many changes.
- **unavailable**: reported by :meth:`~OccupancyMachine.set_available`.

A faulted sensor does not vote: a PIR stuck high would otherwise keep a cell "occupied"
forever, a flapping one would toggle it. The indicator shows FAULT while any sensor is
faulted, because the free/occupied reading can no longer be trusted.

Times are taken when the machine is stepped; the agent steps it at every event and at
:meth:`~OccupancyMachine.next_deadline`, so late steps only ever lengthen a hold.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

from edge.clock import Clock


class CellState(Enum):
    VACANT = "vacant"
    OCCUPIED = "occupied"
    LEAVING = "leaving"


class SensorKind(Enum):
    MOTION = "motion"        # PIR: sees movement, misses a person sitting still
    PRESENCE = "presence"    # mmWave radar: sees still people too
    DOOR = "door"            # reed switch: value = door closed; edges are evidence


class Indication(Enum):
    """What the cell's indicator LED outside the door shows (see edge.cells.indicator)."""
    FREE = "free"
    OCCUPIED = "occupied"
    FAULT = "fault"


# -- inputs, produced by the sensor drivers (on their threads) ------------------------------
@dataclass(frozen=True, slots=True)
class SensorReading:
    """A sensor's new level, already debounced. See the module docstring for ``value``."""
    cell: str
    sensor: str
    value: bool


@dataclass(frozen=True, slots=True)
class SensorAvailability:
    """A sensor's transport came (``available``) or went; ``detail`` is a sentence for the log."""
    cell: str
    sensor: str
    available: bool
    detail: str = ""


# -- outputs -----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Transition:
    cell: str
    old: CellState
    new: CellState
    reason: str          # "presence", "session", "absence", "presence_returned", "hold_expired"


@dataclass(frozen=True, slots=True)
class SensorFault:
    cell: str
    sensor: str
    fault: str           # "stuck", "flapping", "unavailable"
    detail: str = ""


@dataclass(frozen=True, slots=True)
class SensorRecovered:
    cell: str
    sensor: str
    fault: str


Output = Transition | SensorFault | SensorRecovered

_EXCLUDING = frozenset({"stuck", "flapping", "unavailable"})
#: Deadlines count as reached within a microsecond: a clock advanced to a deadline by float
#: arithmetic may land a rounding error short of it, and must not miss it.
_EPS = 1e-6


@dataclass(frozen=True, slots=True)
class Timings:
    """Seconds (flap_max_changes: a count). Ranges follow PROTOCOLS.md "Booth occupancy"."""
    min_presence_s: float = 0.8
    hold_s: float = 20.0
    hold_motion_only_s: float = 60.0
    door_pulse_s: float = 2.0
    stuck_after_s: float = 1800.0
    flap_window_s: float = 60.0
    flap_max_changes: int = 40

    def __post_init__(self) -> None:
        problems = []
        for name in ("min_presence_s", "hold_s", "hold_motion_only_s", "door_pulse_s",
                     "stuck_after_s", "flap_window_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                problems.append(f"{name} must be a finite number >= 0, got {value!r}")
        if self.stuck_after_s <= 0 or self.flap_window_s <= 0:
            problems.append("stuck_after_s and flap_window_s must be > 0")
        if not isinstance(self.flap_max_changes, int) or self.flap_max_changes < 2:
            problems.append(f"flap_max_changes must be an int >= 2, got {self.flap_max_changes!r}")
        if problems:
            raise ValueError("occupancy timings: " + "; ".join(problems))


class _Sensor:
    __slots__ = ("name", "kind", "value", "available", "faults", "changes", "corroborated",
                 "pulse_until")

    def __init__(self, name: str, kind: SensorKind, max_changes: int) -> None:
        self.name = name
        self.kind = kind
        self.value: bool | None = None
        self.available = True
        self.faults: set[str] = set()
        self.changes: deque[float] = deque(maxlen=max_changes + 1)
        self.corroborated = 0.0      # last moment other evidence coexisted with value True
        self.pulse_until = -math.inf  # doors: evidence until then

    @property
    def votes(self) -> bool:
        return self.available and self.value is not None and not (self.faults & _EXCLUDING)


class OccupancyMachine:
    """One cell. ``sensors`` maps each sensor's name (as the drivers report it) to its kind."""

    def __init__(self, cell: str, sensors: Mapping[str, SensorKind], *, clock: Clock,
                 timings: Timings | None = None) -> None:
        self.cell = cell
        self.clock = clock
        self.timings = timings or Timings()
        self._sensors = {name: _Sensor(name, SensorKind(kind), self.timings.flap_max_changes)
                         for name, kind in sensors.items()}
        self.state = CellState.VACANT
        self.session_active = False
        self._claim_suspended = False
        now = clock.monotonic()
        self._evidence = False
        self._evidence_since = now
        self._state_since = now
        self._last_step = now

    # -- queries ---------------------------------------------------------------------------
    @property
    def faults(self) -> dict[str, tuple[str, ...]]:
        """Sensor name -> its current faults (only sensors that have some)."""
        return {s.name: tuple(sorted(s.faults)) for s in self._sensors.values() if s.faults}

    @property
    def indication(self) -> Indication:
        if any(s.faults for s in self._sensors.values()):
            return Indication.FAULT
        return Indication.FREE if self.state is CellState.VACANT else Indication.OCCUPIED

    @property
    def session_claim(self) -> bool:
        """Whether the active session currently counts as presence."""
        return self.session_active and not self._claim_suspended

    def levels(self) -> dict[str, bool | None]:
        """Sensor name -> last reported level (None: unknown or unavailable)."""
        return {s.name: s.value for s in self._sensors.values()}

    def presence(self) -> bool:
        return self._evidence_now(self.clock.monotonic())

    def next_deadline(self) -> float | None:
        """Monotonic time of the next time-driven change, or None when nothing is pending.

        It may already have passed (the caller then ticks at once): a deadline that falls
        between a step and this query must not be lost.
        """
        t = self.timings
        candidates = []
        if self.state is CellState.VACANT and self._evidence:
            candidates.append(self._evidence_since + t.min_presence_s)
        if self.state is CellState.LEAVING:
            candidates.append(self._state_since + self._hold_s())
        for s in self._sensors.values():
            if s.kind is SensorKind.DOOR:
                if s.votes and s.pulse_until > self._last_step:
                    candidates.append(s.pulse_until)
            elif s.value and s.available and "stuck" not in s.faults:
                candidates.append(s.corroborated + t.stuck_after_s)
            if "flapping" in s.faults and s.changes:
                candidates.append(s.changes[0] + t.flap_window_s)
        return min(candidates) if candidates else None

    # -- inputs ----------------------------------------------------------------------------
    def update(self, sensor: str, value: bool) -> list[Output]:
        s = self._sensor(sensor)
        now = self.clock.monotonic()
        out: list[Output] = []
        self._refresh(now)
        if not s.available:
            s.available = True
            s.faults.discard("unavailable")
            out.append(SensorRecovered(self.cell, s.name, "unavailable"))
        value = bool(value)
        if value != s.value:
            previous, s.value = s.value, value
            if previous is not None:
                s.changes.append(now)
                self._check_flapping(s, now, out)
            if s.kind is SensorKind.DOOR:
                if previous is not None and "flapping" not in s.faults:
                    s.pulse_until = now + self.timings.door_pulse_s
                    if self.session_active:
                        self._claim_suspended = True
            elif value:
                s.corroborated = now
                if not s.faults & _EXCLUDING:
                    self._claim_suspended = False
            elif "stuck" in s.faults:
                s.faults.discard("stuck")
                out.append(SensorRecovered(self.cell, s.name, "stuck"))
        return self._step(now, out)

    def set_available(self, sensor: str, available: bool, detail: str = "") -> list[Output]:
        s = self._sensor(sensor)
        now = self.clock.monotonic()
        out: list[Output] = []
        self._refresh(now)
        if available and not s.available:
            s.available = True
            s.faults.discard("unavailable")
            out.append(SensorRecovered(self.cell, s.name, "unavailable"))
        elif not available and s.available:
            s.available = False
            s.value = None
            s.pulse_until = -math.inf
            s.faults.add("unavailable")
            out.append(SensorFault(self.cell, s.name, "unavailable", detail))
        return self._step(now, out)

    def set_session(self, active: bool) -> list[Output]:
        now = self.clock.monotonic()
        self._refresh(now)
        active = bool(active)
        if active and not self.session_active:
            self._claim_suspended = False
        self.session_active = active
        return self._step(now, [])

    def tick(self) -> list[Output]:
        now = self.clock.monotonic()
        self._refresh(now)
        return self._step(now, [])

    # -- internals -------------------------------------------------------------------------
    def _sensor(self, name: str) -> _Sensor:
        try:
            return self._sensors[name]
        except KeyError:
            raise ValueError(f"cell {self.cell}: no sensor named {name!r} "
                             f"(configured: {', '.join(self._sensors) or 'none'})") from None

    def _hold_s(self) -> float:
        radar_votes = any(s.kind is SensorKind.PRESENCE and s.votes for s in self._sensors.values())
        return self.timings.hold_s if radar_votes else self.timings.hold_motion_only_s

    def _sensor_evidence(self, s: _Sensor, now: float) -> bool:
        if not s.votes:
            return False
        if s.kind is SensorKind.DOOR:
            return now + _EPS < s.pulse_until
        return bool(s.value)

    def _evidence_now(self, now: float) -> bool:
        return self.session_claim or any(self._sensor_evidence(s, now) for s in self._sensors.values())

    def _refresh(self, now: float) -> None:
        """Record corroboration up to ``now`` under the levels that held since the last step
        (levels only change in steps, so they were constant in between)."""
        for s in self._sensors.values():
            if s.kind is SensorKind.DOOR or not s.value or not s.available:
                continue
            if self.session_active:
                s.corroborated = now
                continue
            for o in self._sensors.values():
                if o is s or not o.votes:
                    continue
                if o.kind is SensorKind.DOOR:
                    if o.pulse_until > self._last_step:
                        s.corroborated = max(s.corroborated, min(now, o.pulse_until))
                elif o.value:
                    s.corroborated = now

    def _check_flapping(self, s: _Sensor, now: float, out: list[Output]) -> None:
        t = self.timings
        while s.changes and s.changes[0] + t.flap_window_s <= now + _EPS:
            s.changes.popleft()
        if "flapping" not in s.faults and len(s.changes) > t.flap_max_changes:
            s.faults.add("flapping")
            s.pulse_until = -math.inf
            out.append(SensorFault(self.cell, s.name, "flapping",
                                   f"more than {t.flap_max_changes} changes in {t.flap_window_s:g} s"))
        elif "flapping" in s.faults and len(s.changes) <= t.flap_max_changes // 2:
            s.faults.discard("flapping")
            out.append(SensorRecovered(self.cell, s.name, "flapping"))

    def _step(self, now: float, out: list[Output]) -> list[Output]:
        t = self.timings
        self._refresh(now)
        self._last_step = now
        for s in self._sensors.values():
            if "flapping" in s.faults:
                self._check_flapping(s, now, out)
            if (s.kind is not SensorKind.DOOR and s.value and s.available
                    and "stuck" not in s.faults and s.corroborated + t.stuck_after_s <= now + _EPS):
                s.faults.add("stuck")
                out.append(SensorFault(self.cell, s.name, "stuck",
                                       f"presence for {t.stuck_after_s:g} s with nothing to confirm it"))
        evidence = self._evidence_now(now)
        if evidence != self._evidence:
            self._evidence = evidence
            self._evidence_since = now
        old = self.state
        if old is CellState.VACANT:
            if evidence and self.session_claim:
                self._enter(CellState.OCCUPIED, now, "session", out)
            elif evidence and self._evidence_since + t.min_presence_s <= now + _EPS:
                self._enter(CellState.OCCUPIED, now, "presence", out)
        elif old is CellState.OCCUPIED:
            if not evidence:
                self._enter(CellState.LEAVING, now, "absence", out)
        elif evidence:
            self._enter(CellState.OCCUPIED, now, "presence_returned", out)
        elif self._state_since + self._hold_s() <= now + _EPS:
            self._enter(CellState.VACANT, now, "hold_expired", out)
        return out

    def _enter(self, new: CellState, now: float, reason: str, out: list[Output]) -> None:
        out.append(Transition(self.cell, self.state, new, reason))
        self.state = new
        self._state_since = now
