"""Errors of the provisioning tools (CA station and kiosk enrollment).

Messages name the file and the device or service id, never a key: whoever reads the field
engineer's terminal must be able to act on the message without the source.
"""

from __future__ import annotations

from hallkiosk.errors import HallkioskError


class ProvisioningError(HallkioskError, ValueError):
    """A CA directory, certificate, CRL, bundle or inventory that cannot be used."""


class EnrollmentRefused(ProvisioningError):
    """A certificate request refused (bad CN, bad signature, wrong key type, id taken)."""


class TrustError(ProvisioningError):
    """A certificate that does not chain to the hall's CA, has expired, or is revoked."""
