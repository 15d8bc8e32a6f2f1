"""Events handed to the agent's main loop: the one place that owns the kiosk's state.

Device threads and library callbacks (paho, gpiozero) only build one of these and put it on
the queue; they never touch state themselves. MQTT link events live in edge.mqtt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class CardRead:
    """A card was read. ``card`` is an edge.idcard.card.CardData holding personal data: the
    main loop validates it, hashes the identity and wipes it when the session ends."""
    card: Any
    presented_mono: float


@dataclass(frozen=True, slots=True)
class DeviceFault:
    device: str          # "idcard-reader", "ticket-printer", ...
    fault: str           # short machine word: "gone", "timeout", "refused", ...
    detail: str          # a sentence for the log (no personal data)


@dataclass(frozen=True, slots=True)
class DeviceRecovered:
    device: str


@dataclass(frozen=True, slots=True)
class ButtonPressed:
    role: str            # the board role, e.g. "A" of service_buttons


@dataclass(frozen=True, slots=True)
class Stop:
    reason: str
