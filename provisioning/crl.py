"""Revocation: the issuing CA's CRL, built from the inventory.

Who reads the CRL: the broker (``crlfile``: a revoked certificate fails its next TLS
handshake) and every verifier of envelopes (trust.py drops a revoked certificate's key from
the keyring), so a revoked kiosk can neither connect nor be believed.

Two facts measured on Mosquitto 2.0.11 that shape the procedure (docs/provisioning.md):
- the broker re-reads ``crlfile`` on SIGHUP, but a session that is already open stays open;
  so after writing a CRL that revokes someone, the broker is restarted gracefully
  (persistence keeps every session and queued message), every client reconnects, and the
  revoked one fails the handshake;
- with ``crlfile`` set, OpenSSL checks the CRL of the client certificate's issuer and
  refuses EVERY client when that CRL is missing or past its nextUpdate. A CRL is therefore
  written from the first day (empty) and must be refreshed before ``CRL_DAYS`` run out;
  ``hallkiosk provision verify`` and ``list`` warn when fewer than ``CRL_WARN_DAYS`` remain.
"""

from __future__ import annotations

import datetime as dt
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from edge.clock import SYSTEM_CLOCK, Clock

from .ca import HallCA, utc_now, write_public_file
from .errors import ProvisioningError, TrustError
from .inventory import Inventory, InventoryEntry

#: Days from one CRL to its nextUpdate.
CRL_DAYS: Final = 60
#: verify/list warn when the CRL expires within this many days.
CRL_WARN_DAYS: Final = 14

_REASON_FLAGS: Final = {
    "unspecified": x509.ReasonFlags.unspecified,
    "key_compromise": x509.ReasonFlags.key_compromise,
    "affiliation_changed": x509.ReasonFlags.affiliation_changed,
    "superseded": x509.ReasonFlags.superseded,
    "cessation_of_operation": x509.ReasonFlags.cessation_of_operation,
}


def build_crl(ca: HallCA, revoked: Iterable[InventoryEntry], *, number: int, now: dt.datetime,
              days: int = CRL_DAYS) -> x509.CertificateRevocationList:
    """A CRL signed by the issuing CA listing ``revoked`` (unexpired ones; expired
    certificates fail validation anyway, so RFC 5280 lets them drop off)."""
    builder = (x509.CertificateRevocationListBuilder()
               .issuer_name(ca.issuing_cert.subject)
               .last_update(now - dt.timedelta(minutes=5))
               .next_update(now + dt.timedelta(days=days))
               .add_extension(x509.CRLNumber(number), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   ca.issuing_cert.public_key()), critical=False))
    for e in revoked:
        if e.not_after_dt <= now:
            continue
        item = (x509.RevokedCertificateBuilder()
                .serial_number(int(e.serial, 16))
                .revocation_date(dt.datetime.fromisoformat(e.revoked_at or now.isoformat())))
        if e.reason and e.reason != "unspecified":
            item = item.add_extension(x509.CRLReason(_REASON_FLAGS[e.reason]), critical=False)
        builder = builder.add_revoked_certificate(item.build())
    return builder.sign(ca.issuing_key, None)


def pem_crl(crl: x509.CertificateRevocationList) -> bytes:
    return crl.public_bytes(serialization.Encoding.PEM)


def load_crl(path: Path) -> x509.CertificateRevocationList:
    try:
        return x509.load_pem_x509_crl(Path(path).read_bytes())
    except FileNotFoundError:
        raise ProvisioningError(f"{path}: CRL not found") from None
    except ValueError as exc:
        raise ProvisioningError(f"{path}: not a PEM CRL ({exc})") from None


def check_crl(crl: x509.CertificateRevocationList, issuing: x509.Certificate,
              now: dt.datetime) -> float:
    """Raise TrustError unless ``crl`` is signed by ``issuing``; return days to nextUpdate
    (negative when it has expired: brokers then refuse every client)."""
    if crl.issuer != issuing.subject or not crl.is_signature_valid(issuing.public_key()):
        raise TrustError("CRL is not signed by the hall's issuing CA")
    next_update = crl.next_update_utc
    if next_update is None:
        raise TrustError("CRL has no nextUpdate")
    return (next_update - now).total_seconds() / 86400


def _publish(ca: HallCA, crl: x509.CertificateRevocationList,
             copy_to: Iterable[Path]) -> None:
    write_public_file(ca.crl_path, pem_crl(crl))
    for dest in copy_to:
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.copyfile(ca.crl_path, tmp)
        tmp.chmod(0o644)
        tmp.replace(dest)


def refresh_crl(ca: HallCA, *, clock: Clock = SYSTEM_CLOCK, days: int = CRL_DAYS,
                copy_to: Iterable[Path] = ()) -> x509.CertificateRevocationList:
    """Re-sign the CRL from the inventory (new number, new nextUpdate), write it to
    ``ca_dir/crl.pem`` and copy it to each of ``copy_to`` (e.g. the broker's crlfile)."""
    now = utc_now(clock)
    with Inventory.edit(ca.inventory_path) as inv:
        crl = build_crl(ca, inv.revoked(), number=inv.next_crl_number(), now=now, days=days)
        _publish(ca, crl, copy_to)
    return crl


def revoke(ca: HallCA, ident: str, *, reason: str = "unspecified",
           clock: Clock = SYSTEM_CLOCK, days: int = CRL_DAYS,
           copy_to: Iterable[Path] = ()) -> list[InventoryEntry]:
    """Revoke every unexpired certificate of ``ident`` and publish the new CRL.

    The caller then forces open sessions off (restart the broker: see the module docstring).
    Returns the entries revoked now (empty if they already were).
    """
    now = utc_now(clock)
    with Inventory.edit(ca.inventory_path) as inv:
        newly = inv.revoke(ident, now=now, reason=reason)
        crl = build_crl(ca, inv.revoked(), number=inv.next_crl_number(), now=now, days=days)
        _publish(ca, crl, copy_to)
    return newly


def revoked_serials(crl: x509.CertificateRevocationList) -> frozenset[int]:
    return frozenset(r.serial_number for r in crl)
