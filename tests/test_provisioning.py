"""Provisioning: the hall CA, kiosk enrollment from a CSR, bundles, inventory, renewal,
revocation (CRL), keyrings from certificates, the generated broker config, the agent's
key-file and certificate checks, and the CLI end to end (all with real cryptography)."""

from __future__ import annotations

import datetime as dt
import json
import os
import stat
import tomllib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge.clock import ManualClock
from edge.config import parse_config
from edge.tls import check_tls
from hallkiosk.errors import ConfigError
from mqtt_topics.envelope import key_id
from mqtt_topics.topics import KINDS
from provisioning import cli
from provisioning.brokerconf import BrokerFiles, render_acl, render_mosquitto_conf
from provisioning.bundle import BUNDLE_FILES, KioskSettings, verify_bundle, write_bundle
from provisioning.ca import create_hall_ca, load_hall_ca
from provisioning.crl import check_crl, load_crl, revoke
from provisioning.enroll import (enroll, generate_device_key, issue_service, make_csr,
                                 read_csr, renew)
from provisioning.errors import EnrollmentRefused, ProvisioningError, TrustError
from provisioning.inventory import Inventory
from provisioning.trust import (TrustAnchors, apply_crl, keyring_from_certs, load_pem_certs,
                                trusted_public_keys)

HALL = "citizen-home"
SERVICES = (("A", "Citizen card", "A"), ("B", "Social insurance", "B"))


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def csr_with_subject(attrs, key=None) -> bytes:
    key = key or Ed25519PrivateKey.generate()
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(oid, v) for oid, v in attrs]))
           .sign(key, None))
    return csr.public_bytes(serialization.Encoding.PEM)


@pytest.fixture
def clock():
    return ManualClock(start_wall=1_795_000_000.0)


@pytest.fixture
def ca(tmp_path, clock):
    return create_hall_ca(tmp_path / "ca", HALL, root_dir=tmp_path / "offline-root", clock=clock)


def settings_for(device: str, tmp_path) -> KioskSettings:
    return KioskSettings(device_id=device, hall=HALL, hall_name="Citizen Home Service Centre",
                         number_prefix="07", board="rpi4b", broker_host="127.0.0.1",
                         broker_port=8883, services=SERVICES,
                         key_path=str(tmp_path / "kiosk" / "device.key"),
                         secret_path=str(tmp_path / "kiosk" / "citizen.secret"),
                         state_dir=str(tmp_path / "kiosk" / "state"))


def kiosk_enrolled(ca, tmp_path, clock, device="k07"):
    """keygen on the 'kiosk', CSR to the CA, bundle to the 'boot partition'."""
    key = generate_device_key(tmp_path / "kiosk" / "device.key")
    cert, entry = enroll(ca, make_csr(key, device), board="rpi4b", expect_id=device, clock=clock)
    ops_cert, _ = issue_service(ca, "ops-1", "ops", tmp_path / "ops", clock=clock) \
        if Inventory.load(ca.inventory_path).active("ops-1") is None else (None, None)
    services = [c for c in (ops_cert,) if c is not None]
    write_bundle(tmp_path / "boot", ca, cert, settings_for(device, tmp_path), services,
                 clock=clock)
    return key, cert, entry


# -- the CA -------------------------------------------------------------------------------
def test_ca_layout_modes_and_chain(ca, tmp_path, clock):
    assert mode(tmp_path / "offline-root" / "root.key") == 0o600
    assert mode(tmp_path / "ca" / "issuing.key") == 0o600
    assert not (tmp_path / "ca" / "root.key").exists()      # the root key is elsewhere
    anchors = TrustAnchors(load_pem_certs(ca.chain_path))
    assert anchors.hall == HALL and anchors.issuing.issuer == anchors.root.subject
    crl = load_crl(ca.crl_path)
    assert len(list(crl)) == 0
    assert check_crl(crl, ca.issuing_cert, dt.datetime.fromtimestamp(clock.wall(), dt.UTC)) > 50
    with pytest.raises(ProvisioningError, match="already exists"):
        create_hall_ca(tmp_path / "ca", HALL, clock=clock)
    assert load_hall_ca(tmp_path / "ca").issuing_cert == ca.issuing_cert
    (tmp_path / "ca" / "issuing.key").chmod(0o644)
    with pytest.raises(ProvisioningError, match="chmod 600"):
        load_hall_ca(tmp_path / "ca")


