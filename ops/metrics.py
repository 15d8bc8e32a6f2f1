"""Prometheus ``/metrics`` for the fleet: per-kiosk and per-hall series, read at scrape time.

A custom collector turns one consistent snapshot (``Monitor.snapshot``, ``Monitor.firing``,
``Monitor.stats_copy``) into metric families on every scrape, so nothing is double-booked
between the fleet and a set of prometheus-client gauges. Series (labels ``hall``, ``kiosk``):

- ``hallkiosk_kiosk_up`` 1 online/degraded/out of service, 0 offline/unknown;
  ``hallkiosk_kiosk_status{status}`` one-hot;
- ``hallkiosk_kiosk_last_seen_age_seconds``, ``hallkiosk_kiosk_temperature_celsius``,
  ``hallkiosk_kiosk_load1``, ``hallkiosk_kiosk_outbox_depth``,
  ``hallkiosk_kiosk_outbox_oldest_seconds``, ``hallkiosk_kiosk_paper{paper}`` one-hot,
  ``hallkiosk_kiosk_faults`` (active device faults), ``hallkiosk_kiosk_fault{subject,fault}``;
- counters ``hallkiosk_kiosk_messages_total{type}``, ``hallkiosk_kiosk_lost_messages_total``,
  ``hallkiosk_kiosk_replays_total``, ``hallkiosk_kiosk_bad_signatures_total``,
  ``hallkiosk_kiosk_malformed_total``, ``hallkiosk_kiosk_tickets_total``;
- per hall: ``hallkiosk_hall_kiosks{status}``, ``hallkiosk_hall_alerts_firing{severity}``,
  ``hallkiosk_hall_unattributed_rejections_total``;
- alerts: ``hallkiosk_alert_firing{hall,kiosk,rule,severity}`` 1 while firing;
- the monitor itself: ``hallkiosk_monitor_messages_total{result}``,
  ``hallkiosk_monitor_queue_depth``, ``hallkiosk_monitor_connected``.

With several monitor instances splitting the load, counters are per instance (label
``instance`` added by Prometheus): sum them in queries; gauges agree between instances.

The HTTP server binds 127.0.0.1 by default: the fleet view is for the ops host; put a
reverse proxy with TLS in front to expose it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from ops.alerts import Alert
from ops.fleet import PAPER_STATES, STATUSES, KioskSnapshot


@dataclass(frozen=True, slots=True)
class MetricsView:
    """What one scrape sees: kiosks, firing alerts, the monitor's counters."""

    kiosks: Sequence[KioskSnapshot]
    alerts: Sequence[Alert]
    stats: dict[str, Any]


