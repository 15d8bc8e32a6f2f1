"""The kiosk bundle: what the field engineer's enroll command writes for one kiosk.

Written to a target directory, typically the kiosk's boot partition mounted on the CA
station (or a USB stick); the agent's install step copies it to /etc/hallkiosk::

    device.crt     the kiosk's certificate (CN = device id, OU = kiosk, O = hall)
    ca-chain.pem   issuing CA + root: to verify the broker and every signed message
    crl.pem        the issuing CA's CRL (revoked keys are refused)
    services.pem   certificates of the hall services the kiosk trusts (consumer, ops,
                   booking: trust.trusted_public_keys gives the QR appointment keys)
    agent.toml     hall, broker, board, services, and the paths above

The device key is NOT in the bundle: it was generated on the kiosk and stays there (a FAT
boot partition could not even keep it 0600); agent.toml points at it (``key_path``).
"""

from __future__ import annotations

import base64
import json
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from cryptography import x509

from edge.clock import SYSTEM_CLOCK, Clock
from edge.keys import check_private_file, public_raw
from hallkiosk.errors import ConfigError

from .ca import HallCA, check_id, load_key_file, pem_cert, utc_now, write_public_file
from .crl import CRL_WARN_DAYS, check_crl, load_crl
from .errors import ProvisioningError, TrustError
from .trust import CertInfo, TrustAnchors, load_pem_certs

CERT_FILE: Final = "device.crt"
CHAIN_FILE: Final = "ca-chain.pem"
CRL_FILE: Final = "crl.pem"
SERVICES_FILE: Final = "services.pem"
CONFIG_FILE: Final = "agent.toml"
BUNDLE_FILES: Final = (CERT_FILE, CHAIN_FILE, CRL_FILE, SERVICES_FILE, CONFIG_FILE)
#: ``verify`` warns when the kiosk certificate expires within this many days (renew then).
RENEW_WARN_DAYS: Final = 30
#: Roles whose keys the current agent config accepts in [[keys.trusted]] (edge.config).
CONFIG_TRUSTED_ROLES: Final = ("consumer", "ops")


@dataclass(frozen=True)
class KioskSettings:
    """What agent.toml says about one kiosk, besides keys and certificates.

    ``services`` are (category, printed name, board button) triples. Paths are as seen on
    the kiosk; relative ones resolve against agent.toml's directory.
    """

    device_id: str
    hall: str
    hall_name: str
    number_prefix: str
    board: str
    broker_host: str
    broker_port: int = 8883
    services: tuple[tuple[str, str, str], ...] = ()
    key_path: str = "/etc/hallkiosk/device.key"
    secret_path: str = "/etc/hallkiosk/citizen.secret"
    state_dir: str = "/var/lib/hallkiosk"
    extra_toml: str = field(default="", repr=False)


def _s(value: str) -> str:
    # A JSON string (ASCII, escaped) is a valid TOML basic string.
    return json.dumps(value)


def render_agent_toml(s: KioskSettings, trusted: Iterable[CertInfo] = (), *,
                      tls: bool = True) -> str:
    """agent.toml for the kiosk. ``tls`` adds the [tls] section (ca/cert/crl/services paths)."""
    if not s.services:
        raise ProvisioningError(f"{s.device_id}: at least one service (category, name, button)")
    lines = [
        f"# hallkiosk agent config for {s.device_id}, written by 'hallkiosk provision enroll'.",
        "# Certificates next to this file; the device key stays where keygen put it.",
        "[kiosk]",
        f"device_id = {_s(s.device_id)}",
        f"hall = {_s(s.hall)}",
        f"number_prefix = {_s(s.number_prefix)}",
        f"board = {_s(s.board)}",
        f"state_dir = {_s(s.state_dir)}",
        "",
        "[hall]",
        f"name = {_s(s.hall_name)}",
        f"citizen_hash_secret_file = {_s(s.secret_path)}",
        "",
        "[broker]",
        f"host = {_s(s.broker_host)}",
        f"port = {int(s.broker_port)}",
        "",
        "[keys]",
        f"device_key = {_s(s.key_path)}",
    ]
    for info in trusted:
        if info.role not in CONFIG_TRUSTED_ROLES:
            continue
        lines += ["[[keys.trusted]]", f"owner = {_s(info.owner)}", f"role = {_s(info.role)}",
                  f"public_key = {_s(base64.b64encode(public_raw(info.public_key)).decode())}"]
    if tls:
        lines += ["", "[tls]", f"ca_file = {_s(CHAIN_FILE)}", f"cert_file = {_s(CERT_FILE)}",
                  f"crl_file = {_s(CRL_FILE)}", f"trusted_certs = {_s(SERVICES_FILE)}"]
    for category, name, button in s.services:
        lines += ["", "[[services]]", f"category = {_s(category)}", f"name = {_s(name)}",
                  f"button = {_s(button)}"]
    text = "\n".join(lines) + "\n"
    if s.extra_toml:
        text += "\n" + s.extra_toml.strip() + "\n"
    return text


