"""edge.store against real SQLite files, including a child process killed with SIGKILL."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.clock import ManualClock
from edge.store import (
    MAX_TICKET_NUMBER,
    RECENT_TICKETS,
    SEQ_BLOCK,
    WAITING_WINDOW_S,
    KioskStore,
    TicketNumber,
    next_ticket_number,
)
from hallkiosk.errors import StateError

REPO = Path(__file__).resolve().parents[1]
DEVICE = "kiosk-07"


def body_for(ticket: TicketNumber) -> dict:
    return {"ticket_uid": ticket.uid(DEVICE), "ticket_id": ticket.display, "hmac": "00ff"}


def commit(store: KioskStore, service: str = "A", prefix: str = "07"):
    return store.commit_ticket(service, prefix, body_for)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state" / "kiosk.db"


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def store(db: Path, clock: ManualClock):
    with KioskStore(db, clock=clock) as s:
        yield s


# -- ticket numbers ----------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(st.integers(0, MAX_TICKET_NUMBER))
def test_next_ticket_number_stays_in_range_and_wraps(last: int) -> None:
    n = next_ticket_number(last)
    assert 1 <= n <= MAX_TICKET_NUMBER
    assert n == (1 if last == MAX_TICKET_NUMBER else last + 1)


@pytest.mark.parametrize("bad", [-1, MAX_TICKET_NUMBER + 1])
def test_next_ticket_number_refuses_out_of_range(bad: int) -> None:
    with pytest.raises(ValueError):
        next_ticket_number(bad)


def test_numbers_per_service_increase_and_serial_is_kiosk_wide(store: KioskStore) -> None:
    entries = [commit(store, service) for service in "AABAB"]
    assert [e.ticket_id for e in entries] == [
        "A-07-0001", "A-07-0002", "B-07-0001", "A-07-0003", "B-07-0002",
    ]
    # The serial starts at the wall clock in seconds (a lost store cannot re-issue uids).
    first = entries[0].created_seq
    assert first == int(ManualClock().wall())
    assert [e.created_seq for e in entries] == list(range(first, first + 5))
    assert len({e.uid for e in entries}) == 5
    assert [e.uid for e in entries] == [f"{DEVICE}:{n}" for n in range(first, first + 5)]
    expected = {"ticket_uid": entries[0].uid, "ticket_id": "A-07-0001", "hmac": "00ff"}
    assert entries[0].body == expected


def test_numbers_wrap_after_9999(db: Path) -> None:
    KioskStore(db).close()
    # White box: move the counter near the end instead of issuing 9,998 tickets.
    with sqlite3.connect(db) as raw:
        raw.execute(
            "INSERT INTO counters (service, number) VALUES ('A', ?)", (MAX_TICKET_NUMBER - 1,)
        )
    raw.close()
    with KioskStore(db) as s:
        ids = [commit(s).ticket_id for _ in range(3)]
        assert ids == ["A-07-9999", "A-07-0001", "A-07-0002"]
        serials = [e.created_seq for e in s.pending()]
        assert serials == list(range(serials[0], serials[0] + 3))


@pytest.mark.parametrize("service,prefix", [("", "07"), ("A/B", "07"), ("A", "0 7"), (1, "07"), ("A" * 33, "07")])
def test_bad_labels_are_refused(store: KioskStore, service, prefix) -> None:
    with pytest.raises(ValueError):
        store.commit_ticket(service, prefix, body_for)
    assert store.depth() == 0


def test_reopen_continues_numbers_serial_seq_and_session(db: Path) -> None:
    with KioskStore(db) as s:
        first = [commit(s, svc) for svc in "AB"]
        seqs = [s.next_seq() for _ in range(SEQ_BLOCK + 3)]
        session = s.session_counter()
    assert seqs == sorted(set(seqs))
    with KioskStore(db) as s:
        again = [commit(s, svc) for svc in "AB"]
        assert [e.ticket_id for e in again] == ["A-07-0002", "B-07-0002"]
        base = first[0].created_seq
        assert [e.created_seq for e in again] == [base + 2, base + 3]
        assert {e.uid for e in again}.isdisjoint(e.uid for e in first)
        assert s.next_seq() > max(seqs)
        assert s.session_counter() == session + 1


def test_a_lost_store_does_not_reissue_ticket_uids(tmp_path: Path) -> None:
    """A kiosk whose SD card was replaced starts a new store; its uids must not collide
    with the ones the hall's ledger already holds (the ledger would drop them as duplicates)."""
    clock = ManualClock()
    with KioskStore(tmp_path / "old.sqlite", clock=clock) as old:
        old_uids = {commit(old).uid for _ in range(50)}
    clock.advance(3600)                      # re-imaged an hour later
    with KioskStore(tmp_path / "new.sqlite", clock=clock) as new:
        new_uids = {commit(new).uid for _ in range(50)}
    assert old_uids.isdisjoint(new_uids)


