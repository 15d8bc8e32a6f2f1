"""Enrollment: the device key is made on the kiosk, only a CSR travels to the CA station.

Kiosk side (``hallkiosk provision keygen``): ``generate_device_key`` writes the Ed25519 key
with mode 0600 on the kiosk's own file system, ``make_csr`` writes a CSR whose subject is
``CN=<device id>`` and nothing else. The CSR is public: it can travel on the boot partition,
a USB stick or a QR code.

CA station side (``hallkiosk provision enroll``): ``read_csr`` refuses anything but a
well-formed, self-signed Ed25519 CSR whose CN obeys the contract's id rule (no MQTT
wildcard, no '/', no '$', no spaces: the CN becomes the MQTT username and a topic level in
every ACL pattern). The role, hall and validity are the CA's decision: whatever else a CSR
asks for (OU, extensions) is refused or ignored, never copied.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import NameOID

from edge.clock import SYSTEM_CLOCK, Clock
from edge.keys import write_private_file
from hallkiosk.errors import ContractError
from mqtt_topics.envelope import key_id
from mqtt_topics.topics import validate_id

from .ca import HallCA, load_cert_file, pem_cert, pem_key, utc_now, write_public_file
from .errors import EnrollmentRefused, ProvisioningError
from .inventory import Inventory, InventoryEntry

#: Largest CSR accepted (a real one is about 400 bytes).
MAX_CSR_BYTES = 8192


@dataclass(frozen=True, slots=True)
class CertRequest:
    """A CSR that passed every check: the id it asks for and the key it proves."""

    cn: str
    public_key: Ed25519PublicKey = field(repr=False)


def check_device_id(value: str) -> str:
    """The id rule for a CN, as EnrollmentRefused (names the problem, e.g. the wildcard)."""
    try:
        return validate_id("requested CN", value)
    except ContractError as exc:
        raise EnrollmentRefused(str(exc)) from None


def generate_device_key(key_path: Path, *, force: bool = False) -> Ed25519PrivateKey:
    """Make the device key ON THE KIOSK, mode 0600 from the first byte.

    Refuses to replace an existing key unless ``force``: replacing it orphans the
    certificate issued for it.
    """
    key_path = Path(key_path)
    if key_path.exists() and not force:
        raise ProvisioningError(f"{key_path}: a device key already exists; keep it (its "
                                "certificate depends on it) or pass --force to replace it")
    key = Ed25519PrivateKey.generate()
    write_private_file(key_path, pem_key(key))
    return key


def make_csr(key: Ed25519PrivateKey, device_id: str) -> bytes:
    """PEM CSR with subject ``CN=<device_id>``, signed by ``key``."""
    check_device_id(device_id)
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
           .sign(key, None))
    return csr.public_bytes(serialization.Encoding.PEM)


def write_csr(path: Path, csr_pem: bytes) -> None:
    write_public_file(Path(path), csr_pem)


def read_csr(data: bytes) -> CertRequest:
    """Parse and check a PEM CSR; EnrollmentRefused says what is wrong."""
    if not isinstance(data, (bytes, bytearray)) or len(data) > MAX_CSR_BYTES:
        raise EnrollmentRefused(f"CSR: expected PEM bytes of at most {MAX_CSR_BYTES}")
    try:
        csr = x509.load_pem_x509_csr(bytes(data))
    except ValueError as exc:
        raise EnrollmentRefused(f"CSR: not a PEM certificate request ({exc})") from None
    if not csr.is_signature_valid:
        raise EnrollmentRefused("CSR: signature does not verify (damaged or forged request)")
    key = csr.public_key()
    if not isinstance(key, Ed25519PublicKey):
        raise EnrollmentRefused(f"CSR: key is {type(key).__name__}; hall devices use Ed25519 "
                                "(the same key signs their messages)")
    attrs = list(csr.subject)
    if len(attrs) != 1 or attrs[0].oid != NameOID.COMMON_NAME:
        raise EnrollmentRefused("CSR: subject must be exactly CN=<id> (the CA sets role and "
                                "hall itself)")
    cn = attrs[0].value
    if not isinstance(cn, str):
        raise EnrollmentRefused("CSR: CN is not text")
    return CertRequest(check_device_id(cn), key)


def enroll(ca: HallCA, csr_pem: bytes, *, role: str = "kiosk", board: str | None = None,
           days: int | None = None, expect_id: str | None = None,
           clock: Clock = SYSTEM_CLOCK) -> tuple[x509.Certificate, InventoryEntry]:
    """Check a CSR, issue its certificate and record it in the hall inventory.

    ``expect_id``: the id the engineer typed, which must match the CSR's CN (a CSR picked up
    from the wrong kiosk is refused rather than silently enrolled under its own name).
    """
    req = read_csr(csr_pem)
    if expect_id is not None and req.cn != expect_id:
        raise EnrollmentRefused(f"CSR is for {req.cn!r}, not {expect_id!r}")
    now = utc_now(clock)
    with Inventory.edit(ca.inventory_path) as inv:
        _precheck(inv, req.cn, role, req.public_key)
        cert = ca.issue(req.public_key, req.cn, role, days=days, clock=clock)
        entry = inv.record(cert, req.cn, role, now=now, board=board)
    return cert, entry


def _never_revoked(inv: Inventory, ident: str, public_key: Ed25519PublicKey) -> None:
    """A key once revoked is never certified again (it may be in someone else's hands)."""
    kid = key_id(public_key)
    if any(e.kid == kid for e in inv.revoked()):
        raise EnrollmentRefused(f"{ident}: this key was revoked; make a new key on the "
                                "device (keygen --force) and a new CSR")


def _precheck(inv: Inventory, ident: str, role: str, public_key: Ed25519PublicKey) -> None:
    _never_revoked(inv, ident, public_key)
    held = inv.role_of(ident)
    if held is not None and held != role:
        raise EnrollmentRefused(f"{ident}: id already used by a {held} certificate")
    current = inv.active(ident)
    if current is not None:
        raise EnrollmentRefused(f"{ident}: already enrolled (serial {current.serial}); renew "
                                "it, or revoke it first if the device was replaced")


def issue_service(ca: HallCA, ident: str, role: str, out_dir: Path, *,
                  csr_pem: bytes | None = None, days: int | None = None,
                  clock: Clock = SYSTEM_CLOCK) -> tuple[x509.Certificate, Path | None]:
    """Issue an ops / consumer / booking / monitor certificate into ``out_dir``.

    With ``csr_pem`` the key stays wherever it was made; without, a key is generated here
    and written to ``out_dir/<id>.key`` (0600), for services installed from this station.
    Returns the certificate and the key path (None with a CSR).
    """
    if role in ("kiosk", "broker"):
        raise ProvisioningError(f"issue_service: use enroll for kiosks and issue_broker for "
                                f"the broker, not role {role!r}")
    out_dir = Path(out_dir)
    key_path: Path | None = None
    if csr_pem is not None:
        req = read_csr(csr_pem)
        if req.cn != ident:
            raise EnrollmentRefused(f"CSR is for {req.cn!r}, not {ident!r}")
        public_key = req.public_key
    else:
        check_device_id(ident)
        key = Ed25519PrivateKey.generate()
        public_key = key.public_key()
    now = utc_now(clock)
    with Inventory.edit(ca.inventory_path) as inv:
        _precheck(inv, ident, role, public_key)
        cert = ca.issue(public_key, ident, role, days=days, clock=clock)
        inv.record(cert, ident, role, now=now)
    if csr_pem is None:
        key_path = out_dir / f"{ident}.key"
        write_private_file(key_path, pem_key(key))
    write_public_file(out_dir / f"{ident}.crt", pem_cert(cert))
    write_public_file(out_dir / "chain.pem", ca.chain_pem())
    return cert, key_path


def issue_broker(ca: HallCA, out_dir: Path, *, name: str = "broker",
                 dns_names: tuple[str, ...] = (), ip_addresses: tuple[str, ...] = (),
                 days: int | None = None, clock: Clock = SYSTEM_CLOCK
                 ) -> tuple[x509.Certificate, Path]:
    """The hall broker's server certificate and key (made here: the broker is hall
    infrastructure installed from this station), written to ``out_dir`` as
    ``broker.crt`` / ``broker.key`` (0600), with ``chain.pem``."""
    out_dir = Path(out_dir)
    key = Ed25519PrivateKey.generate()
    now = utc_now(clock)
    with Inventory.edit(ca.inventory_path) as inv:
        renewal = inv.active(name) is not None and inv.role_of(name) == "broker"
        if inv.role_of(name) not in (None, "broker"):
            raise EnrollmentRefused(f"{name}: id already used by a {inv.role_of(name)} "
                                    "certificate")
        cert = ca.issue(key.public_key(), name, "broker", days=days, dns_names=dns_names,
                        ip_addresses=ip_addresses, clock=clock)
        inv.record(cert, name, "broker", now=now, renewal=renewal)
    write_private_file(out_dir / "broker.key", pem_key(key))
    write_public_file(out_dir / "broker.crt", pem_cert(cert))
    write_public_file(out_dir / "chain.pem", ca.chain_pem())
    return cert, out_dir / "broker.key"


def renew(ca: HallCA, ident: str, *, csr_pem: bytes | None = None, days: int | None = None,
          clock: Clock = SYSTEM_CLOCK) -> tuple[x509.Certificate, InventoryEntry]:
    """Issue a fresh certificate for an enrolled id, before the current one expires.

    Without a CSR the current certificate's key is certified again (the kiosk keeps its
    key; nothing has to happen on the device but installing the new certificate); with a
    CSR (same CN) the kiosk has rotated its key. A revoked id cannot be renewed.
    """
    now = utc_now(clock)
    with Inventory.edit(ca.inventory_path) as inv:
        current = inv.active(ident)
        if current is None:
            raise ProvisioningError(f"{ident}: no active certificate to renew (revoked, or "
                                    "never enrolled: enroll it)")
        if csr_pem is not None:
            req = read_csr(csr_pem)
            if req.cn != ident:
                raise EnrollmentRefused(f"CSR is for {req.cn!r}, not {ident!r}")
            public_key = req.public_key
            _never_revoked(inv, ident, public_key)
        else:
            old = load_cert_file(ca.dir / "issued" / f"{current.serial}.pem")
            public_key = old.public_key()
        cert = ca.issue(public_key, ident, current.role, days=days, clock=clock)
        entry = inv.record(cert, ident, current.role, now=now, renewal=True)
    return cert, entry
