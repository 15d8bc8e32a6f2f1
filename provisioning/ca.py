"""The hall's certificate authority: an offline root and an issuing CA, all Ed25519.

Why Ed25519 everywhere: the key that signs MQTT envelopes IS the key of the device's TLS
certificate, so one key, generated on the kiosk, proves both the connection and every
message. Measured on Debian bookworm (Mosquitto 2.0.11, OpenSSL 3.0, Python's ssl): an
all-Ed25519 chain (root, issuing CA, broker and client certificates) negotiates TLS 1.3
with mutual authentication, and Mosquitto maps the client CN to the username. The broker
config therefore pins ``tls_version tlsv1.3`` (TLS 1.2 has no Ed25519 in most stacks).

Layout of a CA station directory (``ca_dir``)::

    hall.json          hall id and defaults (no secrets)
    issuing.key        issuing CA key, 0600: signs every certificate and the CRL
    issuing.crt
    root.crt           copy of the root certificate (public)
    chain.pem          issuing.crt + root.crt: what brokers and kiosks trust
    crl.pem            current CRL of the issuing CA (crl.py)
    inventory.json     every certificate issued (inventory.py)
    issued/<serial>.pem every certificate issued, by serial (hex)

The root key lives in ``root_dir`` (``root.key``, 0600), meant to be a removable medium kept
offline: it is needed only to create or replace the issuing CA.

Certificate profile: subject ``CN=<id>, OU=<role>, O=<hall>``. The CN is the device or
service id (the MQTT username and client id on the broker, so it obeys the contract's id
rule); the OU is the role the hall grants (ROLES below); O binds the hall.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edge.clock import SYSTEM_CLOCK, Clock
from edge.keys import check_private_file, write_private_file
from hallkiosk.errors import ConfigError, ContractError
from mqtt_topics.topics import validate_id

from .errors import ProvisioningError

#: Roles a certificate can carry (its OU). kiosk: a device; ops: may send commands;
#: consumer: the ticket consumer (acks tickets); booking: the booking service's signing key;
#: monitor: read-only dashboards and audits; broker: the hall broker's server certificate.
ROLES: Final = ("kiosk", "ops", "consumer", "booking", "monitor", "broker")
#: Roles whose key signs envelopes (go into keyrings); the broker never signs. A monitor signs
#: only the alerts it publishes (contract kind ``alert``).
SIGNING_ROLES: Final = ("kiosk", "ops", "consumer", "booking", "monitor")

#: Default validity per role, in days. Kiosks renew yearly; ops certificates are short so a
#: lost laptop stops mattering soon even if nobody revokes it.
DEFAULT_DAYS: Final = {"kiosk": 365, "ops": 90, "consumer": 365, "booking": 365,
                       "monitor": 365, "broker": 365}
ROOT_DAYS: Final = 20 * 365
ISSUING_DAYS: Final = 5 * 365
#: notBefore is back-dated so a kiosk whose clock lags a little still accepts a fresh
#: certificate (a Pi without RTC keeps the last saved time until NTP syncs).
BACKDATE: Final = dt.timedelta(hours=1)


def utc_now(clock: Clock = SYSTEM_CLOCK) -> dt.datetime:
    """The clock's wall time as an aware UTC datetime, to the second."""
    return dt.datetime.fromtimestamp(int(clock.wall()), dt.timezone.utc)


def check_id(what: str, value: str) -> str:
    """The contract's id rule (no MQTT wildcards, no '/', no '$', no spaces), as a
    ProvisioningError."""
    try:
        return validate_id(what, value)
    except ContractError as exc:
        raise ProvisioningError(str(exc)) from None


def subject_for(cn: str, role: str, hall: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, hall),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
        x509.NameAttribute(NameOID.COMMON_NAME, cn),
    ])


def pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def pem_key(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def load_key_file(path: Path, what: str) -> Ed25519PrivateKey:
    """An Ed25519 PEM key file that only its owner can read (ProvisioningError otherwise)."""
    try:
        check_private_file(path, what)
    except ConfigError as exc:
        raise ProvisioningError(str(exc)) from None
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise ProvisioningError(f"{path}: {what} is not a PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ProvisioningError(f"{path}: {what} is {type(key).__name__}, expected Ed25519")
    return key


def load_cert_file(path: Path, what: str = "certificate") -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except FileNotFoundError:
        raise ProvisioningError(f"{path}: {what} not found") from None
    except ValueError as exc:
        raise ProvisioningError(f"{path}: {what} is not a PEM certificate ({exc})") from None


def write_public_file(path: Path, data: bytes) -> None:
    """Write a public file (certificate, chain, CRL, config) atomically, mode 0644."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.chmod(0o644)
    tmp.replace(path)


def _ca_cert(subject: x509.Name, issuer: x509.Name, public_key: Ed25519PublicKey,
             signer: Ed25519PrivateKey, issuer_public: Ed25519PublicKey, *, now: dt.datetime,
             days: int, path_length: int) -> x509.Certificate:
    return (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_public),
                           critical=False)
            .sign(signer, None))  # Ed25519 takes no separate hash


@dataclass(frozen=True)
class HallCA:
    """A loaded CA station directory: the issuing CA that signs certificates and CRLs."""

    hall: str
    dir: Path
    issuing_cert: x509.Certificate
    root_cert: x509.Certificate
    issuing_key: Ed25519PrivateKey = field(repr=False)

    @property
    def chain_path(self) -> Path:
        return self.dir / "chain.pem"

    @property
    def crl_path(self) -> Path:
        return self.dir / "crl.pem"

    @property
    def inventory_path(self) -> Path:
        return self.dir / "inventory.json"

    def chain_pem(self) -> bytes:
        return pem_cert(self.issuing_cert) + pem_cert(self.root_cert)

    def issue(self, public_key: Ed25519PublicKey, cn: str, role: str, *, days: int | None = None,
              dns_names: tuple[str, ...] = (), ip_addresses: tuple[str, ...] = (),
              clock: Clock = SYSTEM_CLOCK) -> x509.Certificate:
        """Sign a leaf certificate for ``cn`` with ``role``; the caller records it.

        ``dns_names``/``ip_addresses`` only for the broker (its server name). Raises
        ProvisioningError for a bad id, role, key type or validity.
        """
        check_id("certificate CN", cn)
        if role not in ROLES:
            raise ProvisioningError(f"role {role!r}: expected one of {', '.join(ROLES)}")
        if not isinstance(public_key, Ed25519PublicKey):
            raise ProvisioningError(f"{cn}: expected an Ed25519 public key, got "
                                    f"{type(public_key).__name__}")
        days = DEFAULT_DAYS[role] if days is None else days
        if not 1 <= days <= 3 * 365:
            raise ProvisioningError(f"{cn}: validity of {days} days outside 1..{3 * 365}")
        now = utc_now(clock)
        not_after = min(now + dt.timedelta(days=days), self.issuing_cert.not_valid_after_utc)
        server = role == "broker"
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (x509.CertificateBuilder()
                   .subject_name(subject_for(cn, role, self.hall))
                   .issuer_name(self.issuing_cert.subject).public_key(public_key)
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - BACKDATE).not_valid_after(not_after)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                                key_encipherment=False, data_encipherment=False,
                                                key_agreement=False, key_cert_sign=False,
                                                crl_sign=False, encipher_only=False,
                                                decipher_only=False), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key),
                                  critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                       self.issuing_cert.public_key()), critical=False))
        if server:
            names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns_names]
            try:
                names += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
            except ValueError as exc:
                raise ProvisioningError(f"{cn}: {exc}") from None
            if not names:
                raise ProvisioningError(f"{cn}: a broker certificate needs a DNS name or an IP "
                                        "address (the name kiosks connect to)")
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        elif dns_names or ip_addresses:
            raise ProvisioningError(f"{cn}: only a broker certificate carries server names")
        cert = builder.sign(self.issuing_key, None)
        write_public_file(self.dir / "issued" / f"{cert.serial_number:x}.pem", pem_cert(cert))
        return cert


def create_hall_ca(ca_dir: Path, hall: str, *, root_dir: Path | None = None,
                   clock: Clock = SYSTEM_CLOCK) -> HallCA:
    """Create the root (key into ``root_dir``, default ``ca_dir/root``) and the issuing CA.

    Refuses to overwrite an existing CA. Writes an empty CRL and inventory, so brokers
    (``crlfile``) and kiosks can load them from the first day.
    """
    from .crl import refresh_crl
    from .inventory import Inventory

    ca_dir = Path(ca_dir)
    check_id("hall", hall)
    root_dir = Path(root_dir) if root_dir is not None else ca_dir / "root"
    for existing in (ca_dir / "issuing.key", ca_dir / "hall.json", root_dir / "root.key"):
        if existing.exists():
            raise ProvisioningError(f"{existing}: a CA already exists here; refusing to "
                                    "overwrite it")
    now = utc_now(clock)
    root_key = Ed25519PrivateKey.generate()
    root_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, hall),
                           x509.NameAttribute(NameOID.COMMON_NAME, f"hallkiosk {hall} root CA")])
    root = _ca_cert(root_name, root_name, root_key.public_key(), root_key, root_key.public_key(),
                    now=now, days=ROOT_DAYS, path_length=1)
    issuing_key = Ed25519PrivateKey.generate()
    issuing_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, hall),
                              x509.NameAttribute(NameOID.COMMON_NAME,
                                                 f"hallkiosk {hall} issuing CA")])
    issuing = _ca_cert(issuing_name, root_name, issuing_key.public_key(), root_key,
                       root_key.public_key(), now=now, days=ISSUING_DAYS, path_length=0)

    write_private_file(root_dir / "root.key", pem_key(root_key))
    write_public_file(root_dir / "root.crt", pem_cert(root))
    write_private_file(ca_dir / "issuing.key", pem_key(issuing_key))
    write_public_file(ca_dir / "issuing.crt", pem_cert(issuing))
    write_public_file(ca_dir / "root.crt", pem_cert(root))
    write_public_file(ca_dir / "chain.pem", pem_cert(issuing) + pem_cert(root))
    write_public_file(ca_dir / "hall.json",
                      (json.dumps({"version": 1, "hall": hall}, indent=2) + "\n").encode())
    ca = HallCA(hall, ca_dir, issuing, root, issuing_key)
    Inventory.create(ca.inventory_path, hall)
    refresh_crl(ca, clock=clock)
    return ca


def load_hall_ca(ca_dir: Path) -> HallCA:
    """Load a CA station directory made by create_hall_ca (ProvisioningError if unusable)."""
    ca_dir = Path(ca_dir)
    try:
        meta = json.loads((ca_dir / "hall.json").read_text("utf-8"))
        hall = meta["hall"]
    except FileNotFoundError:
        raise ProvisioningError(f"{ca_dir}: not a CA directory (no hall.json); run "
                                "'hallkiosk provision init-ca' first") from None
    except (ValueError, KeyError, TypeError):
        raise ProvisioningError(f"{ca_dir / 'hall.json'}: unreadable") from None
    check_id("hall", hall)
    key = load_key_file(ca_dir / "issuing.key", "issuing CA key")
    issuing = load_cert_file(ca_dir / "issuing.crt", "issuing CA certificate")
    root = load_cert_file(ca_dir / "root.crt", "root CA certificate")
    if pem_key_public(key) != issuing.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw):
        raise ProvisioningError(f"{ca_dir}: issuing.key does not match issuing.crt")
    return HallCA(hall, ca_dir, issuing, root, key)


def pem_key_public(key: Ed25519PrivateKey) -> bytes:
    """Raw 32 bytes of the public half (to compare keys with certificates)."""
    return key.public_key().public_bytes(serialization.Encoding.Raw,
                                         serialization.PublicFormat.Raw)
