"""ops.toml: the hall-side monitor's configuration, and the key inventory it verifies against.

Read once, validated into frozen dataclasses; every problem is collected and raised together
in one ConfigError whose ``problems`` read ``file: key.path: message``, with the nearest
valid key suggested for a misspelt one (the agent's config does the same). Relative paths
are resolved against the file's directory. Units live in key names (``*_s`` seconds).

Layout (every section optional except ``[ops]``)::

    [ops]
    instance = "ops-1"                 # id of this monitor instance (MQTT client id prefix)
    halls = ["citizen-home"]           # 1-512 hall ids watched
    state_dir = "/var/lib/hallkiosk-ops"
    share_group = ""                   # "" = see everything; an id = split telemetry, events,
                                       # tickets and command results with the other instances
                                       # of that group (gap detection is then off)
    workers = 0                        # 0: verify on the MQTT thread (one core); N: verify
                                       # threads, for spare cores (2 on 2 cores: about 1.3x)
    tick_s = 1.0                       # heartbeat, gap and alert evaluation period
    publish_alerts = true              # sign alerts and publish them on hall/{h}/kiosk/{d}/alert
    alert_key = "ops-1.key"            # the key they are signed with (certificate role
                                       # "monitor", CN = instance); default: [broker]
                                       # tls_key_file. Without either, alerts go to the log only

    [broker]                           # host, port, keepalive_s, reconnect_min_s, reconnect_max_s
    protocol = "5"                     # "3.1.1" for a city tier's NATS gateway (no MQTT 5:
                                       # no share_group, no hosted ledger)
    nodes = ["10.1.0.2:8883"]          # more nodes of a clustered broker, tried in turn
    tls_ca_file = "hall-chain.pem"     # optional mTLS (all three, or none): the monitor's own
    tls_cert_file = "ops-1.crt"        # certificate; the broker takes its CN as client id,
    tls_key_file = "ops-1.key"         # so it must be unique per instance

    [keys]                             # who the monitor believes (at least one source)
    ca_chain = "hall-chain.pem"        # kiosk certificates checked against the hall CA ...
    certs = ["kiosks.pem"]             # (provisioning export-certs) ...
    crl = "hall.crl"                   # ... minus the revoked ones (optional)
    inventory = "inventory.toml"       # and/or a plain key list (below), e.g. for the emulator
    [[keys.hall]]                      # central ops: each hall under its own CA, its keys
    hall = "hall1"                     # trusted for that hall's topics only
    ca_chain = "hall1/chain.pem"
    certs = ["hall1/kiosks.pem"]
    crl = "hall1/hall.crl"             # optional

    [ledger]                           # the ticket consumer this monitor hosts
    enabled = true
    service_id = "ledger"              # its sender id: one per instance, each with its own key
    key = "ledger.key"                 # PEM Ed25519 private key, chmod 600
    group = "consumers"                # shared subscription group of all ledger instances
    state_dir = "ledger"               # ledger.sqlite lives here: instances on one host share it
    tls_cert_file = "ledger-1.crt"     # with mTLS: the consumer's own certificate (CN =
    tls_key_file = "ledger-1.key"      # service_id); the CA is [broker] tls_ca_file

    [fleet]
    heartbeat_timeout_s = 90           # 0 turns the heartbeat off
    gap_grace_s = 10

    [metrics]
    enabled = true
    host = "127.0.0.1"
    port = 9478

    [dashboard]
    refresh_s = 1.0

    [[alerts]]                         # none listed: ops.alerts.DEFAULT_RULES
    name = "kiosk_offline"
    kind = "offline"                   # see ops.alerts for kinds and their figures
    severity = "critical"
    after_s = 60

Inventory (``[keys] inventory``)::

    [[kiosk]]
    hall = "citizen-home"
    device = "k07"
    public_key = "base64 of the raw 32-byte Ed25519 public key"

    [[service]]
    owner = "ledger"
    roles = ["consumer"]
    public_key = "..."
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import difflib
import logging
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hallkiosk.errors import ConfigError, ContractError
from mqtt_topics.envelope import Keyring
from ops.alerts import DEFAULT_RULES, KINDS, SEVERITIES, AlertRule

log = logging.getLogger("hallkiosk.ops.config")

_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,31}")
#: Halls one monitor process may watch: a city's ~100 with room (5 filters each).
MAX_HALLS = 512
_ID_RULE = "1-32 of A-Z a-z 0-9 _ -, not starting with -"
_ROLES = ("kiosk", "consumer", "operator", "ops")
DEFAULT_OPS_CONFIG = Path("/etc/hallkiosk/ops.toml")


# -- the result --------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class TlsFiles:
    """mTLS material: the hall CA chain, a certificate and its key (PEM paths)."""

    ca_file: Path
    cert_file: Path
    key_file: Path


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    host: str
    port: int
    keepalive_s: int
    reconnect_min_s: float
    reconnect_max_s: float
    tls: TlsFiles | None = None
    protocol: str = "5"                            # "5", or "3.1.1" for a city gateway
    nodes: tuple[tuple[str, int], ...] = ()        # more nodes of a clustered broker


@dataclass(frozen=True, slots=True)
class TrustSources:
    """Where keys come from: certificates under the hall CA, and/or a plain inventory."""

    ca_chain: Path | None
    certs: tuple[Path, ...]
    crl: Path | None
    inventory: Path | None
    #: Central ops watching several halls, each under its own CA: ([[keys.hall]]).
    halls: tuple["HallTrustSources", ...] = ()


@dataclass(frozen=True, slots=True)
class HallTrustSources:
    """One hall's CA chain, its kiosk certificates and CRL; its keys sign only that hall."""

    hall: str
    ca_chain: Path
    certs: tuple[Path, ...]
    crl: Path | None