def write_bundle(target: Path, ca: HallCA, cert: x509.Certificate, settings: KioskSettings,
                 service_certs: Sequence[x509.Certificate] = (), *, tls: bool = True,
                 clock: Clock = SYSTEM_CLOCK) -> list[Path]:
    """Write the five bundle files into ``target``; returns their paths.

    ``service_certs`` are checked against the chain first: a revoked or foreign certificate
    is refused rather than handed to a kiosk as trusted.
    """
    check_id("device", settings.device_id)
    target = Path(target)
    anchors = TrustAnchors(load_pem_certs(ca.chain_pem()))
    now = utc_now(clock)
    crl = load_crl(ca.crl_path)
    infos = []
    for sc in service_certs:
        try:
            infos.append(anchors.check(sc, now=now, crl=crl))
        except TrustError as exc:
            raise ProvisioningError(f"service certificate refused for the bundle: {exc}") from None
    files = {
        CERT_FILE: pem_cert(cert),
        CHAIN_FILE: ca.chain_pem(),
        CRL_FILE: ca.crl_path.read_bytes(),
        SERVICES_FILE: b"".join(pem_cert(c) for c in service_certs),
        CONFIG_FILE: render_agent_toml(settings, infos, tls=tls).encode("utf-8"),
    }
    out = []
    for name, data in files.items():
        write_public_file(target / name, data)
        out.append(target / name)
    return out


@dataclass
class BundleReport:
    """Result of verify_bundle: ``problems`` stop the agent, ``warnings`` need action soon."""

    device_id: str | None = None
    days_left: float | None = None
    crl_days_left: float | None = None
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_bundle(target: Path, *, key_path: Path | None = None,
                  clock: Clock = SYSTEM_CLOCK) -> BundleReport:
    """Check a kiosk's files as the agent and the broker will see them.

    Chain, certificate (role kiosk, this hall, valid now, not revoked), CRL (signed,
    current), agent.toml (device id and hall match the certificate), the key (0600, the
    certificate's key) if ``key_path`` is given or agent.toml's key is readable here.
    """
    target = Path(target)
    rep = BundleReport()
    now = utc_now(clock)
    missing = [n for n in BUNDLE_FILES if not (target / n).is_file()]
    if missing:
        rep.problems.append(f"{target}: missing {', '.join(missing)}")
        return rep
    try:
        anchors = TrustAnchors(load_pem_certs(target / CHAIN_FILE))
        crl = load_crl(target / CRL_FILE)
        rep.crl_days_left = check_crl(crl, anchors.issuing, now)
        cert = load_pem_certs(target / CERT_FILE)[0]
    except ProvisioningError as exc:
        rep.problems.append(str(exc))
        return rep
    if rep.crl_days_left < 0:
        rep.problems.append(f"{target / CRL_FILE}: CRL expired {-rep.crl_days_left:.1f} days "
                            "ago; the broker refuses every client: refresh it (provision crl)")
    elif rep.crl_days_left < CRL_WARN_DAYS:
        rep.warnings.append(f"{target / CRL_FILE}: CRL expires in {rep.crl_days_left:.1f} days")
    try:
        info = anchors.check(cert, now=now, crl=crl, roles=("kiosk",))
    except TrustError as exc:
        rep.problems.append(f"{target / CERT_FILE}: {exc}")
        return rep
    rep.device_id = info.owner
    rep.days_left = (info.not_after - now).total_seconds() / 86400
    if rep.days_left < RENEW_WARN_DAYS:
        rep.warnings.append(f"{info.owner}: certificate expires in {rep.days_left:.1f} days; "
                            "renew it (provision renew)")
    services = target / SERVICES_FILE
    for sc in load_pem_certs(services) if services.stat().st_size else []:
        try:
            anchors.check(sc, now=now, crl=crl)
        except TrustError as exc:
            rep.warnings.append(f"{target / SERVICES_FILE}: {exc}")
    config_key = _check_config(target / CONFIG_FILE, info, rep)
    if key_path is None and config_key is not None and config_key.exists():
        key_path = config_key
    if key_path is not None:
        _check_key(Path(key_path), info, rep)
    return rep


def _check_config(path: Path, info: CertInfo, rep: BundleReport) -> Path | None:
    try:
        data = tomllib.loads(path.read_text("utf-8"))
        device, hall = data["kiosk"]["device_id"], data["kiosk"]["hall"]
        key = data["keys"]["device_key"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        rep.problems.append(f"{path}: unreadable agent config ({type(exc).__name__}: {exc})")
        return None
    if device != info.owner:
        rep.problems.append(f"{path}: kiosk.device_id {device!r} differs from the certificate's "
                            f"CN {info.owner!r}")
    if hall != info.hall:
        rep.problems.append(f"{path}: kiosk.hall {hall!r} differs from the certificate's hall "
                            f"{info.hall!r}")
    key_path = Path(key)
    return key_path if key_path.is_absolute() else path.parent / key_path


def _check_key(path: Path, info: CertInfo, rep: BundleReport) -> None:
    try:
        check_private_file(path, "device key")
        key = load_key_file(path, "device key")
    except (ConfigError, ProvisioningError) as exc:
        rep.problems.append(str(exc))
        return
    if public_raw(key) != public_raw(info.public_key):
        rep.problems.append(f"{path}: device key does not match the certificate of "
                            f"{info.owner!r} (re-enroll with a CSR from this key)")


def refresh_bundle(target: Path, ca: HallCA, cert: x509.Certificate) -> list[Path]:
    """After a renewal: replace the certificate, chain and CRL of an existing bundle,
    leaving agent.toml (and any local edits to it) alone."""
    target = Path(target)
    if not (target / CONFIG_FILE).is_file():
        raise ProvisioningError(f"{target}: no {CONFIG_FILE}; not a kiosk bundle")
    out = []
    for name, data in ((CERT_FILE, pem_cert(cert)), (CHAIN_FILE, ca.chain_pem()),
                       (CRL_FILE, ca.crl_path.read_bytes())):
        write_public_file(target / name, data)
        out.append(target / name)
    return out
