"""The kiosk's mTLS material, checked before the agent connects.

``check_tls(ca_file, cert_file, key_file, crl_file=..., device_id=...)`` refuses to start
(ConfigError naming the file and the fix) when:
- the key file is readable by group or others (chmod 600), or is not Ed25519;
- the certificate is not the key's, not this device's (CN), not a kiosk's, not signed by
  the hall's chain, expired or not yet valid, or revoked by the CRL it was given.
It returns the TlsSettings for edge.mqtt.MqttLink and the days left on the certificate,
which the agent reports (and logs a warning below ``warn_days``: renew before expiry).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from edge.clock import SYSTEM_CLOCK, Clock
from edge.keys import load_private_key, public_raw
from edge.mqtt import TlsSettings
from hallkiosk.errors import ConfigError

log = logging.getLogger("hallkiosk.tls")

#: Below this many days left the agent logs a renewal warning at every start.
DEFAULT_WARN_DAYS = 30


@dataclass(frozen=True, slots=True)
class CheckedTls:
    settings: TlsSettings
    owner: str
    days_left: float


def check_tls(ca_file: Path, cert_file: Path, key_file: Path, *, crl_file: Path | None = None,
              device_id: str | None = None, role: str = "kiosk",
              warn_days: float = DEFAULT_WARN_DAYS, clock: Clock = SYSTEM_CLOCK) -> CheckedTls:
    """Check the files as the broker will, before connecting; ConfigError says what to fix."""
    # Imported here: provisioning pulls in x509 parsing the agent needs only at start.
    from provisioning.ca import utc_now
    from provisioning.crl import load_crl
    from provisioning.errors import ProvisioningError
    from provisioning.trust import TrustAnchors, load_pem_certs

    key = load_private_key(Path(key_file))   # refuses 0644 keys and non-Ed25519 keys
    try:
        anchors = TrustAnchors(load_pem_certs(Path(ca_file)))
        certs = load_pem_certs(Path(cert_file))
        crl = load_crl(Path(crl_file)) if crl_file is not None else None
        now = utc_now(clock)
        info = anchors.check(certs[0], now=now, crl=crl, roles=(role,))
    except ProvisioningError as exc:
        raise ConfigError(f"{cert_file}: {exc}") from None
    if public_raw(key) != public_raw(info.public_key):
        raise ConfigError(f"{cert_file}: certificate is not for the key in {key_file} "
                          "(re-enroll: hallkiosk provision keygen, then enroll)")
    if device_id is not None and info.owner != device_id:
        raise ConfigError(f"{cert_file}: certificate is for {info.owner!r}, this kiosk is "
                          f"{device_id!r}")
    days_left = (info.not_after - now).total_seconds() / 86400
    if days_left < warn_days:
        log.warning("device certificate expires in %.1f days: renew it (hallkiosk provision "
                    "renew %s)", days_left, info.owner)
    return CheckedTls(TlsSettings(str(ca_file), str(cert_file), str(key_file)), info.owner,
                      days_left)