def test_failed_make_body_allocates_nothing(store: KioskStore) -> None:
    def boom(ticket: TicketNumber) -> dict:
        raise RuntimeError("printer template broken")

    with pytest.raises(RuntimeError):
        store.commit_ticket("A", "07", boom)
    with pytest.raises(ValueError):
        store.commit_ticket("A", "07", lambda t: {"ticket_id": t.display})
    with pytest.raises(ValueError):
        store.commit_ticket("A", "07", lambda t: {"ticket_uid": t.uid(DEVICE), "x": {1, 2}})
    with pytest.raises(StateError):
        store.commit_ticket(
            "A", "07", lambda t: {"ticket_uid": t.uid(DEVICE), "s": store.next_seq()}
        )
    assert store.depth() == 0
    entry = commit(store)
    assert (entry.ticket_id, entry.created_seq) == ("A-07-0001", int(ManualClock().wall()))


def test_duplicate_ticket_uid_is_refused(store: KioskStore) -> None:
    store.commit_ticket("A", "07", lambda t: {"ticket_uid": "same"})
    with pytest.raises(ValueError):
        store.commit_ticket("A", "07", lambda t: {"ticket_uid": "same"})
    assert commit(store).ticket_id == "A-07-0002"


def test_daily_reset_restarts_numbers_but_not_the_serial(store: KioskStore) -> None:
    base = commit(store).created_seq
    assert store.reset_numbers_if_new_day("2026-03-01") is False  # first day only records
    assert commit(store).ticket_id == "A-07-0002"
    assert store.reset_numbers_if_new_day("2026-03-01") is False
    assert store.reset_numbers_if_new_day("2026-03-02") is True
    entry = commit(store)
    assert (entry.ticket_id, entry.created_seq) == ("A-07-0001", base + 2)
    # A clock put back must not hand out today's numbers twice, but is recorded.
    assert store.reset_numbers_if_new_day("2026-03-01") is False
    assert commit(store).ticket_id == "A-07-0002"
    assert store.reset_numbers_if_new_day("2026-03-02") is True
    with pytest.raises(ValueError):
        store.reset_numbers_if_new_day("2026-3-2")


# -- outbox --------------------------------------------------------------------------------
def test_ack_removes_and_double_ack_is_harmless(store: KioskStore) -> None:
    a, b, c = (commit(store) for _ in range(3))
    assert [e.uid for e in store.pending()] == [a.uid, b.uid, c.uid]
    assert store.depth() == 3
    assert store.ack(b.uid) is True
    assert store.ack(b.uid) is False
    assert store.ack("no-such-ticket") is False
    assert store.get(b.uid) is None
    assert store.get(a.uid) == a
    assert [e.uid for e in store.pending()] == [a.uid, c.uid]
    assert [e.uid for e in store.pending(limit=1)] == [a.uid]
    assert store.depth() == 2


def test_ack_survives_reopen(db: Path) -> None:
    with KioskStore(db) as s:
        a, b = commit(s), commit(s)
        s.ack(a.uid)
    with KioskStore(db) as s:
        assert [e.uid for e in s.pending()] == [b.uid]