class FleetCollector(Collector):
    """Builds every family from ``source()`` at scrape time (thread: the HTTP server's)."""

    def __init__(self, source: Callable[[], MetricsView]) -> None:
        self.source = source

    def describe(self) -> Iterable[Metric]:
        return []  # families depend on the fleet; an empty describe skips the dry-run collect

    def collect(self) -> Iterator[Metric]:
        v = self.source()
        kl = ["hall", "kiosk"]

        def g(name: str, doc: str, extra: Sequence[str] = ()) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=[*kl, *extra])

        def c(name: str, doc: str, extra: Sequence[str] = ()) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, labels=[*kl, *extra])

        up = g("hallkiosk_kiosk_up", "1 if the kiosk is connected (online, degraded or out of "
               "service), else 0")
        status = g("hallkiosk_kiosk_status", "Kiosk status, one-hot", ["status"])
        seen = g("hallkiosk_kiosk_last_seen_age_seconds", "Seconds since the last message")
        temp = g("hallkiosk_kiosk_temperature_celsius", "CPU temperature")
        load = g("hallkiosk_kiosk_load1", "1-minute load average")
        depth = g("hallkiosk_kiosk_outbox_depth", "Tickets not yet acknowledged end to end")
        oldest = g("hallkiosk_kiosk_outbox_oldest_seconds", "Age of the oldest unacked ticket")
        paper = g("hallkiosk_kiosk_paper", "Printer paper state, one-hot", ["paper"])
        nfaults = g("hallkiosk_kiosk_faults", "Active device faults")
        fault = g("hallkiosk_kiosk_fault", "1 per active device fault", ["subject", "fault"])
        msgs = c("hallkiosk_kiosk_messages", "Verified messages", ["type"])
        lost = c("hallkiosk_kiosk_lost_messages", "Messages confirmed lost (sequence gaps)")
        replays = c("hallkiosk_kiosk_replays", "Replayed or duplicated envelopes refused")
        badsig = c("hallkiosk_kiosk_bad_signatures", "Messages on the kiosk's topics that "
                   "failed signature, key or ownership checks")
        malformed = c("hallkiosk_kiosk_malformed", "Messages on the kiosk's topics that broke "
                      "the contract")
        tickets = c("hallkiosk_kiosk_tickets", "Tickets seen (re-sends counted once)")
        hall_kiosks = GaugeMetricFamily("hallkiosk_hall_kiosks", "Kiosks per status",
                                        labels=["hall", "status"])
        per_hall: dict[str, dict[str, int]] = {}
        for k in v.kiosks:
            lv = [k.hall, k.device]
            up.add_metric(lv, 1.0 if k.online else 0.0)
            for s in STATUSES:
                status.add_metric([*lv, s], 1.0 if k.status == s else 0.0)
            counts = per_hall.setdefault(k.hall, {s: 0 for s in STATUSES})
            counts[k.status] = counts.get(k.status, 0) + 1
            if k.last_seen_age_s is not None:
                seen.add_metric(lv, k.last_seen_age_s)
            if k.temp_mC is not None:
                temp.add_metric(lv, k.temp_mC / 1000)
            if k.load1_x100 is not None:
                load.add_metric(lv, k.load1_x100 / 100)
            if k.outbox_depth is not None:
                depth.add_metric(lv, k.outbox_depth)
            if k.outbox_oldest_s is not None:
                oldest.add_metric(lv, k.outbox_oldest_s)
            if k.paper is not None:
                for p in PAPER_STATES:
                    paper.add_metric([*lv, p], 1.0 if k.paper == p else 0.0)
            nfaults.add_metric(lv, len(k.faults))
            for subject, word in k.faults:
                fault.add_metric([*lv, subject, word], 1.0)
            for msg_type, n in sorted(k.messages.items()):
                msgs.add_metric([*lv, msg_type], n)
            lost.add_metric(lv, k.lost)
            replays.add_metric(lv, k.replays)
            badsig.add_metric(lv, k.bad_signatures)
            malformed.add_metric(lv, k.malformed)
            tickets.add_metric(lv, k.tickets)
        for hall, counts in sorted(per_hall.items()):
            for s, n in counts.items():
                hall_kiosks.add_metric([hall, s], n)

        firing = GaugeMetricFamily("hallkiosk_alert_firing", "1 per firing alert",
                                   labels=["hall", "kiosk", "rule", "severity"])
        hall_alerts = GaugeMetricFamily("hallkiosk_hall_alerts_firing", "Firing alerts",
                                        labels=["hall", "severity"])
        by_hall: dict[tuple[str, str], int] = {}
        for hall in per_hall:
            for sev in ("info", "warning", "critical"):
                by_hall[(hall, sev)] = 0
        for a in v.alerts:
            if a.state != "firing":
                continue
            firing.add_metric([a.hall, a.device, a.rule, a.severity], 1.0)
            by_hall[(a.hall, a.severity)] = by_hall.get((a.hall, a.severity), 0) + 1
        for (hall, sev), n in sorted(by_hall.items()):
            hall_alerts.add_metric([hall, sev], n)

        unattributed = CounterMetricFamily("hallkiosk_hall_unattributed_rejections",
                                           "Rejected messages naming no known kiosk",
                                           labels=["hall"])
        for hall, n in sorted(v.stats.get("unattributed", {}).items()):
            unattributed.add_metric([hall], n)
        mon = CounterMetricFamily("hallkiosk_monitor_messages", "Messages handled by this "
                                  "monitor", labels=["result"])
        mon.add_metric(["verified"], v.stats.get("verified", 0))
        for reason, n in sorted(v.stats.get("rejected", {}).items()):
            mon.add_metric([reason], n)
        queued = GaugeMetricFamily("hallkiosk_monitor_queue_depth",
                                   "Messages waiting for a verify worker",
                                   value=v.stats.get("queued", 0))
        connected = GaugeMetricFamily("hallkiosk_monitor_connected", "1 while the MQTT link "
                                      "is up", value=1.0 if v.stats.get("connected") else 0.0)
        yield from (up, status, seen, temp, load, depth, oldest, paper, nfaults, fault, msgs,
                    lost, replays, badsig, malformed, tickets, hall_kiosks, firing, hall_alerts,
                    unattributed, mon, queued, connected)


def monitor_view(monitor: Any) -> Callable[[], MetricsView]:
    """A MetricsView source reading an ops.monitor.Monitor."""
    def source() -> MetricsView:
        return MetricsView(monitor.snapshot(), monitor.firing(), monitor.stats_copy())
    return source


class MetricsServer:
    """``/metrics`` over HTTP on ``host:port`` (port 0 picks a free one: see ``.port``)."""

    def __init__(self, source: Callable[[], MetricsView], *, host: str = "127.0.0.1",
                 port: int = 9478) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(FleetCollector(source))
        self.host = host
        self._requested_port = port
        self._server: Any = None
        self._thread: Any = None

    @property
    def port(self) -> int:
        return self._server.server_port if self._server is not None else self._requested_port

    def start(self) -> MetricsServer:
        self._server, self._thread = start_http_server(self._requested_port, addr=self.host,
                                                       registry=self.registry)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            if self._thread is not None:
                self._thread.join(5)
            self._server = self._thread = None
