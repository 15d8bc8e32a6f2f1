"""The topic tree and ids of the MQTT contract (pure: no broker)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hallkiosk.errors import ContractError
from mqtt_topics import (
    DELIVERY,
    ID_RE,
    KINDS,
    KIOSK_KINDS,
    MESSAGE_TYPE_FOR_KIND,
    MESSAGE_TYPES,
    ROLE_FOR_KIND,
    HallTopics,
    KioskTopics,
    TopicParts,
    parse_topic,
    validate_id,
)
from mqtt_topics.schemas import SCHEMAS

DOC = Path(__file__).resolve().parents[1] / "docs" / "mqtt-contract.md"
ids = st.from_regex(ID_RE, fullmatch=True)


def test_kiosk_topics_are_built_exactly():
    t = KioskTopics("hall-01", "kiosk-07")
    base = "hall/hall-01/kiosk/kiosk-07"
    assert t.state == f"{base}/state"
    assert t.telemetry == f"{base}/telemetry"
    assert t.event == f"{base}/event"
    assert t.ticket == f"{base}/ticket"
    assert t.ticket_ack == f"{base}/ticket/ack"
    assert t.cmd == f"{base}/cmd"
    assert t.cmd_result == f"{base}/cmd/result"


def test_kiosk_topics_are_frozen():
    t = KioskTopics("h", "d")
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.device = "other"  # type: ignore[misc]


def test_hall_filters_and_shared_subscription():
    h = HallTopics("hall-01")
    assert h.all_state == "hall/hall-01/kiosk/+/state"
    assert h.all_telemetry == "hall/hall-01/kiosk/+/telemetry"
    assert h.all_events == "hall/hall-01/kiosk/+/event"
    assert h.all_tickets == "hall/hall-01/kiosk/+/ticket"
    assert h.all_ticket_acks == "hall/hall-01/kiosk/+/ticket/ack"
    assert h.all_cmd_results == "hall/hall-01/kiosk/+/cmd/result"
    assert h.alerts == "hall/hall-01/kiosk/+/alert"
    assert h.shared("consumers", h.all_tickets) == "$share/consumers/hall/hall-01/kiosk/+/ticket"
    assert h.kiosk("kiosk-07") == KioskTopics("hall-01", "kiosk-07")


@pytest.mark.parametrize("group, filt", [
    ("a/b", "hall/h/kiosk/+/ticket"),
    ("g+", "hall/h/kiosk/+/ticket"),
    ("", "hall/h/kiosk/+/ticket"),
    ("g", ""),
    ("g", "$share/x/hall/h/kiosk/+/ticket"),
])
def test_shared_rejects_bad_group_or_filter(group, filt):
    with pytest.raises(ContractError):
        HallTopics.shared(group, filt)


@pytest.mark.parametrize("value", ["a", "A_b-1", "_x", "0", "a" * 32, "kiosk-07"])
def test_valid_ids(value):
    assert validate_id("device", value) == value


@pytest.mark.parametrize("value, why", [
    ("", "empty"),
    ("a" * 33, "at most 32"),
    ("a+b", "wildcard"),
    ("ab#", "wildcard"),
    ("a/b", "'/'"),
    ("$SYS", "'$'"),
    ("a b", "whitespace"),
    ("a\x00", "NUL"),
    ("a\n", "whitespace"),
    ("-a", "starts with '-'"),
    ("kiosk\u00e9", "only A-Z"),
    (7, "expected a string"),
    (None, "expected a string"),
])
def test_invalid_ids_name_the_problem(value, why):
    with pytest.raises(ContractError, match=re.escape(why)) as info:
        validate_id("device", value)
    assert str(info.value).startswith("device id")


@pytest.mark.parametrize("hall, device", [("h/x", "d"), ("h", "+"), ("h", "#"), ("", "d"),
                                          ("h", "$d"), ("h", "a" * 33)])
def test_topics_refuse_bad_ids(hall, device):
    with pytest.raises(ContractError):
        KioskTopics(hall, device)


def test_hall_topics_refuse_bad_id():
    with pytest.raises(ContractError, match="hall id"):
        HallTopics("hall/1")


@settings(max_examples=200, deadline=None)
@given(hall=ids, device=ids, kind=st.sampled_from(KINDS))
def test_parse_topic_round_trip(hall, device, kind):
    topic = KioskTopics(hall, device).topic(kind)
    assert parse_topic(topic) == TopicParts(hall, device, kind)


@pytest.mark.parametrize("topic", [
    "hall/h/kiosk/d",
    "hall/h/kiosk/d/",
    "hall/h/kiosk/d/unknown",
    "hall/h/kiosk/d/state/",
    "hall/h/kiosk/d/ticket/ack/x",
    "hall/h/kiosk/d/ack",
    "hall/h/kiosk/+/state",
    "hall/+/kiosk/d/state",
    "hall/h/kiosk/#",
    "$share/g/hall/h/kiosk/d/state",
    "hall//kiosk/d/state",
    "hall/h/kiosk//state",
    "hall/h/ops/alert",
    "x/h/kiosk/d/state",
    "/hall/h/kiosk/d/state",
    "hall/h/kiosk/-d/state",
    "",
])
def test_parse_topic_rejects(topic):
    with pytest.raises(ContractError):
        parse_topic(topic)


def test_parse_topic_rejects_non_string():
    with pytest.raises(ContractError):
        parse_topic(b"hall/h/kiosk/d/state")


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80) | st.lists(st.sampled_from(
    ["hall", "kiosk", "h", "d", "+", "#", "state", "ticket", "ack", "cmd", "result", "", "$x"]),
    max_size=8).map("/".join))
def test_parse_topic_only_accepts_what_it_can_rebuild(topic):
    try:
        parts = parse_topic(topic)
    except ContractError:
        return
    assert KioskTopics(parts.hall, parts.device).topic(parts.kind) == topic


def test_kind_tables_cover_every_kind():
    assert set(MESSAGE_TYPE_FOR_KIND) == set(KINDS) == set(DELIVERY) == set(ROLE_FOR_KIND)
    assert set(MESSAGE_TYPE_FOR_KIND.values()) <= set(MESSAGE_TYPES)
    assert KIOSK_KINDS == {k for k, d in DELIVERY.items() if d.publisher == "kiosk"}
    assert DELIVERY["state"].qos == 1 and DELIVERY["state"].retain
    assert DELIVERY["telemetry"].qos == 0
    assert not any(d.retain for k, d in DELIVERY.items() if k != "state")
    assert ROLE_FOR_KIND["ticket_ack"] == "consumer"
    assert (ROLE_FOR_KIND["alert"], DELIVERY["alert"].publisher) == ("monitor", "monitor")


def test_unknown_kind_is_refused():
    with pytest.raises(ContractError, match="unknown topic kind"):
        KioskTopics("h", "d").topic("tickets")
    with pytest.raises(ContractError, match="unknown topic kind"):
        HallTopics("h").all_of("alerts")


def test_spec_names_every_schema_field():
    # The written contract is what other languages implement: it must not lag the code.
    text = DOC.read_text(encoding="utf-8")
    for msg_type, schema in SCHEMAS.items():
        assert f"### {msg_type}" in text, msg_type
        for field in schema.fields:
            assert f"`{field.name}`" in text, f"{msg_type}.{field.name}"
