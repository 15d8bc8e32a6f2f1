"""``hallkiosk ops``: the hall-side monitor, its dashboard, remote commands and its benchmark.

Subcommands (``add_parser(sub)`` registers them under ``ops``; ``cmd_ops(args)`` runs them):

- ``ops run``: monitor + ticket ledger + ``/metrics`` + alerts, with the live dashboard on a
  terminal (``--no-dashboard`` under systemd). Stops on SIGTERM/SIGINT.
- ``ops status``: connect, gather the retained states for ``--wait-s``, print one frame of
  the dashboard and exit 0 if every kiosk is online, 1 otherwise (for scripts and ssh).
- ``ops alerts``: follow the halls' alert topics; print each alert transition once it
  verifies (role ``monitor``), deduplicated across monitor instances by (alert_id, state).
  With mTLS the broker takes the certificate's CN as client id, so give it a config whose
  certificate is not the one a running ``ops run`` uses (an ops certificate), or the two
  would keep taking the session from each other.

Remote commands are signed and sent by ``provisioning``'s command client (it holds the ops
certificate and key); the monitor shows each kiosk's last command result.
- ``ops bench``: the verify-throughput benchmark (emulator.bench_ops).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from hallkiosk.errors import ConfigError

log = logging.getLogger("hallkiosk.ops")


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``ops`` and its subcommands on the main parser's subparsers."""
    from ops.config import DEFAULT_OPS_CONFIG

    ops = sub.add_parser("ops", help="hall operations: fleet monitor, dashboard, alerts, "
                         "metrics, ticket ledger, remote commands")
    osub = ops.add_subparsers(dest="ops_command", required=True, metavar="OPS_COMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", type=Path, default=DEFAULT_OPS_CONFIG)
        p.add_argument("--log-level", default="info",
                       choices=("debug", "info", "warning", "error"))

    r = osub.add_parser("run", help="run the monitor (with the live dashboard on a terminal)")
    common(r)
    r.add_argument("--no-dashboard", action="store_true",
                   help="no dashboard; log to stdout (what systemd runs)")
    r.add_argument("--log-file", type=Path, default=None,
                   help="where logs go while the dashboard owns the terminal "
                        "(default: STATE_DIR/ops.log)")

    s = osub.add_parser("status", help="print the fleet once and exit (1 if a kiosk is not "
                        "online)")
    common(s)
    s.add_argument("--wait-s", type=float, default=3.0,
                   help="how long to gather retained states and traffic")
    s.add_argument("--width", type=int, default=80)

    a = osub.add_parser("alerts", help="follow the signed alerts of the halls (one line each)")
    common(a)
    a.add_argument("--count", type=int, default=0,
                   help="exit after this many alerts (0: follow until SIGTERM/SIGINT)")
    a.add_argument("--json", action="store_true", help="one JSON object per line")

    u = osub.add_parser("rollout", help="update kiosks in waves with signed update commands "
                        "(canaries first; halts on a rollback, refusal or ticket-rate drop)")
    common(u)
    u.add_argument("--cert", type=Path, required=True, help="an ops certificate (role ops)")
    u.add_argument("--key", type=Path, required=True, help="its private key")
    u.add_argument("--target", required=True, help="the bundle's name in the signed targets")
    u.add_argument("--version", required=True, help="the version it installs")
    u.add_argument("--hall", help="the hall (needed when ops.toml watches several)")
    u.add_argument("--devices", help="comma-separated kiosks (default: every kiosk of the hall "
                   "the monitor sees)")
    u.add_argument("--canaries", type=int, default=1, help="kiosks in the first wave")
    u.add_argument("--wave-pct", type=int, default=25, help="share of the rest per wave")
    u.add_argument("--soak-s", type=float, default=120.0)
    u.add_argument("--wave-deadline-s", type=float, default=900.0)
    u.add_argument("--health-deadline-s", type=int, default=None)
    u.add_argument("--min-success-pct", type=int, default=90)
    u.add_argument("--min-tickets", type=int, default=5)
    u.add_argument("--wait-s", type=float, default=3.0,
                   help="how long to gather the kiosks' retained states first")
    u.add_argument("--dry-run", action="store_true", help="print the waves and send nothing")

    b = osub.add_parser("bench", help="verified messages/s vs the raw Ed25519 verify rate")
    b.add_argument("--out", default="bench-out")
    b.add_argument("--messages", type=int, default=20000)
    b.add_argument("--procs", type=_proc_counts, default=(1, 2), metavar="N,N",
                   help="monitor process counts to measure (default 1,2; 1 is always run)")
    b.add_argument("--log-level", default="warning",
                   choices=("debug", "info", "warning", "error"))
    ops.set_defaults(func=cmd_ops)
    return ops