# -- enrollment ---------------------------------------------------------------------------
def test_enroll_writes_bundle_and_inventory(ca, tmp_path, clock):
    key, cert, entry = kiosk_enrolled(ca, tmp_path, clock)
    assert mode(tmp_path / "kiosk" / "device.key") == 0o600
    assert sorted(p.name for p in (tmp_path / "boot").iterdir()) == sorted(BUNDLE_FILES)
    assert not any("PRIVATE KEY" in p.read_text() for p in (tmp_path / "boot").iterdir())
    subject = {a.oid: a.value for a in cert.subject}
    assert subject == {NameOID.COMMON_NAME: "k07", NameOID.ORGANIZATIONAL_UNIT_NAME: "kiosk",
                       NameOID.ORGANIZATION_NAME: HALL}
    assert entry.kid == key_id(key.public_key())   # the signing key IS the TLS key
    inv = Inventory.load(ca.inventory_path)
    assert inv.active("k07").serial == f"{cert.serial_number:x}" and inv.active("k07").board == "rpi4b"
    rep = verify_bundle(tmp_path / "boot", clock=clock)
    assert rep.ok, rep.problems
    assert rep.device_id == "k07" and 364 < rep.days_left < 366 and not rep.warnings

    # agent.toml: what the current config accepts, plus the [tls] section (see report).
    data = tomllib.loads((tmp_path / "boot" / "agent.toml").read_text())
    assert data["tls"] == {"ca_file": "ca-chain.pem", "cert_file": "device.crt",
                           "crl_file": "crl.pem", "trusted_certs": "services.pem"}
    assert data["keys"]["trusted"][0]["owner"] == "ops-1"
    secret = tmp_path / "kiosk" / "citizen.secret"
    secret.write_bytes(os.urandom(48))
    secret.chmod(0o600)
    cfg = parse_config({k: v for k, v in data.items() if k != "tls"}, source="agent.toml",
                       base_dir=tmp_path / "boot")
    assert (cfg.kiosk.device_id, cfg.kiosk.hall, cfg.broker.port) == ("k07", HALL, 8883)
    assert [s.category for s in cfg.services] == ["A", "B"]


def test_enroll_refuses_duplicates_and_shared_ids(ca, tmp_path, clock):
    kiosk_enrolled(ca, tmp_path, clock)
    with pytest.raises(EnrollmentRefused, match="already enrolled"):
        enroll(ca, make_csr(Ed25519PrivateKey.generate(), "k07"), clock=clock)
    with pytest.raises(EnrollmentRefused, match="ops certificate"):
        enroll(ca, make_csr(Ed25519PrivateKey.generate(), "ops-1"), clock=clock)
    with pytest.raises(EnrollmentRefused, match="not 'k08'"):
        enroll(ca, make_csr(Ed25519PrivateKey.generate(), "k09"), expect_id="k08", clock=clock)
    assert Inventory.load(ca.inventory_path).ids() == ["k07", "ops-1"]


@pytest.mark.parametrize("cn", ["k+1", "k#", "hall/k1", "+", "#", "$SYS", "k 1", "-k",
                                "k" * 33, "k\x00"])
def test_cn_with_wildcard_or_slash_refused_at_enrollment(ca, cn, clock):
    with pytest.raises(EnrollmentRefused):
        enroll(ca, csr_with_subject([(NameOID.COMMON_NAME, cn)]), clock=clock)
    with pytest.raises(EnrollmentRefused):
        make_csr(Ed25519PrivateKey.generate(), cn)
    with pytest.raises(EnrollmentRefused, match="empty"):
        make_csr(Ed25519PrivateKey.generate(), "")
    assert Inventory.load(ca.inventory_path).entries() == []


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=6), st.sampled_from("+#/$ "), st.text(max_size=6))
def test_fuzz_cn_with_mqtt_specials_never_enrolled(ca, clock, head, special, tail):
    cn = head + special + tail
    with pytest.raises(EnrollmentRefused):
        enroll(ca, csr_with_subject([(NameOID.COMMON_NAME, cn)]), clock=clock)


