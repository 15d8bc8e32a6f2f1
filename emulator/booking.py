"""A stand-in for the hall's online booking service and for an e-ID issuer: they make signed QR
payloads (``edge.qr.codes`` formats) for tests, the benchmark and the demo.

    booking = BookingService("citizen-home")
    code = booking.appointment("A", start_s=now, minutes=30)   # bytes for camera.show()
    issuer = EidIssuer()
    eid = issuer.code("990000198001010015", now_s=now)

Also the attacker's side, for the refusal tests: :func:`forge` flips a byte of the payload
(the signature no longer matches), and a second BookingService with its own key stands for a
key the hall does not know. All ID numbers used here are synthetic (region 99).
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge.qr.codes import (
    APPOINTMENT_PREFIX,
    EID_PREFIX,
    encode_appointment,
    encode_eid,
    qr_key_id,
    trusted_keys,
)


class BookingService:
    """Issues appointment codes for one hall, signed with its own Ed25519 key."""

    def __init__(self, hall: str, *, key: Ed25519PrivateKey | None = None) -> None:
        self.hall = hall
        self.key = key or Ed25519PrivateKey.generate()
        self._ids = itertools.count(1)

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.key.public_key()

    @property
    def kid(self) -> str:
        return qr_key_id(self.public_key).hex()

    def keys(self) -> dict:
        """The ``booking_keys`` mapping a kiosk of this hall is configured with."""
        return trusted_keys([self.public_key])

    def next_id(self) -> str:
        return f"BK-{next(self._ids):06d}"

    def appointment(self, service: str, *, start_s: int, minutes: int = 30,
                    early_s: int = 900, appointment_id: str | None = None,
                    hall: str | None = None) -> bytes:
        """A code for ``service`` whose window opens ``early_s`` before ``start_s`` (citizens
        arrive early) and closes ``minutes`` after it."""
        return encode_appointment(self.key, hall=hall or self.hall,
                                  appointment_id=appointment_id or self.next_id(),
                                  service=service, not_before_s=start_s - early_s,
                                  not_after_s=start_s + minutes * 60)


class EidIssuer:
    """Issues e-ID codes the way a phone app does: short-lived, refreshed every few minutes."""

    def __init__(self, *, key: Ed25519PrivateKey | None = None, lifetime_s: int = 300) -> None:
        self.key = key or Ed25519PrivateKey.generate()
        self.lifetime_s = lifetime_s

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.key.public_key()

    def keys(self) -> dict:
        """The ``eid_keys`` mapping a kiosk trusting this issuer is configured with."""
        return trusted_keys([self.public_key])

    def code(self, id_number: str, *, now_s: int) -> bytes:
        return encode_eid(self.key, id_number=id_number, not_before_s=now_s,
                          not_after_s=now_s + self.lifetime_s)


def forge(code: bytes, at: int = 30) -> bytes:
    """The same code with one payload character changed (still valid base32): what an attacker
    editing a screenshot produces. ``at`` picks the character, counted from the payload's
    first; the default lies past the fixed header (version, key id, window: 28 characters),
    in the hall name or the ID number, so the result is refused as "forged"."""
    prefix = APPOINTMENT_PREFIX if code.startswith(APPOINTMENT_PREFIX) else EID_PREFIX
    body, sig = code[len(prefix):].split(b".")
    i = at % (len(body) - 1)          # never the last character (its low bits must stay 0)
    swapped = b"B" if body[i:i + 1] != b"B" else b"C"
    return prefix + body[:i] + swapped + body[i + 1:] + b"." + sig


def cmd_qr_code(args) -> int:
    """``hallkiosk qr-code``: sign a test code with the Ed25519 key in ``--key`` (PEM, made by
    ``edge.keys.generate_private_key`` if missing), print it, and save a PNG if asked. The
    kiosk must trust the key's public half (printed, base64) for the code to be accepted."""
    from edge.keys import generate_private_key, load_private_key, public_b64

    key_path = Path(args.key)
    key = load_private_key(key_path) if key_path.exists() else generate_private_key(key_path)
    now_s = int(time.time())
    if args.kind == "appointment":
        code = BookingService(args.hall, key=key).appointment(
            args.service, start_s=args.start_s or now_s, minutes=args.minutes,
            appointment_id=args.appointment_id)
    else:
        code = EidIssuer(key=key, lifetime_s=args.minutes * 60).code(args.id_number, now_s=now_s)
    print(f"public key (base64): {public_b64(key)}")
    print(code.decode("ascii"))
    if args.png:
        import segno

        segno.make(code, error="m", boost_error=False).save(args.png, scale=6, border=4)
        print(f"saved {args.png}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("qr-code", help="make a signed test appointment or e-ID QR code")
    p.add_argument("kind", choices=("appointment", "eid"))
    p.add_argument("--key", required=True, help="Ed25519 PEM private key (created if missing)")
    p.add_argument("--hall", default="citizen-home", help="hall id (appointment)")
    p.add_argument("--service", default="A", help="service category (appointment)")
    p.add_argument("--appointment-id", default=None)
    p.add_argument("--start-s", type=int, default=None, help="appointment time, Unix seconds")
    p.add_argument("--minutes", type=int, default=30, help="validity after the start")
    p.add_argument("--id-number", default="990000198001010012", help="synthetic ID (e-ID)")
    p.add_argument("--png", help="also save the QR code as a PNG")
    p.set_defaults(func=cmd_qr_code)


__all__ = ["BookingService", "EidIssuer", "add_parser", "cmd_qr_code", "forge"]
