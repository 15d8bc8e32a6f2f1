"""Trust from certificates: which keys the hall believes, and for which role.

A receiver of envelopes (kiosk, ticket consumer, ops console) builds its keyring from the
hall's CA chain, the certificates of the senders it listens to, and the current CRL::

    keyring = keyring_from_certs(chain_pem_path, [services_pem_path], crl_pem_path)

Each certificate is checked against the chain by hand (issuer name, Ed25519 signature,
basicConstraints, validity, then the CRL): cryptography's x509.verification policy is the
web PKI's and does not take Ed25519 chains, and nothing here needs hostname rules. The
keyring entry's owner is the CN and its role the OU (ca.py's profile); the kid is the
contract's key id of the certificate's Ed25519 key, which is the key that signs envelopes.

A revoked certificate's key never enters a keyring built with the CRL, and ``apply_crl``
removes it from a keyring already in use once a newer CRL is loaded.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.x509.oid import NameOID

from edge.clock import SYSTEM_CLOCK, Clock
from hallkiosk.errors import ContractError
from mqtt_topics.envelope import Keyring, key_id
from mqtt_topics.topics import validate_id

from .ca import ROLES, SIGNING_ROLES, utc_now
from .crl import check_crl, load_crl, revoked_serials
from .errors import ProvisioningError, TrustError

log = logging.getLogger("hallkiosk.trust")

CertSource = x509.Certificate | Path | str | bytes
CrlSource = x509.CertificateRevocationList | Path | str | None


@dataclass(frozen=True, slots=True)
class CertInfo:
    """What a verified certificate says: who (owner = CN), role (OU), hall (O), key."""

    owner: str
    role: str
    hall: str
    serial: int
    kid: str
    not_after: dt.datetime
    public_key: Ed25519PublicKey = field(repr=False, compare=False)


def load_pem_certs(source: CertSource) -> list[x509.Certificate]:
    """Certificates from a Certificate, PEM bytes, or a PEM file path (one or several)."""
    if isinstance(source, x509.Certificate):
        return [source]
    if isinstance(source, (str, Path)):
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            raise ProvisioningError(f"{source}: cannot read certificates "
                                    f"({exc.strerror})") from None
        where = str(source)
    else:
        data, where = bytes(source), "PEM data"
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise ProvisioningError(f"{where}: no PEM certificate ({exc})") from None
    return certs


def _one(name: x509.Name, oid: x509.ObjectIdentifier, what: str) -> str:
    values = name.get_attributes_for_oid(oid)
    if len(values) != 1 or not isinstance(values[0].value, str):
        raise TrustError(f"certificate subject must hold exactly one {what}")
    return values[0].value


def subject_fields(cert: x509.Certificate) -> tuple[str, str, str]:
    """(CN, OU, O) of a hall certificate; TrustError unless each appears exactly once."""
    name = cert.subject
    return (_one(name, NameOID.COMMON_NAME, "CN"),
            _one(name, NameOID.ORGANIZATIONAL_UNIT_NAME, "OU (role)"),
            _one(name, NameOID.ORGANIZATION_NAME, "O (hall)"))


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _check_time(cert: x509.Certificate, now: dt.datetime, what: str) -> None:
    if now < cert.not_valid_before_utc:
        raise TrustError(f"{what} not valid before {cert.not_valid_before_utc.isoformat()}")
    if now > cert.not_valid_after_utc:
        raise TrustError(f"{what} expired on {cert.not_valid_after_utc.isoformat()}")


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate, what: str) -> None:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        raise TrustError(f"{what} is not signed by {issuer.subject.rfc4514_string()}") from None


class TrustAnchors:
    """The hall's chain: a self-signed root and the issuing CA it signed."""

    def __init__(self, chain: Iterable[x509.Certificate]) -> None:
        certs = list(chain)
        roots = [c for c in certs if c.issuer == c.subject and _is_ca(c)]
        if len(roots) != 1:
            raise TrustError("CA chain must hold exactly one self-signed root")
        root = roots[0]
        issuing = [c for c in certs if c is not root and c.issuer == root.subject and _is_ca(c)]
        if len(issuing) != 1:
            raise TrustError("CA chain must hold exactly one issuing CA under the root")
        _issued_by(root, root, "root CA")
        _issued_by(issuing[0], root, "issuing CA")
        self.root = root
        self.issuing = issuing[0]
        self.hall = _one(root.subject, NameOID.ORGANIZATION_NAME, "O (hall)")

    @classmethod
    def load(cls, source: CertSource | TrustAnchors) -> TrustAnchors:
        if isinstance(source, TrustAnchors):
            return source
        return cls(load_pem_certs(source))

    def check(self, cert: x509.Certificate, *, now: dt.datetime,
              crl: x509.CertificateRevocationList | None = None,
              roles: Iterable[str] | None = None) -> CertInfo:
        """Verify one leaf certificate of this hall; TrustError says why it is refused."""
        for ca, what in ((self.root, "root CA"), (self.issuing, "issuing CA")):
            _check_time(ca, now, what)
        cn = "?"
        try:
            cn, role, hall = subject_fields(cert)
            validate_id("certificate CN", cn)
        except ContractError as exc:
            raise TrustError(str(exc)) from None
        who = f"certificate of {cn!r} (serial {cert.serial_number:x})"
        if _is_ca(cert):
            raise TrustError(f"{who} is a CA certificate, not a leaf")
        _issued_by(cert, self.issuing, who)
        _check_time(cert, now, who)
        if hall != self.hall:
            raise TrustError(f"{who} belongs to hall {hall!r}, not {self.hall!r}")
        if role not in ROLES:
            raise TrustError(f"{who} has unknown role {role!r}")
        if roles is not None and role not in set(roles):
            raise TrustError(f"{who} has role {role!r}, not one of {', '.join(roles)}")
        key = cert.public_key()
        if not isinstance(key, Ed25519PublicKey):
            raise TrustError(f"{who} holds a {type(key).__name__}, expected Ed25519")
        if crl is not None:
            check_crl(crl, self.issuing, now)
            if cert.serial_number in revoked_serials(crl):
                raise TrustError(f"{who} is revoked")
        return CertInfo(cn, role, hall, cert.serial_number, key_id(key),
                        cert.not_valid_after_utc, key)


