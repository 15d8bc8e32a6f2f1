"""Kiosk telemetry: small collectors over /proc and /sys, and the contract's telemetry body.

Each collector reads one source through a path (or a callable) it is handed, so tests point
it at files they wrote; none of them raises for a missing source, they return None and the
key is left out. Quantities are integers in the unit their key names (the contract allows no
floats): ``temp_mC`` milli-degrees Celsius, ``load1_x100`` the 1-minute load average times
100, ``*_kib`` KiB, ``*_s`` seconds.

Wiring (the agent): build one :class:`TelemetryBuilder` with the agent version, the config
digest, ``outbox=lambda: (store.depth(), store.oldest_age_s(now_ms))`` and one health
callable per peripheral, keyed by the same subject its DeviceFault events use
(``"ticket-printer"``, ``"idcard-reader"``, ...). A :class:`TelemetrySchedule` gives the main
loop its next deadline; when ``due()``, the loop calls ``build()`` and publishes the body on
the kiosk's telemetry topic (QoS 0), then feeds ``builder.last_health`` to a
:class:`HealthChanges`, which turns a fault or warning that appeared or cleared into events.
The same HealthChanges is fed whenever a peripheral reports its status between two
telemetry messages (the printer after each ticket), so a fault is an event the moment it is
seen, not at the next telemetry.

Peripheral health objects follow one convention (the ops side relies on it): ``ok`` (bool),
``fault`` (a short word, or null: what stops the device working), ``warning`` (a short
word, or null: needs staff soon, still works), then any device-specific integers, booleans
or short strings (``paper``: ``"ok" | "near_end" | "out" | "unknown"``; ``fps_x100``; ...).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from edge.clock import SYSTEM_CLOCK, Clock
from hallkiosk.errors import ContractError, HallkioskError
from mqtt_topics.schemas import validate_body

log = logging.getLogger("hallkiosk.telemetry")

#: Interfaces reported at most (the contract allows 32 members in a nested object).
MAX_INTERFACES = 16
#: Peripherals reported at most: the body holds at most 64 members, the system keys ~20.
MAX_PERIPHERALS = 32
#: How long ``vcgencmd`` may take before its answer is abandoned (seconds).
VCGENCMD_TIMEOUT_S = 2.0

# get_throttled bit meanings (Raspberry Pi firmware, vcgencmd documentation): bits 0-3 are
# the condition now, bits 16-19 the same condition "has occurred since boot".
THROTTLE_BITS = (
    (0, "under_voltage"),
    (1, "freq_capped"),
    (2, "throttled"),
    (3, "soft_temp_limit"),
    (16, "under_voltage_occurred"),
    (17, "freq_capped_occurred"),
    (18, "throttled_occurred"),
    (19, "soft_temp_limit_occurred"),
)
_THROTTLED_RE = re.compile(r"\s*(?:throttled=)?(?:0x)?([0-9A-Fa-f]{1,8})\s*")
_NOT_KEY_CHAR = re.compile(r"[^A-Za-z0-9_]")

# System keys the builder writes; a peripheral may not reuse one as its key.
SYSTEM_KEYS = frozenset({
    "uptime_s", "agent_uptime_s", "temp_mC", "load1_x100", "load5_x100", "load15_x100",
    "mem_total_kib", "mem_avail_kib", "disk_total_kib", "disk_avail_kib", "throttle", "net",
    "net_up", "agent_version", "config_hash", "outbox_depth", "outbox_oldest_s",
})


class TelemetryError(HallkioskError, ValueError):
    """A telemetry builder was wired wrongly (a bad peripheral name, too many of them)."""


@dataclass(frozen=True, slots=True)
class SystemPaths:
    """Where each system figure is read. Defaults are the Linux / Raspberry Pi OS paths.

    ``thermal`` is what gpiozero's CPUTemperature reads too (milli-degrees as text);
    ``throttled`` is the firmware's sysfs copy of ``vcgencmd get_throttled`` on recent Pi
    kernels (tried first, since it costs no process); ``disk`` is the filesystem whose free
    space matters (the state partition).
    """

    thermal: Path = Path("/sys/class/thermal/thermal_zone0/temp")
    loadavg: Path = Path("/proc/loadavg")
    meminfo: Path = Path("/proc/meminfo")
    uptime: Path = Path("/proc/uptime")
    net: Path = Path("/sys/class/net")
    throttled: Path = Path("/sys/devices/platform/soc/soc:firmware/get_throttled")
    disk: Path = Path("/")


# -- collectors: text in, integers out --------------------------------------------------
def _read_text(path: Path) -> str | None:
    try:
        return Path(path).read_text(encoding="ascii", errors="replace")
    except OSError:
        return None


_DECIMAL_RE = re.compile(r"([0-9]+)(?:\.([0-9]+))?")


def _fixed(text: str, places: int) -> int:
    """An unsigned decimal as an int of 10**-places units, exactly (never a float), rounded
    half to even: '0.52', 2 -> 52. ValueError for anything but digits[.digits] (the kernel
    writes nothing else; decimal.Decimal would also take 'nan' and '1e9')."""
    match = _DECIMAL_RE.fullmatch(text)
    if match is None:
        raise ValueError(f"not a decimal number: {text[:20]!r}")
    whole, frac = match.group(1), match.group(2) or ""
    value = int(whole + frac[:places].ljust(places, "0"))
    rest = frac[places:].rstrip("0")
    if rest and (rest[0] > "5" or (rest[0] == "5" and (len(rest) > 1 or value % 2 == 1))):
        value += 1
    return value


def _x100(text: str) -> int:
    """'0.52' -> 52, exactly."""
    return _fixed(text, 2)


def parse_temp_mC(text: str) -> int | None:
    """A thermal zone's ``temp`` file: an integer of milli-degrees Celsius ('48312\\n')."""
    try:
        return int(text.strip())
    except ValueError:
        return None


