"""The MQTT topic tree of a service hall: the only place topic strings are built.

Tree (contract version 1, see docs/mqtt-contract.md)::

    hall/{hall}/kiosk/{device}/state          kiosk -> hall   QoS 1, retained, also the MQTT will
    hall/{hall}/kiosk/{device}/telemetry      kiosk -> hall   QoS 0
    hall/{hall}/kiosk/{device}/event          kiosk -> hall   QoS 1
    hall/{hall}/kiosk/{device}/ticket         kiosk -> hall   QoS 1, until acknowledged end to end
    hall/{hall}/kiosk/{device}/ticket/ack     hall  -> kiosk  QoS 1 (ticket consumer)
    hall/{hall}/kiosk/{device}/cmd            hall  -> kiosk  QoS 1 (ops)
    hall/{hall}/kiosk/{device}/cmd/result     kiosk -> hall   QoS 1
    hall/{hall}/kiosk/{device}/alert          ops monitor -> hall  QoS 1 (an alert about the kiosk)

Ids are restricted so that an id can never act as an MQTT wildcard (``+``, ``#``), split a
level (``/``), land in the broker's ``$SYS``/``$share`` space (``$``) or break a Mosquitto
ACL pattern line (spaces). The device id is also the certificate CN, the MQTT username
and client id on the broker (``use_identity_as_username``), so the ACL ``pattern write
hall/+/kiosk/%u/...`` only works if it is a single clean topic level.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, NamedTuple

from hallkiosk.errors import ContractError

#: Hall, device, service-category and sender ids: 1-32 of [A-Za-z0-9_-], not starting with "-"
#: (a leading "-" reads as an option to every command-line tool an operator pastes it into).
ID_RE: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,31}")
ID_MAX_LEN: Final = 32

#: The kinds of message topics under one kiosk, in tree order.
KINDS: Final = ("state", "telemetry", "event", "ticket", "ticket_ack", "cmd", "cmd_result",
                 "alert")

#: Topic levels after ``hall/{hall}/kiosk/{device}/`` for each kind.
SUFFIX_FOR_KIND: Final = {
    "state": "state",
    "telemetry": "telemetry",
    "event": "event",
    "ticket": "ticket",
    "ticket_ack": "ticket/ack",
    "cmd": "cmd",
    "cmd_result": "cmd/result",
    "alert": "alert",
}
_KIND_FOR_SUFFIX: Final = {suffix: kind for kind, suffix in SUFFIX_FOR_KIND.items()}

#: The envelope ``type`` expected on each kind of topic (one type per kind in v1).
MESSAGE_TYPE_FOR_KIND: Final = {kind: kind for kind in KINDS}

#: Kinds the kiosk itself publishes: the envelope sender must be the topic's device.
KIOSK_KINDS: Final = frozenset({"state", "telemetry", "event", "ticket", "cmd_result"})
#: Kinds the hall sends TO a kiosk (what a kiosk subscribes to and may read). Alerts are
#: about a kiosk but for ops: the kiosk has no business reading them.
TO_KIOSK_KINDS: Final = ("ticket_ack", "cmd")

#: Key role a receiver should require (``verify(..., require_role=...)``) for each kind.
ROLE_FOR_KIND: Final = {
    "state": "kiosk",
    "telemetry": "kiosk",
    "event": "kiosk",
    "ticket": "kiosk",
    "cmd_result": "kiosk",
    "ticket_ack": "consumer",
    "cmd": "ops",
    "alert": "monitor",
}


class Delivery(NamedTuple):
    """How a kind is published: MQTT QoS, retain flag, and who publishes it."""

    qos: int
    retain: bool
    publisher: str


#: QoS and retain for every kind (the will on ``state`` uses the same QoS 1 + retain).
DELIVERY: Final = {
    "state": Delivery(1, True, "kiosk"),
    "telemetry": Delivery(0, False, "kiosk"),
    "event": Delivery(1, False, "kiosk"),
    "ticket": Delivery(1, False, "kiosk"),
    "ticket_ack": Delivery(1, False, "consumer"),
    "cmd": Delivery(1, False, "ops"),
    "cmd_result": Delivery(1, False, "kiosk"),
    "alert": Delivery(1, False, "monitor"),
}


def validate_id(kind: str, value: object) -> str:
    """Return ``value`` if it is a valid id, else raise ContractError naming the problem.

    ``kind`` ("hall", "device", "service", ...) only labels the message.
    """
    if not isinstance(value, str):
        raise ContractError(f"{kind} id: expected a string, got {type(value).__name__}")
    if value == "":
        raise ContractError(f"{kind} id: empty")
    if len(value) > ID_MAX_LEN:
        raise ContractError(f"{kind} id: {len(value)} characters, at most {ID_MAX_LEN} allowed")
    if ID_RE.fullmatch(value):
        return value
    shown = ascii(value)
    problems = []
    if "+" in value or "#" in value:
        problems.append("contains an MQTT wildcard (+ or #)")
    if "/" in value:
        problems.append("contains '/' (a topic level separator)")
    if "$" in value:
        problems.append("contains '$' (reserved for broker topics)")
    if "\x00" in value:
        problems.append("contains NUL")
    if any(ch.isspace() for ch in value):
        problems.append("contains whitespace")
    if value.startswith("-"):
        problems.append("starts with '-'")
    if not problems:
        problems.append("only A-Z a-z 0-9 _ - are allowed")
    raise ContractError(f"{kind} id {shown}: " + "; ".join(problems))


def _kiosk_base(hall: str, device: str) -> str:
    return f"hall/{hall}/kiosk/{device}"


@dataclass(frozen=True, slots=True)
class KioskTopics:
    """The topics of one kiosk. Both ids are validated on construction."""

    hall: str
    device: str

    def __post_init__(self) -> None:
        validate_id("hall", self.hall)
        validate_id("device", self.device)

    def topic(self, kind: str) -> str:
        """The topic of ``kind`` (one of KINDS) for this kiosk."""
        if kind not in SUFFIX_FOR_KIND:
            raise ContractError(f"unknown topic kind {kind!r}; expected one of {', '.join(KINDS)}")
        return f"{_kiosk_base(self.hall, self.device)}/{SUFFIX_FOR_KIND[kind]}"

    @property
    def state(self) -> str:
        return self.topic("state")

    @property
    def telemetry(self) -> str:
        return self.topic("telemetry")

    @property
    def event(self) -> str:
        return self.topic("event")

    @property
    def ticket(self) -> str:
        return self.topic("ticket")

    @property
    def ticket_ack(self) -> str:
        return self.topic("ticket_ack")

    @property
    def cmd(self) -> str:
        return self.topic("cmd")

    @property
    def cmd_result(self) -> str:
        return self.topic("cmd_result")

    @property
    def alert(self) -> str:
        return self.topic("alert")


@dataclass(frozen=True, slots=True)
class HallTopics:
    """Subscription filters for the hall side (consumers, dashboards, ops)."""

    hall: str

    def __post_init__(self) -> None:
        validate_id("hall", self.hall)

    def kiosk(self, device: str) -> KioskTopics:
        """The topics of one kiosk in this hall (to publish ``ticket_ack`` and ``cmd``)."""
        return KioskTopics(self.hall, device)

    def all_of(self, kind: str) -> str:
        """Filter matching ``kind`` on every kiosk of the hall."""
        if kind not in SUFFIX_FOR_KIND:
            raise ContractError(f"unknown topic kind {kind!r}; expected one of {', '.join(KINDS)}")
        return f"hall/{self.hall}/kiosk/+/{SUFFIX_FOR_KIND[kind]}"

    @property
    def all_state(self) -> str:
        return self.all_of("state")

    @property
    def all_telemetry(self) -> str:
        return self.all_of("telemetry")

    @property
    def all_events(self) -> str:
        return self.all_of("event")

    @property
    def all_tickets(self) -> str:
        return self.all_of("ticket")

    @property
    def all_ticket_acks(self) -> str:
        return self.all_of("ticket_ack")

    @property
    def all_cmd_results(self) -> str:
        return self.all_of("cmd_result")

    @property
    def alerts(self) -> str:
        return self.all_of("alert")

    @staticmethod
    def shared(group: str, filter: str) -> str:  # noqa: A002 - name fixed by the contract API
        """A shared subscription (MQTT 5 / Mosquitto 2): each message goes to ONE group member."""
        validate_id("share group", group)
        if not isinstance(filter, str) or filter == "":
            raise ContractError("shared subscription: empty topic filter")
        if filter.startswith("$share/"):
            raise ContractError("shared subscription: filter is already shared")
        if "\x00" in filter:
            raise ContractError("shared subscription: filter contains NUL")
        return f"$share/{group}/{filter}"


class TopicParts(NamedTuple):
    """A kiosk topic taken apart: ``kind`` is one of KINDS."""

    hall: str
    device: str
    kind: str


#: Topics parsed before (each kiosk uses a handful, and every message is parsed at least
#: twice on a monitor): bounded, emptied when full so hostile topics cannot grow it.
_PARSED: dict[str, TopicParts] = {}
_PARSED_MAX = 4096


def parse_topic(topic: object) -> TopicParts:
    """Split a concrete kiosk topic (no wildcards) into its parts; raise ContractError otherwise."""
    if type(topic) is not str:
        return _parse_topic(topic)            # a str subclass is parsed, never remembered
    known = _PARSED.get(topic)
    if known is not None:
        return known
    parts = _parse_topic(topic)
    if len(_PARSED) >= _PARSED_MAX:
        _PARSED.clear()
    _PARSED[topic] = parts
    return parts


def _parse_topic(topic: object) -> TopicParts:
    if not isinstance(topic, str):
        raise ContractError(f"topic: expected a string, got {type(topic).__name__}")
    levels = topic.split("/")
    if len(levels) < 5 or levels[0] != "hall" or levels[2] != "kiosk":
        raise ContractError(f"topic {_shown(topic)}: not hall/{{hall}}/kiosk/{{device}}/...")
    kind = _KIND_FOR_SUFFIX.get("/".join(levels[4:]))
    if kind is None:
        raise ContractError(f"topic {_shown(topic)}: unknown kind; expected one of "
                            + ", ".join(SUFFIX_FOR_KIND.values()))
    hall = validate_id("hall", levels[1])
    device = validate_id("device", levels[3])
    return TopicParts(hall, device, kind)


def _shown(topic: str) -> str:
    # Topics come off the wire: bound what goes into an error message.
    return ascii(topic if len(topic) <= 80 else topic[:77] + "...")
