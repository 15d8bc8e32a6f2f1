"""The citizen's session at the kiosk: a small pure state machine with an injected clock.

IDLE --card accepted--> CHOOSING --service button--> ISSUING --ticket done--> IDLE
CHOOSING --no choice within choose_timeout_s--> IDLE

Personal data (the card) lives only in the session and is wiped when it ends, however it
ends. The only form of the identity that leaves the session is the keyed hash.
A kiosk that offers a single service skips CHOOSING: there is nothing to choose, and making a
citizen press the only button is a step that can only go wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from edge.clock import Clock


class Phase(Enum):
    IDLE = "idle"
    CHOOSING = "choosing"
    ISSUING = "issuing"


@dataclass(slots=True)
class Session:
    source: str                 # "idcard" | "qr"
    citizen: str | None         # keyed hash of the identity
    started_mono: float
    card: Any = None            # CardData, wiped at the end
    service: str | None = None  # chosen category
    extra: dict = field(default_factory=dict)

    def wipe(self) -> None:
        card, self.card = self.card, None
        if card is not None:
            card.wipe()
        self.citizen = None
        self.extra.clear()


class SessionMachine:
    def __init__(self, categories: tuple[str, ...], *, choose_timeout_s: float, clock: Clock) -> None:
        if not categories:
            raise ValueError("a kiosk needs at least one service")
        self.categories = categories
        self.choose_timeout_s = choose_timeout_s
        self.clock = clock
        self.phase = Phase.IDLE
        self.session: Session | None = None
        self._deadline: float | None = None

    def begin(self, source: str, citizen: str | None, card: Any = None, *,
              service: str | None = None) -> Phase:
        """A citizen identified themselves. Replaces (and wipes) any unfinished session,
        except one whose ticket is being issued. ``service``: already chosen (an
        appointment code names its service), so no choice is asked for."""
        if self.phase is Phase.ISSUING:
            if card is not None:
                card.wipe()
            return self.phase
        self.end()
        self.session = Session(source, citizen, self.clock.monotonic(), card)
        if service is not None or len(self.categories) == 1:
            self.session.service = service if service is not None else self.categories[0]
            self.phase = Phase.ISSUING
        else:
            self.phase = Phase.CHOOSING
            self._deadline = self.clock.monotonic() + self.choose_timeout_s
        return self.phase

    def choose(self, category: str) -> bool:
        """A service button: True when it starts issuing a ticket for ``category``."""
        if self.phase is not Phase.CHOOSING or category not in self.categories:
            return False
        current = self.session
        if current is None:
            return False
        current.service = category
        self.phase = Phase.ISSUING
        self._deadline = None
        return True

    def next_deadline(self) -> float | None:
        return self._deadline

    @property
    def active(self) -> bool:
        return self.phase is not Phase.IDLE

    def expire(self) -> bool:
        """Called when the deadline passed: True when the session timed out (and was wiped)."""
        if self._deadline is not None and self.clock.monotonic() >= self._deadline:
            self.end()
            return True
        return False

    def end(self) -> None:
        if self.session is not None:
            self.session.wipe()
        self.session = None
        self.phase = Phase.IDLE
        self._deadline = None
