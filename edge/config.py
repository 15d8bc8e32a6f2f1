"""Agent configuration: one TOML file, read once, validated into frozen dataclasses.

``load_config(path)`` reads the file with tomllib; ``parse_config(data, ...)`` checks every
section, then a final pass checks what spans sections (service buttons against the board
profile, two devices on one port), ESPHome style. Every problem is collected first and
raised together as one ``ConfigError`` whose ``problems`` read ``file: key.path: message``.
No raw dict travels past this module.

Units live in key names (``*_s`` are seconds). Relative paths in the file (secret and key
files, state_dir, plain device paths) are resolved against the config file's directory.
The hall secret and device key are only checked here (exist, regular file, mode 0600-ish,
size); the agent reads them itself. The file layout is documented in
``docs/agent.example.toml``.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import difflib
import hashlib
import json
import os
import re
import stat
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from boards import (BOARD_NAMES, HARDWARE_PIN_FACTORIES, BoardProfile, load_board,
                    unknown_board_message)
from edge.commands import DEFAULT_WINDOW_S, MAX_WINDOW_S, MIN_WINDOW_S
from hallkiosk.errors import ConfigError

__all__ = [
    "DEFAULT_CONFIG_PATH", "DEFAULT_STATE_DIR", "PIN_FACTORIES", "TRUSTED_ROLES",
    "AgentConfig", "BrokerConfig", "GpioConfig", "HallConfig", "KeysConfig", "KioskConfig",
    "PrinterConfig", "ReaderConfig", "ServiceConfig", "SessionConfig", "ClockConfig", "TrustedKey",
    "config_digest", "load_config", "parse_config",
]

DEFAULT_CONFIG_PATH = Path("/etc/hallkiosk/agent.toml")
DEFAULT_STATE_DIR = Path("/var/lib/hallkiosk")
#: ``default`` lets gpiozero pick (GPIOZERO_PIN_FACTORY or its own probe order);
#: ``mock`` is gpiozero's MockFactory, used with the emulator.
PIN_FACTORIES = ("default", *HARDWARE_PIN_FACTORIES, "mock")
#: Roles a trusted hall service can hold (what its signature may authorise).
TRUSTED_ROLES = ("consumer", "ops")
MAX_SERVICES = 8
# Ids end up in MQTT topic levels, so no '/', '+', '#' or spaces (same rule as mqtt_topics).
_ID = re.compile(r"[A-Za-z0-9_-]{1,32}")
_ID_RULE = "1-32 characters of A-Z a-z 0-9 _ -"
# Printer code pages worth suggesting when an encoding name is misspelt.
_COMMON_ENCODINGS = ("cp437", "cp850", "cp852", "cp858", "cp866", "cp1252", "gb18030", "gbk",
                     "big5", "shift_jis", "ascii", "latin-1", "utf-8")
_SECRET_MIN_BYTES = 32
_ED25519_PUBLIC_BYTES = 32


# -- the result ------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class KioskConfig:
    """Who this kiosk is. ``number_prefix`` is the 2 digits printed in ticket numbers."""

    device_id: str
    hall: str
    number_prefix: str
    board: str
    state_dir: Path


@dataclass(frozen=True, slots=True)
class HallConfig:
    """The hall: its printed name and the file holding its citizen-hash HMAC secret."""

    name: str
    citizen_hash_secret_file: Path


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    """MQTT broker. ``client_id`` is already resolved (defaults to the device id)."""

    host: str
    port: int
    keepalive_s: int
    reconnect_min_s: float
    reconnect_max_s: float
    client_id: str


@dataclass(frozen=True, slots=True)
class TrustedKey:
    """A hall service whose Ed25519 signatures the kiosk accepts (raw 32-byte public key)."""

    owner: str
    role: str
    public_key: bytes


@dataclass(frozen=True, slots=True)
class KeysConfig:
    """The kiosk's own Ed25519 private key file (PEM PKCS8) and the keys it trusts."""

    device_key: Path
    trusted: tuple[TrustedKey, ...]


@dataclass(frozen=True, slots=True)
class ReaderConfig:
    """ID-card reader. ``port`` is a pyserial URL, resolved from the board if not set."""

    port: str
    poll_interval_s: float
    timeout_s: float


@dataclass(frozen=True, slots=True)
class PrinterConfig:
    """Ticket printer. ``encoding`` is the Python codec's canonical name (e.g. 'cp437')."""

    port: str
    timeout_s: float
    encoding: str


@dataclass(frozen=True, slots=True)
class GpioConfig:
    """Which gpiozero pin factory to build (one of PIN_FACTORIES)."""

    pin_factory: str


