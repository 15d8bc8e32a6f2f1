"""The citizen session state machine, with an injected clock."""

from __future__ import annotations

from edge.clock import ManualClock
from edge.session import Phase, SessionMachine


class FakeCard:
    """Counts wipes: the session must wipe personal data however it ends."""

    def __init__(self) -> None:
        self.wipes = 0

    def wipe(self) -> None:
        self.wipes += 1


def test_choose_then_issue_then_wipe():
    clock = ManualClock()
    m = SessionMachine(("A", "B"), choose_timeout_s=20, clock=clock)
    card = FakeCard()
    assert m.begin("idcard", "h" * 64, card) is Phase.CHOOSING
    assert not m.choose("Z")                  # not a service of this kiosk
    assert m.choose("B") and m.phase is Phase.ISSUING and m.session.service == "B"
    m.end()
    assert m.phase is Phase.IDLE and m.session is None and card.wipes == 1


def test_timeout_returns_to_idle_and_wipes():
    clock = ManualClock()
    m = SessionMachine(("A", "B"), choose_timeout_s=20, clock=clock)
    card = FakeCard()
    m.begin("idcard", "h" * 64, card)
    clock.advance(19.9)
    assert not m.expire() and m.phase is Phase.CHOOSING
    clock.advance(0.2)
    assert m.expire() and m.phase is Phase.IDLE and card.wipes == 1
    assert not m.choose("A")                  # too late


def test_a_new_card_replaces_an_unfinished_session():
    m = SessionMachine(("A", "B"), choose_timeout_s=20, clock=ManualClock())
    first, second = FakeCard(), FakeCard()
    m.begin("idcard", "1" * 64, first)
    m.begin("idcard", "2" * 64, second)
    assert first.wipes == 1 and second.wipes == 0 and m.session.citizen == "2" * 64


def test_a_card_during_issuing_is_wiped_and_ignored():
    m = SessionMachine(("A",), choose_timeout_s=20, clock=ManualClock())
    first, second = FakeCard(), FakeCard()
    assert m.begin("idcard", "1" * 64, first) is Phase.ISSUING     # single service: no choice
    assert m.begin("idcard", "2" * 64, second) is Phase.ISSUING
    assert second.wipes == 1 and m.session.citizen == "1" * 64


def test_single_service_needs_no_choice_and_has_no_deadline():
    m = SessionMachine(("A",), choose_timeout_s=20, clock=ManualClock())
    assert m.begin("qr", None) is Phase.ISSUING
    assert m.session.service == "A" and m.next_deadline() is None
