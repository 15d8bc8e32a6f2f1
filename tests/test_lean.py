"""The agent's small footprint: Ed25519 through libcrypto, the PKCS#8 reader, deferred
standard modules, and an agent process that never maps the cryptography package."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey as CryptoKey
from hypothesis import given
from hypothesis import strategies as st

from edge.keys import generate_private_key, load_private_key, parse_private_key_pem
from edge.telemetry import _fixed, parse_loadavg, parse_uptime_s
from hallkiosk.errors import ConfigError
from mqtt_topics import ed25519
from mqtt_topics.ed25519 import Ed25519PrivateKey, Ed25519PublicKey, InvalidSignature

from .conftest import wait_for

REPO = Path(__file__).resolve().parents[1]

# RFC 8032 section 7.1, TEST 1 (empty message) and TEST 2 (one byte).
RFC8032 = [
    ("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
     "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a", "",
     "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"),
    ("4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
     "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c", "72",
     "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00"),
]


# -- Ed25519 through libcrypto --------------------------------------------------------------
@pytest.mark.parametrize("seed,public,message,signature", RFC8032)
def test_rfc8032_vectors(seed, public, message, signature):
    key = Ed25519PrivateKey(bytes.fromhex(seed))
    assert key.public_key().public_bytes_raw().hex() == public
    assert key.sign(bytes.fromhex(message)).hex() == signature
    Ed25519PublicKey(bytes.fromhex(public)).verify(bytes.fromhex(signature),
                                                   bytes.fromhex(message))


def test_libcrypto_is_the_backend_here():
    # This machine's Python links libcrypto: the agent must not silently fall back.
    assert ed25519.BACKEND == "libcrypto"


@given(st.binary(max_size=2048), st.binary(min_size=32, max_size=32))
def test_same_signatures_as_cryptography_and_refusals(message, seed):
    ours, theirs = Ed25519PrivateKey(seed), CryptoKey.from_private_bytes(seed)
    sig = ours.sign(message)
    assert sig == theirs.sign(message)
    theirs.public_key().verify(sig, message)
    pub = ours.public_key()
    pub.verify(sig, message)
    for bad_sig, bad_msg in ((sig[:-1] + bytes([sig[-1] ^ 1]), message),
                             (sig, message + b"x"), (sig[:63], message), (sig + b"\0", message)):
        with pytest.raises(InvalidSignature):
            pub.verify(bad_sig, bad_msg)


def test_bad_key_sizes_refused():
    with pytest.raises(ValueError, match="32"):
        Ed25519PrivateKey(b"\1" * 31)
    with pytest.raises(ValueError, match="32"):
        Ed25519PublicKey(b"\1" * 33)
    with pytest.raises(ValueError, match="Ed25519 key"):
        ed25519.raw_public("not a key")


def test_fallback_backend_gives_the_same_signatures():
    """Without a usable libcrypto the same classes use cryptography (forced here)."""
    seed, _, message, signature = RFC8032[1]
    code = ("import json; from mqtt_topics import ed25519 as e; "
            f"k = e.Ed25519PrivateKey(bytes.fromhex('{seed}')); "
            f"s = k.sign(bytes.fromhex('{message}')); k.public_key().verify(s, bytes.fromhex('{message}')); "
            "print(json.dumps([e.BACKEND, s.hex()]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env={"HALLKIOSK_ED25519": "cryptography", "PATH": "/usr/bin:/bin"},
                         check=True).stdout
    assert json.loads(out) == ["cryptography", signature]


# -- the device key file --------------------------------------------------------------------------
def _pem(key, fmt=serialization.PrivateFormat.PKCS8, enc=None):
    return key.private_bytes(serialization.Encoding.PEM, fmt,
                             enc or serialization.NoEncryption())


def test_reads_cryptography_pkcs8_and_writes_what_cryptography_reads(tmp_path):
    theirs = CryptoKey.generate()
    seed = parse_private_key_pem(_pem(theirs))
    assert seed == theirs.private_bytes_raw()
    path = tmp_path / "device.key"
    ours = generate_private_key(path)
    back = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert back.public_key().public_bytes_raw() == ours.public_key().public_bytes_raw()
    assert load_private_key(path).public_key() == ours.public_key()


def test_pkcs8_v2_with_public_key_is_checked():
    seed = bytes(range(32))
    pub = Ed25519PrivateKey(seed).public_key().public_bytes_raw()
    der = bytes.fromhex("3051020101300506032b657004220420") + seed + bytes.fromhex("812100") + pub
    pem = b"-----BEGIN PRIVATE KEY-----\n" + base64.encodebytes(der) + b"-----END PRIVATE KEY-----\n"
    assert parse_private_key_pem(pem) == seed
    wrong = der[:-1] + bytes([der[-1] ^ 1])
    with pytest.raises(ValueError, match="does not belong"):
        parse_private_key_pem(b"-----BEGIN PRIVATE KEY-----\n" + base64.encodebytes(wrong)
                              + b"-----END PRIVATE KEY-----\n")


@pytest.mark.parametrize("make,message", [
    (lambda: _pem(CryptoKey.generate(), enc=serialization.BestAvailableEncryption(b"pw")),
     "encrypted"),
    (lambda: _pem(ec.generate_private_key(ec.SECP256R1())), "another algorithm"),
    (lambda: _pem(ec.generate_private_key(ec.SECP256R1()),
                  serialization.PrivateFormat.TraditionalOpenSSL), "'EC'"),
    (lambda: b"-----BEGIN PRIVATE KEY-----\n!!!!\n-----END PRIVATE KEY-----\n", "base64"),
    (lambda: b"-----BEGIN PRIVATE KEY-----\nMC4CAQA=\n", "not terminated"),
    (lambda: b"hello", "no PEM block"),
    (lambda: b"-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n",
     "malformed"),
])
def test_unusable_key_files_get_a_clear_error(tmp_path, make, message):
    path = tmp_path / "device.key"
    path.write_bytes(make())
    path.chmod(0o600)
    with pytest.raises(ConfigError, match=message) as err:
        load_private_key(path)
    assert str(path) in str(err.value)


# -- deferred standard modules -----------------------------------------------------------------------
LEAN_PROBE = """
import codecs, json, sys
from edge.lean import defer_stdlib, loaded, DEFERRED
deferred = defer_stdlib()
import paho.mqtt.client
import edge.gpio, edge.staffcall, edge.cells.sensors, edge.cells.indicator, edge.config
from gpiozero.pins.mock import MockFactory
import edge.agent, socket
from edge.printer.escpos import TicketLayout, render_ticket
render_ticket(TicketLayout(hall_name="H", service_name="S", ticket_number="A-07-0001",
                           issued_at="09:41", waiting_ahead=0, qr_data="HK1:A-07-0001:x"))
