"""The agent's footprint by ordinary means (-OO bytecode, the heap trimmed, the QR size
from the capacity table), its key files read with ``cryptography``, and its own telemetry
number parsers."""

from __future__ import annotations

import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from edge.keys import generate_private_key, load_private_key, parse_private_key_pem
from edge.telemetry import _fixed, parse_loadavg, parse_uptime_s
from hallkiosk.errors import ConfigError

from .conftest import wait_for

REPO = Path(__file__).resolve().parents[1]


# -- key files ----------------------------------------------------------------------------------
def _pem(key, fmt=serialization.PrivateFormat.PKCS8, enc=None):
    return key.private_bytes(serialization.Encoding.PEM, fmt,
                             enc or serialization.NoEncryption())


def test_key_files_round_trip_with_cryptography(tmp_path):
    theirs = Ed25519PrivateKey.generate()
    assert parse_private_key_pem(_pem(theirs)).private_bytes_raw() == theirs.private_bytes_raw()
    path = tmp_path / "device.key"
    ours = generate_private_key(path)
    assert path.stat().st_mode & 0o777 == 0o600
    back = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert back.public_key().public_bytes_raw() == ours.public_key().public_bytes_raw()
    assert load_private_key(path).public_key() == ours.public_key()


@pytest.mark.parametrize("make,message", [
    (lambda: _pem(Ed25519PrivateKey.generate(),
                  enc=serialization.BestAvailableEncryption(b"pw")), "encrypted"),
    (lambda: _pem(ec.generate_private_key(ec.SECP256R1())), "expected an Ed25519 key"),
    (lambda: b"-----BEGIN PRIVATE KEY-----\n!!!!\n-----END PRIVATE KEY-----\n", "PEM"),
    (lambda: b"-----BEGIN PRIVATE KEY-----\nMC4CAQA=\n", "PEM"),
    (lambda: b"hello", "PEM"),
    (lambda: b"-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n",
     "PEM"),
])
def test_unusable_key_files_get_a_clear_error(tmp_path, make, message):
    path = tmp_path / "device.key"
    path.write_bytes(make())
    path.chmod(0o600)
    with pytest.raises(ConfigError, match=message) as err:
        load_private_key(path)
    assert str(path) in str(err.value) and "not a usable PEM private key" in str(err.value)


def test_a_key_file_others_can_read_is_refused(tmp_path):
    path = tmp_path / "device.key"
    generate_private_key(path)
    path.chmod(0o640)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_private_key(path)


# -- QR symbol size without an encoder ------------------------------------------------------------
@given(st.one_of(st.text("0123456789", max_size=3000).map(str.encode),
                 st.text("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ $%*+-./:", max_size=4500)
                 .map(str.encode),
                 st.binary(max_size=2400), st.text(max_size=400).map(str.encode)))
def test_qr_version_is_what_an_encoder_picks(data):
    import segno

    from edge.printer.escpos import qr_version

    try:
        expected = segno.make(data, error="m", micro=False, boost_error=False, mask=0).version
    except segno.DataOverflowError:
        with pytest.raises(ValueError, match="does not fit"):
            qr_version(data)
    else:
        assert qr_version(data) == expected


# -- bytecode for -OO ------------------------------------------------------------------------------
def test_precompile_writes_opt2_bytecode_of_what_the_agent_loads(tmp_path):
    cache, site = tmp_path / "cache", tmp_path / "site-packages"
    (site / "lazydep").mkdir(parents=True)
    (site / "lazydep" / "__init__.py").write_text("")
    (site / "lazydep" / "camera.py").write_text("FRAMES = 30\n")
    out = subprocess.run([sys.executable, "-m", "edge.footprint", "--precompile", "--site-dir",
                          str(site)], cwd=REPO,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPYCACHEPREFIX": str(cache)},
                         capture_output=True, text=True, check=True).stdout
    assert "1 package directories compiled for python -OO" in out
    written = {p.name for p in cache.rglob("*.opt-2.pyc")}
    for module in ("agent", "mqtt", "tls", "client", "ssl", "dbapi2", "request", "trust"):
        assert any(name.startswith(module + ".") for name in written), module
    agent_pyc = cache / str(REPO / "edge").lstrip("/") / \
        f"agent.{sys.implementation.cache_tag}.opt-2.pyc"
    assert agent_pyc.is_file()
    # The X.509 helper's cryptography, which it imports only when it runs.
    assert any(p.parent.name == "x509" for p in cache.rglob("*.opt-2.pyc"))
    # A package the agent imports only when configured: compiled from its site directory.
    assert (cache / str(site / "lazydep").lstrip("/") /
            f"camera.{sys.implementation.cache_tag}.opt-2.pyc").is_file()


def test_precompile_usage_is_refused():
    got = subprocess.run([sys.executable, "-m", "edge.footprint", "--precompile", "--site"], cwd=REPO,
                         capture_output=True, text=True)
    assert got.returncode == 1 and "usage: python -m edge.footprint --precompile" in got.stderr


# -- telemetry numbers without decimal ---------------------------------------------------------------
@given(st.integers(0, 10**6), st.text("0123456789", min_size=0, max_size=6))
def test_fixed_point_matches_decimal(whole, frac):
    text = f"{whole}.{frac}" if frac else str(whole)
    assert _fixed(text, 2) == int((Decimal(text) * 100).to_integral_value())


def test_kernel_numbers_refuse_what_the_kernel_never_writes():
    assert parse_loadavg("0.26 0.22 0.19 1/161 19039") == (26, 22, 19)
    assert parse_loadavg("nan 0.1 0.1") is None and parse_loadavg("1e3 0 0") is None
    assert parse_uptime_s("1532.70 2718.21") == 1532 and parse_uptime_s("-1.0 2") is None


# -- the agent process ---------------------------------------------------------------------------
@pytest.mark.e2e
def test_agent_process_runs_optimised_with_its_libraries_imported_plainly(hall):
    kiosk = hall.add_kiosk("lean1")
    proc = kiosk.spawn_agent()
    lines: list[str] = []
    wait_for(lambda: lines.append(proc.stdout.readline()) or "broker link up" in lines[-1],
             20, "the agent's link")
    maps = Path(f"/proc/{proc.pid}/maps").read_text()
    # Signing goes through cryptography's own extension, not a stand-in of ours.
    assert "cryptography" in maps and "_rust" in maps
    assert "PYTHONOPTIMIZE=2" in Path(f"/proc/{proc.pid}/environ").read_text().replace("\0", " ")
