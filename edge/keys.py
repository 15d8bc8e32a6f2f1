"""Ed25519 key files: the device key that signs every message the kiosk sends.

The key is generated on the kiosk and never leaves it. A key file that group or others can
read is refused: on a shared service account a readable key lets another process speak for
the kiosk (the agent refuses to start, and says which chmod fixes it).

The agent reads the key without the ``cryptography`` package (see mqtt_topics.ed25519 for
why): the file is the unencrypted PKCS#8 PEM that ``hallkiosk provision keygen`` writes, whose
DER for Ed25519 is fixed by RFC 8410 section 7: a 16-byte prefix and the 32-byte seed, or in
the v2 form (OneAsymmetricKey) also the public key, which must then match the seed.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
from pathlib import Path
from typing import Any

from hallkiosk.errors import ConfigError
from mqtt_topics.ed25519 import Ed25519PrivateKey, Ed25519PublicKey, raw_public

# SEQUENCE { INTEGER 0, SEQUENCE { OID 1.3.101.112 }, OCTET STRING { OCTET STRING (32) } }
_PKCS8_V1_PREFIX = bytes.fromhex("302e020100300506032b657004220420")
# The same with version 1 and the public key as [1] IMPLICIT BIT STRING (RFC 8410 / 5958).
_PKCS8_V2_PREFIX = bytes.fromhex("3051020101300506032b657004220420")
_PKCS8_V2_PUBLIC = bytes.fromhex("812100")
_ED25519_OID = bytes.fromhex("06032b6570")


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


def private_key_pem(seed: bytes) -> bytes:
    """Unencrypted PKCS#8 PEM (RFC 8410 v1 form) of a 32-byte Ed25519 seed."""
    if len(seed) != 32:
        raise ValueError("an Ed25519 seed is 32 bytes")
    body = base64.b64encode(_PKCS8_V1_PREFIX + seed).decode("ascii")
    return f"-----BEGIN PRIVATE KEY-----\n{body}\n-----END PRIVATE KEY-----\n".encode("ascii")


def generate_private_key(path: Path) -> Ed25519PrivateKey:
    """A fresh key from the OS's random source, written 0600 as PKCS#8 PEM."""
    seed = os.urandom(32)
    write_private_file(path, private_key_pem(seed))
    return Ed25519PrivateKey(seed)


def parse_private_key_pem(pem: bytes) -> bytes:
    """The 32-byte seed of an unencrypted PKCS#8 Ed25519 PEM; ValueError says what it is not."""
    text = pem.decode("ascii", "replace")
    begin = text.find("-----BEGIN ")
    if begin < 0:
        raise ValueError("no PEM block (-----BEGIN ...-----)")
    label_end = text.find("-----", begin + 11)
    label = text[begin + 11:label_end]
    end = text.find(f"-----END {label}-----", label_end)
    if label_end < 0 or end < 0:
        raise ValueError("PEM block not terminated")
    if label == "ENCRYPTED PRIVATE KEY":
        raise ValueError("the key is encrypted; the agent needs an unencrypted key (mode 0600)")
    if label != "PRIVATE KEY":
        kind = label.removesuffix(" PRIVATE KEY") if label.endswith("PRIVATE KEY") else label
        raise ValueError(f"expected an Ed25519 key (PKCS#8 \"PRIVATE KEY\"), found {kind!r}")
    try:
        der = base64.b64decode("".join(text[label_end + 5:end].split()), validate=True)
    except binascii.Error:
        raise ValueError("PEM body is not base64") from None
    if len(der) == 48 and der.startswith(_PKCS8_V1_PREFIX):
        return der[16:]
    if (len(der) == 83 and der.startswith(_PKCS8_V2_PREFIX)
            and der[48:51] == _PKCS8_V2_PUBLIC):
        seed = der[16:48]
        if Ed25519PrivateKey(seed).public_key().public_bytes_raw() != der[51:]:
            raise ValueError("the public key in the file does not belong to its private key")
        return seed
    if _ED25519_OID not in der[:16]:
        raise ValueError("expected an Ed25519 key, found another algorithm")
    raise ValueError("malformed PKCS#8 Ed25519 key")


def load_private_key(path: Path) -> Ed25519PrivateKey:
    check_private_file(path, "device key")
    try:
        seed = parse_private_key_pem(path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"{path}: device key unreadable: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(f"{path}: not a usable PEM private key: {exc}") from None
    return Ed25519PrivateKey(seed)


def public_raw(key: Any) -> bytes:
    """Raw 32 bytes of an Ed25519 key (private or public, ours or cryptography's)."""
    return raw_public(key)


def public_b64(key: Any) -> str:
    return base64.b64encode(public_raw(key)).decode("ascii")


def public_from_raw(raw: bytes) -> Ed25519PublicKey:
    return Ed25519PublicKey(raw)


def load_secret(path: Path, what: str = "hall secret", min_bytes: int = 32) -> bytes:
    check_private_file(path, what)
    data = path.read_bytes().strip()
    if len(data) < min_bytes:
        raise ConfigError(f"{path}: {what} is {len(data)} bytes; at least {min_bytes} needed")
    return data
