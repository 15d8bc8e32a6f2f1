"""The kiosk's publisher keeps what it could not send: command results and events wait for
the next connection (bounded), results first, each sealed then with a fresh seq and verified
here with the real contract."""

from __future__ import annotations

import pytest

from edge.mqtt import NotConnected
from edge.publisher import MAX_PENDING_RESULTS, Publisher
from mqtt_topics.envelope import verify
from mqtt_topics.topics import KioskTopics
from tests.test_envelope import K7, _signer, keyring  # noqa: F401  (fixture)

TOPICS = KioskTopics("hall-01", "kiosk-07")


class _Link:
    """Records what is published; ``connected`` is switched by the test."""

    def __init__(self) -> None:
        self.connected = False
        self.sent: list[tuple[str, bytes]] = []

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> int:
        if not self.connected:
            raise NotConnected("down")
        self.sent.append((topic, payload))
        return len(self.sent)


def _result(seq: int, status: str = "done") -> dict:
    return {"cmd_seq": seq, "nonce": "n" * 22 + f"{seq:02d}", "status": status,
            "reason": None, "detail": {}}


def test_a_result_raised_while_offline_goes_out_first_after_reconnect(keyring):  # noqa: F811
    link = _Link()
    pub = Publisher(link, _signer(), TOPICS)
    pub.event("printer_paper_out", "warning", "printer")
    pub.command_result(_result(7))
    assert link.sent == []
    link.connected = True
    pub.flush_events()
    got = [verify(p, t, keyring) for t, p in link.sent]
    assert [(v.msg_type, t) for v, (t, _) in zip(got, link.sent)] == [
        ("cmd_result", TOPICS.cmd_result), ("event", TOPICS.event)]
    assert got[0].body["cmd_seq"] == 7 and got[0].body["status"] == "done"
    # Sealed at sending, in order: the result's seq is below the event's.
    assert got[0].seq < got[1].seq
    pub.flush_events()
    assert len(link.sent) == 2          # nothing is sent twice


def test_results_beyond_the_bound_drop_the_oldest_and_say_so(keyring):  # noqa: F811
    link = _Link()
    pub = Publisher(link, _signer(), TOPICS)
    for seq in range(1, MAX_PENDING_RESULTS + 4):
        pub.command_result(_result(seq))
    link.connected = True
    pub.flush_events()
    got = [verify(p, t, keyring) for t, p in link.sent]
    seqs = [v.body["cmd_seq"] for v in got if v.msg_type == "cmd_result"]
    assert seqs == list(range(4, MAX_PENDING_RESULTS + 4))
    (dropped,) = [v.body for v in got if v.msg_type == "event"]
    assert dropped["name"] == "command_results_dropped" and dropped["detail"] == {"count": 3}


def test_a_link_that_drops_again_mid_flush_keeps_the_rest(keyring):  # noqa: F811
    link = _Link()
    pub = Publisher(link, _signer(), TOPICS)
    for seq in (1, 2, 3):
        pub.command_result(_result(seq))

    real = link.publish

    def once_then_down(topic, payload, **kw):
        n = real(topic, payload, **kw)
        link.connected = False
        return n
    link.publish = once_then_down
    link.connected = True
    pub.flush_events()
    link.publish = real
    link.connected = True
    pub.flush_events()
    got = [verify(p, t, keyring).body["cmd_seq"] for t, p in link.sent]
    assert got == [1, 2, 3]


def test_sent_at_once_when_connected(keyring):  # noqa: F811
    link = _Link()
    link.connected = True
    pub = Publisher(link, _signer(), TOPICS)
    pub.command_result(_result(5, "accepted"))
    (v,) = [verify(p, t, keyring) for t, p in link.sent]
    assert v.body["status"] == "accepted"
    with pytest.raises(NotConnected):
        link.connected = False
        pub.send(TOPICS.event, "event", {"name": "x", "severity": "info", "subject": None,
                                         "detail": {}})