def test_csr_must_be_exactly_cn_ed25519_and_self_signed(ca, clock):
    with pytest.raises(EnrollmentRefused, match="exactly CN"):
        read_csr(csr_with_subject([(NameOID.COMMON_NAME, "k1"),
                                   (NameOID.ORGANIZATIONAL_UNIT_NAME, "ops")]))
    ecdsa = ec.generate_private_key(ec.SECP256R1())
    from cryptography.hazmat.primitives import hashes
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "k1")]))
           .sign(ecdsa, hashes.SHA256())).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(EnrollmentRefused, match="Ed25519"):
        read_csr(csr)
    # Swap the public key of one CSR into another: the self-signature no longer verifies.
    good = x509.load_pem_x509_csr(make_csr(Ed25519PrivateKey.generate(), "k1"))
    der = bytearray(good.public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x01                                     # inside the signature
    tampered = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(EnrollmentRefused, match="signature"):
        read_csr(tampered)
    with pytest.raises(EnrollmentRefused):
        read_csr(b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600))
def test_fuzz_read_csr_clear_errors(data):
    with pytest.raises(EnrollmentRefused):
        read_csr(b"-----BEGIN CERTIFICATE REQUEST-----\n" + data)
    with pytest.raises(EnrollmentRefused):
        read_csr(data)


def test_device_key_not_overwritten(tmp_path):
    path = tmp_path / "device.key"
    generate_device_key(path)
    before = path.read_bytes()
    with pytest.raises(ProvisioningError, match="already exists"):
        generate_device_key(path)
    assert path.read_bytes() == before
    generate_device_key(path, force=True)
    assert path.read_bytes() != before and mode(path) == 0o600


# -- verify, the agent's checks ---------------------------------------------------------------
def test_verify_and_agent_refuse_readable_or_wrong_keys(ca, tmp_path, clock):
    key, cert, _ = kiosk_enrolled(ca, tmp_path, clock)
    boot, key_path = tmp_path / "boot", tmp_path / "kiosk" / "device.key"
    ok = check_tls(boot / "ca-chain.pem", boot / "device.crt", key_path,
                   crl_file=boot / "crl.pem", device_id="k07", clock=clock)
    assert ok.owner == "k07" and ok.settings.key_file == str(key_path)

    key_path.chmod(0o640)
    rep = verify_bundle(boot, clock=clock)
    assert not rep.ok and "chmod 600" in rep.problems[0]
    with pytest.raises(ConfigError, match="chmod 600"):
        check_tls(boot / "ca-chain.pem", boot / "device.crt", key_path, clock=clock)
    key_path.chmod(0o600)

    other = tmp_path / "other.key"
    generate_device_key(other)
    rep = verify_bundle(boot, key_path=other, clock=clock)
    assert any("does not match" in p for p in rep.problems)
    with pytest.raises(ConfigError, match="not for the key"):
        check_tls(boot / "ca-chain.pem", boot / "device.crt", other, clock=clock)
    with pytest.raises(ConfigError, match="this kiosk is 'k08'"):
        check_tls(boot / "ca-chain.pem", boot / "device.crt", key_path, device_id="k08",
                  clock=clock)


def test_verify_reports_expiry_revocation_and_foreign_ca(ca, tmp_path, clock):
    kiosk_enrolled(ca, tmp_path, clock)
    boot = tmp_path / "boot"
    late = ManualClock(start_wall=clock.wall() + 340 * 86400)
    rep = verify_bundle(boot, clock=ManualClock(start_wall=clock.wall() + 50 * 86400))
    assert rep.ok and any("CRL expires" in w for w in rep.warnings)
    rep = verify_bundle(boot, clock=late)
    assert any("CRL expired" in p for p in rep.problems)
    assert any("renew" in w for w in rep.warnings)
    rep = verify_bundle(boot, clock=ManualClock(start_wall=clock.wall() + 400 * 86400))
    assert any("expired" in p for p in rep.problems)

    revoke(ca, "k07", reason="key_compromise", clock=clock, copy_to=[boot / "crl.pem"])
    rep = verify_bundle(boot, clock=clock)
    assert any("revoked" in p for p in rep.problems)
    with pytest.raises(ConfigError, match="revoked"):
        check_tls(boot / "ca-chain.pem", boot / "device.crt", tmp_path / "kiosk" / "device.key",
                  crl_file=boot / "crl.pem", clock=clock)

    other = create_hall_ca(tmp_path / "other-ca", HALL, clock=clock)
    (boot / "ca-chain.pem").write_bytes(other.chain_pem())
    rep = verify_bundle(boot, clock=clock)
    assert not rep.ok and "not signed" in rep.problems[0]