def _proc_counts(text: str) -> tuple[int, ...]:
    from emulator.bench_ops import parse_proc_counts   # only when the option is given

    return parse_proc_counts(text)


def cmd_ops(args: argparse.Namespace) -> int:
    from edge.logs import setup_logging

    if args.ops_command == "bench":
        from emulator.bench_ops import run_ops_bench

        setup_logging(args.log_level)
        figures = run_ops_bench(Path(args.out), messages=args.messages, procs=args.procs)
        print(json.dumps(figures, indent=2))
        return 0

    from ops.config import load_ops_config

    cfg = load_ops_config(args.config)
    if args.ops_command == "run":
        dashboard = not args.no_dashboard and sys.stdout.isatty()
        if dashboard:
            _log_to_file(args.log_file or cfg.state_dir / "ops.log", args.log_level)
        else:
            setup_logging(args.log_level)
        return run_ops(cfg, dashboard=dashboard)
    setup_logging("warning" if args.log_level == "info" else args.log_level)
    if args.ops_command == "status":
        return _status(cfg, args.wait_s, args.width)
    if args.ops_command == "rollout":
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        return rollout(cfg, args, stop=stop)
    if args.ops_command == "alerts":
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        return follow_alerts(cfg, count=args.count, as_json=args.json, stop=stop)
    raise ConfigError(f"unknown ops command {args.ops_command!r}")


def rollout(cfg: Any, args: argparse.Namespace, *, stop: threading.Event,
            out: Any = None, turn_s: float = 2.0) -> int:
    """``ops rollout``: the monitor of ``cfg`` gives the kiosks' snapshots, an OpsClient
    signed with ``--cert``/``--key`` sends the commands, ops.rollout decides. Exit 0 when
    every wave passed, 1 when the rollout halted (the reason printed), 2 for a setup error."""
    from edge.keys import load_private_key
    from edge.mqtt import TlsSettings
    from ops.config import load_trust
    from ops.rollout import ClientResults, Rollout, RolloutPlan, client_sender, drive, plan_waves
    from provisioning.ca import load_cert_file
    from provisioning.opsclient import OpsClient
    from provisioning.trust import subject_fields

    out = out if out is not None else sys.stdout
    if args.hall is None and len(cfg.halls) != 1:
        raise ConfigError(f"ops rollout: ops.toml watches {len(cfg.halls)} halls; name one "
                          "with --hall")
    hall = args.hall or cfg.halls[0]
    if hall not in cfg.halls:
        raise ConfigError(f"ops rollout: hall {hall!r} is not one ops.toml watches {cfg.halls}")
    ops_id, role, _ = subject_fields(load_cert_file(args.cert, "ops certificate"))
    if role != "ops":
        raise ConfigError(f"{args.cert}: role {role!r}; commands need an ops certificate")
    if cfg.broker.tls is None:
        raise ConfigError("ops rollout: [broker] needs TLS settings (commands go over mTLS)")
    monitor = build_monitor(cfg, with_ledger=False)
    monitor.start()
    client = None
    try:
        if not monitor.wait_connected(10.0):
            print(f"hallkiosk ops rollout: broker {cfg.broker.host}:{cfg.broker.port} "
                  "unreachable", file=sys.stderr)
            return 2
        stop.wait(args.wait_s)           # the retained states of the hall's kiosks

        def snapshots() -> list:
            monitor.tick()
            return monitor.snapshot(hall)

        devices = ([d for d in args.devices.split(",") if d] if args.devices
                   else sorted(s.device for s in snapshots()))
        if not devices:
            print(f"hallkiosk ops rollout: no kiosk of hall {hall} seen", file=sys.stderr)
            return 2
        waves = plan_waves(devices, canaries=args.canaries, wave_pct=args.wave_pct)
        for n, wave in enumerate(waves):
            print(f"wave {n}: {', '.join(wave)}", file=out, flush=True)
        if args.dry_run:
            return 0
        plan = RolloutPlan(target=args.target, version=args.version, waves=waves, hall=hall,
                           wave_deadline_s=args.wave_deadline_s, soak_s=args.soak_s,
                           min_success_pct=args.min_success_pct, min_tickets=args.min_tickets,
                           health_deadline_s=args.health_deadline_s)
        keyring = load_trust(cfg.trust).keyring          # the kiosks answer the commands
        client = OpsClient(ops_id=ops_id, hall=hall, key=load_private_key(args.key),
                           keyring=keyring, tls=TlsSettings(str(cfg.broker.tls.ca_file),
                                                            str(args.cert), str(args.key)),
                           host=cfg.broker.host, port=cfg.broker.port,
                           state_dir=cfg.state_dir / "rollout").start()
        r = Rollout(plan)
        d = drive(r, send=client_sender(client), snapshots=snapshots,
                  results=ClientResults(r, client), wait=stop.wait, turn_s=turn_s)
        if d.state == "done":
            print(f"rollout of {args.version} done: {len(devices)} kiosks committed", file=out)
            return 0
        print(f"rollout of {args.version} {d.state} in wave {d.wave}: "
              f"{d.reason or 'stopped by a signal'}", file=out)
        return 1
    finally:
        if client is not None:
            client.stop()
        monitor.stop()


