"""The ops side of signed commands: seal a command with an ops key, publish it over mTLS,
and collect the kiosks' verified answers.

``build_command`` is pure (signer in, topic + payload out); ``OpsClient`` holds one MQTT 5
connection as the ops certificate's identity (username = CN, forced by the broker),
subscribed to every kiosk's ``cmd/result`` in the hall; ``send_command`` is the one-shot
form the CLI and tests use. Results are verified (role kiosk, sender = topic device)
before anyone sees them.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge.clock import SYSTEM_CLOCK, Clock
from edge.mqtt import LinkMessage, MqttLink, TlsSettings
from edge.store import KioskStore
from hallkiosk.errors import ContractError
from mqtt_topics.envelope import Keyring, Signer, Verified, verify
from mqtt_topics.topics import HallTopics, KioskTopics

from .errors import ProvisioningError

log = logging.getLogger("hallkiosk.ops")

#: Default lifetime of a command; the kiosk refuses anything beyond its window (300 s).
DEFAULT_TTL_S = 60


def new_nonce() -> str:
    """22 characters of base64url (128 random bits), within the contract's nonce rule."""
    return secrets.token_urlsafe(16)


def build_command(signer: Signer, hall: str, device: str, name: str,
                  args: dict[str, Any] | None = None, *, ttl_s: float = DEFAULT_TTL_S,
                  clock: Clock = SYSTEM_CLOCK, nonce: str | None = None,
                  expires_at_ms: int | None = None) -> tuple[str, bytes, str]:
    """(topic, signed payload, nonce) of a command for ``device``.

    ``expires_at_ms`` overrides ``ttl_s`` (tests use it to make expired commands).
    """
    topic = KioskTopics(hall, device).cmd
    nonce = nonce or new_nonce()
    if expires_at_ms is None:
        expires_at_ms = int(clock.wall() * 1000 + ttl_s * 1000)
    body = {"name": name, "args": dict(args or {}), "target": device, "nonce": nonce,
            "expires_at_ms": expires_at_ms}
    return topic, signer.seal(topic, "cmd", body), nonce


class OpsClient:
    """An ops console's link: sends signed commands, gathers verified cmd_results.

    ``state_dir`` keeps the durable sequence counter of this ops identity (envelopes never
    reuse a seq, even across restarts). ``keyring`` verifies the kiosks' answers.
    """

    def __init__(self, *, ops_id: str, hall: str, key: Ed25519PrivateKey, keyring: Keyring,
                 tls: TlsSettings, host: str, port: int, state_dir: Path,
                 clock: Clock = SYSTEM_CLOCK,
                 on_result: Callable[[Verified], None] | None = None) -> None:
        self.hall = hall
        self.keyring = keyring
        self.clock = clock
        self._seq = KioskStore(Path(state_dir) / f"{ops_id}-seq.sqlite", clock=clock)
        self.signer = Signer(key, sender=ops_id, boot_id=secrets.token_hex(16),
                             next_seq=self._seq.next_seq, clock=clock)
        self._cond = threading.Condition()
        self._results: dict[str, list[Verified]] = {}
        self.rejected: list[str] = []
        self._on_result = on_result
        self.link = MqttLink(client_id=ops_id, host=host, port=port, sink=self._sink,
                             subscriptions=((HallTopics(hall).all_cmd_results, 1),),
                             tls=tls, reconnect_min_s=0.2, reconnect_max_s=5.0, name=ops_id)

    def start(self, timeout_s: float = 10.0) -> OpsClient:
        self.link.start()
        if not self.link.wait_connected(timeout_s):
            self.stop()
            raise ProvisioningError(f"ops client could not connect: {self.link.last_error}")
        return self

    def stop(self) -> None:
        self.link.stop()
        self._seq.close()

    def __enter__(self) -> OpsClient:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- sending ----------------------------------------------------------------------
    def send(self, device: str, name: str, args: dict[str, Any] | None = None, *,
             ttl_s: float = DEFAULT_TTL_S, nonce: str | None = None,
             expires_at_ms: int | None = None) -> tuple[str, bytes, str]:
        """Seal and publish (QoS 1); returns (topic, payload, nonce) so tests can replay."""
        topic, payload, nonce = build_command(self.signer, self.hall, device, name, args,
                                              ttl_s=ttl_s, clock=self.clock, nonce=nonce,
                                              expires_at_ms=expires_at_ms)
        self.link.publish(topic, payload, qos=1)
        return topic, payload, nonce

    def publish_raw(self, topic: str, payload: bytes) -> None:
        """Publish bytes as they are (replays and forgeries in tests)."""
        self.link.publish(topic, payload, qos=1)

    # -- results ------------------------------------------------------------------------
    def _sink(self, ev: object) -> None:
        if not isinstance(ev, LinkMessage):
            return
        try:
            v = verify(ev.payload, ev.topic, self.keyring, expect_type="cmd_result",
                       require_role="kiosk")
        except ContractError as exc:
            self.rejected.append(str(exc))
            log.warning("cmd_result rejected: %s", exc)
            return
        with self._cond:
            self._results.setdefault(v.body["nonce"], []).append(v)
            self._cond.notify_all()
        if self._on_result is not None:
            try:
                self._on_result(v)
            except Exception:
                log.exception("on_result hook failed")

    def results(self, nonce: str) -> list[Verified]:
        """The verified answers naming the command with ``nonce``, in arrival order."""
        with self._cond:
            return list(self._results.get(nonce, ()))

    def unattributed(self) -> list[Verified]:
        """Refusals that name no command (cmd_seq and nonce null: a replay, a forgery, a
        malformed command); what the payload claimed is in ``body["detail"]``."""
        with self._cond:
            return list(self._results.get(None, ()))

    def wait_unattributed(self, predicate: Callable[[Verified], bool],
                          timeout_s: float = 10.0) -> Verified | None:
        """The first unattributed refusal satisfying ``predicate`` (None on timeout)."""
        def found() -> Verified | None:
            return next((v for v in self._results.get(None, ()) if predicate(v)), None)

        with self._cond:
            self._cond.wait_for(lambda: found() is not None, timeout_s)
            return found()

    def wait_result(self, nonce: str, timeout_s: float = 10.0,
                    count: int = 1) -> list[Verified]:
        """Wait until ``count`` verified answers for ``nonce`` arrived (or the timeout);
        returns what arrived."""
        with self._cond:
            self._cond.wait_for(lambda: len(self._results.get(nonce, ())) >= count, timeout_s)
            return list(self._results.get(nonce, ()))


def send_command(*, ops_id: str, hall: str, key: Ed25519PrivateKey, keyring: Keyring,
                 tls: TlsSettings, host: str, port: int, state_dir: Path, device: str,
                 name: str, args: dict[str, Any] | None = None,
                 ttl_s: float = DEFAULT_TTL_S, timeout_s: float = 10.0,
                 clock: Clock = SYSTEM_CLOCK) -> Verified | None:
    """Connect, send one command, wait for the kiosk's first answer; None on timeout."""
    with OpsClient(ops_id=ops_id, hall=hall, key=key, keyring=keyring, tls=tls, host=host,
                   port=port, state_dir=state_dir, clock=clock) as client:
        _, _, nonce = client.send(device, name, args, ttl_s=ttl_s)
        got = client.wait_result(nonce, timeout_s)
        return got[0] if got else None