def read_temp_mC(path: Path) -> int | None:
    text = _read_text(path)
    return None if text is None else parse_temp_mC(text)


def parse_loadavg(text: str) -> tuple[int, int, int] | None:
    """/proc/loadavg ('0.26 0.22 0.19 1/161 19039') -> (26, 22, 19)."""
    fields = text.split()
    try:
        return _x100(fields[0]), _x100(fields[1]), _x100(fields[2])
    except (IndexError, ValueError):
        return None


def read_loadavg(path: Path) -> tuple[int, int, int] | None:
    text = _read_text(path)
    return None if text is None else parse_loadavg(text)


def parse_meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo -> ``mem_total_kib`` and ``mem_avail_kib`` (MemAvailable, Linux >= 3.14)."""
    wanted = {"MemTotal": "mem_total_kib", "MemAvailable": "mem_avail_kib"}
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        key = wanted.get(name.strip())
        if key is None:
            continue
        parts = rest.split()
        if parts and parts[0].isdigit() and (len(parts) == 1 or parts[1] == "kB"):
            out[key] = int(parts[0])
    return out


def read_meminfo(path: Path) -> dict[str, int]:
    text = _read_text(path)
    return {} if text is None else parse_meminfo(text)


def parse_uptime_s(text: str) -> int | None:
    """/proc/uptime ('1532.70 2718.21') -> 1532 whole seconds since boot."""
    try:
        return _fixed(text.split()[0].partition(".")[0], 0)     # whole seconds, truncated
    except (IndexError, ValueError):
        return None


def read_uptime_s(path: Path) -> int | None:
    text = _read_text(path)
    return None if text is None else parse_uptime_s(text)


def disk_kib(path: Path, statvfs: Callable[[str], Any] = os.statvfs) -> tuple[int, int] | None:
    """(total, available to unprivileged users) KiB of the filesystem holding ``path``."""
    try:
        st = statvfs(str(path))
    except OSError:
        return None
    return st.f_blocks * st.f_frsize // 1024, st.f_bavail * st.f_frsize // 1024


def parse_throttled(text: str) -> dict[str, int | bool] | None:
    """``vcgencmd get_throttled`` output ('throttled=0x50005') or the sysfs hex ('50005').

    Returns one boolean per known bit (see THROTTLE_BITS) and ``raw``, the whole value, so
    bits the firmware adds later are not lost. None if the text is not such a value.
    """
    match = _THROTTLED_RE.fullmatch(text)
    if match is None:
        return None
    raw = int(match.group(1), 16)
    flags: dict[str, int | bool] = {name: bool(raw >> bit & 1) for bit, name in THROTTLE_BITS}
    flags["raw"] = raw
    return flags


def read_throttled(path: Path | None, *, vcgencmd: str | None,
                   run: Callable[..., Any] = subprocess.run,
                   timeout_s: float = VCGENCMD_TIMEOUT_S) -> dict[str, int | bool] | None:
    """The Pi's throttling flags, from sysfs when the kernel has it, else from ``vcgencmd``.

    None when neither exists (not a Pi) or the answer is unusable. ``vcgencmd`` is a path
    (``vcgencmd`` on PATH) or None; it runs with a timeout, never a shell.
    """
    if path is not None:
        text = _read_text(path)
        if text is not None:
            return parse_throttled(text)
    if vcgencmd is None:
        return None
    try:
        done = run([vcgencmd, "get_throttled"], capture_output=True, text=True,
                   timeout=timeout_s, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return parse_throttled(done.stdout)


def telemetry_key(name: str) -> str:
    """A name (interface, peripheral subject) as a telemetry key: [A-Za-z0-9_]{1,64}."""
    key = _NOT_KEY_CHAR.sub("_", name)[:64]
    return key or "_"


def read_links(root: Path) -> dict[str, str]:
    """Network interfaces and their link state: ``{"eth0": "up", "wlan0": "no_carrier"}``.

    Reads ``/sys/class/net/*/operstate`` and ``carrier``. Loopback is skipped; when some
    interfaces are physical (they have a ``device`` link), only those are reported, so a
    host full of veth and bridge interfaces stays readable. State words: ``up``,
    ``no_carrier`` (administratively up, cable out), ``down``, or the kernel's operstate
    (``dormant``, ``unknown``...).
    """
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return {}
    names = [n for n in names if n != "lo"]
    physical = [n for n in names if (Path(root) / n / "device").exists()]
    out: dict[str, str] = {}
    for name in (physical or names)[:MAX_INTERFACES]:
        base = Path(root) / name
        oper = (_read_text(base / "operstate") or "unknown").strip() or "unknown"
        # Reading carrier of an interface that is administratively down fails with EINVAL.
        carrier = (_read_text(base / "carrier") or "").strip()
        if oper == "up" or (oper == "unknown" and carrier == "1"):
            state = "up"
        elif carrier == "0":
            state = "no_carrier"
        else:
            state = telemetry_key(oper)[:16]
        out[telemetry_key(name)] = state
    return out


# -- peripheral health helpers ------------------------------------------------------------
def printer_health(status: Any | None, *, error: str | None = None) -> dict[str, Any]:
    """Health object of an ESC/POS printer from its last ``PrinterStatus`` (or None).

    A printer that never answered is NOT healthy (silence is a fault, PROTOCOLS.md).
    ``paper`` is ``unknown`` unless the paper-sensor byte (DLE EOT 4) was answered.
    """
    if status is None:
        return {"ok": False, "online": False, "paper": "unknown", "cover_open": False,
                "fault": telemetry_key(error or "no_answer")[:32], "warning": None}
    if status.paper_out or status.stopped_by_paper_end:
        paper = "out"
    elif status.paper_near_end:
        paper = "near_end"
    elif 4 in status.answered:
        paper = "ok"
    else:
        paper = "unknown"
    faults = tuple(status.faults)
    warnings = tuple(status.warnings)
    return {"ok": bool(status.ok_to_print), "online": bool(status.online), "paper": paper,
            "cover_open": bool(status.cover_open), "fault": faults[0] if faults else None,
            "warning": warnings[0] if warnings else None}


def link_health(healthy: bool, fault: str | None = None, **extra: int | bool | str | None
                ) -> dict[str, Any]:
    """Health object of a device behind a SerialWorker (reader, scanner, sensor node)."""
    return {"ok": bool(healthy), "fault": None if healthy else (fault or "gone"),
            "warning": None, **extra}


class HealthEvent(NamedTuple):
    """An event to publish: ``publisher.event(name, severity, subject, **detail)``."""

    name: str
    severity: str
    subject: str
    detail: dict[str, str]


class HealthChanges:
    """Turns successive health objects of each peripheral into fault/recovery events.

    ``update(subject, health)`` compares ``health["fault"]`` and ``health["warning"]`` with
    the previous report of that subject and returns the events to publish:

    - ``device_fault`` (severity fault, detail ``fault``) when a fault appears or changes;
    - ``device_recovered`` (info, detail ``fault`` = the one that cleared) when it clears;
    - ``device_warning`` (warning, detail ``warning``) when a warning appears or changes;
    - ``device_warning_cleared`` (info, detail ``warning``) when it clears.

    These are the names the agent's serial workers already use for faults and recoveries,
    so the ops side treats both sources alike. The first report of a healthy device says
    nothing; the first report of a faulty one is a fault.
    """

    def __init__(self) -> None:
        self._last: dict[str, tuple[str | None, str | None]] = {}

    def update(self, subject: str, health: Mapping[str, Any]) -> list[HealthEvent]:
        fault = _word(health.get("fault"))
        warning = _word(health.get("warning"))
        old_fault, old_warning = self._last.get(subject, (None, None))
        self._last[subject] = (fault, warning)
        events: list[HealthEvent] = []
        if fault != old_fault:
            if old_fault is not None and fault is None:
                events.append(HealthEvent("device_recovered", "info", subject,
                                          {"fault": old_fault}))
            elif fault is not None:
                events.append(HealthEvent("device_fault", "fault", subject, {"fault": fault}))
        if warning != old_warning:
            if old_warning is not None and warning is None:
                events.append(HealthEvent("device_warning_cleared", "info", subject,
                                          {"warning": old_warning}))
            elif warning is not None:
                events.append(HealthEvent("device_warning", "warning", subject,
                                          {"warning": warning}))
        return events

    def update_all(self, health: Mapping[str, Mapping[str, Any]]) -> list[HealthEvent]:
        events: list[HealthEvent] = []
        for subject, item in health.items():
            events.extend(self.update(subject, item))
        return events


def _word(value: Any) -> str | None:
    return value[:64] if isinstance(value, str) and value else None


# -- the body ---------------------------------------------------------------------------
class TelemetrySchedule:
    """When the next telemetry is due, on the monotonic clock, without drift.

    ``next_deadline()`` is for the main loop's queue timeout; ``due()`` says whether to
    publish now and, if so, arms the next deadline one interval later (or one interval
    from now after a stall longer than an interval, so a stalled loop does not burst).
    """

    def __init__(self, interval_s: float, *, clock: Clock = SYSTEM_CLOCK,
                 first_after_s: float = 0.0) -> None:
        if not interval_s > 0:
            raise TelemetryError(f"telemetry interval must be > 0 s, not {interval_s!r}")
        self.interval_s = float(interval_s)
        self.clock = clock
        self._deadline = clock.monotonic() + first_after_s

    def next_deadline(self) -> float:
        return self._deadline

    def due_now(self) -> None:
        """Make the next telemetry due at once (on every connection: ops get the kiosk's
        health with its birth, not up to an interval later)."""
        self._deadline = self.clock.monotonic()

    def due(self) -> bool:
        now = self.clock.monotonic()
        if now < self._deadline:
            return False
        self._deadline += self.interval_s
        if self._deadline <= now:
            self._deadline = now + self.interval_s
        return True


HealthProbe = Callable[[], Mapping[str, Any]]


class TelemetryBuilder:
    """Assembles the contract's telemetry body from the collectors and the agent's figures.

    ``outbox()`` returns (pending tickets, age in seconds of the oldest or None).
    ``peripherals`` maps an event subject (``"ticket-printer"``) to a callable returning its
    health object; the body carries it under ``telemetry_key(subject)`` (``ticket_printer``).
    A probe that raises or returns something the contract refuses is reported as
    ``{"ok": false, "fault": "health_check_failed" | "bad_health_report"}`` and logged,
    never allowed to stop the telemetry. ``throttle_every_s`` bounds how often ``vcgencmd``
    runs (a process start on the main loop).

    ``build()`` returns a body that ``validate_body("telemetry", ...)`` accepts (checked).
    """

    def __init__(self, *, agent_version: str, config_hash: str,
                 outbox: Callable[[], tuple[int, float | None]] | None = None,
                 peripherals: Mapping[str, HealthProbe] | None = None,
                 paths: SystemPaths = SystemPaths(), clock: Clock = SYSTEM_CLOCK,
                 vcgencmd: str | None = None, find_vcgencmd: bool = True,
                 run: Callable[..., Any] = subprocess.run,
                 statvfs: Callable[[str], Any] = os.statvfs,
                 throttle_every_s: float = 60.0) -> None:
        self.agent_version = agent_version
        self.config_hash = config_hash
        self.outbox = outbox
        self.paths = paths
        self.clock = clock
        self._run = run
        self._statvfs = statvfs
        if vcgencmd is None and find_vcgencmd:
            vcgencmd = shutil.which("vcgencmd")
        self._vcgencmd = vcgencmd
        self._throttle_every_s = throttle_every_s
        self._throttle: dict[str, int | bool] | None = None
        self._throttle_at: float | None = None
        self._started = clock.monotonic()
        self._probes: dict[str, tuple[str, HealthProbe]] = {}
        for subject, probe in (peripherals or {}).items():
            self.add_peripheral(subject, probe)
        self.last_health: dict[str, dict[str, Any]] = {}

    def add_peripheral(self, subject: str, probe: HealthProbe) -> None:
        """Report ``probe()`` under ``telemetry_key(subject)`` from the next body on."""
        if not isinstance(subject, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", subject):
            raise TelemetryError(f"peripheral subject {subject!r}: expected 1-64 of "
                                 "A-Z a-z 0-9 _ . -")
        key = telemetry_key(subject)
        if key in SYSTEM_KEYS:
            raise TelemetryError(f"peripheral subject {subject!r} collides with the system "
                                 f"telemetry key {key!r}")
        taken = {k for k, _ in self._probes.values()}
        if key in taken and subject not in self._probes:
            raise TelemetryError(f"peripheral subject {subject!r} maps to key {key!r}, "
                                 "already used by another peripheral")
        if subject not in self._probes and len(self._probes) >= MAX_PERIPHERALS:
            raise TelemetryError(f"at most {MAX_PERIPHERALS} peripherals in telemetry")
        if not callable(probe):
            raise TelemetryError(f"peripheral {subject!r}: health probe is not callable")
        self._probes[subject] = (key, probe)

    # -- pieces ---------------------------------------------------------------------------
    def _throttle_flags(self) -> dict[str, int | bool] | None:
        now = self.clock.monotonic()
        if self._throttle_at is None or now - self._throttle_at >= self._throttle_every_s:
            self._throttle = read_throttled(self.paths.throttled, vcgencmd=self._vcgencmd,
                                            run=self._run)
            self._throttle_at = now
        return self._throttle

    def _health(self, subject: str, probe: HealthProbe) -> dict[str, Any]:
        try:
            health = dict(probe())
        except Exception:  # a probe is device code: its failure is a finding, not a crash
            log.warning("health probe of %s failed", subject, exc_info=True)
            return {"ok": False, "fault": "health_check_failed", "warning": None}
        try:
            # The contract's own validator decides what a nested telemetry object may hold.
            validate_body("telemetry", {"uptime_s": 0, "x": health})
        except ContractError as exc:
            log.warning("health report of %s refused by the contract: %s", subject, exc)
            return {"ok": False, "fault": "bad_health_report", "warning": None}
        return health

    def system(self) -> dict[str, Any]:
        """The system figures alone (no agent or peripheral keys); missing ones left out."""
        p = self.paths
        agent_uptime = max(0, int(self.clock.monotonic() - self._started))
        uptime = read_uptime_s(p.uptime)
        body: dict[str, Any] = {"uptime_s": uptime if uptime is not None else agent_uptime,
                                "agent_uptime_s": agent_uptime}
        temp = read_temp_mC(p.thermal)
        if temp is not None:
            body["temp_mC"] = temp
        load = read_loadavg(p.loadavg)
        if load is not None:
            body["load1_x100"], body["load5_x100"], body["load15_x100"] = load
        body.update(read_meminfo(p.meminfo))
        disk = disk_kib(p.disk, self._statvfs)
        if disk is not None:
            body["disk_total_kib"], body["disk_avail_kib"] = disk
        throttle = self._throttle_flags()
        if throttle is not None:
            body["throttle"] = dict(throttle)
        links = read_links(p.net)
        body["net"] = links
        body["net_up"] = any(state == "up" for state in links.values())
        return body

    def build(self) -> dict[str, Any]:
        """The whole telemetry body, validated against the contract."""
        body = self.system()
        body["agent_version"] = self.agent_version
        body["config_hash"] = self.config_hash
        if self.outbox is not None:
            try:
                depth, oldest = self.outbox()
                body["outbox_depth"] = int(depth)
                body["outbox_oldest_s"] = None if oldest is None else int(oldest)
            except Exception:  # the store's failure shows elsewhere; telemetry still goes out
                log.warning("outbox figures unavailable", exc_info=True)
        health: dict[str, dict[str, Any]] = {}
        for subject, (key, probe) in self._probes.items():
            health[subject] = self._health(subject, probe)
            body[key] = health[subject]
        self.last_health = health
        return validate_body("telemetry", body)
