"""The hall inventory: every certificate the CA station issued, and what became of it.

One JSON file next to the CA (``ca_dir/inventory.json``), rewritten atomically under an
exclusive lock (``fcntl.flock`` on ``inventory.json.lock``) so two engineers' commands on the
same station cannot lose each other's entries. It holds ids, roles, serials, key ids,
fingerprints and dates: no personal data and no secrets.

Rules it enforces, because the broker and the contract rely on them:
- one id, one role: device ids and service ids share the MQTT username namespace, so
  ``ops-1`` can never also be a kiosk;
- one active certificate per id: enrolling an id that already has one is refused (renew
  it, or revoke it first when a kiosk is replaced);
- revoking an id revokes every certificate of it that has not expired, superseded ones
  included (a superseded certificate still passes TLS until its notAfter).
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mqtt_topics.envelope import key_id

from .errors import EnrollmentRefused, ProvisioningError

INVENTORY_VERSION: Final = 1
STATUSES: Final = ("active", "superseded", "revoked")
#: RFC 5280 reason names accepted by ``revoke``.
REASONS: Final = ("unspecified", "key_compromise", "affiliation_changed", "superseded",
                  "cessation_of_operation")


@dataclass(frozen=True, slots=True)
class InventoryEntry:
    """One issued certificate. Dates are ISO 8601 UTC strings; ``serial`` is lowercase hex."""

    id: str
    role: str
    serial: str
    kid: str
    fingerprint: str
    not_before: str
    not_after: str
    status: str
    issued_at: str
    board: str | None = None
    revoked_at: str | None = None
    reason: str | None = None

    @property
    def not_after_dt(self) -> dt.datetime:
        return dt.datetime.fromisoformat(self.not_after)

    def days_left(self, now: dt.datetime) -> float:
        return (self.not_after_dt - now).total_seconds() / 86400


def cert_facts(cert: x509.Certificate) -> tuple[str, str, str]:
    """(serial hex, kid of its Ed25519 key, sha256 fingerprint hex) of a certificate."""
    raw = cert.public_key().public_bytes(serialization.Encoding.Raw,
                                         serialization.PublicFormat.Raw)
    return (f"{cert.serial_number:x}", key_id(raw),
            hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest())


class Inventory:
    """The loaded inventory. Change it only inside ``Inventory.edit(path)``."""

    def __init__(self, path: Path, hall: str, entries: list[InventoryEntry],
                 crl_number: int) -> None:
        self.path = path
        self.hall = hall
        self._entries = entries
        self.crl_number = crl_number

    # -- files ----------------------------------------------------------------------
    @classmethod
    def create(cls, path: Path, hall: str) -> Inventory:
        path = Path(path)
        if path.exists():
            raise ProvisioningError(f"{path}: inventory already exists")
        inv = cls(path, hall, [], 0)
        inv._save()
        return inv

    @classmethod
    def load(cls, path: Path) -> Inventory:
        path = Path(path)
        try:
            data = json.loads(path.read_text("utf-8"))
        except FileNotFoundError:
            raise ProvisioningError(f"{path}: inventory not found") from None
        except ValueError as exc:
            raise ProvisioningError(f"{path}: inventory is not valid JSON ({exc})") from None
        try:
            if data["version"] != INVENTORY_VERSION:
                raise ProvisioningError(f"{path}: inventory version {data['version']!r}, "
                                        f"this tool reads {INVENTORY_VERSION}")
            entries = [InventoryEntry(**e) for e in data["entries"]]
            return cls(path, data["hall"], entries, int(data["crl_number"]))
        except (KeyError, TypeError) as exc:
            raise ProvisioningError(f"{path}: inventory damaged ({exc})") from None

    @classmethod
    @contextmanager
    def edit(cls, path: Path) -> Iterator[Inventory]:
        """Lock, load, yield, and save if the block did not raise."""
        path = Path(path)
        lock = path.with_name(path.name + ".lock")
        with open(lock, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                inv = cls.load(path)
                yield inv
                inv._save()
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _save(self) -> None:
        data = {"version": INVENTORY_VERSION, "hall": self.hall, "crl_number": self.crl_number,
                "entries": [asdict(e) for e in self._entries]}
        text = json.dumps(data, indent=2, sort_keys=True) + "\n"
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, text.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)

    # -- queries ------------------------------------------------------------------------
    def entries(self) -> list[InventoryEntry]:
        return list(self._entries)

    def active(self, ident: str) -> InventoryEntry | None:
        for e in reversed(self._entries):
            if e.id == ident and e.status == "active":
                return e
        return None

    def role_of(self, ident: str) -> str | None:
        for e in self._entries:
            if e.id == ident:
                return e.role
        return None

    def by_serial(self, serial: str) -> InventoryEntry | None:
        for e in self._entries:
            if e.serial == serial:
                return e
        return None

    def revoked(self) -> list[InventoryEntry]:
        return [e for e in self._entries if e.status == "revoked"]

    def due(self, now: dt.datetime, within_days: float) -> list[InventoryEntry]:
        """Active certificates that expire within ``within_days`` of ``now`` (or already did)."""
        return [e for e in self._entries
                if e.status == "active" and e.days_left(now) <= within_days]

    def usable(self, now: dt.datetime, roles: tuple[str, ...] | None = None
               ) -> list[InventoryEntry]:
        """Unrevoked, unexpired certificates (superseded ones too: they stay valid, and a
        kiosk may not have installed its renewed certificate yet), optionally by role."""
        return [e for e in self._entries if e.status != "revoked" and e.not_after_dt > now
                and (roles is None or e.role in roles)]

    def ids(self, role: str | None = None) -> list[str]:
        """Ids that hold an active certificate, optionally of one role, in enrollment order."""
        seen: list[str] = []
        for e in self._entries:
            if e.status == "active" and (role is None or e.role == role) and e.id not in seen:
                seen.append(e.id)
        return seen

    # -- changes ----------------------------------------------------------------------------
    def record(self, cert: x509.Certificate, ident: str, role: str, *, now: dt.datetime,
               board: str | None = None, renewal: bool = False) -> InventoryEntry:
        """Add an issued certificate. A renewal supersedes the id's active certificate."""
        held = self.role_of(ident)
        if held is not None and held != role:
            raise EnrollmentRefused(f"{ident}: id already used by a {held} certificate; ids "
                                    "are one namespace on the broker, pick another")
        current = self.active(ident)
        if current is not None and not renewal:
            raise EnrollmentRefused(f"{ident}: already enrolled (serial {current.serial}, "
                                    f"valid to {current.not_after}); renew it, or revoke it "
                                    "first if the device was replaced")
        if renewal and current is None:
            raise ProvisioningError(f"{ident}: no active certificate to renew")
        if current is not None:
            self._replace(current, status="superseded")
            board = board or current.board
        serial, kid, fingerprint = cert_facts(cert)
        entry = InventoryEntry(ident, role, serial, kid, fingerprint,
                               cert.not_valid_before_utc.isoformat(),
                               cert.not_valid_after_utc.isoformat(), "active",
                               now.isoformat(), board)
        self._entries.append(entry)
        return entry

    def revoke(self, ident: str, *, now: dt.datetime,
               reason: str = "unspecified") -> list[InventoryEntry]:
        """Revoke every unexpired certificate of ``ident``; returns those newly revoked."""
        if reason not in REASONS:
            raise ProvisioningError(f"revocation reason {reason!r}: expected one of "
                                    + ", ".join(REASONS))
        targets = [e for e in self._entries if e.id == ident and e.status != "revoked"
                   and e.not_after_dt > now]
        if not targets and self.role_of(ident) is None:
            raise ProvisioningError(f"{ident}: not in the inventory of hall {self.hall}")
        out = []
        for e in targets:
            out.append(self._replace(e, status="revoked", revoked_at=now.isoformat(),
                                     reason=reason))
        return out

    def next_crl_number(self) -> int:
        self.crl_number += 1
        return self.crl_number

    def _replace(self, entry: InventoryEntry, **changes: object) -> InventoryEntry:
        new = replace(entry, **changes)
        self._entries[self._entries.index(entry)] = new
        return new
