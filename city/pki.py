"""The city CA: one more CA made with the provisioning code (ca.py), which issues the
cluster nodes' server certificate and one client certificate per hall bridge (role
``broker``: the client is a hall broker) and per central service.

The halls' own CAs are untouched: a kiosk never talks to the city tier, and envelopes are
still verified against each hall's keyring (the signatures cross the bridge unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edge.mqtt import TlsSettings
from provisioning.ca import HallCA, create_hall_ca, load_hall_ca
from provisioning.enroll import issue_broker, issue_service

from .cluster import CityTls


@dataclass(frozen=True)
class CityPki:
    dir: Path
    ca: HallCA

    @property
    def chain_file(self) -> Path:
        return self.dir / "nodes" / "chain.pem"

    def node_tls(self) -> CityTls:
        d = self.dir / "nodes"
        return CityTls(d / "chain.pem", d / "broker.crt", d / "broker.key")

    def bridge(self, hall: str) -> TlsSettings:
        """The client certificate of ``hall``'s bridge. ca.py gives broker certificates
        the server-auth usage only, which the cluster rightly refuses from a client, so a
        bridge gets a service certificate (client auth; role ``ops``, which in the city CA
        grants nothing: the city CA's keys never sign envelopes)."""
        return self.service(f"bridge-{hall}", role="ops")

    def service(self, name: str, role: str = "monitor") -> TlsSettings:
        """A central service's client certificate (ops monitor, city ledger)."""
        d = self.dir / "services" / name
        if not (d / f"{name}.crt").is_file():
            issue_service(self.ca, name, role, d)
        return TlsSettings(str(d / "chain.pem"), str(d / f"{name}.crt"), str(d / f"{name}.key"))


def city_pki(workdir: str | Path, city: str = "city") -> CityPki:
    """Create (or load) the city CA in ``workdir`` with the cluster's server certificate
    (valid for localhost and 127.0.0.1; a real cluster lists its nodes' names)."""
    base = Path(workdir).absolute()
    if (base / "ca").is_dir():
        return CityPki(base, load_hall_ca(base / "ca"))
    ca = create_hall_ca(base / "ca", city)
    issue_broker(ca, base / "nodes", name="city-nodes", dns_names=("localhost",),
                 ip_addresses=("127.0.0.1",))
    return CityPki(base, ca)
