"""Ed25519 signing and verification for long-running processes, through OpenSSL's libcrypto.

Why not `cryptography` here: its Rust extension maps about 9 MB of resident code into every
process that imports it, and the kiosk agent (budget: 30 MB resident) needs only two
operations of it, sign and verify. The Python interpreter already carries libcrypto for
``hashlib`` and ``ssl``, so this module calls that same library (found in this process's own
memory map, so it is the exact copy ``ssl`` uses) with ctypes: EVP_PKEY_new_raw_*_key and the
one-shot EVP_DigestSign / EVP_DigestVerify (OpenSSL 1.1.1 and later; RFC 8032 pure Ed25519).
Certificates, CSRs, CRLs and key generation stay with ``cryptography`` in provisioning and ops.

Where no usable libcrypto is found the same classes fall back to ``cryptography``, so callers
never branch. ``BACKEND`` says which one this process uses.

The classes mirror the part of ``cryptography``'s Ed25519 API the contract uses
(``sign``, ``verify``, ``public_key``, ``public_bytes_raw``), so keys from either side can be
handed to mqtt_topics.envelope.Signer and Keyring; ``raw_public`` accepts both.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any, Final

EVP_PKEY_ED25519: Final = 1087     # NID_ED25519 (OpenSSL obj_mac.h)
SIGNATURE_LEN: Final = 64
KEY_LEN: Final = 32


class InvalidSignature(Exception):
    """The signature does not verify for this key and data."""


def _libcrypto_path() -> str | None:
    """The libcrypto this interpreter's ``_hashlib`` is linked to (read off /proc/self/maps)."""
    import _hashlib  # noqa: F401  (loads libcrypto if the interpreter links it dynamically)
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                path = line.rstrip("\n").partition("/")[2]
                if path and "libcrypto" in os.path.basename(path):
                    return "/" + path
    except OSError:
        pass
    return None


def _load_libcrypto() -> Any | None:
    path = os.environ.get("HALLKIOSK_LIBCRYPTO") or _libcrypto_path()
    if not path or os.environ.get("HALLKIOSK_ED25519") == "cryptography":
        return None
    try:
        lib = ctypes.CDLL(path)       # CDLL: every call releases the GIL
        p, sz, i = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int
        buf = ctypes.c_char_p
        for name, res, args in (
                ("EVP_PKEY_new_raw_private_key", p, (i, p, buf, sz)),
                ("EVP_PKEY_new_raw_public_key", p, (i, p, buf, sz)),
                ("EVP_PKEY_get_raw_public_key", i, (p, ctypes.c_char_p, ctypes.POINTER(sz))),
                ("EVP_PKEY_free", None, (p,)),
                ("EVP_MD_CTX_new", p, ()),
                ("EVP_MD_CTX_free", None, (p,)),
                ("EVP_DigestSignInit", i, (p, p, p, p, p)),
                ("EVP_DigestSign", i, (p, ctypes.c_char_p, ctypes.POINTER(sz), buf, sz)),
                ("EVP_DigestVerifyInit", i, (p, p, p, p, p)),
                ("EVP_DigestVerify", i, (p, buf, sz, buf, sz)),
                ("ERR_clear_error", None, ())):
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args
    except (OSError, AttributeError):
        return None
    return lib


_LIB: Final = _load_libcrypto()
BACKEND: Final = "libcrypto" if _LIB is not None else "cryptography"


def _clear_errors() -> None:
    # A failed call leaves entries on OpenSSL's per-thread error queue; the ssl module reads
    # that queue after its own failures, so stale entries would garble its messages.
    _LIB.ERR_clear_error()


def _new_pkey(constructor: Any, key: bytes, what: str) -> Any:
    """An EVP_PKEY from raw key bytes (EVP_PKEY_new_raw_public_key / _private_key)."""
    pkey = constructor(EVP_PKEY_ED25519, None, key, KEY_LEN)
    if not pkey:
        _clear_errors()
        raise ValueError(f"not an Ed25519 {what} key")
    return pkey


def _free_pkey(key: Any) -> None:
    # __del__ of both classes: also runs for an object whose __init__ raised.
    if getattr(key, "_pkey", None) and _LIB is not None:
        _LIB.EVP_PKEY_free(key._pkey)
        key._pkey = None


