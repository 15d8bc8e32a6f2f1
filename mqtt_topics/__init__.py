"""The MQTT contract of a service hall (version 1): topics, payload schemas, signed envelope.

Every publisher and subscriber builds topics and payloads ONLY through this package, so the
kiosk agent, the hall-side consumers and the emulator cannot drift apart. The contract is
written down for other languages in docs/mqtt-contract.md, with test vectors.
"""

from .envelope import (
    KeyEntry,
    Keyring,
    SequenceTracker,
    Signer,
    Verified,
    canonical_bytes,
    canonical_json,
    key_id,
    state_supersedes,
    verify,
)
from .schemas import CONTRACT_VERSION, MAX_PAYLOAD, MESSAGE_TYPES, validate_body
from .topics import (
    DELIVERY,
    ID_RE,
    KINDS,
    KIOSK_KINDS,
    MESSAGE_TYPE_FOR_KIND,
    ROLE_FOR_KIND,
    TO_KIOSK_KINDS,
    Delivery,
    HallTopics,
    KioskTopics,
    TopicParts,
    parse_topic,
    validate_id,
)

__all__ = [
    "CONTRACT_VERSION", "DELIVERY", "ID_RE", "KINDS", "KIOSK_KINDS", "MAX_PAYLOAD",
    "MESSAGE_TYPES", "MESSAGE_TYPE_FOR_KIND", "ROLE_FOR_KIND", "TO_KIOSK_KINDS", "Delivery", "HallTopics",
    "KeyEntry", "Keyring", "KioskTopics", "SequenceTracker", "Signer", "TopicParts", "Verified",
    "canonical_bytes", "canonical_json", "key_id", "parse_topic", "state_supersedes",
    "validate_body", "validate_id", "verify",
]