def _log_to_file(path: Path, level: str) -> None:
    from edge.logs import LogfmtFormatter

    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("hallkiosk.mqtt.paho").setLevel(logging.WARNING)


# -- building the pieces from the config ---------------------------------------------------------
def build_monitor(cfg: Any, *, with_ledger: bool = True, tick_s: float | None = None) -> Any:
    """Monitor (+ its ticket consumers) wired from an OpsConfig."""
    from edge.keys import load_private_key
    from ops.alerts import AlertEngine, AlertSink
    from ops.config import load_trust
    from ops.consumer import TicketConsumer
    from ops.fleet import Fleet
    from ops.monitor import Monitor, alert_signer

    inv = load_trust(cfg.trust)
    signer = None
    if cfg.alert_key is not None:
        # Receivers check that the key's owner (its certificate's CN) is the sender.
        sender = cfg.instance
        if cfg.broker.tls is not None and cfg.alert_key == cfg.broker.tls.key_file:
            from cryptography import x509

            from provisioning.trust import subject_fields

            cert = x509.load_pem_x509_certificate(cfg.broker.tls.cert_file.read_bytes())
            sender, role, _ = subject_fields(cert)
            if role != "monitor":
                logging.getLogger("hallkiosk.ops").warning(
                    "the monitor's certificate has role %r, not 'monitor': receivers will "
                    "refuse its alerts", role)
        signer = alert_signer(load_private_key(cfg.alert_key), sender)
    else:
        logging.getLogger("hallkiosk.ops").warning(
            "alerts go to the log only: no key to sign them ([ops] alert_key or [broker] "
            "tls_key_file), or [ops] publish_alerts = false")
    consumers = []
    if with_ledger and cfg.ledger.enabled and cfg.ledger.key is not None:
        key = load_private_key(cfg.ledger.key)
        for hall in cfg.halls:
            # One ledger database per hall; instances on one host share it (WAL + BEGIN
            # IMMEDIATE), which is what stops two instances both accepting one ticket.
            state_dir = cfg.ledger.state_dir / hall if len(cfg.halls) > 1 else cfg.ledger.state_dir
            consumers.append(TicketConsumer(
                service_id=cfg.ledger.service_id, hall=hall, key=key, keyring=inv.keyring,
                state_dir=state_dir, host=cfg.broker.host, port=cfg.broker.port,
                group=cfg.ledger.group, tls=_tls(cfg.ledger.tls)))
    fleet = Fleet(heartbeat_timeout_s=cfg.fleet.heartbeat_timeout_s,
                  gap_grace_s=cfg.fleet.gap_grace_s, track_gaps=cfg.share_group is None)
    return Monitor(halls=cfg.halls, keyring=inv.keyring, host=cfg.broker.host,
                   port=cfg.broker.port, instance=cfg.instance, share_group=cfg.share_group,
                   workers=cfg.workers, fleet=fleet, alerts=AlertEngine(cfg.alerts),
                   sink=AlertSink(), consumers=consumers, expected=inv.kiosks,
                   tick_s=tick_s or cfg.tick_s, keepalive_s=cfg.broker.keepalive_s,
                   reconnect_min_s=cfg.broker.reconnect_min_s,
                   reconnect_max_s=cfg.broker.reconnect_max_s, tls=_tls(cfg.broker.tls),
                   alert_signer=signer, protocol=cfg.broker.protocol,
                   fallbacks=cfg.broker.nodes)


def _tls(files: Any) -> Any:
    from edge.mqtt import TlsSettings

    if files is None:
        return None
    return TlsSettings(str(files.ca_file), str(files.cert_file), str(files.key_file))