socket.getaddrinfo("localhost", 1883)      # encodes the host name with the idna codec
before = {m: loaded(m) for m in DEFERRED}
heavy = sorted(m for m in ("email", "http.client", "zipfile", "decimal", "gpiozero.boards",
                           "stringprep", "unicodedata", "segno", "edge.printer.parser")
               if m in sys.modules)
idna_lean = not loaded("encodings.idna")
idna = {"ascii": "Kiosk-07.hall.local".encode("idna").decode(),
        "unicode": "bücher.example".encode("idna").decode(),
        "incremental": codecs.getincrementalencoder("idna")().encode("bücher.", True).decode(),
        "decoded": b"xn--bcher-kva.example".decode("idna")}
import importlib.util
spec_ok = (importlib.util.find_spec("statistics") is not None
           and importlib.util.find_spec("encodings.idna") is not None)
import io, tokenize                    # a star-import inside a late-loaded module
tokens = len(list(tokenize.generate_tokens(io.StringIO("a = 1\\n").readline)))
from statistics import median          # a from-import of a deferred module still works
value = median([3, 1, 2])
from gpiozero import LED               # so does the package gpiozero itself
import gpiozero.output_devices
print(json.dumps({"deferred": deferred, "before": before, "heavy": heavy, "spec_ok": spec_ok,
                  "median": value, "statistics": loaded("statistics"),
                  "gpiozero": loaded("gpiozero"),
                  "same_led": LED is gpiozero.output_devices.LED, "idna_lean": idna_lean,
                  "idna": idna, "tokens": tokens}))