def test_mark_sent_set_printed_and_ages(store: KioskStore, clock: ManualClock) -> None:
    assert store.oldest_age_s(0) is None
    first = commit(store)
    clock.advance(5)
    second = commit(store)
    clock.advance(2.5)
    now_ms = int(clock.wall() * 1000)
    assert store.oldest_age_s(now_ms) == pytest.approx(7.5)
    assert store.oldest_age_s(first.created_at_ms - 1000) == 0.0  # clock stepped back
    assert store.mark_sent(second.uid) == 1
    clock.advance(1)
    assert store.mark_sent(second.uid) == 2
    got = store.get(second.uid)
    assert (got.attempts, got.last_sent_at_ms) == (2, now_ms + 1000)
    assert store.set_printed(second.uid, "unknown") is True
    assert store.get(second.uid).printed == "unknown"
    assert store.set_printed("no-such-ticket", "yes") is False
    with pytest.raises(ValueError):
        store.set_printed(second.uid, "maybe")
    store.ack(second.uid)
    assert store.mark_sent(second.uid) == 0  # the ack won the race: not an error
    assert store.oldest_age_s(now_ms) == pytest.approx(7.5)


def test_last_ticket_survives_ack_and_recent_tickets_stay_small(db: Path) -> None:
    with KioskStore(db) as s:
        assert s.last_ticket() is None
        entries = [commit(s) for _ in range(RECENT_TICKETS + 5)]
        for e in entries:
            s.ack(e.uid)
        assert s.depth() == 0
        last = s.last_ticket()
        assert last.uid == entries[-1].uid
        assert s.set_printed(last.uid, "yes") is True
        assert s.last_ticket().printed == "yes"
    raw = sqlite3.connect(db)
    try:
        (kept,) = raw.execute("SELECT COUNT(*) FROM tickets").fetchone()
    finally:
        raw.close()
    assert kept == RECENT_TICKETS


def test_waiting_count_is_the_last_four_hours(store: KioskStore, clock: ManualClock) -> None:
    commit(store, "A")
    clock.advance(WAITING_WINDOW_S - 10)
    commit(store, "A")
    commit(store, "B")
    counts = [store.waiting_count(service) for service in "ABC"]
    assert counts == [2, 1, 0]
    clock.advance(11)
    assert store.waiting_count("A") == 1


def test_no_body_in_repr(store: KioskStore) -> None:
    entry = store.commit_ticket(
        "A", "07", lambda t: {"ticket_uid": t.uid(DEVICE), "secret": "ZHANG-SAN-110101"}
    )
    assert "ZHANG-SAN-110101" not in repr(entry)
    assert "ZHANG-SAN-110101" not in repr(store)


# -- the file ------------------------------------------------------------------------------
def test_file_mode_parent_dirs_and_durability_pragmas(db: Path, store: KioskStore) -> None:
    assert db.parent.is_dir()
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    conn = store._conn  # white box: synchronous is per connection
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_garbage_file_is_refused_and_kept(db: Path) -> None:
    db.parent.mkdir(parents=True)
    garbage = random.Random(7).randbytes(8192)
    db.write_bytes(garbage)
    with pytest.raises(StateError, match=str(db)):
        KioskStore(db)
    assert db.read_bytes() == garbage  # never silently recreated


def test_damaged_index_page_is_refused(db: Path) -> None:
    with KioskStore(db) as s:
        for _ in range(50):
            s.commit_ticket("A", "07", lambda t: {"ticket_uid": t.uid(DEVICE), "pad": "x" * 500})
    # Damage the uid index: the tables still read fine, only an integrity check sees it.
    raw = sqlite3.connect(db)
    try:
        (page_size,) = raw.execute("PRAGMA page_size").fetchone()
        (root,) = raw.execute(
            "SELECT rootpage FROM sqlite_master WHERE type = 'index' AND tbl_name = 'tickets'"
        ).fetchone()
    finally:
        raw.close()
    data = bytearray(db.read_bytes())
    start = (root - 1) * page_size
    data[start : start + page_size] = random.Random(3).randbytes(page_size)
    db.write_bytes(bytes(data))
    with pytest.raises(StateError, match=str(db)):
        KioskStore(db)


