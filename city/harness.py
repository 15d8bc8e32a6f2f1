"""A city on loopback: a 3-node NATS cluster, hall brokers bridged to it, emulated kiosks,
a hall ledger per hall, the central city ledger, and the faults (``make city``, tests).

``CityRun`` owns every process it starts and stops them all on exit. Figures come from
the ledgers and the kiosks' outboxes, never from the brokers' word.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from emulator.broker import MosquittoBroker
from hall.blackhole import BlackholeProxy
from ops.consumer import TicketConsumer
from provisioning.emulated import DEFAULT_SERVICES, HallMaterials, provision_emulated_hall

from .bridge import render_bridge_conf
from .central import CentralOps, start_central_ops
from .cluster import NatsCluster
from .kiosks import LightKiosk
from .ledger import CityLedger, HallTrust
from .pki import city_pki


def wait_until(predicate: Callable[[], object], timeout_s: float, what: str) -> float:
    """Poll ``predicate`` until true; returns the seconds it took, raises on the deadline."""
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - t0


def city_ledger_id(hall: str) -> str:
    return f"cityledger-{hall}"


@dataclass
class Hall:
    name: str
    mats: HallMaterials
    broker: MosquittoBroker
    ledger: TicketConsumer
    kiosks: list[LightKiosk] = field(default_factory=list)
    #: The hall's uplink: one loopback relay per city node, which the bridge dials instead
    #: of the node, so one hall's bridge can be cut while the others and the city run on.
    uplinks: list[BlackholeProxy] = field(default_factory=list)

    def cut_bridge(self, on: bool) -> None:
        """Cut (or restore) this hall's link to every city node: connections reset, new
        ones refused, as a severed uplink or a firewall would (hall/blackhole.py's cut)."""
        if not self.uplinks:
            raise RuntimeError(f"{self.name}: no uplink relays (CityRun(uplink_relays=True))")
        for relay in self.uplinks:
            relay.cut(on)

    def bridge_connected(self) -> bool:
        return any("Connecting bridge" in m or "bridge" in m.lower() for m in self.broker.log_messages())


class CityRun:
    def __init__(self, workdir: str | Path, *, halls: int = 3, kiosks_per_hall: int = 3,
                 nodes: int = 3, central_ops: int = 0, uplink_relays: bool = False) -> None:
        """``central_ops``: how many ``hallkiosk ops run`` instances watch the city (the
        halls split between them). ``uplink_relays``: each hall's bridge dials the nodes
        through loopback relays (``Hall.uplinks``), so that one hall's bridge can be cut; off
        for the node-loss and city-restart scenario (docs/city.md says why)."""
        self.dir = Path(workdir).absolute()
        self.n_halls, self.n_kiosks = halls, kiosks_per_hall
        self.n_central = central_ops
        self.uplink_relays = uplink_relays
        self.central: list[CentralOps] = []
        self.pki = city_pki(self.dir / "city-pki")
        self.cluster = NatsCluster(self.dir / "cluster", self.pki.node_tls(), size=nodes)
        self.halls: list[Hall] = []
        self.city: CityLedger | None = None
        self._relays: list[BlackholeProxy] = []

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> "CityRun":
        self.cluster.start()
        self.cluster.wait_mqtt_ready(self.pki.service("probe"))
        trusts = []
        for i in range(self.n_halls):
            name = f"hall{i + 1}"
            devices = [f"{name}-k{j + 1}" for j in range(self.n_kiosks)]
            mats = provision_emulated_hall(
                self.dir / name, devices, hall=name,
                services=DEFAULT_SERVICES + ((city_ledger_id(name), "consumer"),))
            uplinks = [BlackholeProxy(h, p, refuse_when_upstream_down=True).start()
                       for h, p in self.cluster.mqtt_addresses] if self.uplink_relays else []
            self._relays += uplinks
            dial = ([("127.0.0.1", r.port) for r in uplinks] if uplinks
                    else self.cluster.mqtt_addresses)
            conf = mats.broker_conf_text + "\n" + render_bridge_conf(
                name, dial, self.pki.bridge(name))
            broker = MosquittoBroker(self.dir / name / "broker-run", conf_text=conf).start()
            ledger = TicketConsumer(service_id="ledger", hall=name, key=mats["ledger"].key,
                                    keyring=mats.keyring(), state_dir=self.dir / name / "ledger",
                                    host=broker.host, port=broker.port,
                                    tls=mats.tls_for("ledger")).start()
            hall = Hall(name, mats, broker, ledger, uplinks=uplinks)
            ring = mats.keyring()
            for d in devices:
                hall.kiosks.append(LightKiosk(name, d, mats[d].key, mats.tls_for(d), ring,
                                              broker.host, broker.port).start())
            self.halls.append(hall)
            cid = city_ledger_id(name)
            trusts.append(HallTrust(name, mats.keyring(), cid, mats[cid].key))
        self.city = CityLedger(client_id="cityledger", halls=trusts,
                               state_dir=self.dir / "city-ledger",
                               addresses=self.cluster.mqtt_addresses,
                               tls=self.pki.service("cityledger", role="consumer")).start()
        wait_until(lambda: all(k.connected for h in self.halls for k in h.kiosks), 30,
                   "every kiosk connected to its hall broker")
        self.wait_bridges()
        self.wait_settled()
        if self.n_central:
            self.start_central()
        return self

    def start_central(self, timeout_s: float = 60.0) -> None:
        """Central ops (city/central.py) on the cluster; returns once every kiosk of the
        city is online in exactly one instance."""
        trust = {}
        for h in self.halls:
            pem = self.dir / h.name / "kiosk-certs.pem"
            pem.write_bytes(b"".join(h.mats[k.device].cert_path.read_bytes() for k in h.kiosks))
            trust[h.name] = (h.mats.chain_file, pem)
        self.central = start_central_ops(self.dir / "central", halls=[h.name for h in self.halls],
                                         instances=self.n_central,
                                         addresses=self.cluster.mqtt_addresses, pki=self.pki,
                                         hall_trust=trust)
        want = {(k.hall, k.device) for k in self.kiosks}
        wait_until(lambda: {key for key, st in self.central_view()["status"].items()
                            if st == "online"} == want, timeout_s,
                   "every kiosk online in central ops")

    def central_view(self) -> dict:
        """Central ops merged: tickets and status per (hall, kiosk), and which instances
        report each hall (each must be reported by exactly one)."""
        tickets: dict = {}
        status: dict = {}
        halls_by: dict[str, set[str]] = {}
        verified = 0
        for c in self.central:
            view = c.scrape()
            for key, n in view.get("tickets", {}).items():
                tickets[key] = n
                halls_by.setdefault(key[0], set()).add(c.instance)
            status.update(view.get("status", {}))
            verified += view.get("verified", 0)
        return {"tickets": tickets, "status": status, "halls_by": halls_by,
                "verified": verified}

    def central_tickets(self) -> dict[str, int]:
        """Tickets per hall as central ops count them."""
        out: dict[str, int] = {}
        for (hall, _device), n in self.central_view()["tickets"].items():
            out[hall] = out.get(hall, 0) + n
        return out

    def wait_bridges(self, timeout_s: float = 60.0) -> None:
        """Until a ticket of every hall has crossed its bridge and the city's ack came back.
        Mosquitto queues messages for a bridge only once that bridge has connected: what a
        hall publishes before its first connection never reaches the city."""
        probes = {h.name: h.kiosks[0].issue() for h in self.halls}
        t0 = last = time.monotonic()
        while not self.acked_by_city(list(probes.values())):
            if time.monotonic() - t0 > timeout_s:
                raise TimeoutError(f"bridges not carrying tickets within {timeout_s} s")
            if time.monotonic() - last > 2.0:
                for h in self.halls:
                    h.kiosks[0].resend(probes[h.name])
                last = time.monotonic()
            time.sleep(0.05)

    def wait_settled(self, rounds: int = 3, round_s: float = 5.0, timeout_s: float = 90.0) -> int:
        """Until ``rounds`` rounds in a row of one ticket per hall each came back acked by the
        city within ``round_s`` without a re-send: the cluster has settled its JetStream
        leaders. Returns the rounds it took. Faults start after this: twice in about nine
        runs, a burst issued right after the cluster formed lost one ticket in the city tier
        (the hall ledger had it; NATS logged slow read loops and session lookup timeouts in
        those first seconds), and nothing re-sends a ticket the hall ledger acked (docs/city.md)."""
        t0 = time.monotonic()
        ok = tried = 0
        while ok < rounds:
            if time.monotonic() - t0 > timeout_s:
                raise TimeoutError(f"the city did not settle within {timeout_s} s")
            probes = {h.kiosks[0]: h.kiosks[0].issue() for h in self.halls}
            tried += 1
            deadline = time.monotonic() + round_s
            while not self.acked_by_city(list(probes.values())) and time.monotonic() < deadline:
                time.sleep(0.05)
            if self.acked_by_city(list(probes.values())):
                ok += 1
                continue
            ok = 0
            # Not settled: a probe the city has not acked is sent again until it has (the
            # hall ledger takes it as a duplicate), so that no settling probe counts as lost.
            while not self.acked_by_city(list(probes.values())):
                if time.monotonic() - t0 > timeout_s:
                    raise TimeoutError(f"the city did not settle within {timeout_s} s")
                for k, uid in probes.items():
                    if not self.acked_by_city([uid]):
                        k.resend(uid)
                time.sleep(2.0)
        return tried

    def close(self) -> None:
        for c in self.central:
            c.stop()
        for h in self.halls:
            for k in h.kiosks:
                k.stop()
            h.ledger.stop()
        if self.city is not None:
            self.city.stop()
        for h in self.halls:
            h.broker.stop()
        for r in self._relays:
            r.stop()
        self.cluster.stop()

    def __enter__(self) -> "CityRun":
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()

    # -- traffic ---------------------------------------------------------------------
    @property
    def kiosks(self) -> list[LightKiosk]:
        return [k for h in self.halls for k in h.kiosks]

    def issue(self, per_kiosk: int = 1) -> list[str]:
        return [k.issue() for _ in range(per_kiosk) for k in self.kiosks]

    def acked_by_hall(self, uids: list[str]) -> bool:
        acked = set().union(*(k.acked("ledger") for k in self.kiosks))
        return set(uids) <= acked

    def acked_by_city(self, uids: list[str]) -> bool:
        acked = set().union(*(k.acked(city_ledger_id(k.hall)) for k in self.kiosks))
        return set(uids) <= acked

    def wait_acked(self, uids: list[str], *, city: bool, timeout_s: float = 60.0,
                   resend_every_s: float = 3.0) -> float:
        """Until every ticket in ``uids`` has the hall ledger's ack (and the city's when
        ``city``); kiosks re-send what is still in their outbox, as the agent does."""
        check = self.acked_by_city if city else self.acked_by_hall
        t0 = time.monotonic()
        last = t0
        while not check(uids):
            if time.monotonic() - t0 > timeout_s:
                raise TimeoutError(f"timed out after {timeout_s} s waiting for "
                                   f"{'city' if city else 'hall'} acks")
            if time.monotonic() - last > resend_every_s:
                for k in self.kiosks:
                    k.resend_unacked()
                last = time.monotonic()
            time.sleep(0.05)
        return time.monotonic() - t0

    def city_has(self, uids: list[str]) -> bool:
        by_hall: dict[str, list[str]] = {}
        for u in uids:
            by_hall.setdefault(u.split("-k")[0], []).append(u)
        return all(self.city.ledgers[h].lookup(u) is not None
                   for h, us in by_hall.items() for u in us)

    # -- figures ---------------------------------------------------------------------
    def figures(self) -> dict[str, int]:
        """Acked tickets lost: acked by any ledger (as the kiosk saw it) but missing from the
        hall ledger, or from the city ledger. Duplicates: deliveries the ledgers removed."""
        acked = set().union(*(k.acked() for k in self.kiosks))
        lost_hall = lost_city = dup_hall = dup_city = rows_hall = rows_city = 0
        for h in self.halls:
            hall_rows = {r.ticket_uid: r for r in h.ledger.ledger.rows()}
            city_rows = {r.ticket_uid: r for r in self.city.ledgers[h.name].rows()}
            mine = {u for u in acked if u.startswith(f"{h.name}-k")}
            lost_hall += len(mine - hall_rows.keys())
            lost_city += len(mine - city_rows.keys())
            dup_hall += sum(r.deliveries - 1 for r in hall_rows.values())
            dup_city += sum(r.deliveries - 1 for r in city_rows.values())
            rows_hall += len(hall_rows)
            rows_city += len(city_rows)
            for rows in (hall_rows, city_rows):
                if len({r.ticket_uid for r in rows.values()}) != len(rows):
                    raise AssertionError("a ledger holds a ticket twice")
        return {"acked": len(acked), "lost_hall": lost_hall, "lost_city": lost_city,
                "rows_hall": rows_hall, "rows_city": rows_city,
                "duplicates_removed_hall": dup_hall, "duplicates_removed_city": dup_city}