# -- renewal and revocation ---------------------------------------------------------------------
def test_renew_keeps_key_supersedes_and_revoke_covers_both(ca, tmp_path, clock):
    key, cert, entry = kiosk_enrolled(ca, tmp_path, clock)
    later = ManualClock(start_wall=clock.wall() + 340 * 86400)
    inv = Inventory.load(ca.inventory_path)
    now_late = dt.datetime.fromtimestamp(later.wall(), dt.UTC)
    assert [e.id for e in inv.due(now_late, 30)] == ["k07", "ops-1"]   # ops: 90 days
    new_cert, new_entry = renew(ca, "k07", clock=later)
    assert new_entry.kid == entry.kid and new_cert.serial_number != cert.serial_number
    inv = Inventory.load(ca.inventory_path)
    assert inv.by_serial(entry.serial).status == "superseded"
    assert inv.active("k07") == new_entry and [e.id for e in inv.due(now_late, 30)] == ["ops-1"]
    # A rotated key comes as a CSR for the same CN.
    rotated = Ed25519PrivateKey.generate()
    with pytest.raises(EnrollmentRefused):
        renew(ca, "k07", csr_pem=make_csr(rotated, "k08"), clock=later)
    third, _ = renew(ca, "k07", csr_pem=make_csr(rotated, "k07"), clock=later)

    ring = keyring_from_certs(ca.chain_path, [cert, new_cert, third], ca.crl_path, clock=later)
    assert len(ring) == 2                     # two keys, one owner
    newly = revoke(ca, "k07", clock=later)
    assert len(newly) == 3                    # superseded certificates still pass TLS: revoked too
    crl = load_crl(ca.crl_path)
    assert {r.serial_number for r in crl} == {cert.serial_number, new_cert.serial_number,
                                             third.serial_number}
    removed = apply_crl(ring, ca.chain_path, [cert, new_cert, third], crl, clock=later)
    assert len(removed) == 2 and len(ring) == 0
    with pytest.raises(ProvisioningError, match="no active certificate"):
        renew(ca, "k07", clock=later)
    assert revoke(ca, "k07", clock=later) == []
    with pytest.raises(ProvisioningError, match="not in the inventory"):
        revoke(ca, "nobody", clock=later)


def test_keyring_from_certs_roles_and_rejections(ca, tmp_path, clock):
    _, kiosk_cert, _ = kiosk_enrolled(ca, tmp_path, clock)
    consumer, _ = issue_service(ca, "ledger", "consumer", tmp_path / "svc", clock=clock)
    monitor, _ = issue_service(ca, "auditor", "monitor", tmp_path / "svc", clock=clock)
    other = create_hall_ca(tmp_path / "other", HALL, clock=clock)
    foreign, _ = issue_service(other, "ops-9", "ops", tmp_path / "other-svc", clock=clock)
    rejected = []
    ring = keyring_from_certs(ca.chain_path, [kiosk_cert, consumer, monitor, foreign,
                                              tmp_path / "ops" / "ops-1.crt"],
                              ca.crl_path, clock=clock,
                              on_reject=lambda c, why: rejected.append(why))
    owners = {ring.get(kid).owner: ring.get(kid).roles for kid in ring}
    # A monitor signs its alerts, so it is trusted too (for role monitor only).
    assert owners == {"k07": {"kiosk"}, "ledger": {"consumer"}, "ops-1": {"ops"},
                      "auditor": {"monitor"}}
    assert len(rejected) == 1 and "not signed" in rejected[0]
    expired = keyring_from_certs(ca.chain_path, [kiosk_cert], ca.crl_path,
                                 clock=ManualClock(start_wall=clock.wall() + 400 * 86400),
                                 on_reject=lambda c, why: rejected.append(why))
    assert len(expired) == 0 and "expired" in rejected[-1]
    with pytest.raises(TrustError, match="not signed by the hall"):
        keyring_from_certs(ca.chain_path, [kiosk_cert], other.crl_path, clock=clock)