def test_newer_schema_version_is_refused(db: Path) -> None:
    KioskStore(db).close()
    raw = sqlite3.connect(db)
    raw.execute("PRAGMA user_version = 99")
    raw.close()
    with pytest.raises(StateError, match="99"):
        KioskStore(db)


def test_unopenable_path_is_a_state_error(tmp_path: Path) -> None:
    (tmp_path / "is-a-dir").mkdir()
    with pytest.raises(StateError, match="is-a-dir"):
        KioskStore(tmp_path / "is-a-dir")


def test_foreign_database_is_refused(db: Path) -> None:
    db.parent.mkdir(parents=True)
    raw = sqlite3.connect(db)
    raw.execute("CREATE TABLE tickets (x)")
    raw.close()
    with pytest.raises(StateError):
        KioskStore(db)


def test_close_twice_and_use_after_close(db: Path) -> None:
    s = KioskStore(db)
    s.close()
    s.close()
    with pytest.raises(StateError):
        s.next_seq()
    with pytest.raises(StateError):
        s.depth()


# -- threads -------------------------------------------------------------------------------
def test_next_seq_from_two_threads_is_distinct(store: KioskStore) -> None:
    results: list[list[int]] = [[], []]
    barrier = threading.Barrier(2)

    def work(out: list[int]) -> None:
        barrier.wait()
        for _ in range(5000):
            out.append(store.next_seq())

    threads = [threading.Thread(target=work, args=(out,)) for out in results]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    assert all(out == sorted(out) for out in results)
    assert len(set(results[0]) | set(results[1])) == 10_000


def test_commit_ticket_from_two_threads_is_distinct(store: KioskStore) -> None:
    ids: list[str] = []
    lock = threading.Lock()

    def work() -> None:
        for _ in range(25):
            entry = commit(store)
            with lock:
                ids.append(entry.ticket_id)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(ids) == [f"A-07-{n:04d}" for n in range(1, 51)]


# -- crash safety --------------------------------------------------------------------------
CHILD = """
import sys
from edge.store import KioskStore
store = KioskStore(sys.argv[1])
i = 0
while True:
    print("S", store.next_seq(), flush=True)
    e = store.commit_ticket("AB"[i % 2], "07",
                            lambda t: {"ticket_uid": t.uid("k1"), "ticket_id": t.display})
    print("T", e.created_seq, e.ticket_id, e.uid, flush=True)
    if e.created_seq % 3 == 0:
        store.ack(e.uid)
        print("A", e.created_seq, flush=True)
    i += 1
"""


