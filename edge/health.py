"""The kiosk's health, part by part, and whether systemd's watchdog should be fed. Pure code.

Wiring: the agent's main loop owns one ``Health`` (not thread-safe on purpose: one owner of
state). It hands it every DeviceFault / DeviceRecovered / LinkUp / LinkDown / LinkMessage /
PublishDone event (``apply``), the printer's polled status (``report(PRINTER, *printer_level(
...))``), the clock's trust, and calls ``loop_tick()`` once per loop turn. Each turn it asks
``watchdog_ok()``; only when that is true does it send WATCHDOG=1 (edge.sdnotify).

What makes us withhold the watchdog, so that systemd restarts the agent, and why: only
faults a restart can cure.
- The main loop has not turned for ``loop_stall_s`` (a handler stuck in I/O without a
  timeout, a deadlock). The ping is sent from the loop, so a dead loop stops it anyway; the
  check also covers a loop that turns but calls us from somewhere else.
- A thread that must live as long as the process has died (``watch_thread``): the link
  thread, a device worker. A dead worker never reports its device again.
- The broker link claims to be connected but a QoS 1 publish (the probe) has had no answer
  for ``link_probe_timeout_s``, with no other traffic since. paho's network thread can die
  or wedge while ``is_connected()`` still says True (PROTOCOLS.md); paho's own keepalive
  would have reported a broker that merely went away (LinkDown), so a connected link that is
  silent far beyond the keepalive is ours to fix, by restarting.

What never restarts us: a missing or faulty peripheral (printer, reader, camera, scanner),
an unreachable broker, an untrusted clock. Those are degraded modes (edge.degraded): the
kiosk keeps serving what it can, says so in its retained state, and recovers by itself when
the part comes back. Restarting would only add a restart loop to the outage.

Every time here is ``clock.monotonic()``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from edge.clock import SYSTEM_CLOCK, Clock
from edge.events import DeviceFault, DeviceRecovered
from edge.mqtt import LinkDown, LinkMessage, LinkUp, PublishDone

# Component names are the device names workers put in DeviceFault / DeviceRecovered.
READER = "idcard-reader"
PRINTER = "ticket-printer"
QR_SCANNER = "qr-scanner"    # edge.qr.scanner.QrScannerWorker.device
CAMERA = "qr-camera"      # edge.qr.worker.QrCameraWorker.device
BROKER = "broker"
STORE = "store"
CLOCK = "clock"
MAIN_LOOP = "main-loop"


class Level(str, enum.Enum):
    OK = "ok"
    DEGRADED = "degraded"       # works, needs attention soon (paper near end, clock unsynced)
    DOWN = "down"               # does not work


@dataclass(frozen=True, slots=True)
class ComponentHealth:
    """One part's last report. ``reason`` is a short machine word or phrase (``paper_out``,
    ``gone``), never personal data; ``since_mono`` is when this level began."""

    name: str
    level: Level
    reason: str | None
    since_mono: float


class Health:
    """Component levels, main-loop liveness, watched threads and the broker-link probe.

    ``components`` are the parts this kiosk has; each starts OK ("assumed until a fault is
    reported": a serial worker reports its first failed open within one attempt). A report for
    a name not listed adds it. ``loop_stall_s``: longest gap between ``loop_tick()`` calls.
    ``link_probe_interval_s``: with no link traffic for this long, ``probe_due()`` asks for a
    probe publish. ``link_probe_timeout_s``: a probe unanswered this long (with no other
    traffic since it was sent) is a wedged link; make it well above 1.5 x the MQTT keepalive.
    """

    def __init__(self, components: Iterable[str] = (READER, PRINTER, BROKER, STORE, CLOCK), *,
                 clock: Clock = SYSTEM_CLOCK, loop_stall_s: float = 10.0,
                 link_probe_interval_s: float = 60.0, link_probe_timeout_s: float = 90.0) -> None:
        for name, value in (("loop_stall_s", loop_stall_s),
                            ("link_probe_interval_s", link_probe_interval_s),
                            ("link_probe_timeout_s", link_probe_timeout_s)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, not {value!r}")
        self.clock = clock
        self.loop_stall_s = loop_stall_s
        self.link_probe_interval_s = link_probe_interval_s
        self.link_probe_timeout_s = link_probe_timeout_s
        now = clock.monotonic()
        self._parts: dict[str, ComponentHealth] = {}
        for name in components:
            if name == MAIN_LOOP:
                raise ValueError(f"{MAIN_LOOP!r} is tracked by loop_tick(), not reported")
            self._parts[name] = ComponentHealth(name, Level.OK, None, now)
        self._last_tick: float | None = None
        self._threads: dict[str, Callable[[], bool]] = {}
        self._connected = False
        self._link_activity: float | None = None
        self._probes: dict[int, float] = {}         # mid -> monotonic time sent

    # -- reports -------------------------------------------------------------------------
    def report(self, name: str, level: Level, reason: str | None = None) -> bool:
        """Record a part's level; True when its level or reason changed."""
        if name == MAIN_LOOP:
            raise ValueError(f"{MAIN_LOOP!r} is tracked by loop_tick(), not reported")
        level = Level(level)
        reason = None if level is Level.OK else reason
        current = self._parts.get(name)
        if current is not None and (current.level, current.reason) == (level, reason):
            return False
        self._parts[name] = ComponentHealth(name, level, reason, self.clock.monotonic())
        return True

    def ok(self, name: str) -> bool:
        return self.report(name, Level.OK)

    def degraded(self, name: str, reason: str) -> bool:
        return self.report(name, Level.DEGRADED, reason)

    def down(self, name: str, reason: str) -> bool:
        return self.report(name, Level.DOWN, reason)

    def apply(self, event: object) -> bool:
        """Take what an event says about health; True when a part's level or reason changed
        (the agent then re-decides its service mode). Other events are ignored."""
        if isinstance(event, DeviceFault):
            return self.down(event.device, event.fault)
        if isinstance(event, DeviceRecovered):
            return self.ok(event.device)
        if isinstance(event, LinkUp):
            self._connected = True
            self._probes.clear()
            self._link_activity = self.clock.monotonic()
            return self.ok(BROKER)
        if isinstance(event, LinkDown):
            self._connected = False
            self._probes.clear()
            return self.down(BROKER, "unreachable")
        if isinstance(event, (PublishDone, LinkMessage)):
            # Any answer arriving now proves paho's network thread and the broker turned
            # after every pending probe was sent: that is all a probe asks.
            self._link_activity = self.clock.monotonic()
            self._probes.clear()
        return False

    def loop_tick(self) -> None:
        """The main loop turned (call once per iteration)."""
        self._last_tick = self.clock.monotonic()

    def watch_thread(self, name: str, is_alive: Callable[[], bool]) -> None:
        """A thread that must live as long as the agent (e.g. ``worker.is_alive``)."""
        self._threads[name] = is_alive

    def unwatch_thread(self, name: str) -> None:
        """Before stopping that thread on purpose (shutdown, reload)."""
        self._threads.pop(name, None)

    # -- the broker-link probe -------------------------------------------------------------
    @property
    def link_connected(self) -> bool:
        """As the last LinkUp / LinkDown said."""
        return self._connected

    @property
    def probes_pending(self) -> int:
        return len(self._probes)

    def probe_due(self) -> bool:
        """True when connected, no probe is pending and the link was quiet for the interval."""
        if not self._connected or self._probes:
            return False
        last = self._link_activity
        return last is None or self.clock.monotonic() - last >= self.link_probe_interval_s

    def next_probe_deadline(self) -> float | None:
        """Monotonic time at which ``probe_due()`` or ``link_stalled()`` may change."""
        if not self._connected:
            return None
        if self._probes:
            return min(self._probes.values()) + self.link_probe_timeout_s
        last = self._link_activity
        return self.clock.monotonic() if last is None else last + self.link_probe_interval_s

    def probe_sent(self, mid: int) -> None:
        """The agent published a QoS 1 probe (its retained state, again) with this mid."""
        if self._connected:
            self._probes.setdefault(mid, self.clock.monotonic())

    def link_stalled(self) -> bool:
        if not self._connected or not self._probes:
            return False
        return self.clock.monotonic() - min(self._probes.values()) >= self.link_probe_timeout_s

    # -- questions ---------------------------------------------------------------------------
    def get(self, name: str) -> ComponentHealth | None:
        if name == MAIN_LOOP:
            return self._loop_health()
        return self._parts.get(name)

    def snapshot(self) -> Mapping[str, ComponentHealth]:
        """Every part, plus the main loop, by name (a copy)."""
        parts = dict(self._parts)
        parts[MAIN_LOOP] = self._loop_health()
        return parts

    def watchdog_problems(self) -> tuple[str, ...]:
        """Why the watchdog must not be fed now (empty: feed it)."""
        problems = []
        if self._last_tick is None:
            problems.append("main loop not started")
        elif self.clock.monotonic() - self._last_tick > self.loop_stall_s:
            problems.append(f"main loop stalled for more than {self.loop_stall_s:g} s")
        for name, is_alive in self._threads.items():
            try:
                alive = bool(is_alive())
            except Exception:
                alive = False
            if not alive:
                problems.append(f"thread {name} died")
        if self.link_stalled():
            problems.append(f"broker link connected but silent for more than "
                            f"{self.link_probe_timeout_s:g} s")
        return tuple(problems)

    def watchdog_ok(self) -> bool:
        """True only while the loop turns, watched threads live and the link is not wedged.
        Peripherals and the broker being down never make this false (see module doc)."""
        return not self.watchdog_problems()

    def summary(self) -> str:
        """One line for systemd's STATUS: ``ok`` or the parts that are not, worst first."""
        bad = [c for c in self._parts.values() if c.level is not Level.OK]
        if not bad:
            return "all parts ok"
        bad.sort(key=lambda c: (c.level is not Level.DOWN, c.name))
        return "; ".join(f"{c.name} {c.level.value}" + (f" ({c.reason})" if c.reason else "")
                         for c in bad)

    def _loop_health(self) -> ComponentHealth:
        if self._last_tick is None:
            return ComponentHealth(MAIN_LOOP, Level.DOWN, "not started", self.clock.monotonic())
        if self.clock.monotonic() - self._last_tick > self.loop_stall_s:
            return ComponentHealth(MAIN_LOOP, Level.DOWN, "stalled", self._last_tick)
        return ComponentHealth(MAIN_LOOP, Level.OK, None, self._last_tick)


def printer_level(status=None, error: BaseException | None = None) -> tuple[Level, str | None]:
    """A polled printer status (edge.printer.escpos.PrinterStatus) or the error the poll
    raised, as a level and reason: faults that stop printing (offline, cover open, paper out,
    errors) are DOWN, paper near end is DEGRADED, a printer that did not answer is DOWN."""
    if error is not None:
        from hallkiosk.errors import DeviceGone, DeviceTimeout

        if isinstance(error, DeviceTimeout):
            return Level.DOWN, "timeout"
        if isinstance(error, DeviceGone):
            return Level.DOWN, "gone"
        return Level.DOWN, "failed"
    if status is None:
        return Level.DOWN, "no status"
    if not status.ok_to_print:
        return Level.DOWN, ",".join(status.faults) or "status unknown"
    if status.warnings:
        return Level.DEGRADED, ",".join(status.warnings)
    return Level.OK, None


class PollSchedule:
    """When to poll a part that never reports by itself (the printer): every
    ``ok_interval_s`` while it is fine, every ``down_interval_s`` while it is not, so a
    refilled printer is noticed quickly and an idle healthy one costs almost nothing."""

    def __init__(self, *, ok_interval_s: float = 30.0, down_interval_s: float = 2.0,
                 clock: Clock = SYSTEM_CLOCK) -> None:
        if not (ok_interval_s > 0 and down_interval_s > 0):
            raise ValueError("poll intervals must be > 0")
        self.ok_interval_s = ok_interval_s
        self.down_interval_s = down_interval_s
        self.clock = clock
        self._next: float = clock.monotonic()       # poll at once after start

    def due(self) -> bool:
        return self.clock.monotonic() >= self._next

    def next_deadline(self) -> float:
        return self._next

    def polled(self, level: Level) -> None:
        """Schedule the next poll after one that found ``level``."""
        interval = self.ok_interval_s if level is Level.OK else self.down_interval_s
        self._next = self.clock.monotonic() + interval

    def poll_soon(self) -> None:
        """Poll at the next turn (after a print failed, or on a DeviceFault)."""
        self._next = self.clock.monotonic()