def _load_crl(crl: CrlSource) -> x509.CertificateRevocationList | None:
    if crl is None or isinstance(crl, x509.CertificateRevocationList):
        return crl
    return load_crl(Path(crl))


def _log_reject(cert: x509.Certificate, reason: str) -> None:
    log.warning("certificate not trusted: %s", reason)


def keyring_from_certs(ca_chain: CertSource | TrustAnchors, certs: Iterable[CertSource],
                       crl: CrlSource = None, *, clock: Clock = SYSTEM_CLOCK,
                       roles: Iterable[str] = SIGNING_ROLES, keyring: Keyring | None = None,
                       on_reject: Callable[[x509.Certificate, str], None] = _log_reject
                       ) -> Keyring:
    """A Keyring (owner = CN, roles = {OU}) of every certificate in ``certs`` that chains to
    ``ca_chain``, is valid now by ``clock``, has one of ``roles`` and is not on ``crl``.

    Certificates that fail are left out and reported to ``on_reject(cert, reason)`` (logged
    by default): one bad file must not stop a kiosk from trusting the rest. A CRL that is
    not signed by the hall's issuing CA raises TrustError (the whole trust would be wrong).
    """
    anchors = TrustAnchors.load(ca_chain)
    now = utc_now(clock)
    crl_obj = _load_crl(crl)
    if crl_obj is not None:
        days = check_crl(crl_obj, anchors.issuing, now)
        if days < 0:
            log.warning("CRL expired %.1f days ago: revocations still applied; refresh it", -days)
    roles = tuple(roles)
    ring = keyring if keyring is not None else Keyring()
    for source in certs:
        for cert in load_pem_certs(source):
            try:
                info = anchors.check(cert, now=now, crl=None, roles=roles)
                if crl_obj is not None and cert.serial_number in revoked_serials(crl_obj):
                    raise TrustError(f"certificate of {info.owner!r} (serial "
                                     f"{info.serial:x}) is revoked")
                ring.add(info.public_key, owner=info.owner, roles=(info.role,), hall=info.hall)
            except (TrustError, ContractError) as exc:
                on_reject(cert, str(exc))
    return ring


def apply_crl(keyring: Keyring, ca_chain: CertSource | TrustAnchors,
              certs: Iterable[CertSource], crl: CrlSource, *,
              clock: Clock = SYSTEM_CLOCK) -> list[str]:
    """Remove from ``keyring`` the keys of ``certs`` that ``crl`` revokes; return their kids.

    Call it whenever a newer CRL arrives (the keyring may be in use: Keyring swaps its
    dict on write, so readers never see a half-updated ring).
    """
    anchors = TrustAnchors.load(ca_chain)
    crl_obj = _load_crl(crl)
    if crl_obj is None:
        return []
    check_crl(crl_obj, anchors.issuing, utc_now(clock))
    serials = revoked_serials(crl_obj)
    removed = []
    for source in certs:
        for cert in load_pem_certs(source):
            if cert.serial_number in serials:
                key = cert.public_key()
                if isinstance(key, Ed25519PublicKey):
                    kid = key_id(key)
                    if kid in keyring:
                        keyring.remove(kid)
                        removed.append(kid)
    return removed


def trusted_public_keys(ca_chain: CertSource | TrustAnchors, certs: Iterable[CertSource],
                        crl: CrlSource = None, *, role: str,
                        clock: Clock = SYSTEM_CLOCK) -> list[Ed25519PublicKey]:
    """The Ed25519 keys of the valid, unrevoked certificates of one ``role``: e.g. the
    booking service's keys for edge.qr.codes.trusted_keys (appointment QR codes)."""
    ring = keyring_from_certs(ca_chain, certs, crl, clock=clock, roles=(role,))
    return [ring.get(kid).public_key for kid in ring]