def run_child_until_killed(db: Path, kill_after: int) -> list[list[str]]:
    """Run the child, SIGKILL it after ``kill_after`` committed tickets; return every line."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(db)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=env,
    )
    lines: list[list[str]] = []
    try:
        tickets = 0
        while tickets < kill_after:
            line = proc.stdout.readline()
            if not line:
                pytest.fail(f"child died early: {proc.stderr.read()}")
            lines.append(line.split())
            tickets += line.startswith("T ")
        proc.send_signal(signal.SIGKILL)
        # What the child printed before the kill landed is committed too.
        for line in proc.stdout.read().splitlines(keepends=True):
            if line.endswith("\n"):
                lines.append(line.split())
    finally:
        proc.kill()
        proc.wait(timeout=10)
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    return lines


@pytest.mark.timeout(60)
def test_sigkill_at_random_points_loses_and_reuses_nothing(db: Path) -> None:
    rng = random.Random(20260301)
    seqs: list[int] = []
    tickets: dict[int, tuple[str, str]] = {}  # serial -> (display, uid), as reported
    acked: set[int] = set()
    # Per kill: the serial that may have been committed (and even acked) unreported, and
    # the last reported serial, whose ack may have landed unreported.
    maybe_committed: set[int] = set()
    maybe_acked: set[int] = set()
    for _ in range(4):
        reported: list[int] = []
        for kind, *rest in run_child_until_killed(db, rng.randint(3, 40)):
            if kind == "S":
                seqs.append(int(rest[0]))
            elif kind == "T":
                serial = int(rest[0])
                assert serial not in tickets
                tickets[serial] = (rest[1], rest[2])
                reported.append(serial)
            else:
                acked.add(int(rest[0]))
        maybe_committed.add(max(tickets) + 1)
        maybe_acked.add(reported[-1])
    # Reported sequence numbers never repeat, even across the kills.
    assert seqs == sorted(set(seqs))
    displays = [display for display, _ in tickets.values()]
    assert len(set(displays)) == len(displays)
    assert len({uid for _, uid in tickets.values()}) == len(tickets)

    with KioskStore(db) as s:
        pending = {e.created_seq: e for e in s.pending()}
        # Every reported ticket is in the outbox as reported, unless its ack was reported
        # (then it is gone), or its ack was under way when the kill landed.
        for serial, (display, uid) in tickets.items():
            if serial in acked:
                assert serial not in pending
            elif serial in pending:
                assert (pending[serial].ticket_id, pending[serial].uid) == (display, uid)
            else:
                assert serial % 3 == 0 and serial in maybe_acked
        # Nothing else is, except tickets committed just before a kill; serials have no
        # other gaps.
        assert set(pending) - set(tickets) <= maybe_committed
        top = max(tickets)
        # (The first serial is the store's creation time in seconds, not 1.)
        assert set(range(min(tickets), top + 1)) - set(tickets) <= maybe_committed
        all_displays = displays + [pending[n].ticket_id for n in set(pending) - set(tickets)]
        assert len(set(all_displays)) == len(all_displays)
        # Reopened: numbers, serial and seq go on without reuse.
        assert s.next_seq() > max(seqs)
        nxt = commit(s, "A")
        assert nxt.created_seq in (top + 1, top + 2)
        assert nxt.created_seq > max(pending, default=0)
        assert nxt.ticket_id not in all_displays
        used_a = [int(d.rsplit("-", 1)[1]) for d in all_displays if d.startswith("A-")]
        assert int(nxt.ticket_id.rsplit("-", 1)[1]) > max(used_a)


def test_ticket_uid_follows_the_mqtt_contract() -> None:
    from mqtt_topics.schemas import TICKET_UID_RE

    ticket = TicketNumber("A", "07", 123, 4567)
    assert ticket.display == "A-07-0123"
    match = TICKET_UID_RE.fullmatch(ticket.uid(DEVICE))
    assert match is not None and (match.group(1), int(match.group(2))) == (DEVICE, 4567)
    for bad in ("", "-lead", "a:b", "a/b", "x" * 33):
        with pytest.raises(ValueError):
            ticket.uid(bad)


def test_a_claimed_code_yields_one_ticket_only(store: KioskStore) -> None:
    from edge.store import CodeAlreadyUsed

    def body(t):
        return {"ticket_uid": t.uid("k07"), "n": t.number}

    store.commit_ticket("A", "07", body, claim=("appt-1", 2_000_000_000_000))
    assert store.code_used("appt-1", 1_900_000_000_000)
    with pytest.raises(CodeAlreadyUsed):
        store.commit_ticket("A", "07", body, claim=("appt-1", 2_000_000_000_000))
    assert store.depth() == 1                 # the refused claim allocated nothing
    nxt = store.commit_ticket("A", "07", body, claim=("appt-2", 2_000_000_000_000))
    assert nxt.ticket_id == "A-07-0002"
    assert not store.code_used("appt-1", 2_100_000_000_000)   # expired: forgotten