@dataclass(frozen=True, slots=True)
class ClockConfig:
    """Whether the wall clock may be trusted. ``kernel``: only once the kernel reports it
    synchronised (adjtimex; a Pi has no RTC). ``assume_synced``: always (the emulator on a
    developer machine, or a board with a battery-backed RTC)."""

    trust: str


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """mTLS to the hall broker (files from the provisioning bundle, docs/provisioning.md).
    ``trusted_certs`` holds the hall services' certificates (consumer, ops, booking) whose
    keys the kiosk accepts signatures from, checked against ``ca_file`` and ``crl_file``."""

    ca_file: Path
    cert_file: Path
    crl_file: Path | None
    trusted_certs: Path | None
    warn_days: float


@dataclass(frozen=True, slots=True)
class CameraConfig:
    """The QR camera (picamera2 on the Pi, imported only when enabled)."""

    enabled: bool
    camera_num: int
    fps: float
    repeat_window_s: float
    settle_s: float


@dataclass(frozen=True, slots=True)
class QrScannerConfig:
    """A GM65-class serial QR scanner: payloads framed by a terminator or an idle gap."""

    port: str | None                 # None: no scanner fitted
    baudrate: int
    terminator: str
    idle_gap_s: float
    max_len: int


@dataclass(frozen=True, slots=True)
class QrConfig:
    """Keys the kiosk accepts QR codes from (base64 raw Ed25519): the hall's booking service
    (appointments) and e-ID issuers (a citizen's own code); ``leeway_s`` for clock skew."""

    booking_keys: tuple[bytes, ...]
    eid_keys: tuple[bytes, ...]
    leeway_s: int


@dataclass(frozen=True, slots=True)
class CellConfig:
    """The privacy cell this kiosk stands in (docs: edge/cells). Sensors: PIR and door on
    the board's occupancy pins, an LD2410 radar and/or a Pico sensor node on serial."""

    id: str
    pir: bool
    door: bool
    radar_port: str | None
    node_port: str | None
    indicator_pin: int | None
    min_presence_s: float
    hold_s: float
    hold_motion_only_s: float


@dataclass(frozen=True, slots=True)
class TelemetryConfig:
    interval_s: float


@dataclass(frozen=True, slots=True)
class StaffCallConfig:
    repeat_after_s: float


@dataclass(frozen=True, slots=True)
class CommandsConfig:
    """Signed ops commands: how far ahead a command may expire (its replay window)."""

    window_s: float


@dataclass(frozen=True, slots=True)
class UnattendedConfig:
    """Unattended operation (docs/unattended.md): what citizens are told when this kiosk
    offers no ticket, the watchdog's health thresholds, the printer's poll intervals and the
    time SIGTERM may take."""

    direct_to: str
    loop_stall_s: float
    link_probe_interval_s: float
    link_probe_timeout_s: float
    printer_check_s: float
    printer_recheck_s: float
    stop_timeout_s: float


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """Citizen session timing: back to idle after ``choose_timeout_s`` without a choice."""

    choose_timeout_s: float


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    """One service offered: its ticket category, printed name and the button that picks it."""

    category: str
    name: str
    button: str


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """The whole validated config. ``digest`` is the sha256 hex of the bytes read."""

    source: Path
    digest: str
    kiosk: KioskConfig
    hall: HallConfig
    broker: BrokerConfig
    keys: KeysConfig
    reader: ReaderConfig
    printer: PrinterConfig
    gpio: GpioConfig
    session: SessionConfig
    clock: ClockConfig
    unattended: UnattendedConfig
    tls: TlsConfig | None
    commands: CommandsConfig
    camera: CameraConfig
    qr_scanner: QrScannerConfig
    qr: QrConfig
    cell: CellConfig | None
    staff_call: StaffCallConfig
    telemetry: TelemetryConfig
    services: tuple[ServiceConfig, ...]
    board: BoardProfile

    def service_by_button(self, button: str) -> ServiceConfig | None:
        """The service a board button selects, or None for a button with no service."""
        for service in self.services:
            if service.button == button:
                return service
        return None

    def service(self, category: str) -> ServiceConfig:
        """The service of a ticket category; KeyError if none is configured."""
        for service in self.services:
            if service.category == category:
                return service
        raise KeyError(f"no service with category {category!r}")


def config_digest(cfg: AgentConfig) -> str:
    """sha256 hex of the config bytes the agent runs with (for telemetry)."""
    return cfg.digest