"""


def test_deferred_modules_stay_unloaded_until_used_and_then_work():
    out = subprocess.run([sys.executable, "-c", LEAN_PROBE], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    got = json.loads(out)
    assert set(got["deferred"]) >= {"urllib.request", "importlib.metadata", "statistics",
                                    "gpiozero"}
    assert not any(got["before"].values()), got["before"]
    assert got["heavy"] == []
    assert got["spec_ok"] and got["median"] == 2 and got["statistics"]
    assert got["gpiozero"] and got["same_led"]
    # The ASCII fast path of the idna codec answered getaddrinfo; a non-ASCII name then loaded
    # the real codec, through the same registry entry.
    assert got["idna_lean"]
    assert got["tokens"] == 5           # NAME OP NUMBER NEWLINE ENDMARKER
    assert got["idna"] == {"ascii": "Kiosk-07.hall.local", "unicode": "xn--bcher-kva.example",
                           "incremental": "xn--bcher-kva.", "decoded": "bücher.example"}


@given(st.text(st.sampled_from("abcXYZ09-._\u00e9"), max_size=80))
def test_lean_idna_encodes_as_the_real_codec(name):
    import encodings.idna as real

    from edge.lean import _AsciiIdna

    lean = _AsciiIdna("encodings.idna").getregentry()
    try:
        expected = real.Codec().encode(name)
    except UnicodeError as exc:
        with pytest.raises(UnicodeError) as ours:
            lean.encode(name)
        assert str(ours.value) == str(exc)       # the same refusal, in the same words
    else:
        assert lean.encode(name) == expected


# -- the agent's command line without argparse ----------------------------------------------------
_AGENT_TOKENS = st.sampled_from(["--config", "--config=/etc/k.toml", "/tmp/a.toml", "--log-level",
                                 "debug", "warning", "loud", "--log-level=error", "-h", "--conf",
                                 "--", "-x", "--config=", "agent"])


@given(st.lists(_AGENT_TOKENS, max_size=6))
def test_agent_args_agree_with_argparse(tokens):
    from hallkiosk.cli import agent_args, build_parser

    argv = ["agent", *tokens]
    fast = agent_args(argv)
    if fast is None:
        return                          # argparse answers these (help, errors, abbreviations)
    full = build_parser(tools=False).parse_args(argv)
    assert (fast.command, fast.config, fast.log_level, fast.func) == \
        (full.command, full.config, full.log_level, full.func)


def test_agent_args_leave_help_and_errors_to_argparse():
    from hallkiosk.cli import agent_args

    assert agent_args(["agent"]).config == Path("/etc/hallkiosk/agent.toml")
    assert agent_args(["agent", "--config", "k.toml", "--log-level", "debug"]).log_level == "debug"
    for argv in (["agent", "--help"], ["agent", "--config"], ["agent", "--log-level", "loud"],
                 ["agent", "--conf", "k.toml"], ["check-config"], []):
        assert agent_args(argv) is None, argv


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
    out = subprocess.run([sys.executable, "-m", "edge.lean", "--precompile", "--site-dir",
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
    got = subprocess.run([sys.executable, "-m", "edge.lean", "--precompile", "--site"], cwd=REPO,
                         capture_output=True, text=True)
    assert got.returncode == 1 and "usage: python -m edge.lean --precompile" in got.stderr


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
def test_agent_process_never_maps_cryptography(hall):
    kiosk = hall.add_kiosk("lean1")
    proc = kiosk.spawn_agent()
    lines: list[str] = []
    wait_for(lambda: lines.append(proc.stdout.readline()) or "broker link up" in lines[-1],
             20, "the agent's link")
    maps = Path(f"/proc/{proc.pid}/maps").read_text()
    assert "libcrypto" in maps                      # Ed25519 and TLS: OpenSSL, once
    assert "cryptography" not in maps and "_cffi_backend" not in maps
    # Deferred before its command line was read (argparse -> shutil -> bz2, lzma) and its
    # broker address resolved (idna -> unicodedata).
    for lib in ("_bz2", "_lzma", "unicodedata"):
        assert lib not in maps, lib
    assert "PYTHONOPTIMIZE=2" in Path(f"/proc/{proc.pid}/environ").read_text().replace("\0", " ")
