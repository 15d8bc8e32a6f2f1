"""A whole hall's PKI made with the real enrollment flow, for the emulator, tests and demo.

``provision_emulated_hall(workdir, devices)`` runs exactly what field engineers run (init
the CA, keygen + CSR "on" each kiosk, enroll, issue the service certificates and the
broker's, generate the broker config) into one work dir, and returns the paths and keys
the emulated kiosks, the ticket consumer and the ops console need. Nothing here hand-makes
a certificate.

Layout under ``workdir``::

    ca/                 the CA station (ca.py layout); ca/root/ holds the root key
    broker/             broker.crt/.key, chain.pem, crl.pem, acl, hallkiosk.conf
    kiosks/<id>/        device.key (made "on the kiosk") + the bundle files
    services/<id>/      <id>.key, <id>.crt, chain.pem
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge.clock import SYSTEM_CLOCK, Clock
from edge.mqtt import TlsSettings
from mqtt_topics.envelope import Keyring

from .brokerconf import write_broker_config
from .bundle import CERT_FILE, CHAIN_FILE, CRL_FILE, SERVICES_FILE, KioskSettings, write_bundle
from .ca import SIGNING_ROLES, HallCA, create_hall_ca, load_key_file, pem_cert, write_public_file
from .crl import revoke as revoke_id
from .enroll import enroll, generate_device_key, issue_broker, issue_service, make_csr
from .inventory import InventoryEntry
from .trust import keyring_from_certs

DEFAULT_SERVICES = (("ledger", "consumer"), ("ops", "ops"), ("auditor", "monitor"))


@dataclass(frozen=True)
class Identity:
    """One enrolled party: its id, role, key file and certificate file (paths absolute)."""

    id: str
    role: str
    dir: Path
    key_path: Path
    cert_path: Path
    key: Ed25519PrivateKey = field(repr=False, compare=False)


@dataclass
class HallMaterials:
    hall: str
    dir: Path
    ca: HallCA
    broker_dir: Path
    broker_conf_text: str
    chain_file: Path
    crl_file: Path
    identities: dict[str, Identity] = field(default_factory=dict)
    clock: Clock = field(default=SYSTEM_CLOCK, repr=False)

    def __getitem__(self, ident: str) -> Identity:
        return self.identities[ident]

    def tls_for(self, ident: str) -> TlsSettings:
        """mTLS settings for edge.mqtt.MqttLink as ``ident``."""
        me = self.identities[ident]
        return TlsSettings(str(self.chain_file), str(me.cert_path), str(me.key_path))

    def certs(self, roles: Iterable[str] | None = None) -> list[x509.Certificate]:
        wanted = None if roles is None else set(roles)
        return [x509.load_pem_x509_certificate(i.cert_path.read_bytes())
                for i in self.identities.values() if wanted is None or i.role in wanted]

    def keyring(self, roles: Iterable[str] = SIGNING_ROLES) -> Keyring:
        """A keyring of every identity's certificate with one of ``roles``, CRL applied."""
        return keyring_from_certs(self.chain_file, self.certs(roles), self.crl_file,
                                  clock=self.clock, roles=roles)

    def add_kiosk(self, device_id: str, settings: KioskSettings | None = None) -> Identity:
        """Keygen + CSR in the kiosk's dir, enroll at the CA, write its bundle there.

        Without ``settings`` the bundle's agent.toml is left out (the emulator writes its
        own config) and only the certificate files are written.
        """
        kdir = self.dir / "kiosks" / device_id
        key_path = kdir / "device.key"
        key = generate_device_key(key_path)                      # on the kiosk
        cert, _ = enroll(self.ca, make_csr(key, device_id), expect_id=device_id,
                         board=settings.board if settings else None, clock=self.clock)
        services = self.certs(("consumer", "ops", "booking"))
        if settings is not None:
            write_bundle(kdir, self.ca, cert, settings, services, clock=self.clock)
        else:
            write_public_file(kdir / CERT_FILE, pem_cert(cert))
            write_public_file(kdir / CHAIN_FILE, self.ca.chain_pem())
            write_public_file(kdir / CRL_FILE, self.ca.crl_path.read_bytes())
            write_public_file(kdir / SERVICES_FILE, b"".join(pem_cert(c) for c in services))
        ident = Identity(device_id, "kiosk", kdir, key_path, kdir / CERT_FILE, key)
        self.identities[device_id] = ident
        return ident

    def add_service(self, ident: str, role: str) -> Identity:
        sdir = self.dir / "services" / ident
        _, key_path = issue_service(self.ca, ident, role, sdir, clock=self.clock)
        kp = key_path if key_path is not None else sdir / f"{ident}.key"
        me = Identity(ident, role, sdir, kp, sdir / f"{ident}.crt",
                      load_key_file(kp, f"{ident} key"))
        self.identities[ident] = me
        self.regenerate_broker_config()
        return me

    def regenerate_broker_config(self) -> None:
        conf, _ = write_broker_config(self.ca, self.broker_dir)
        self.broker_conf_text = conf.read_text()

    def revoke(self, ident: str, reason: str = "key_compromise") -> list[InventoryEntry]:
        """Revoke ``ident`` and copy the new CRL to the broker's crlfile and every kiosk
        bundle (the caller restarts the broker to force open sessions off)."""
        dests = [self.crl_file] + [i.dir / CRL_FILE for i in self.identities.values()
                                   if i.role == "kiosk"]
        return revoke_id(self.ca, ident, reason=reason, clock=self.clock, copy_to=dests)


def provision_emulated_hall(workdir: str | Path, devices: Iterable[str] = (), *,
                            hall: str = "citizen-home",
                            services: Iterable[tuple[str, str]] = DEFAULT_SERVICES,
                            broker_names: tuple[str, ...] = ("localhost",),
                            broker_ips: tuple[str, ...] = ("127.0.0.1",),
                            clock: Clock = SYSTEM_CLOCK) -> HallMaterials:
    """Provision a hall in ``workdir``: CA, services, broker, then each device in order.

    ``broker_conf_text`` keeps ``{host}``/``{port}`` for emulator.broker.MosquittoBroker.
    """
    base = Path(workdir).absolute()
    ca = create_hall_ca(base / "ca", hall, clock=clock)
    broker_dir = base / "broker"
    issue_broker(ca, broker_dir, dns_names=broker_names, ip_addresses=broker_ips, clock=clock)
    conf, files = write_broker_config(ca, broker_dir)
    mats = HallMaterials(hall, base, ca, broker_dir, conf.read_text(), files.cafile,
                         files.crlfile, clock=clock)
    for ident, role in services:
        sdir = base / "services" / ident
        _, key_path = issue_service(ca, ident, role, sdir, clock=clock)
        kp = key_path if key_path is not None else sdir / f"{ident}.key"
        mats.identities[ident] = Identity(ident, role, sdir, kp, sdir / f"{ident}.crt",
                                          load_key_file(kp, f"{ident} key"))
    mats.regenerate_broker_config()
    for device in devices:
        mats.add_kiosk(device)
    return mats
