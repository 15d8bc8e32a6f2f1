"""``hallkiosk provision ...``: the field engineer's and the CA station's commands.

Wired into hallkiosk/cli.py with ``provisioning.cli.add_parser(sub)``; each subcommand is a
``cmd_xxx(args) -> int`` (0 ok, 1 verification found problems). Errors are raised as
HallkioskError subclasses, which the main CLI prints as one line and exits 2.
The step-by-step procedure is docs/provisioning.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from .errors import ProvisioningError

DEFAULT_KEY_PATH = "/etc/hallkiosk/device.key"
# Spelled out here (tests check them against ca.ROLES and inventory.REASONS) so building the
# parser for `hallkiosk agent` does not import cryptography's x509 machinery.
ISSUE_ROLES = ("ops", "consumer", "booking", "monitor")
CERT_ROLES = ("kiosk", *ISSUE_ROLES, "broker")
REVOKE_REASONS = ("unspecified", "key_compromise", "affiliation_changed", "superseded",
                  "cessation_of_operation")


def _out(line: str) -> None:
    print(line, flush=True)


# -- CA station -------------------------------------------------------------------------
def cmd_init_ca(args: argparse.Namespace) -> int:
    from .ca import create_hall_ca

    ca = create_hall_ca(args.ca_dir, args.hall, root_dir=args.root_dir)
    root_dir = args.root_dir or args.ca_dir / "root"
    _out(f"hall {ca.hall}: CA created in {args.ca_dir}")
    _out(f"root key: {root_dir / 'root.key'} -- move it to offline storage now; it is only "
         "needed to replace the issuing CA")
    return 0


def _split_broker(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep:
        return value, 8883
    try:
        return host, int(port)
    except ValueError:
        raise ProvisioningError(f"--broker {value!r}: expected HOST or HOST:PORT") from None


def _services(values: list[str]) -> tuple[tuple[str, str, str], ...]:
    out = []
    for v in values:
        parts = v.split(":")
        if len(parts) != 3 or not all(parts):
            raise ProvisioningError(f"--service {v!r}: expected CATEGORY:NAME:BUTTON")
        out.append((parts[0], parts[1], parts[2]))
    return tuple(out)


def _issued_certs(ca, roles: tuple[str, ...]) -> list:
    """Certificates of ``roles`` that are neither revoked nor expired, from the inventory."""
    from .ca import load_cert_file, utc_now
    from .inventory import Inventory

    inv = Inventory.load(ca.inventory_path)
    return [load_cert_file(ca.dir / "issued" / f"{e.serial}.pem")
            for e in inv.usable(utc_now(), roles)]


def _service_certs(ca) -> list:
    return _issued_certs(ca, ("consumer", "ops", "booking"))


def cmd_enroll(args: argparse.Namespace) -> int:
    from .bundle import KioskSettings, write_bundle
    from .ca import load_hall_ca
    from .enroll import enroll

    ca = load_hall_ca(args.ca_dir)
    host, port = _split_broker(args.broker)
    settings = KioskSettings(device_id=args.device, hall=ca.hall, hall_name=args.hall_name,
                             number_prefix=args.prefix, board=args.board, broker_host=host,
                             broker_port=port, services=_services(args.service),
                             key_path=args.key_path, secret_path=args.secret_path,
                             state_dir=args.state_dir)
    if not settings.services:
        raise ProvisioningError("enroll: give at least one --service CATEGORY:NAME:BUTTON")
    try:
        csr = args.csr.read_bytes()
    except OSError as exc:
        raise ProvisioningError(f"{args.csr}: cannot read CSR ({exc.strerror})") from None
    cert, entry = enroll(ca, csr, board=args.board, days=args.days, expect_id=args.device)
    files = write_bundle(args.target, ca, cert, settings, _service_certs(ca))
    _out(f"{entry.id}: enrolled, serial {entry.serial}, valid to {entry.not_after}")
    _out(f"bundle: {', '.join(str(f) for f in files)}")
    return 0


def cmd_issue(args: argparse.Namespace) -> int:
    from .ca import load_hall_ca
    from .enroll import issue_service

    ca = load_hall_ca(args.ca_dir)
    csr = args.csr.read_bytes() if args.csr else None
    cert, key_path = issue_service(ca, args.id, args.role, args.out, csr_pem=csr, days=args.days)
    _out(f"{args.id}: {args.role} certificate serial {cert.serial_number:x} in {args.out}"
         + (f", key {key_path} (0600)" if key_path else ""))
    if args.role in ("ops", "consumer", "monitor"):
        _out("broker: re-run 'hallkiosk provision broker-conf' and reload the broker for its ACL")
    return 0


def cmd_issue_broker(args: argparse.Namespace) -> int:
    from .ca import load_hall_ca
    from .enroll import issue_broker

    ca = load_hall_ca(args.ca_dir)
    cert, key = issue_broker(ca, args.out, name=args.name, dns_names=tuple(args.dns),
                             ip_addresses=tuple(args.ip), days=args.days)
    _out(f"{args.name}: broker certificate serial {cert.serial_number:x}, key {key} (0600)")
    return 0


def cmd_broker_conf(args: argparse.Namespace) -> int:
    from .brokerconf import write_broker_config
    from .ca import load_hall_ca

    ca = load_hall_ca(args.ca_dir)
    conf, _ = write_broker_config(ca, args.out, host=args.host, port=args.port,
                                  chown_to=args.chown)
    _out(f"broker config: {conf} (install into /etc/mosquitto/conf.d/ and restart mosquitto)")
    return 0


def cmd_bridge_conf(args: argparse.Namespace) -> int:
    from city.bridge import write_bridge_conf

    conf = write_bridge_conf(args.out, args.hall, args.city_node, args.cafile, args.certfile,
                             args.keyfile)
    _out(f"bridge config: {conf} (append to the hall broker's conf.d, after its listener)")
    return 0


# -- kiosk --------------------------------------------------------------------------------
def cmd_keygen(args: argparse.Namespace) -> int:
    from .enroll import generate_device_key, make_csr, write_csr

    key = generate_device_key(args.key, force=args.force)
    write_csr(args.csr, make_csr(key, args.device))
    _out(f"{args.device}: key {args.key} (0600, stays on this kiosk); CSR {args.csr} (take "
         "it to the CA station)")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .bundle import verify_bundle

    rep = verify_bundle(args.dir, key_path=args.key)
    for w in rep.warnings:
        _out(f"warning: {w}")
    for p in rep.problems:
        _out(f"problem: {p}")
    if rep.ok:
        _out(f"{rep.device_id}: OK, certificate valid {rep.days_left:.0f} more days, CRL "
             f"{rep.crl_days_left:.0f} more days")
        return 0
    return 1


# -- lifecycle ------------------------------------------------------------------------------
def cmd_renew(args: argparse.Namespace) -> int:
    from .bundle import refresh_bundle
    from .ca import load_hall_ca, utc_now
    from .enroll import renew
    from .inventory import Inventory

    ca = load_hall_ca(args.ca_dir)
    if args.due_within is not None:
        due = Inventory.load(ca.inventory_path).due(utc_now(), args.due_within)
        idents = [e.id for e in due]
    else:
        idents = list(args.ids)
    if not idents:
        _out("nothing to renew")
        return 0
    if args.target and len(idents) != 1:
        raise ProvisioningError("renew --target: renew one id at a time")
    csr = args.csr.read_bytes() if args.csr else None
    for ident in idents:
        cert, entry = renew(ca, ident, csr_pem=csr, days=args.days)
        _out(f"{ident}: renewed, serial {entry.serial}, valid to {entry.not_after}, "
             f"certificate {ca.dir / 'issued' / (entry.serial + '.pem')}")
        if args.target:
            refresh_bundle(args.target, ca, cert)
            _out(f"{ident}: bundle in {args.target} updated")
    return 0


def _restart(unit: str | None) -> None:
    if not unit:
        _out("now restart the broker (e.g. systemctl restart mosquitto): open sessions of a "
             "revoked certificate stay up until the broker drops them")
        return
    cmd = ["systemctl", "restart", unit]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise ProvisioningError(f"{shlex.join(cmd)} failed: {done.stderr.strip()}")
    _out(f"broker restarted ({shlex.join(cmd)}): every client reconnects, the revoked one "
         "fails its handshake")


def cmd_revoke(args: argparse.Namespace) -> int:
    from .ca import load_hall_ca
    from .crl import revoke

    ca = load_hall_ca(args.ca_dir)
    newly = revoke(ca, args.id, reason=args.reason, copy_to=args.crl_copy)
    if not newly:
        _out(f"{args.id}: nothing left to revoke (already revoked or expired)")
        return 0
    _out(f"{args.id}: revoked serial(s) {', '.join(e.serial for e in newly)}; CRL {ca.crl_path}"
         + "".join(f", copied to {p}" for p in args.crl_copy))
    _restart(args.restart_unit)
    return 0


def cmd_crl(args: argparse.Namespace) -> int:
    from .ca import load_hall_ca
    from .crl import refresh_crl

    ca = load_hall_ca(args.ca_dir)
    crl = refresh_crl(ca, copy_to=args.copy)
    _out(f"CRL {ca.crl_path}: {len(list(crl))} revoked, next update {crl.next_update_utc}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from .ca import load_hall_ca, utc_now
    from .crl import CRL_WARN_DAYS, check_crl, load_crl
    from .inventory import Inventory

    ca = load_hall_ca(args.ca_dir)
    inv = Inventory.load(ca.inventory_path)
    now = utc_now()
    if args.due_within is not None:
        entries = inv.due(now, args.due_within)
    elif args.all:
        entries = inv.entries()
    else:
        entries = [e for e in inv.entries() if e.status == "active"]
    if args.json:
        _out(json.dumps([asdict(e) for e in entries], indent=2))
        return 0
    _out(f"hall {inv.hall}: {len(entries)} certificate(s)")
    for e in entries:
        _out(f"  {e.id:<24} {e.role:<9} {e.status:<10} serial {e.serial[:16]:<16} "
             f"days left {e.days_left(now):7.1f}" + (f"  board {e.board}" if e.board else ""))
    crl_days = check_crl(load_crl(ca.crl_path), ca.issuing_cert, now)
    if crl_days < CRL_WARN_DAYS:
        _out(f"warning: CRL expires in {crl_days:.1f} days: run 'hallkiosk provision crl'")
    return 0


def cmd_export_certs(args: argparse.Namespace) -> int:
    """What hall services verify kiosks with: one PEM file of usable certificates."""
    from .ca import load_hall_ca, pem_cert, write_public_file

    ca = load_hall_ca(args.ca_dir)
    certs = _issued_certs(ca, tuple(args.role or ("kiosk",)))
    write_public_file(args.out, b"".join(pem_cert(c) for c in certs))
    _out(f"{len(certs)} certificate(s) written to {args.out} (load with "
         "provisioning.trust.keyring_from_certs, with the chain and the CRL)")
    return 0


# -- ops ---------------------------------------------------------------------------------------
def cmd_command(args: argparse.Namespace) -> int:
    from .ca import load_cert_file, load_hall_ca, load_key_file
    from .opsclient import send_command
    from .trust import keyring_from_certs, subject_fields
    from edge.mqtt import TlsSettings

    ca = load_hall_ca(args.ca_dir)
    cert = load_cert_file(args.cert, "ops certificate")
    ops_id, role, _ = subject_fields(cert)
    if role != "ops":
        raise ProvisioningError(f"{args.cert}: role {role!r}, an ops certificate is needed")
    keyring = keyring_from_certs(ca.chain_path, _issued_certs(ca, ("kiosk",)), ca.crl_path,
                                 roles=("kiosk",))
    try:
        cmd_args = json.loads(args.args)
    except ValueError as exc:
        raise ProvisioningError(f"--args: not JSON ({exc})") from None
    result = send_command(ops_id=ops_id, hall=ca.hall, key=load_key_file(args.key, "ops key"),
                          keyring=keyring,
                          tls=TlsSettings(str(ca.chain_path), str(args.cert), str(args.key)),
                          host=args.host, port=args.port, state_dir=args.state_dir,
                          device=args.device, name=args.name, args=cmd_args, ttl_s=args.ttl,
                          timeout_s=args.timeout)
    if result is None:
        _out(f"{args.device}: no answer within {args.timeout} s")
        return 1
    _out(f"{args.device}: {result.body['status']}"
         + (f" ({result.body['reason']})" if result.body["reason"] else ""))
    return 0 if result.body["status"] != "refused" else 1


# -- argparse ------------------------------------------------------------------------------
def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``provision`` and its subcommands on the main CLI's subparsers."""
    p = sub.add_parser("provision", help="hall CA, kiosk enrollment, certificates, broker config")
    ps = p.add_subparsers(dest="provision_command", required=True, metavar="STEP")

    def ca_dir(q: argparse.ArgumentParser) -> None:
        q.add_argument("--ca-dir", type=Path, required=True, help="the CA station directory")

    q = ps.add_parser("init-ca", help="create the hall's root and issuing CA (once per hall)")
    ca_dir(q)
    q.add_argument("--hall", required=True)
    q.add_argument("--root-dir", type=Path, help="where the root key goes (offline medium)")
    q.set_defaults(func=cmd_init_ca)

    q = ps.add_parser("keygen", help="ON THE KIOSK: make the device key and a CSR")
    q.add_argument("--device", required=True)
    q.add_argument("--key", type=Path, default=Path(DEFAULT_KEY_PATH))
    q.add_argument("--csr", type=Path, required=True)
    q.add_argument("--force", action="store_true", help="replace an existing key")
    q.set_defaults(func=cmd_keygen)

    q = ps.add_parser("enroll", help="issue a kiosk certificate from its CSR and write its bundle")
    ca_dir(q)
    q.add_argument("--csr", type=Path, required=True)
    q.add_argument("--device", required=True, help="the id expected in the CSR")
    q.add_argument("--target", type=Path, required=True, help="bundle directory (boot partition)")
    q.add_argument("--board", required=True)
    q.add_argument("--prefix", required=True, help="2-digit ticket number prefix")
    q.add_argument("--hall-name", required=True)
    q.add_argument("--broker", required=True, help="HOST[:PORT], port 8883 by default")
    q.add_argument("--service", action="append", default=[], metavar="CAT:NAME:BUTTON")
    q.add_argument("--key-path", default=DEFAULT_KEY_PATH, help="device key path on the kiosk")
    q.add_argument("--secret-path", default="/etc/hallkiosk/citizen.secret")
    q.add_argument("--state-dir", default="/var/lib/hallkiosk")
    q.add_argument("--days", type=int)
    q.set_defaults(func=cmd_enroll)

    q = ps.add_parser("issue", help="issue an ops / consumer / booking / monitor certificate")
    ca_dir(q)
    q.add_argument("--id", required=True)
    q.add_argument("--role", required=True, choices=ISSUE_ROLES)
    q.add_argument("--out", type=Path, required=True)
    q.add_argument("--csr", type=Path, help="certify this CSR's key instead of making one")
    q.add_argument("--days", type=int)
    q.set_defaults(func=cmd_issue)

    q = ps.add_parser("issue-broker", help="the hall broker's server certificate and key")
    ca_dir(q)
    q.add_argument("--out", type=Path, required=True)
    q.add_argument("--name", default="broker")
    q.add_argument("--dns", action="append", default=[])
    q.add_argument("--ip", action="append", default=[])
    q.add_argument("--days", type=int)
    q.set_defaults(func=cmd_issue_broker)

    q = ps.add_parser("broker-conf", help="generate the broker's Mosquitto TLS + ACL config")
    ca_dir(q)
    q.add_argument("--out", type=Path, required=True, help="dir holding broker.crt/.key")
    q.add_argument("--host", default="0.0.0.0")
    q.add_argument("--port", type=int, default=8883)
    q.add_argument("--chown", help="give the broker's files to this user (run as root)")
    q.set_defaults(func=cmd_broker_conf)

    q = ps.add_parser("bridge-conf", help="generate the hall broker's bridge to the city tier")
    q.add_argument("--hall", required=True)
    q.add_argument("--city-node", action="append", required=True, metavar="HOST:PORT",
                   help="a city cluster node's MQTT address; repeat for failover, first preferred")
    q.add_argument("--cafile", type=Path, required=True, help="the city CA chain (PEM)")
    q.add_argument("--certfile", type=Path, required=True, help="this hall bridge's certificate")
    q.add_argument("--keyfile", type=Path, required=True, help="this hall bridge's key")
    q.add_argument("--out", type=Path, required=True, help="the conf file to write")
    q.set_defaults(func=cmd_bridge_conf)

    q = ps.add_parser("verify", help="check a kiosk's bundle, certificate, CRL and key")
    q.add_argument("--dir", type=Path, required=True)
    q.add_argument("--key", type=Path, help="device key (default: agent.toml's, if readable)")
    q.set_defaults(func=cmd_verify)

    q = ps.add_parser("renew", help="re-certify before expiry (same key, or a new CSR)")
    ca_dir(q)
    q.add_argument("ids", nargs="*")
    q.add_argument("--due-within", type=float, metavar="DAYS", help="renew every id due")
    q.add_argument("--csr", type=Path)
    q.add_argument("--target", type=Path, help="bundle to update with the new certificate")
    q.add_argument("--days", type=int)
    q.set_defaults(func=cmd_renew)

    q = ps.add_parser("revoke", help="revoke an id's certificates and publish the CRL")
    ca_dir(q)
    q.add_argument("id")
    q.add_argument("--reason", default="unspecified", choices=REVOKE_REASONS)
    q.add_argument("--crl-copy", type=Path, action="append", default=[],
                   help="also write the CRL here (the broker's crlfile)")
    q.add_argument("--restart-unit", help="systemd unit of the broker to restart afterwards")
    q.set_defaults(func=cmd_revoke)

    q = ps.add_parser("crl", help="re-sign the CRL (before its next update date)")
    ca_dir(q)
    q.add_argument("--copy", type=Path, action="append", default=[])
    q.set_defaults(func=cmd_crl)

    q = ps.add_parser("list", help="list the hall inventory")
    ca_dir(q)
    q.add_argument("--due-within", type=float, metavar="DAYS")
    q.add_argument("--all", action="store_true", help="include superseded and revoked")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_list)

    q = ps.add_parser("export-certs", help="usable certificates (kiosks by default) for hall "
                      "services to verify messages with")
    ca_dir(q)
    q.add_argument("--out", type=Path, required=True)
    q.add_argument("--role", action="append", choices=CERT_ROLES)
    q.set_defaults(func=cmd_export_certs)

    q = ps.add_parser("command", help="send one signed command to a kiosk and wait for its answer")
    ca_dir(q)
    q.add_argument("--cert", type=Path, required=True)
    q.add_argument("--key", type=Path, required=True)
    q.add_argument("--host", required=True)
    q.add_argument("--port", type=int, default=8883)
    q.add_argument("--device", required=True)
    q.add_argument("--name", required=True)
    q.add_argument("--args", default="{}", help="JSON object")
    q.add_argument("--ttl", type=float, default=60.0)
    q.add_argument("--timeout", type=float, default=10.0)
    q.add_argument("--state-dir", type=Path,
                   default=Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local/state"))
                   / "hallkiosk-ops")
    q.set_defaults(func=cmd_command)

    from .release_cli import add_release_parser   # signed updates (docs/updates.md)
    add_release_parser(ps)
    return p


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (``python -m provisioning.cli``) until hallkiosk/cli.py wires it."""
    from hallkiosk.errors import HallkioskError

    parser = argparse.ArgumentParser(prog="hallkiosk")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except HallkioskError as exc:
        print(f"hallkiosk provision {args.provision_command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