# -- loading ---------------------------------------------------------------------------
def load_config(path: str | os.PathLike[str] = DEFAULT_CONFIG_PATH) -> AgentConfig:
    """Read, parse and validate the agent config file; ConfigError lists every problem."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, expected a config file") from None
    except PermissionError:
        raise ConfigError(f"{path}: cannot read config file: permission denied") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 (bad byte at offset {exc.start})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {_toml_error(exc)}") from None
    return parse_config(data, source=str(path), base_dir=path.absolute().parent, raw=raw)


def _toml_error(exc: tomllib.TOMLDecodeError) -> str:
    # Python 3.11's TOMLDecodeError has no lineno attribute; the position is in the text.
    text = str(exc)
    found = re.search(r"\s*\(at line (\d+), column (\d+)\)$", text)
    if found:
        reason = text[:found.start()]
        return f"line {found.group(1)}, column {found.group(2)}: invalid TOML: {reason}"
    return f"invalid TOML: {text}"


def parse_config(data: dict, *, source: str, base_dir: Path,
                 raw: bytes | None = None) -> AgentConfig:
    """Validate an already-parsed TOML document into an AgentConfig.

    ``source`` names the file in messages; ``base_dir`` anchors relative paths; ``raw``
    (the file bytes) gives the digest, else a canonical JSON dump of ``data`` does.
    """
    if raw is None:
        try:
            raw = json.dumps(data, sort_keys=True, default=str).encode()
        except TypeError:   # non-string keys (not possible from TOML): the validator says so
            raw = repr(data).encode()
    v = _Validator(source, Path(base_dir))
    if not isinstance(data, dict):
        v.problems.append(f"{source}: expected a TOML document (a table), found {_found(data)}")
        cfg = None
    else:
        cfg = v.run(data, hashlib.sha256(raw).hexdigest())
    if cfg is None:
        problems = v.problems or [f"{source}: invalid config"]
        raise ConfigError(_summary(source, problems), problems)
    return cfg


def _summary(source: str, problems: list[str]) -> str:
    if len(problems) == 1:
        return problems[0]
    return f"{source}: {len(problems)} problems:\n" + "\n".join(f"  {p}" for p in problems)


# -- validation helpers ----------------------------------------------------------------
_MISSING = object()


def _nearest(word: str, choices: Iterable[str]) -> str | None:
    choices = [str(c) for c in choices]
    for choice in choices:
        if choice.lower() == str(word).lower():
            return choice
    close = difflib.get_close_matches(str(word), choices, n=1, cutoff=0.6)
    return close[0] if close else None


def _found(value: Any) -> str:
    """What a wrong value was, for a message: its TOML type and a short rendering."""
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int):
        return f"an integer ({value})"
    if isinstance(value, float):
        return f"a float ({value})"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"a string ({shown!r})"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return f"a {type(value).__name__}"


class _Table:
    """One TOML table under validation: hands out typed values, records problems.

    Every accessor returns None when the value is missing-but-required or invalid, after
    recording why; the caller keeps going so all problems surface in one run.
    """

    def __init__(self, v: _Validator, path: str, data: Any, keys: tuple[str, ...]) -> None:
        self.v = v
        self.path = path
        self.data = data if isinstance(data, dict) else {}
        for key in self.data:
            if key not in keys:
                near = _nearest(key, keys)
                hint = f", did you mean '{near}'?" if near else f" (valid keys: {', '.join(keys)})"
                v.add(self.at(key), f"unknown key '{key}'{hint}")

    def at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def _get(self, key: str, default: Any) -> Any:
        value = self.data.get(key, _MISSING)
        if value is _MISSING and default is _MISSING:
            self.v.add(self.at(key), "required key missing")
        return value

    def string(self, key: str, default: Any = _MISSING, *, pattern: re.Pattern | None = None,
               rule: str = "", max_len: int = 64) -> str | None:
        value = self._get(key, default)
        if value is _MISSING:
            return None if default is _MISSING else default
        if not isinstance(value, str):
            self.v.add(self.at(key), f"expected a string, found {_found(value)}")
            return None
        if pattern is not None:
            if not pattern.fullmatch(value):
                self.v.add(self.at(key), f"{value!r} is not valid: {rule}")
                return None
        elif not value.strip() or len(value) > max_len or not value.isprintable():
            self.v.add(self.at(key), f"expected 1-{max_len} printable characters")
            return None
        return value

    def integer(self, key: str, default: Any, lo: int, hi: int) -> int | None:
        value = self._get(key, default)
        if value is _MISSING:
            return None if default is _MISSING else default
        if isinstance(value, bool) or not isinstance(value, int):
            self.v.add(self.at(key), f"expected an integer, found {_found(value)}")
            return None
        if not lo <= value <= hi:
            self.v.add(self.at(key), f"must be between {lo} and {hi}, found {value}")
            return None
        return value

    def seconds(self, key: str, default: Any, lo: float, hi: float) -> float | None:
        value = self._get(key, default)
        if value is _MISSING:
            return None if default is _MISSING else default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.v.add(self.at(key), f"expected a number of seconds, found {_found(value)}")
            return None
        if not lo <= value <= hi:  # also rejects nan
            self.v.add(self.at(key), f"must be between {lo:g} and {hi:g} s, found {value:g}")
            return None
        return float(value)

    def choice(self, key: str, default: Any, choices: tuple[str, ...]) -> str | None:
        value = self._get(key, default)
        if value is _MISSING:
            return None if default is _MISSING else default
        if not isinstance(value, str):
            self.v.add(self.at(key), f"expected a string, found {_found(value)}")
            return None
        if value not in choices:
            near = _nearest(value, choices)
            hint = f", did you mean '{near}'?" if near else ""
            self.v.add(self.at(key),
                       f"unknown value '{value}'{hint} (one of: {', '.join(choices)})")
            return None
        return value

    def path_(self, key: str, default: Any = _MISSING) -> Path | None:
        value = self._get(key, default)
        if value is _MISSING:
            return None if default is _MISSING else default
        if not isinstance(value, str) or not value.strip():
            self.v.add(self.at(key), f"expected a file path string, found {_found(value)}")
            return None
        return self.v.base_dir / value  # an absolute value replaces base_dir

    def port(self, key: str) -> str | None:
        """An optional pyserial URL; a plain relative device path is anchored like files."""
        value = self._get(key, None)
        if value is _MISSING:
            return None
        if not isinstance(value, str) or not value.strip():
            self.v.add(self.at(key), f"expected a pyserial URL string, found {_found(value)}")
            return None
        if "://" in value or os.path.isabs(value):
            return value
        return str(self.v.base_dir / value)

    def table(self, key: str, keys: tuple[str, ...], *, required: bool = False) -> _Table:
        value = self.data.get(key, _MISSING)
        if value is _MISSING:
            if required:
                self.v.add(self.at(key), "required section missing")
            value = {}
        elif not isinstance(value, dict):
            self.v.add(self.at(key), f"expected a table, found {_found(value)}")
            value = {}
        return _Table(self.v, self.at(key), value, keys)

    def tables(self, key: str) -> list[tuple[str, Any]] | None:
        """An array of tables (``[[key]]``) as (path, raw item) pairs; None if absent."""
        value = self.data.get(key, _MISSING)
        if value is _MISSING:
            return None
        if not isinstance(value, list):
            self.v.add(self.at(key), f"expected an array of tables ([[{key}]]), "
                                     f"found {_found(value)}")
            return []
        items = []
        for i, item in enumerate(value):
            path = f"{self.at(key)}[{i}]"
            if not isinstance(item, dict):
                self.v.add(path, f"expected a table, found {_found(item)}")
                continue
            items.append((path, item))
        return items


_KIOSK_KEYS = ("device_id", "hall", "number_prefix", "board", "state_dir")
_BROKER_KEYS = ("host", "port", "keepalive_s", "reconnect_min_s", "reconnect_max_s", "client_id")
_TOP = ("kiosk", "hall", "broker", "keys", "tls", "commands", "devices", "gpio", "session",
        "clock", "unattended", "qr", "cell", "staff_call", "telemetry", "services")
_CELL_KEYS = ("id", "pir", "door", "radar_port", "node_port", "indicator_pin", "min_presence_s",
              "hold_s", "hold_motion_only_s")
_TLS_KEYS = ("ca_file", "cert_file", "crl_file", "trusted_certs", "warn_days")
_UNATTENDED_KEYS = ("direct_to", "loop_stall_s", "link_probe_interval_s", "link_probe_timeout_s",
                    "printer_check_s", "printer_recheck_s", "stop_timeout_s")
CLOCK_TRUST = ("kernel", "assume_synced")


class _Validator:
    def __init__(self, source: str, base_dir: Path) -> None:
        self.source = source
        self.base_dir = base_dir
        self.problems: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.problems.append(f"{self.source}: {path}: {message}")

    # Each section reader returns its dataclass, or None when something in it was invalid
    # (the problem is already recorded). Cross-section checks skip what is None.
    def run(self, data: dict, digest: str) -> AgentConfig | None:
        top = _Table(self, "", data, _TOP)
        kiosk, board = self._kiosk(top.table("kiosk", _KIOSK_KEYS, required=True))
        hall = self._hall(top.table("hall", ("name", "citizen_hash_secret_file"), required=True))
        broker = self._broker(top.table("broker", _BROKER_KEYS),
                              kiosk.device_id if kiosk else None)
        keys = self._keys(top.table("keys", ("device_key", "trusted"), required=True))
        devices = top.table("devices", ("reader", "printer", "camera", "qr_scanner"))
        reader = self._reader(devices.table("reader", ("port", "poll_interval_s", "timeout_s")),
                              board)
        printer = self._printer(devices.table("printer", ("port", "timeout_s", "encoding")),
                                board)
        gpio = self._gpio(top.table("gpio", ("pin_factory",)), board)
        session = self._session(top.table("session", ("choose_timeout_s",)))
        clock = top.table("clock", ("trust",)).choice("trust", "kernel", CLOCK_TRUST)
        unattended = self._unattended(top.table("unattended", _UNATTENDED_KEYS), broker)
        tls = self._tls(top, top.table("tls", _TLS_KEYS))
        window = top.table("commands", ("window_s",)).seconds(
            "window_s", float(DEFAULT_WINDOW_S), MIN_WINDOW_S, MAX_WINDOW_S)
        camera = self._camera(devices.table("camera", ("enabled", "camera_num", "fps",
                                                       "repeat_window_s", "settle_s")))
        scanner = self._scanner(devices.table("qr_scanner", ("port", "baudrate", "terminator",
                                                             "idle_gap_s", "max_len")))
        qr = self._qr(top.table("qr", ("booking_keys", "eid_keys", "leeway_s")))
        cell = self._cell(top, top.table("cell", _CELL_KEYS), board)
        staff = top.table("staff_call", ("repeat_after_s",)).seconds("repeat_after_s", 60.0, 5, 3600)
        tele = top.table("telemetry", ("interval_s",)).seconds("interval_s", 60.0, 1, 3600)
        services = self._services(top, board)
        self._ports(reader, printer, board)
        parts = (kiosk, board, hall, broker, keys, reader, printer, gpio, session, services, clock,
                 unattended, tls, window, camera, scanner, qr, cell, staff, tele)
        if self.problems or any(part is None for part in parts):
            return None
        return AgentConfig(source=Path(self.source), digest=digest, kiosk=kiosk, hall=hall,
                           broker=broker, keys=keys, reader=reader, printer=printer, gpio=gpio,
                           session=session, services=services, board=board,
                           clock=ClockConfig(clock), unattended=unattended,
                           tls=tls or None, commands=CommandsConfig(window), camera=camera,
                           qr_scanner=scanner, qr=qr, cell=cell or None,
                           staff_call=StaffCallConfig(staff), telemetry=TelemetryConfig(tele))

    def _kiosk(self, t: _Table) -> tuple[KioskConfig | None, BoardProfile | None]:
        device_id = t.string("device_id", pattern=_ID, rule=_ID_RULE)
        hall = t.string("hall", pattern=_ID, rule=_ID_RULE)
        prefix = t.data.get("number_prefix")
        if isinstance(prefix, int) and not isinstance(prefix, bool):
            # TOML `07` is not even valid and `7` loses the leading zero: ask for a string.
            t.v.add(t.at("number_prefix"),
                    f'expected a string of 2 digits like "07", found {_found(prefix)}')
            number_prefix = None
        else:
            number_prefix = t.string("number_prefix", pattern=re.compile(r"[0-9]{2}"),
                                     rule='exactly 2 digits, like "07"')
        board_name = t.string("board")
        board = None
        if board_name is not None:
            if board_name not in BOARD_NAMES:
                self.add(t.at("board"), unknown_board_message(board_name))
            else:
                try:
                    board = load_board(board_name)
                except ConfigError as exc:
                    # A broken shipped profile: its own problems already name its file.
                    self.problems.extend(exc.problems)
        state_dir = t.path_("state_dir", DEFAULT_STATE_DIR)
        if None in (device_id, hall, number_prefix, board, state_dir):
            return None, board
        return KioskConfig(device_id, hall, number_prefix, board_name, state_dir), board

    def _hall(self, t: _Table) -> HallConfig | None:
        name = t.string("name")
        secret = t.path_("citizen_hash_secret_file")
        if secret is not None and not self._private_file(
                t.at("citizen_hash_secret_file"), secret, min_bytes=_SECRET_MIN_BYTES):
            secret = None
        if name is None or secret is None:
            return None
        return HallConfig(name, secret)

    def _private_file(self, key: str, path: Path, *, min_bytes: int = 1) -> bool:
        """Exists, is a regular file, no group/other access, big enough. Never read."""
        try:
            st = path.stat()
        except FileNotFoundError:
            self.add(key, f"file not found: {path}")
            return False
        except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
            self.add(key, f"cannot stat {path}: {getattr(exc, 'strerror', None) or exc}")
            return False
        if not stat.S_ISREG(st.st_mode):
            self.add(key, f"{path} is not a regular file")
            return False
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            self.add(key, f"{path} is accessible by group/others (mode {mode:04o}); "
                          f"run: chmod 600 {path}")
            return False
        if st.st_size < min_bytes:
            self.add(key, f"{path} holds {st.st_size} bytes, needs at least {min_bytes}")
            return False
        return True

    def _broker(self, t: _Table, device_id: str | None) -> BrokerConfig | None:
        host = t.string("host", "127.0.0.1", max_len=253)
        port = t.integer("port", 1883, 1, 65535)
        keepalive = t.integer("keepalive_s", 30, 5, 3600)
        rmin = t.seconds("reconnect_min_s", 0.5, 0.01, 3600)
        rmax = t.seconds("reconnect_max_s", 30.0, 0.01, 3600)
        if rmin is not None and rmax is not None and rmin > rmax:
            self.add(t.at("reconnect_min_s"),
                     f"must not exceed reconnect_max_s ({rmin:g} > {rmax:g})")
            rmin = None
        client_id = t.string("client_id", None, max_len=128)
        if client_id is None and "client_id" not in t.data:
            client_id = device_id
        if None in (host, port, keepalive, rmin, rmax, client_id):
            return None
        return BrokerConfig(host, port, keepalive, rmin, rmax, client_id)

    def _keys(self, t: _Table) -> KeysConfig | None:
        device_key = t.path_("device_key")
        if device_key is not None and not self._private_file(t.at("device_key"), device_key):
            device_key = None
        trusted: list[TrustedKey] = []
        seen: dict[bytes, str] = {}
        ok = True
        for path, item in t.tables("trusted") or []:
            entry = _Table(self, path, item, ("owner", "role", "public_key"))
            owner = entry.string("owner", pattern=_ID, rule=_ID_RULE)
            role = entry.choice("role", _MISSING, TRUSTED_ROLES)
            key = self._public_key(entry)
            if key is not None and key in seen:
                self.add(entry.at("public_key"), f"same key as {seen[key]}")
                key = None
            if None in (owner, role, key):
                ok = False
                continue
            seen[key] = path
            trusted.append(TrustedKey(owner, role, key))
        if device_key is None or not ok:
            return None
        return KeysConfig(device_key, tuple(trusted))

    def _public_key(self, t: _Table) -> bytes | None:
        text = t.string("public_key", max_len=128)
        if text is None:
            return None
        try:
            key = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            self.add(t.at("public_key"), "not valid base64")
            return None
        if len(key) != _ED25519_PUBLIC_BYTES:
            self.add(t.at("public_key"), f"decodes to {len(key)} bytes, an Ed25519 public "
                                         f"key is {_ED25519_PUBLIC_BYTES}")
            return None
        return key

    def _serial_port(self, t: _Table, role: str, board: BoardProfile | None) -> str | None:
        port = t.port("port")
        if port is not None or "port" in t.data:
            return port
        if board is None:
            return None
        if role not in board.serial:
            self.add(t.at("port"), f"not set, and board '{board.model}' has no '{role}' "
                                   f"serial port to default to; set {t.at('port')}")
            return None
        return board.serial[role]

    def _reader(self, t: _Table, board: BoardProfile | None) -> ReaderConfig | None:
        port = self._serial_port(t, "idcard_reader", board)
        poll = t.seconds("poll_interval_s", 0.3, 0.05, 5)
        timeout = t.seconds("timeout_s", 1.0, 0.05, 30)
        if None in (port, poll, timeout):
            return None
        return ReaderConfig(port, poll, timeout)

    def _printer(self, t: _Table, board: BoardProfile | None) -> PrinterConfig | None:
        port = self._serial_port(t, "printer", board)
        timeout = t.seconds("timeout_s", 0.5, 0.05, 30)
        encoding = t.string("encoding", "cp437", max_len=32)
        if encoding is not None:
            encoding = self._encoding(t.at("encoding"), encoding)
        if None in (port, timeout, encoding):
            return None
        return PrinterConfig(port, timeout, encoding)

    def _encoding(self, key: str, name: str) -> str | None:
        try:
            info = codecs.lookup(name)
            # Binary transforms (base64, zlib) are codecs too but cannot print text, and
            # 'undefined' refuses every character: both fail here.
            if not getattr(info, "_is_text_encoding", True):
                raise LookupError(name)
            info.encode("A-07-0123")
        except (LookupError, UnicodeError):
            info = None
        if info is None:
            near = _nearest(name, _COMMON_ENCODINGS)
            hint = f", did you mean '{near}'?" if near else ""
            self.add(key, f"unknown text encoding '{name}'{hint} "
                          f"(e.g. {', '.join(_COMMON_ENCODINGS[:8])})")
            return None
        return info.name

    def _gpio(self, t: _Table, board: BoardProfile | None) -> GpioConfig | None:
        factory = t.choice("pin_factory", "default", PIN_FACTORIES)
        if factory is None:
            return None
        if board is not None and factory in HARDWARE_PIN_FACTORIES \
                and factory not in board.pin_factories:
            self.add(t.at("pin_factory"), f"'{factory}' cannot drive board '{board.model}' "
                                          f"(use one of: {', '.join(board.pin_factories)})")
            return None
        return GpioConfig(factory)

    def _flag(self, t: _Table, key: str, default: bool) -> bool | None:
        value = t.data.get(key, default)
        if not isinstance(value, bool):
            self.add(t.at(key), f"expected true or false, found {_found(value)}")
            return None
        return value

    def _camera(self, t: _Table) -> CameraConfig | None:
        values = (self._flag(t, "enabled", False), t.integer("camera_num", 0, 0, 7),
                  t.seconds("fps", 30.0, 5, 60), t.seconds("repeat_window_s", 3.0, 0, 60),
                  t.seconds("settle_s", 2.0, 0.5, 30))
        return None if any(v is None for v in values) else CameraConfig(*values)

    def _scanner(self, t: _Table) -> QrScannerConfig | None:
        port = t.port("port")
        values = (t.integer("baudrate", 9600, 1200, 921600),
                  t.choice("terminator", "CR", ("CR", "LF", "CRLF", "TAB", "NONE")),
                  t.seconds("idle_gap_s", 0.08, 0.02, 2), t.integer("max_len", 512, 16, 4096))
        return None if any(v is None for v in values) else QrScannerConfig(port, *values)

    def _keys_list(self, t: _Table, key: str) -> tuple[bytes, ...] | None:
        raw = t.data.get(key, [])
        if not isinstance(raw, list):
            self.add(t.at(key), f"expected a list of base64 Ed25519 public keys, found {_found(raw)}")
            return None
        out = []
        for i, item in enumerate(raw):
            try:
                key_bytes = base64.b64decode(item, validate=True) if isinstance(item, str) else b""
            except ValueError:
                key_bytes = b""
            if len(key_bytes) != 32:
                self.add(f"{t.at(key)}[{i}]", "expected base64 of a raw 32-byte Ed25519 public key")
                return None
            out.append(key_bytes)
        return tuple(out)

    def _qr(self, t: _Table) -> QrConfig | None:
        values = (self._keys_list(t, "booking_keys"), self._keys_list(t, "eid_keys"),
                  t.integer("leeway_s", 60, 0, 600))
        return None if any(v is None for v in values) else QrConfig(*values)

    def _cell(self, top: _Table, t: _Table, board: BoardProfile | None) -> CellConfig | bool | None:
        if "cell" not in top.data:
            return False
        cid = t.string("id", pattern=_ID, rule=_ID_RULE)
        pir, door = self._flag(t, "pir", True), self._flag(t, "door", True)
        radar, node = t.port("radar_port"), t.port("node_port")
        indicator = t.integer("indicator_pin", None, 0, 27)
        timings = (t.seconds("min_presence_s", 0.8, 0.1, 5), t.seconds("hold_s", 20.0, 5, 600),
                   t.seconds("hold_motion_only_s", 60.0, 10, 900))
        if board is not None:
            for flag, role in ((pir, "pir"), (door, "door")):
                if flag and role not in board.occupancy:
                    self.add(t.at(role), f"board '{board.model}' has no occupancy pin for '{role}'")
                    return None
        if None in (cid, pir, door) or any(v is None for v in timings):
            return None
        if not (pir or door or radar or node):
            self.add(t.path, "a cell needs at least one sensor (pir, door, radar_port or node_port)")
            return None
        return CellConfig(cid, pir, door, radar, node, indicator, *timings)

    def _tls(self, top: _Table, t: _Table) -> TlsConfig | bool | None:
        """False (no TLS) when the section is absent, None when it is invalid."""
        if "tls" not in top.data:
            return False
        ca = t.path_("ca_file")
        cert = t.path_("cert_file")
        crl = t.path_("crl_file", None)
        trusted = t.path_("trusted_certs", None)
        warn = t.seconds("warn_days", 30.0, 1, 365)
        for key, path in (("ca_file", ca), ("cert_file", cert), ("crl_file", crl),
                          ("trusted_certs", trusted)):
            if path is not None and not path.is_file():
                self.add(t.at(key), f"file not found: {path}")
                return None
        if ca is None or cert is None or warn is None:
            return None
        return TlsConfig(ca, cert, crl, trusted, warn)

    def _unattended(self, t: _Table, broker: BrokerConfig | None) -> UnattendedConfig | None:
        direct_to = t.string("direct_to", "Please use another kiosk", max_len=200)
        stall = t.seconds("loop_stall_s", 10.0, 1, 60)
        probe_every = t.seconds("link_probe_interval_s", 60.0, 5, 3600)
        probe_timeout = t.seconds("link_probe_timeout_s", 90.0, 5, 7200)
        check = t.seconds("printer_check_s", 30.0, 1, 3600)
        recheck = t.seconds("printer_recheck_s", 2.0, 0.5, 60)
        stop = t.seconds("stop_timeout_s", 10.0, 1, 15)
        if probe_timeout is not None and broker is not None \
                and probe_timeout <= 1.5 * broker.keepalive_s:
            # Below that, a healthy link that is merely waiting for its keepalive would be
            # taken for a wedged one and the watchdog would restart a working agent.
            self.add(t.at("link_probe_timeout_s"),
                     f"must be more than 1.5 x broker.keepalive_s ({1.5 * broker.keepalive_s:g} s)")
            return None
        values = (direct_to, stall, probe_every, probe_timeout, check, recheck, stop)
        if any(v is None for v in values):
            return None
        return UnattendedConfig(*values)

    def _session(self, t: _Table) -> SessionConfig | None:
        timeout = t.seconds("choose_timeout_s", 20.0, 1, 300)
        return None if timeout is None else SessionConfig(timeout)

    def _services(self, top: _Table, board: BoardProfile | None
                  ) -> tuple[ServiceConfig, ...] | None:
        items = top.tables("services")
        if items is None:
            self.add("services", "required: at least one [[services]] entry")
            return None
        if not isinstance(top.data["services"], list):
            return None
        if not 1 <= len(top.data["services"]) <= MAX_SERVICES:
            self.add("services", f"expected 1 to {MAX_SERVICES} [[services]] entries, "
                                 f"found {len(top.data['services'])}")
        out: list[ServiceConfig] = []
        categories: dict[str, str] = {}
        buttons: dict[str, str] = {}
        ok = len(items) == len(top.data["services"])
        for path, item in items:
            t = _Table(self, path, item, ("category", "name", "button"))
            category = t.string("category", pattern=_ID, rule=_ID_RULE)
            name = t.string("name", max_len=48)
            button = t.string("button", pattern=_ID, rule=_ID_RULE)
            if category is not None:
                if category in categories:
                    self.add(t.at("category"),
                             f"category '{category}' already used by {categories[category]}")
                    category = None
                else:
                    categories[category] = path
            if button is not None and board is not None \
                    and button not in board.service_buttons:
                labels = tuple(board.service_buttons)
                near = _nearest(button, labels)
                hint = f", did you mean '{near}'?" if near else ""
                self.add(t.at("button"), f"board '{board.model}' has no service button "
                                         f"'{button}'{hint} (buttons: {', '.join(labels)})")
                button = None
            if button is not None:
                if button in buttons:
                    self.add(t.at("button"), f"button '{button}' already used by {buttons[button]}")
                    button = None
                else:
                    buttons[button] = path
            if None in (category, name, button):
                ok = False
                continue
            out.append(ServiceConfig(category, name, button))
        if not ok or not 1 <= len(out) <= MAX_SERVICES:
            return None
        return tuple(out)

    def _ports(self, reader: ReaderConfig | None, printer: PrinterConfig | None,
               board: BoardProfile | None) -> None:
        """Final pass: one serial port, one device (ESPHome's 'UART claimed twice')."""
        if reader is not None and printer is not None \
                and _same_port(reader.port, printer.port):
            self.add("devices.printer.port",
                     f"same port as devices.reader.port ({printer.port})")
        if board is None:
            return
        for key, cfg, own_role in (("devices.reader.port", reader, "idcard_reader"),
                                   ("devices.printer.port", printer, "printer")):
            if cfg is None:
                continue
            for role, url in board.serial.items():
                if role != own_role and _same_port(cfg.port, url):
                    self.add(key, f"{cfg.port} is the {role} port of board '{board.model}'")


def _same_port(a: str, b: str) -> bool:
    if "://" in a or "://" in b:
        return a == b
    return os.path.normpath(a) == os.path.normpath(b)