@dataclass(frozen=True, slots=True)
class LedgerSettings:
    """The hosted ticket consumer. ``key`` is None when ``enabled`` is false."""

    enabled: bool
    service_id: str
    key: Path | None
    group: str
    state_dir: Path
    tls: TlsFiles | None = None


@dataclass(frozen=True, slots=True)
class FleetSettings:
    heartbeat_timeout_s: float | None
    gap_grace_s: float


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    enabled: bool
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class OpsConfig:
    source: Path
    instance: str
    halls: tuple[str, ...]
    state_dir: Path
    share_group: str | None
    workers: int
    tick_s: float
    broker: BrokerSettings
    trust: TrustSources
    ledger: LedgerSettings
    fleet: FleetSettings
    metrics: MetricsSettings
    refresh_s: float
    alerts: tuple[AlertRule, ...]
    #: The key alerts are signed with (None: alerts are logged, not published).
    alert_key: Path | None = None


@dataclass(frozen=True, slots=True)
class Inventory:
    """The keys the monitor trusts, and which kiosks each hall should have."""

    keyring: Keyring
    kiosks: tuple[tuple[str, str], ...]


# -- a small collecting validator --------------------------------------------------------------
class _Problems:
    def __init__(self, source: str, base_dir: Path) -> None:
        self.source = source
        self.base_dir = base_dir
        self.items: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.items.append(f"{self.source}: {path}: {message}")

    def raise_if_any(self) -> None:
        if self.items:
            if len(self.items) == 1:
                raise ConfigError(self.items[0], self.items)
            raise ConfigError(f"{self.source}: {len(self.items)} problems:\n"
                              + "\n".join(f"  {p}" for p in self.items), self.items)


def _found(value: Any) -> str:
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, (int, float)):
        return f"a number ({value})"
    if isinstance(value, str):
        return f"a string ({value[:40]!r})"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return f"a {type(value).__name__}"


_MISSING = object()