# -- broker config ----------------------------------------------------------------------------
def test_broker_acl_is_derived_from_the_contract():
    acl = render_acl(HALL, [("ledger", "consumer"), ("ops-1", "ops"), ("auditor", "monitor")])
    lines = acl.splitlines()
    base = f"hall/{HALL}/kiosk"
    writes = {f"pattern write {base}/%u/{s}" for s in
              ("state", "telemetry", "event", "ticket", "cmd/result")}
    reads = {f"pattern read {base}/%u/{s}" for s in ("ticket/ack", "cmd")}   # not alert
    assert writes | reads == {ln for ln in lines if ln.startswith("pattern")}
    ops = lines[lines.index("user ops-1") + 1:]
    assert ops[0] == f"topic write {base}/+/cmd"
    assert f"topic read {base}/+/ticket" not in ops[:7]
    assert f"topic read {base}/+/alert" in ops[:7]            # ops follow the alerts
    auditor = lines[lines.index("user auditor") + 1:]
    # A monitor reads everything and writes only alerts.
    assert auditor[0] == f"topic write {base}/+/alert"
    assert len(auditor) == len(KINDS) + 1 and all(x.startswith("topic read") for x in auditor[1:])
    assert not any(" write " in x and "%u" not in x and "cmd" not in x and "ack" not in x
                   and not x.endswith("/alert") for x in lines)
    with pytest.raises(ProvisioningError):
        render_acl(HALL, [("ops 1", "ops")])
    with pytest.raises(ProvisioningError):
        render_acl(HALL, [("k1", "kiosk")])


def test_broker_conf_has_every_security_option(tmp_path):
    files = BrokerFiles(*(tmp_path / n for n in ("chain.pem", "b.crt", "b.key", "crl.pem", "acl")))
    conf = render_mosquitto_conf(files)
    for line in ("require_certificate true", "use_identity_as_username true",
                 "use_username_as_clientid true", "allow_anonymous false",
                 f"crlfile {tmp_path / 'crl.pem'}", "listener {port} {host}",
                 "tls_version tlsv1.3", f"acl_file {tmp_path / 'acl'}"):
        assert line in conf.splitlines()
    with pytest.raises(ProvisioningError):
        render_mosquitto_conf(BrokerFiles(*(tmp_path / "x",) * 4, __import__("pathlib").Path("acl")))


# -- the CLI, as the field engineer types it ----------------------------------------------------
def test_cli_choices_match_the_modules():
    from provisioning.ca import ROLES
    from provisioning.inventory import REASONS

    assert set(cli.CERT_ROLES) == set(ROLES) and cli.REVOKE_REASONS == REASONS
    assert set(cli.ISSUE_ROLES) == set(ROLES) - {"kiosk", "broker"}



