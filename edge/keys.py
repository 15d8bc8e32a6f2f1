"""Ed25519 key files: the device key that signs every message the kiosk sends.

The key is generated on the kiosk and never leaves it. A key file that group or others can
read is refused: on a shared service account a readable key lets another process speak for
the kiosk (the agent refuses to start, and says which chmod fixes it).

Keys are read and written with ``cryptography`` (unencrypted PKCS#8 PEM, what
``hallkiosk provision keygen`` writes); its error for a bad file is passed on with the path.
"""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from hallkiosk.errors import ConfigError
from mqtt_topics.envelope import raw_public


def check_private_file(path: Path, what: str) -> None:
    """Refuse a secret file that others can read (or that does not exist)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: {what} unreadable: {exc.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"{path}: {what} is accessible by group/others "
                          f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}")


def write_private_file(path: Path, data: bytes) -> None:
    """Write a secret atomically with mode 0600 from the first byte."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def private_key_pem(key: Ed25519PrivateKey) -> bytes:
    """Unencrypted PKCS#8 PEM of an Ed25519 private key."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def generate_private_key(path: Path) -> Ed25519PrivateKey:
    """A fresh key from the OS's random source, written 0600 as PKCS#8 PEM."""
    key = Ed25519PrivateKey.generate()
    write_private_file(path, private_key_pem(key))
    return key


def parse_private_key_pem(pem: bytes) -> Ed25519PrivateKey:
    """The Ed25519 key of an unencrypted PKCS#8 PEM; ValueError says what it is not."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError:      # cryptography's word for "encrypted, and no password given"
        raise ValueError("the key is encrypted; the agent needs an unencrypted key "
                         "(mode 0600)") from None
    except ValueError as exc:
        raise ValueError(f"not a PEM private key cryptography can read ({exc})") from None
    except UnsupportedAlgorithm as exc:     # a key type this build cannot load
        raise ValueError(f"unsupported key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"expected an Ed25519 key, found {type(key).__name__}")
    return key


def load_private_key(path: Path) -> Ed25519PrivateKey:
    check_private_file(path, "device key")
    try:
        return parse_private_key_pem(path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"{path}: device key unreadable: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(f"{path}: not a usable PEM private key: {exc}") from None


def public_raw(key: Any) -> bytes:
    """Raw 32 bytes of an Ed25519 key (a private key's public half, a public key, or raw)."""
    return raw_public(key)


def public_b64(key: Any) -> str:
    return base64.b64encode(public_raw(key)).decode("ascii")


def public_from_raw(raw: bytes) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(raw)


def load_secret(path: Path, what: str = "hall secret", min_bytes: int = 32) -> bytes:
    check_private_file(path, what)
    data = path.read_bytes().strip()
    if len(data) < min_bytes:
        raise ConfigError(f"{path}: {what} is {len(data)} bytes; at least {min_bytes} needed")
    return data