class _Table:
    """One table under validation: typed getters that record problems and return None."""

    def __init__(self, p: _Problems, path: str, data: Any, keys: tuple[str, ...]) -> None:
        self.p, self.path = p, path
        self.data = data if isinstance(data, dict) else {}
        for key in self.data:
            if key not in keys:
                near = difflib.get_close_matches(str(key), keys, n=1, cutoff=0.6)
                hint = f", did you mean '{near[0]}'?" if near else f" (valid: {', '.join(keys)})"
                p.add(self.at(key), f"unknown key '{key}'{hint}")

    def at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def _get(self, key: str, default: Any) -> Any:
        value = self.data.get(key, _MISSING)
        if value is _MISSING:
            if default is _MISSING:
                self.p.add(self.at(key), "required key missing")
                return None
            return default
        return value

    def ident(self, key: str, default: Any = _MISSING, *, empty_ok: bool = False) -> str | None:
        value = self._get(key, default)
        if value is None or (empty_ok and value == ""):
            return value
        if not isinstance(value, str) or not _ID.fullmatch(value):
            self.p.add(self.at(key), f"expected an id ({_ID_RULE}), found {_found(value)}")
            return None
        return value

    def text(self, key: str, default: Any = _MISSING, max_len: int = 253) -> str | None:
        value = self._get(key, default)
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip() or len(value) > max_len:
            self.p.add(self.at(key), f"expected 1-{max_len} characters, found {_found(value)}")
            return None
        return value

    def integer(self, key: str, default: Any, lo: int, hi: int) -> int | None:
        value = self._get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            self.p.add(self.at(key), f"expected an integer in {lo}..{hi}, found {_found(value)}")
            return None
        return value

    def seconds(self, key: str, default: Any, lo: float, hi: float) -> float | None:
        value = self._get(key, default)
        if value is None:
            return None
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or not lo <= value <= hi):
            self.p.add(self.at(key), f"expected seconds in {lo:g}..{hi:g}, found {_found(value)}")
            return None
        return float(value)

    def boolean(self, key: str, default: Any) -> bool | None:
        value = self._get(key, default)
        if value is None:
            return None
        if not isinstance(value, bool):
            self.p.add(self.at(key), f"expected true or false, found {_found(value)}")
            return None
        return value

    def choice(self, key: str, default: Any, choices: tuple[str, ...]) -> str | None:
        value = self._get(key, default)
        if value is None:
            return None
        if value not in choices:
            near = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.6)
            hint = f", did you mean '{near[0]}'?" if near else ""
            self.p.add(self.at(key), f"unknown value {_found(value)}{hint} "
                                     f"(one of: {', '.join(choices)})")
            return None
        return value

    def file(self, key: str, default: Any = _MISSING) -> Path | None:
        value = self._get(key, default)
        if value is None:
            return None
        if isinstance(value, Path):
            return value
        if not isinstance(value, str) or not value.strip():
            self.p.add(self.at(key), f"expected a file path, found {_found(value)}")
            return None
        return self.p.base_dir / value

    def table(self, key: str, keys: tuple[str, ...], *, required: bool = False) -> _Table:
        value = self.data.get(key, _MISSING)
        if value is _MISSING:
            if required:
                self.p.add(self.at(key), "required section missing")
            value = {}
        elif not isinstance(value, dict):
            self.p.add(self.at(key), f"expected a table, found {_found(value)}")
            value = {}
        return _Table(self.p, self.at(key), value, keys)

    def tables(self, key: str) -> list[tuple[str, dict]]:
        value = self.data.get(key, _MISSING)
        if value is _MISSING:
            return []
        if not isinstance(value, list):
            self.p.add(self.at(key), f"expected an array of tables ([[{key}]]), "
                                     f"found {_found(value)}")
            return []
        out = []
        for i, item in enumerate(value):
            if isinstance(item, dict):
                out.append((f"{self.at(key)}[{i}]", item))
            else:
                self.p.add(f"{self.at(key)}[{i}]", f"expected a table, found {_found(item)}")
        return out