def run_ops(cfg: Any, *, dashboard: bool, stop: threading.Event | None = None) -> int:
    from ops.dashboard import run_live
    from ops.metrics import MetricsServer, monitor_view

    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
    monitor = build_monitor(cfg)
    metrics = None
    monitor.start()
    try:
        if cfg.metrics.enabled:
            metrics = MetricsServer(monitor_view(monitor), host=cfg.metrics.host,
                                    port=cfg.metrics.port).start()
            log.info("metrics on http://%s:%d/metrics", cfg.metrics.host, metrics.port)
        if dashboard:
            run_live(lambda: (monitor.snapshot(), monitor.firing()), refresh_s=cfg.refresh_s,
                     stop=stop)
        else:
            stop.wait()
    finally:
        if metrics is not None:
            metrics.stop()
        monitor.stop()
    return 0


def _status(cfg: Any, wait_s: float, width: int) -> int:
    from ops.dashboard import render

    monitor = build_monitor(cfg, with_ledger=False)
    monitor.start()
    try:
        if not monitor.wait_connected(min(10.0, max(1.0, wait_s))):
            print(f"hallkiosk ops status: broker {cfg.broker.host}:{cfg.broker.port} "
                  "unreachable", file=sys.stderr)
            return 2
        threading.Event().wait(wait_s)   # gathering retained states: a bounded, idle wait
        monitor.tick()
        kiosks = monitor.snapshot()
        print(render(kiosks, width=width, alerts=monitor.firing()), end="")
    finally:
        monitor.stop()
    return 0 if kiosks and all(k.online for k in kiosks) else 1


def follow_alerts(cfg: Any, *, count: int = 0, as_json: bool = False,
                  stop: threading.Event | None = None, out: Any = None,
                  connected: threading.Event | None = None) -> int:
    """Print verified alert transitions of ``cfg.halls`` until ``count`` were printed (0: until
    ``stop``). Forged, replayed or malformed alerts are logged and never printed."""
    import queue
    import time
    from collections import OrderedDict

    from edge.mqtt import LinkDown, LinkMessage, LinkUp, MqttLink
    from hallkiosk.errors import ContractError
    from mqtt_topics.envelope import SequenceTracker, verify
    from mqtt_topics.topics import HallTopics
    from ops.config import load_trust

    out = out if out is not None else sys.stdout
    stop = stop or threading.Event()
    keyring = load_trust(cfg.trust, roles=("monitor",)).keyring   # alerts come from monitors
    tracker = SequenceTracker()
    events: queue.SimpleQueue[object] = queue.SimpleQueue()
    seen: OrderedDict[tuple[str, str], None] = OrderedDict()
    link = MqttLink(client_id=f"{cfg.instance}-alerts", host=cfg.broker.host,
                    port=cfg.broker.port, sink=events.put,
                    subscriptions=tuple((HallTopics(h).alerts, 1) for h in cfg.halls),
                    keepalive_s=cfg.broker.keepalive_s, reconnect_min_s=cfg.broker.reconnect_min_s,
                    reconnect_max_s=cfg.broker.reconnect_max_s, tls=_tls(cfg.broker.tls),
                    name="ops-alerts")
    link.start()
    printed = 0
    try:
        while not stop.is_set() and (count == 0 or printed < count):
            try:
                ev = events.get(timeout=0.5)
            except queue.Empty:
                continue
            if isinstance(ev, LinkUp):
                if connected is not None:
                    connected.set()
                continue
            if isinstance(ev, LinkDown):
                log.warning("alert feed: %s", ev.reason)
                continue
            if not isinstance(ev, LinkMessage):
                continue
            try:
                v = verify(ev.payload, ev.topic, keyring, tracker=tracker, expect_type="alert",
                           require_role="monitor")
            except ContractError as exc:
                log.warning("alert refused on %s: %s", ev.topic, exc)
                continue
            key = (v.body["alert_id"], v.body["state"])
            if key in seen:
                continue                     # the same transition from another monitor
            seen[key] = None
            if len(seen) > 4096:
                seen.popitem(last=False)
            body = v.body
            if as_json:
                line = json.dumps({**body, "hall": v.hall, "monitor": v.sender},
                                  sort_keys=True)
            else:
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v.ts_ms / 1000))
                line = (f"{when} {body['severity'].upper():8} {body['state']:8} "
                        f"{v.hall}/{body['device']} {body['rule']}: {body['message']} "
                        f"[{body['alert_id']} from {v.sender}]")
            print(line, file=out, flush=True)
            printed += 1
    finally:
        link.stop()
    return 0