class Ed25519PublicKey:
    """A public key (32 raw bytes); ``verify`` raises InvalidSignature on a mismatch."""

    __slots__ = ("_raw", "_pkey", "_fallback")

    def __init__(self, raw: bytes) -> None:
        raw = bytes(raw)
        if len(raw) != KEY_LEN:
            raise ValueError("an Ed25519 public key is 32 raw bytes")
        self._raw = raw
        self._pkey = None
        self._fallback = None
        if _LIB is None:
            from cryptography.hazmat.primitives.asymmetric import ed25519
            self._fallback = ed25519.Ed25519PublicKey.from_public_bytes(raw)
            return
        self._pkey = _new_pkey(_LIB.EVP_PKEY_new_raw_public_key, raw, "public")

    @classmethod
    def from_public_bytes(cls, raw: bytes) -> Ed25519PublicKey:
        return cls(raw)

    def public_bytes_raw(self) -> bytes:
        return self._raw

    def verify(self, signature: bytes, data: bytes) -> None:
        if self._fallback is not None:
            from cryptography.exceptions import InvalidSignature as _Invalid
            try:
                self._fallback.verify(signature, data)
            except _Invalid:
                raise InvalidSignature() from None
            return
        if len(signature) != SIGNATURE_LEN:
            raise InvalidSignature()
        data = bytes(data)
        ctx = _LIB.EVP_MD_CTX_new()
        if not ctx:
            raise MemoryError("EVP_MD_CTX_new failed")
        try:
            ok = (_LIB.EVP_DigestVerifyInit(ctx, None, None, None, self._pkey) == 1
                  and _LIB.EVP_DigestVerify(ctx, signature, SIGNATURE_LEN, data, len(data)) == 1)
        finally:
            _LIB.EVP_MD_CTX_free(ctx)
        if not ok:
            _clear_errors()
            raise InvalidSignature()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Ed25519PublicKey) and other._raw == self._raw

    def __hash__(self) -> int:
        return hash(self._raw)

    def __repr__(self) -> str:
        return f"Ed25519PublicKey({self._raw.hex()[:16]}...)"

    __del__ = _free_pkey


class Ed25519PrivateKey:
    """A private key from its 32-byte seed (RFC 8032); ``sign`` gives 64 bytes."""

    __slots__ = ("_pkey", "_public", "_fallback")

    def __init__(self, seed: bytes) -> None:
        seed = bytes(seed)
        if len(seed) != KEY_LEN:
            raise ValueError("an Ed25519 private key is a 32-byte seed")
        self._pkey = None
        self._fallback = None
        if _LIB is None:
            from cryptography.hazmat.primitives.asymmetric import ed25519
            self._fallback = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
            self._public = Ed25519PublicKey(self._fallback.public_key().public_bytes_raw())
            return
        pkey = self._pkey = _new_pkey(_LIB.EVP_PKEY_new_raw_private_key, seed, "private")
        out = ctypes.create_string_buffer(KEY_LEN)
        size = ctypes.c_size_t(KEY_LEN)
        if _LIB.EVP_PKEY_get_raw_public_key(pkey, out, ctypes.byref(size)) != 1:
            _clear_errors()
            raise ValueError("cannot derive the Ed25519 public key")
        self._public = Ed25519PublicKey(out.raw[:size.value])

    @classmethod
    def from_private_bytes(cls, seed: bytes) -> Ed25519PrivateKey:
        return cls(seed)

    def public_key(self) -> Ed25519PublicKey:
        return self._public

    def sign(self, data: bytes) -> bytes:
        if self._fallback is not None:
            return self._fallback.sign(data)
        data = bytes(data)
        ctx = _LIB.EVP_MD_CTX_new()
        if not ctx:
            raise MemoryError("EVP_MD_CTX_new failed")
        sig = ctypes.create_string_buffer(SIGNATURE_LEN)
        size = ctypes.c_size_t(SIGNATURE_LEN)
        try:
            ok = (_LIB.EVP_DigestSignInit(ctx, None, None, None, self._pkey) == 1
                  and _LIB.EVP_DigestSign(ctx, sig, ctypes.byref(size), data, len(data)) == 1)
        finally:
            _LIB.EVP_MD_CTX_free(ctx)
        if not ok or size.value != SIGNATURE_LEN:
            _clear_errors()
            raise RuntimeError("Ed25519 signing failed in libcrypto")
        return sig.raw

    def __repr__(self) -> str:
        return "Ed25519PrivateKey(<secret>)"

    __del__ = _free_pkey


# -- keys from either side ---------------------------------------------------------------------
def _kind(key: Any) -> str | None:
    """"private" / "public" for an Ed25519 key of this module or of ``cryptography`` (told
    apart by type, without importing cryptography), else None."""
    if isinstance(key, Ed25519PrivateKey):
        return "private"
    if isinstance(key, Ed25519PublicKey):
        return "public"
    t = type(key)
    if t.__module__.startswith("cryptography."):
        name = t.__name__.lower()
        if name == "ed25519privatekey":
            return "private"
        if name == "ed25519publickey":
            return "public"
    return None


def raw_public(key: Any) -> bytes:
    """The 32 raw bytes of a public key given as raw bytes, a key of this module, or a
    ``cryptography`` Ed25519 public or private key (ValueError for anything else)."""
    if isinstance(key, (bytes, bytearray)):
        if len(key) != KEY_LEN:
            raise ValueError("an Ed25519 public key is 32 raw bytes")
        return bytes(key)
    kind = _kind(key)
    if kind is None:
        raise ValueError(f"expected an Ed25519 key or its 32 raw bytes, found {type(key).__name__}")
    return (key.public_key() if kind == "private" else key).public_bytes_raw()


def is_private_key(key: Any) -> bool:
    """Whether ``key`` is an Ed25519 private key of this module or of ``cryptography``."""
    return _kind(key) == "private"