def _read_toml(path: Path, what: str) -> dict:
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what}: {exc.strerror or exc}") from None
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 (bad byte at offset {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


# -- ops.toml ----------------------------------------------------------------------------------
_TOP = ("ops", "broker", "keys", "ledger", "fleet", "metrics", "dashboard", "alerts")
_ALERT_KEYS = ("name", "kind", "severity", "after_s", "threshold", "max_age_s", "window_s",
               "level")


def load_ops_config(path: str | os.PathLike[str] = DEFAULT_OPS_CONFIG) -> OpsConfig:
    """Read and validate ops.toml; ConfigError lists every problem found."""
    path = Path(path)
    return parse_ops_config(_read_toml(path, "ops config"), source=str(path),
                            base_dir=path.absolute().parent)


def parse_ops_config(data: dict, *, source: str, base_dir: Path) -> OpsConfig:
    p = _Problems(source, Path(base_dir))
    top = _Table(p, "", data, _TOP)
    ops = top.table("ops", ("instance", "halls", "state_dir", "share_group", "workers",
                            "tick_s", "publish_alerts", "alert_key"), required=True)
    instance = ops.ident("instance")
    halls = _halls(ops)
    state_dir = ops.file("state_dir", Path("/var/lib/hallkiosk-ops"))
    share_group = ops.ident("share_group", "", empty_ok=True)
    workers = ops.integer("workers", 0, 0, 64)
    tick_s = ops.seconds("tick_s", 1.0, 0.05, 60)

    b = top.table("broker", ("host", "port", "keepalive_s", "reconnect_min_s", "reconnect_max_s",
                             "tls_ca_file", "tls_cert_file", "tls_key_file", "protocol",
                             "nodes"))
    broker = BrokerSettings(b.text("host", "127.0.0.1") or "",
                            b.integer("port", 1883, 1, 65535) or 0,
                            b.integer("keepalive_s", 30, 5, 3600) or 0,
                            b.seconds("reconnect_min_s", 0.5, 0.01, 3600) or 0.0,
                            b.seconds("reconnect_max_s", 30.0, 0.01, 3600) or 0.0)
    if broker.reconnect_min_s > broker.reconnect_max_s > 0:
        p.add("broker.reconnect_min_s", "must not exceed reconnect_max_s")
    ca_file = b.file("tls_ca_file", None)
    tls = _tls(b, ca_file)
    broker = dataclasses.replace(broker, tls=tls, protocol=b.choice("protocol", "5", ("5", "3.1.1"))
                                 or "5", nodes=_nodes(b))
    if broker.protocol == "3.1.1" and share_group:
        p.add("ops.share_group", "shared subscriptions need MQTT 5; with protocol 3.1.1 "
                                 "split the load by giving each instance its own halls")

    trust = _trust_sources(top.table("keys", ("ca_chain", "certs", "crl", "inventory", "hall"),
                                     required=True))
    for _hall in trust.halls:
        if halls and _hall.hall not in halls:
            p.add("keys.hall", f"hall {_hall.hall!r} is not in ops.halls")

    lg = top.table("ledger", ("enabled", "service_id", "key", "group", "state_dir",
                              "tls_cert_file", "tls_key_file"))
    enabled = lg.boolean("enabled", True)
    if enabled and broker.protocol != "5":
        p.add("ledger.enabled", "the hall ledger shares its load over MQTT 5 shared "
                                "subscriptions: set enabled = false with protocol 3.1.1 (the "
                                "city's ledger is city/ledger.py)")
    ledger_tls = _tls(lg, ca_file)
    if ca_file is not None and ledger_tls is None and enabled and tls is not None:
        p.add("ledger.tls_cert_file", "the broker needs mTLS: give the ledger its own "
                                      "certificate (tls_cert_file, tls_key_file)")
    ledger = LedgerSettings(
        enabled=bool(enabled),
        service_id=lg.ident("service_id", "ledger") or "",
        key=lg.file("key") if enabled else lg.file("key", None),
        group=lg.ident("group", "consumers") or "",
        state_dir=lg.file("state_dir", (state_dir or Path(".")) / "ledger") or Path("."),
        tls=ledger_tls)

    f = top.table("fleet", ("heartbeat_timeout_s", "gap_grace_s"))
    heartbeat = f.seconds("heartbeat_timeout_s", 90.0, 0, 86400)
    fleet = FleetSettings(heartbeat or None, f.seconds("gap_grace_s", 10.0, 0, 3600) or 0.0)

    m = top.table("metrics", ("enabled", "host", "port"))
    metrics = MetricsSettings(bool(m.boolean("enabled", True)), m.text("host", "127.0.0.1") or "",
                              m.integer("port", 9478, 0, 65535) or 0)
    refresh_s = top.table("dashboard", ("refresh_s",)).seconds("refresh_s", 1.0, 0.1, 60)
    alerts = _alerts(top, p)
    publish_alerts = ops.boolean("publish_alerts", True)
    alert_key = ops.file("alert_key", None)
    if not publish_alerts:
        alert_key = None
    elif alert_key is None and broker.tls is not None:
        alert_key = broker.tls.key_file      # the monitor's certificate key signs its alerts
    p.raise_if_any()
    return OpsConfig(source=Path(source), instance=instance, halls=halls, state_dir=state_dir,
                     share_group=share_group or None, workers=workers, tick_s=tick_s,
                     broker=broker, trust=trust, ledger=ledger, fleet=fleet,
                     metrics=metrics, refresh_s=refresh_s, alerts=alerts, alert_key=alert_key)


def _tls(t: _Table, ca_file: Path | None) -> TlsFiles | None:
    """tls_cert_file + tls_key_file of a section (with the broker's CA), both or neither."""
    cert, key = t.file("tls_cert_file", None), t.file("tls_key_file", None)
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        t.p.add(t.at("tls_cert_file" if cert is None else "tls_key_file"),
                "tls_cert_file and tls_key_file go together")
        return None
    if ca_file is None:
        t.p.add("broker.tls_ca_file", "required with a TLS certificate")
        return None
    return TlsFiles(ca_file, cert, key)


def _trust_sources(t: _Table) -> TrustSources:
    ca_chain, crl = t.file("ca_chain", None), t.file("crl", None)
    inventory = t.file("inventory", None)
    certs: list[Path] = []
    raw = t.data.get("certs", [])
    if not isinstance(raw, list) or not all(isinstance(c, str) and c for c in raw):
        t.p.add(t.at("certs"), f"expected an array of PEM file paths, found {_found(raw)}")
    else:
        certs = [t.p.base_dir / c for c in raw]
    if certs and ca_chain is None:
        t.p.add(t.at("ca_chain"), "required with certs (certificates are checked against it)")
    halls = []
    for where, item in t.tables("hall"):
        h = _Table(t.p, where, item, ("hall", "ca_chain", "certs", "crl"))
        hall, chain, hall_crl = h.ident("hall"), h.file("ca_chain"), h.file("crl", None)
        raw = h.data.get("certs", _MISSING)
        if not isinstance(raw, list) or not raw or not all(isinstance(c, str) and c for c in raw):
            h.p.add(h.at("certs"), f"expected an array of PEM file paths, found {_found(raw)}")
        elif hall is not None and chain is not None:
            if any(x.hall == hall for x in halls):
                h.p.add(h.at("hall"), f"hall {hall!r} listed twice")
            halls.append(HallTrustSources(hall, chain, tuple(h.p.base_dir / c for c in raw),
                                          hall_crl))
    if not certs and inventory is None and "certs" not in t.data and "hall" not in t.data:
        t.p.add(t.path or "keys", "no keys: set certs (with ca_chain), [[keys.hall]] and/or "
                                  "inventory")
    return TrustSources(ca_chain, tuple(certs), crl, inventory, tuple(halls))


def _nodes(b: _Table) -> tuple[tuple[str, int], ...]:
    raw = b.data.get("nodes", [])
    out = []
    if not isinstance(raw, list):
        b.p.add(b.at("nodes"), f"expected an array of \"host:port\", found {_found(raw)}")
        return ()
    for i, item in enumerate(raw):
        host, sep, port = item.rpartition(":") if isinstance(item, str) else ("", "", "")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            b.p.add(f"{b.at('nodes')}[{i}]", f"expected \"host:port\", found {_found(item)}")
        else:
            out.append((host, int(port)))
    return tuple(out)


def _halls(ops: _Table) -> tuple[str, ...]:
    value = ops.data.get("halls", _MISSING)
    if value is _MISSING:
        ops.p.add(ops.at("halls"), "required key missing")
        return ()
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_HALLS:
        ops.p.add(ops.at("halls"), f"expected an array of 1-{MAX_HALLS} hall ids, "
                                   f"found {_found(value)}")
        return ()
    halls = []
    for i, hall in enumerate(value):
        if not isinstance(hall, str) or not _ID.fullmatch(hall):
            ops.p.add(f"{ops.at('halls')}[{i}]", f"expected a hall id ({_ID_RULE}), "
                                                 f"found {_found(hall)}")
        elif hall in halls:
            ops.p.add(f"{ops.at('halls')}[{i}]", f"hall {hall!r} listed twice")
        else:
            halls.append(hall)
    return tuple(halls)


def _alerts(top: _Table, p: _Problems) -> tuple[AlertRule, ...]:
    items = top.tables("alerts")
    if not items:
        return DEFAULT_RULES
    rules: list[AlertRule] = []
    names: set[str] = set()
    for path, item in items:
        t = _Table(p, path, item, _ALERT_KEYS)
        name = t.ident("name")
        kind = t.choice("kind", _MISSING, KINDS)
        severity = t.choice("severity", "warning", SEVERITIES)
        after_s = t.seconds("after_s", 0.0, 0, 86400)
        threshold = t.integer("threshold", None, 0, 2**53 - 1)
        max_age_s = t.seconds("max_age_s", None, 0, 30 * 86400)
        window_s = t.seconds("window_s", 300.0, 1, 7 * 86400)
        level = t.choice("level", "out", ("out", "near_end"))
        if name is not None and name in names:
            p.add(t.at("name"), f"rule name {name!r} used twice")
            continue
        if None in (name, kind, severity, after_s, window_s, level):
            continue
        names.add(name)
        try:
            rules.append(AlertRule(name, kind, severity, after_s, threshold, max_age_s, window_s,
                                   level))
        except ConfigError as exc:
            p.add(path, str(exc))
    return tuple(rules)


# -- the keys ----------------------------------------------------------------------------------
def load_trust(trust: TrustSources, roles: tuple[str, ...] = ("kiosk",)) -> Inventory:
    """The keyring and expected kiosks of ``[keys]``: certificates of ``roles`` that chain to
    the hall CA (and are not revoked), each ``[[keys.hall]]``'s under its own CA, plus the
    plain inventory if one is given."""
    keyring = Keyring()
    kiosks: list[tuple[str, str]] = []
    sources = [(None, trust.ca_chain, trust.certs, trust.crl)] if trust.certs else []
    sources += [(h.hall, h.ca_chain, h.certs, h.crl) for h in trust.halls]
    for only_hall, ca_chain, certs, crl in sources:
        if ca_chain is None:
            continue
        # Imported here: only a hall with a CA needs the X.509 side.
        from provisioning.trust import keyring_from_certs, load_pem_certs, subject_fields

        ring = keyring_from_certs(ca_chain, certs, crl, roles=roles)
        for kid in ring:
            entry = ring.get(kid)
            if only_hall is not None and entry.hall != only_hall:
                log.warning("%s: certificate of %r is for hall %r, not %r: left out",
                            ca_chain, entry.owner, entry.hall, only_hall)
                continue
            keyring.add(entry.public_key, owner=entry.owner, roles=entry.roles, hall=entry.hall)
        for source in certs:
            for cert in load_pem_certs(source):
                owner, role, hall = subject_fields(cert)
                trusted = any(keyring.get(kid).owner == owner and keyring.get(kid).hall == hall
                              for kid in keyring)
                if role == "kiosk" and trusted and (hall, owner) not in kiosks:
                    kiosks.append((hall, owner))
    if trust.inventory is not None:
        inv = load_inventory(trust.inventory, keyring=keyring)
        kiosks.extend(k for k in inv.kiosks if k not in kiosks)
    return Inventory(keyring, tuple(kiosks))


def load_inventory(path: str | os.PathLike[str], *, keyring: Keyring | None = None) -> Inventory:
    """Read the inventory into a Keyring (kiosk keys with role ``kiosk``; services with
    theirs) and the list of (hall, device) every monitor should expect to see."""
    path = Path(path)
    data = _read_toml(path, "key inventory")
    p = _Problems(str(path), path.absolute().parent)
    top = _Table(p, "", data, ("kiosk", "service"))
    keyring = keyring if keyring is not None else Keyring()
    kiosks: list[tuple[str, str]] = []
    for where, item in top.tables("kiosk"):
        t = _Table(p, where, item, ("hall", "device", "public_key"))
        hall, device, key = t.ident("hall"), t.ident("device"), _public_key(t)
        if None in (hall, device, key):
            continue
        if (hall, device) in kiosks:
            p.add(where, f"kiosk {device!r} of hall {hall!r} listed twice")
            continue
        _trust(p, where, keyring, key, device, ("kiosk",))
        kiosks.append((hall, device))
    for where, item in top.tables("service"):
        t = _Table(p, where, item, ("owner", "roles", "public_key"))
        owner, key = t.ident("owner"), _public_key(t)
        roles = item.get("roles")
        if not isinstance(roles, list) or not roles or any(r not in _ROLES for r in roles):
            p.add(t.at("roles"), f"expected a non-empty array of roles ({', '.join(_ROLES)})")
            continue
        if None in (owner, key):
            continue
        _trust(p, where, keyring, key, owner, tuple(roles))
    p.raise_if_any()
    return Inventory(keyring, tuple(kiosks))


def _public_key(t: _Table) -> bytes | None:
    text = t.text("public_key", max_len=128)
    if text is None:
        return None
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        t.p.add(t.at("public_key"), "not valid base64")
        return None
    if len(raw) != 32:
        t.p.add(t.at("public_key"), f"decodes to {len(raw)} bytes; an Ed25519 public key is 32")
        return None
    return raw


def _trust(p: _Problems, where: str, keyring: Keyring, key: bytes, owner: str,
           roles: tuple[str, ...]) -> None:
    try:
        keyring.add(key, owner=owner, roles=roles)
    except ContractError as exc:
        p.add(where, str(exc))


__all__ = ["BrokerSettings", "DEFAULT_OPS_CONFIG", "FleetSettings", "Inventory",
           "LedgerSettings", "MetricsSettings", "OpsConfig", "TlsFiles", "TrustSources",
           "load_inventory", "load_ops_config", "load_trust", "parse_ops_config"]