def run(capsys, *argv) -> tuple[int, str]:
    code = cli.main(["provision", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_cli_full_procedure(tmp_path, capsys):
    ca, boot, kiosk = tmp_path / "ca", tmp_path / "boot", tmp_path / "kiosk"
    code, out = run(capsys, "init-ca", "--ca-dir", ca, "--hall", HALL, "--root-dir",
                    tmp_path / "usb")
    assert code == 0 and "offline" in out
    assert run(capsys, "issue", "--ca-dir", ca, "--id", "ops-1", "--role", "ops", "--out",
               tmp_path / "ops")[0] == 0
    assert run(capsys, "issue", "--ca-dir", ca, "--id", "booking", "--role", "booking",
               "--out", tmp_path / "booking")[0] == 0
    assert mode(tmp_path / "booking" / "booking.key") == 0o600
    code, out = run(capsys, "keygen", "--device", "k07", "--key", kiosk / "device.key",
                    "--csr", boot / "k07.csr")
    assert code == 0 and mode(kiosk / "device.key") == 0o600
    code, out = run(capsys, "keygen", "--device", "k/07", "--key", kiosk / "x.key", "--csr",
                    boot / "x.csr")
    assert code == 2 and "'/'" in out
    code, out = run(capsys, "enroll", "--ca-dir", ca, "--csr", boot / "k07.csr", "--device",
                    "k07", "--target", boot, "--board", "rpi4b", "--prefix", "07",
                    "--hall-name", "Citizen Home", "--broker", "hall-broker.local:8883",
                    "--service", "A:Citizen card:A", "--key-path", kiosk / "device.key")
    assert code == 0, out
    assert "[tls]" in (boot / "agent.toml").read_text()
    code, out = run(capsys, "verify", "--dir", boot)
    assert code == 0 and "k07: OK" in out
    booking = trusted_public_keys(boot / "ca-chain.pem", [boot / "services.pem"],
                                  boot / "crl.pem", role="booking")
    assert [key_id(k) for k in booking] == [
        key_id(load_pem_certs(tmp_path / "booking" / "booking.crt")[0].public_key())]
    code, out = run(capsys, "issue-broker", "--ca-dir", ca, "--out", tmp_path / "broker",
                    "--dns", "hall-broker.local", "--ip", "127.0.0.1")
    assert code == 0
    code, out = run(capsys, "broker-conf", "--ca-dir", ca, "--out", tmp_path / "broker",
                    "--port", "8883")
    assert code == 0 and "listener 8883 0.0.0.0" in (tmp_path / "broker" / "hallkiosk.conf").read_text()
    assert "user ops-1" in (tmp_path / "broker" / "acl").read_text()
    code, out = run(capsys, "list", "--ca-dir", ca, "--json")
    assert code == 0
    assert {e["id"] for e in json.loads(out)} == {"ops-1", "booking", "k07", "broker"}
    code, out = run(capsys, "export-certs", "--ca-dir", ca, "--out", tmp_path / "kiosks.pem")
    assert code == 0 and "1 certificate(s)" in out
    ring = keyring_from_certs(ca / "chain.pem", [tmp_path / "kiosks.pem"], ca / "crl.pem")
    assert [ring.get(k).owner for k in ring] == ["k07"]
    code, out = run(capsys, "renew", "--ca-dir", ca, "k07", "--target", boot)
    assert code == 0 and "renewed" in out
    assert run(capsys, "verify", "--dir", boot)[0] == 0
    code, out = run(capsys, "revoke", "--ca-dir", ca, "k07", "--reason", "key_compromise",
                    "--crl-copy", boot / "crl.pem")
    assert code == 0 and "restart the broker" in out
    code, out = run(capsys, "verify", "--dir", boot)
    assert code == 1 and "revoked" in out
    code, out = run(capsys, "crl", "--ca-dir", ca)
    assert code == 0 and "2 revoked" in out
    code, out = run(capsys, "list", "--ca-dir", ca, "--all")
    assert code == 0 and out.count("revoked") == 2
    again = ("enroll", "--ca-dir", ca, "--csr", boot / "k07.csr", "--device", "k07", "--target",
             boot, "--board", "rpi4b", "--prefix", "07", "--hall-name", "x", "--broker", "h",
             "--service", "A:x:A")
    code, out = run(capsys, *again)
    assert code == 2 and "key was revoked" in out   # a compromised key is never certified again
    assert run(capsys, "keygen", "--device", "k07", "--key", kiosk / "device.key", "--csr",
               boot / "k07.csr", "--force")[0] == 0
    code, out = run(capsys, *again)
    assert code == 0, out                       # the replaced device, with its new key


def test_agent_helper_process_checks_as_check_tls_and_reads_trusted_keys(ca, tmp_path, clock,
                                                                         caplog):
    """The agent's TlsCheck (a child process, so the agent never loads X.509 code) refuses
    what check_tls refuses, with the same message, and hands over the trusted service keys."""
    from edge.tls import TlsCheck

    key, _, _ = kiosk_enrolled(ca, tmp_path, clock)
    boot, key_path = tmp_path / "boot", tmp_path / "kiosk" / "device.key"

    def check(device="k07", at=clock, crl=boot / "crl.pem"):
        return TlsCheck(ca_file=boot / "ca-chain.pem", cert_file=boot / "device.crt",
                        key_file=key_path, crl_file=crl, device_id=device, warn_days=30,
                        trusted_certs=boot / "services.pem", trusted_roles=("consumer", "ops"),
                        clock=at).start().result()

    checked, trusted = check()
    assert checked.owner == "k07" and checked.settings.key_file == str(key_path)
    assert [(t.owner, t.roles) for t in trusted] == [("ops-1", ("ops",))]
    ops_cert = x509.load_pem_x509_certificate((boot / "services.pem").read_bytes())
    assert key_id(trusted[0].raw) == key_id(ops_cert.public_key())

    with pytest.raises(ConfigError, match="this kiosk is 'k08'"):
        check(device="k08")
    with pytest.raises(ConfigError, match="expired"):
        check(at=ManualClock(start_wall=clock.wall() + 400 * 86400))
    with caplog.at_level("WARNING", logger="hallkiosk.tls"):
        check(at=ManualClock(start_wall=clock.wall() + 340 * 86400), crl=None)
    assert any("renew" in r.getMessage() for r in caplog.records)   # relayed from the child
    (boot / "ca-chain.pem").write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="ca-chain.pem|device.crt"):
        check()
