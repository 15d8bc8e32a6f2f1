"""The kiosk's durable state: ticket numbers, envelope sequence numbers and the outbox.

Wiring: the agent builds one :class:`KioskStore` at start from the configured state path
(a writable partition: Raspberry Pi OS's overlay root keeps /var/lib in RAM) and shares
it between its main loop and the MQTT thread. The store owns one sqlite3 connection,
guarded by a lock, so every method is safe to call from any thread.

Why SQLite in WAL mode with ``synchronous=FULL``: a ticket is committed here BEFORE it is
printed or published, and the kiosk has no UPS. With FULL, every commit is fsynced before
the call returns, so a power cut or a kill -9 between any two statements loses at most
the transaction in flight, and a transaction that never committed allocated nothing. A
PUBACK from Mosquitto is not durability (PROTOCOLS.md: a broker SIGKILL lost PUBACKed
QoS 1 messages), so an outbox entry leaves only when the hall's ticket consumer
acknowledges it end to end (:meth:`KioskStore.ack`).

Times: ``*_ms`` are wall-clock milliseconds since the Unix epoch from the injected clock;
they are for people and for ages, never for ordering. Order comes from the kiosk-wide
ticket serial, which a wall-clock step (first NTP sync on a Pi without an RTC) cannot
disturb.

The schema is versioned with ``PRAGMA user_version`` (no migrations table). A database
that is corrupt, unopenable, or written by a newer hallkiosk raises :class:`StateError`
naming the path; it is never silently recreated, because its outbox holds tickets that
citizens are waiting on.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sqlite3
import stat
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from edge.clock import SYSTEM_CLOCK, Clock
from hallkiosk.errors import HallkioskError, StateError

__all__ = [
    "KioskStore",
    "OutboxEntry",
    "TicketNumber",
    "Printed",
    "next_ticket_number",
    "SCHEMA_VERSION",
    "SEQ_BLOCK",
    "MAX_TICKET_NUMBER",
    "RECENT_TICKETS",
    "WAITING_WINDOW_S",
]

log = logging.getLogger(__name__)

class CodeAlreadyUsed(HallkioskError, ValueError):
    """A single-use code (appointment QR) that already produced a ticket."""


#: ``PRAGMA user_version`` this module writes; a larger one is refused.
SCHEMA_VERSION = 1
#: Sequence numbers reserved per fsync. After a restart the kiosk continues from the end
#: of the last reserved block, so up to this many numbers are skipped (never reused).
SEQ_BLOCK = 256
#: Displayed ticket numbers run 1..9999 per service category, then wrap to 1.
MAX_TICKET_NUMBER = 9999
#: Acknowledged tickets kept for "reprint last ticket".
RECENT_TICKETS = 20
#: Window of :meth:`KioskStore.waiting_count`, seconds.
WAITING_WINDOW_S = 4 * 3600

Printed = Literal["yes", "no", "unknown"]
_PRINTED_VALUES = frozenset({"yes", "no", "unknown"})
_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")
# Service categories and the number prefix: the config's identifier rule (edge/config.py).
_LABEL = re.compile(r"[A-Za-z0-9_-]{1,32}")
# The device part of a ticket uid, as the MQTT contract's TICKET_UID_RE accepts it.
_DEVICE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,31}")

# Schema v1. Acknowledged tickets stay in `tickets` (acked_at_ms set) only while they are
# among the last RECENT_TICKETS, so one table serves both the outbox and "reprint last".
_SCHEMA_V1 = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID",
    "CREATE TABLE counters (service TEXT PRIMARY KEY, number INTEGER NOT NULL) WITHOUT ROWID",
    """CREATE TABLE tickets (
        serial INTEGER PRIMARY KEY,
        uid TEXT NOT NULL UNIQUE,
        ticket_id TEXT NOT NULL,
        service TEXT NOT NULL,
        body TEXT NOT NULL,
        created_at_ms INTEGER NOT NULL,
        printed TEXT NOT NULL CHECK (printed IN ('yes', 'no', 'unknown')),
        attempts INTEGER NOT NULL DEFAULT 0,
        last_sent_at_ms INTEGER,
        acked_at_ms INTEGER
    )""",
    "CREATE TABLE issue_log (serial INTEGER PRIMARY KEY, service TEXT NOT NULL,"
    " created_at_ms INTEGER NOT NULL)",
    "CREATE INDEX issue_log_by_service ON issue_log (service, created_at_ms)",
    # Single-use codes (appointment QR ids) already turned into a ticket, kept until the
    # code's own expiry so a screenshot of a used code is refused for as long as it is valid.
    "CREATE TABLE used_codes (code_id TEXT PRIMARY KEY, expires_at_ms INTEGER NOT NULL)"
    " WITHOUT ROWID",
)
_TICKET_COLUMNS = (
    "uid, ticket_id, service, body, created_at_ms, serial, printed, attempts, last_sent_at_ms"
)


def next_ticket_number(last: int) -> int:
    """The displayed number after ``last`` (0 = none issued yet): 1..9999, then 1 again."""
    if not 0 <= last <= MAX_TICKET_NUMBER:
        raise ValueError(f"ticket number {last} outside 0..{MAX_TICKET_NUMBER}")
    return last % MAX_TICKET_NUMBER + 1


def _check_label(what: str, value: object) -> str:
    if not isinstance(value, str) or not _LABEL.fullmatch(value):
        raise ValueError(f"{what} must be 1-32 characters of A-Z a-z 0-9 _ -, got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class TicketNumber:
    """A ticket number allocated inside :meth:`KioskStore.commit_ticket`.

    ``number`` is what the citizen reads (1..9999 per service, wraps); ``serial`` counts
    every ticket this database ever issued (from 1) and never resets.
    """

    service: str
    prefix: str
    number: int
    serial: int

    @property
    def display(self) -> str:
        """What is printed and called out, e.g. ``"A-07-0123"``."""
        return f"{self.service}-{self.prefix}-{self.number:04d}"

    def uid(self, device: str) -> str:
        """The hall-wide ticket uid ``"<device>:<serial>"`` (mqtt_topics TICKET_UID_RE).

        Put it in the body as ``"ticket_uid"``: the store keys the outbox on it and the
        hall's consumer acknowledges with it.
        """
        if not isinstance(device, str) or not _DEVICE.fullmatch(device):
            raise ValueError(f"device id does not fit a ticket uid: {device!r}")
        return f"{device}:{self.serial}"


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """One committed ticket, as stored.

    ``created_seq`` is the kiosk-wide ticket serial: the creation order, immune to wall
    clock steps. ``body`` is a fresh dict on each read and is left out of ``repr()``.
    """

    uid: str
    ticket_id: str
    service: str
    body: dict[str, Any] = field(repr=False)
    created_at_ms: int
    created_seq: int
    printed: Printed
    attempts: int
    last_sent_at_ms: int | None


class KioskStore:
    """Durable counters and outbox of one kiosk, in one SQLite file.

    ``path``: the database file (parent directories are created; the file is mode 0600).
    ``clock``: supplies wall time for ``created_at_ms``, ``last_sent_at_ms`` and the
    waiting-count window.
    """

    def __init__(self, path: Path | str, *, clock: Clock = SYSTEM_CLOCK) -> None:
        self._path = Path(path)
        self._clock = clock
        # Re-entrant so that make_body calling back into the store is refused with an
        # error instead of deadlocking the calling thread.
        self._lock = threading.RLock()
        self._in_make_body = False
        self._seq_next = 0
        self._seq_limit = 0
        self._conn: sqlite3.Connection | None = self._open()
        try:
            self._prepare()
        except BaseException:
            self._conn.close()
            self._conn = None
            raise

    # -- opening -------------------------------------------------------------------------
    def _open(self) -> sqlite3.Connection:
        try:
            self._path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._create_file()
            # mode=rw: SQLite must never create the file itself (we did, with mode 0600).
            # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT).
            conn = sqlite3.connect(
                f"{self._path.resolve().as_uri()}?mode=rw",
                uri=True,
                timeout=5.0,
                isolation_level=None,
                check_same_thread=False,
            )
        except (OSError, sqlite3.Error) as exc:
            raise StateError(f"kiosk store {self._path}: cannot open: {exc}") from exc
        return conn

    def _create_file(self) -> None:
        """Create an empty database file with mode 0600 and make its name durable."""
        try:
            fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            self._tighten_mode()
            return
        os.close(fd)
        # Without an fsync of the directory a power cut could lose the new file's name,
        # and with it every ticket committed into it.
        dir_fd = os.open(self._path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def _tighten_mode(self) -> None:
        """Make an existing database file 0600 again if someone widened it."""
        st = os.stat(self._path)
        if not stat.S_ISREG(st.st_mode) or not st.st_mode & 0o077:
            return
        try:
            os.chmod(self._path, 0o600)
        except OSError as exc:
            # Not ours to change (e.g. another owner): still usable, so only say so.
            log.warning("kiosk store %s: cannot make it mode 0600: %s", self._path, exc)

    def _prepare(self) -> None:
        """Set the pragmas, create or check the schema."""
        conn = self._conn
        if conn is None:
            raise StateError(f"kiosk store {self._path} is closed")
        try:
            # The first statement that reads the file header: a file that is not a
            # database fails here. A newer schema is refused before anything is written.
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            self._check_version(version)
            (mode,) = conn.execute("PRAGMA journal_mode=WAL").fetchone()
            if str(mode).lower() != "wal":
                raise StateError(
                    f"kiosk store {self._path}: WAL journal refused (got {mode!r});"
                    " the filesystem may not support shared memory"
                )
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("BEGIN IMMEDIATE")
            try:
                # Read again under the write lock: another opener may have created it.
                (version,) = conn.execute("PRAGMA user_version").fetchone()
                self._check_version(version)
                if version == 0:
                    self._create_schema(conn)
                conn.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
            problems = [row[0] for row in conn.execute("PRAGMA quick_check").fetchall()]
            if problems != ["ok"]:
                raise StateError(
                    f"kiosk store {self._path}: corrupt database ({len(problems)} problems,"
                    f" first: {problems[0]})"
                )
        except sqlite3.Error as exc:
            raise StateError(f"kiosk store {self._path}: unusable database: {exc}") from exc

    def _check_version(self, version: int) -> None:
        if version not in (0, SCHEMA_VERSION):
            raise StateError(
                f"kiosk store {self._path}: schema version {version} is not known to"
                f" this hallkiosk (knows {SCHEMA_VERSION}); refusing to touch it"
            )

    def _create_schema(self, conn: sqlite3.Connection) -> None:
        # user_version lives in the file header and is written by this same transaction,
        # so a crash leaves either an empty file or a complete schema.
        for statement in _SCHEMA_V1:
            conn.execute(statement)
        # A fresh database starts its sequence numbers at the wall clock in ms: if a
        # kiosk's database is lost (SD card replaced, re-imaged) it most likely still
        # continues above what consumers have seen from it, and they refuse an older
        # sequence number as a replay. With a wrong clock it is no worse than 0.
        seq_start = max(1, int(self._clock.wall() * 1000))
        # The ticket serial (the second half of every ticket_uid, which the hall's ledger
        # dedupes on) starts at the wall clock in seconds for the same reason: a kiosk whose
        # store was lost must not re-issue uids the ledger already holds, or its new tickets
        # would be taken for duplicates and silently dropped. A kiosk issues far fewer than
        # one ticket per second on average, so a re-seeded store starts above the old serials.
        serial_start = max(0, int(self._clock.wall()) - 1)
        conn.executemany(
            "INSERT INTO meta (key, value) VALUES (?, ?)",
            [
                ("serial", serial_start),
                ("seq_reserved_to", seq_start),
                ("session", 0),
                ("numbers_day", None),
            ],
        )
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        log.info("kiosk store %s: created schema version %d", self._path, SCHEMA_VERSION)

    # -- plumbing ------------------------------------------------------------------------
    def _live(self) -> sqlite3.Connection:
        """The connection; the caller holds the lock."""
        if self._in_make_body:
            raise StateError("make_body must not call back into the kiosk store")
        if self._conn is None:
            raise StateError(f"kiosk store {self._path} is closed")
        return self._conn

    def _fail(self, what: str, exc: sqlite3.Error) -> StateError:
        return StateError(f"kiosk store {self._path}: {what} failed: {exc}")

    def _rollback(self) -> None:
        conn = self._conn
        if conn is not None and conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                # SQLite has already rolled back after some errors (e.g. SQLITE_FULL);
                # the error that brought us here is the one worth reporting.
                pass

    @contextmanager
    def _write(self, what: str) -> Iterator[sqlite3.Connection]:
        """One durable transaction (fsynced at COMMIT). The caller holds the lock."""
        conn = self._live()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise self._fail(what, exc) from exc
        try:
            yield conn
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            raise self._fail(what, exc) from exc
        except BaseException:
            self._rollback()
            raise

    def _read(self, what: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return self._live().execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise self._fail(what, exc) from exc

    @staticmethod
    def _meta(conn: sqlite3.Connection, key: str) -> Any:
        row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        if row is None:
            raise sqlite3.DatabaseError(f"meta key {key!r} missing")
        return row[0]

    def _now_ms(self) -> int:
        return int(self._clock.wall() * 1000)

    @staticmethod
    def _entry(row: tuple[Any, ...]) -> OutboxEntry:
        uid, ticket_id, service, body, created_at_ms, serial, printed, attempts, sent = row
        return OutboxEntry(
            uid=uid,
            ticket_id=ticket_id,
            service=service,
            body=json.loads(body),
            created_at_ms=created_at_ms,
            created_seq=serial,
            printed=printed,
            attempts=attempts,
            last_sent_at_ms=sent,
        )

    # -- counters ------------------------------------------------------------------------
    def next_seq(self) -> int:
        """The next envelope sequence number: strictly increasing, never reused.

        Costs an fsync only once per :data:`SEQ_BLOCK` numbers (a block is made durable
        before any number in it is handed out).
        """
        with self._lock:
            self._live()
            if self._seq_next >= self._seq_limit:
                with self._write("reserve sequence numbers") as conn:
                    start = max(int(self._meta(conn, "seq_reserved_to")), self._seq_next)
                    conn.execute(
                        "UPDATE meta SET value = ? WHERE key = 'seq_reserved_to'",
                        (start + SEQ_BLOCK,),
                    )
                self._seq_next, self._seq_limit = start, start + SEQ_BLOCK
            seq = self._seq_next
            self._seq_next += 1
            return seq

    def session_counter(self) -> int:
        """Bump and return the durable MQTT session counter (1 on a fresh database)."""
        with self._lock, self._write("bump session counter") as conn:
            value = int(self._meta(conn, "session")) + 1
            conn.execute("UPDATE meta SET value = ? WHERE key = 'session'", (value,))
            return value

    def reset_numbers_if_new_day(self, day: str) -> bool:
        """Restart the displayed numbers of every service when ``day`` is a new day.

        ``day`` is ``YYYY-MM-DD``, passed only when the wall clock is trusted. Returns
        True if the numbers were reset. The serial never resets. The first day ever
        recorded does not reset (numbers issued before the clock was trusted may be in
        today's queue), and neither does a day EARLIER than the stored one (a clock put
        back would otherwise hand out today's numbers twice); it is recorded, so the next
        real day change resets.
        """
        if not isinstance(day, str) or not _DAY.fullmatch(day):
            raise ValueError(f"day must be YYYY-MM-DD, got {day!r}")
        with self._lock, self._write("reset ticket numbers") as conn:
            stored = self._meta(conn, "numbers_day")
            if stored == day:
                return False
            conn.execute("UPDATE meta SET value = ? WHERE key = 'numbers_day'", (day,))
            if stored is None or day < stored:
                return False
            conn.execute("DELETE FROM counters")
        log.info("kiosk store: ticket numbers restart for %s", day)
        return True

    # -- tickets -------------------------------------------------------------------------
    def commit_ticket(
        self,
        service: str,
        prefix: str,
        make_body: Callable[[TicketNumber], dict[str, Any]],
        *,
        claim: tuple[str, int] | None = None,
    ) -> OutboxEntry:
        """Allocate a ticket number and commit the ticket to the outbox, in one transaction.

        ``make_body(ticket)`` builds the body; it runs inside the transaction, must not
        call the store, and must return a JSON-serialisable dict with a unique string
        ``"ticket_uid"`` (use ``ticket.uid(device)``), which keys the outbox entry. If it
        raises, nothing is allocated. On return the ticket is fsynced: print or publish
        it only after this returns.

        ``claim=(code_id, expires_at_ms)`` marks a single-use code (an appointment) used in
        the same transaction: a code already used raises :class:`CodeAlreadyUsed` and
        allocates nothing, so one appointment can never yield two tickets, even across a
        power cut between the two writes.
        """
        _check_label("service", service)
        _check_label("prefix", prefix)
        with self._lock:
            self._live()
            now_ms = self._now_ms()
            with self._write("commit ticket") as conn:
                if claim is not None:
                    code_id, expires_at_ms = claim
                    conn.execute("DELETE FROM used_codes WHERE expires_at_ms < ?", (now_ms,))
                    if conn.execute("SELECT 1 FROM used_codes WHERE code_id = ?",
                                    (code_id,)).fetchone():
                        raise CodeAlreadyUsed(f"code {code_id} was already used for a ticket")
                    conn.execute("INSERT INTO used_codes (code_id, expires_at_ms) VALUES (?, ?)",
                                 (code_id, int(expires_at_ms)))
                row = conn.execute(
                    "SELECT number FROM counters WHERE service = ?", (service,)
                ).fetchone()
                number = next_ticket_number(row[0] if row else 0)
                serial = int(self._meta(conn, "serial")) + 1
                ticket = TicketNumber(service, prefix, number, serial)
                self._in_make_body = True
                try:
                    body = make_body(ticket)
                finally:
                    self._in_make_body = False
                uid, text = _encode_body(body)
                if conn.execute("SELECT 1 FROM tickets WHERE uid = ?", (uid,)).fetchone():
                    raise ValueError("make_body returned a ticket_uid this store already holds")
                conn.execute(
                    "INSERT INTO counters (service, number) VALUES (?, ?)"
                    " ON CONFLICT (service) DO UPDATE SET number = excluded.number",
                    (service, number),
                )
                conn.execute("UPDATE meta SET value = ? WHERE key = 'serial'", (serial,))
                conn.execute(
                    "INSERT INTO tickets (serial, uid, ticket_id, service, body, created_at_ms,"
                    # 'unknown' until the printer has answered: a crash from here on cannot
                    # tell whether the paper came out.
                    " printed) VALUES (?, ?, ?, ?, ?, ?, 'unknown')",
                    (serial, uid, ticket.display, service, text, now_ms),
                )
                self._prune_acked(conn)
                conn.execute(
                    "INSERT INTO issue_log (serial, service, created_at_ms) VALUES (?, ?, ?)",
                    (serial, service, now_ms),
                )
                # Rows far in the future come from a clock that was wrong; drop them too.
                window_ms = WAITING_WINDOW_S * 1000
                conn.execute(
                    "DELETE FROM issue_log WHERE created_at_ms < ? OR created_at_ms > ?",
                    (now_ms - window_ms, now_ms + window_ms),
                )
        return OutboxEntry(
            uid=uid,
            ticket_id=ticket.display,
            service=service,
            body=json.loads(text),
            created_at_ms=now_ms,
            created_seq=serial,
            printed="unknown",
            attempts=0,
            last_sent_at_ms=None,
        )

    @staticmethod
    def _prune_acked(conn: sqlite3.Connection) -> None:
        # Keep acknowledged tickets only while they are among the last RECENT_TICKETS.
        conn.execute(
            "DELETE FROM tickets WHERE acked_at_ms IS NOT NULL AND serial NOT IN"
            " (SELECT serial FROM tickets ORDER BY serial DESC LIMIT ?)",
            (RECENT_TICKETS,),
        )

    def set_printed(self, uid: str, printed: Printed) -> bool:
        """Record whether the ticket came out of the printer; False if the uid is unknown.

        Works on acknowledged recent tickets too (printing may finish after the ack).
        """
        if printed not in _PRINTED_VALUES:
            raise ValueError(f"printed must be one of {sorted(_PRINTED_VALUES)}, got {printed!r}")
        with self._lock, self._write("set printed") as conn:
            cur = conn.execute("UPDATE tickets SET printed = ? WHERE uid = ?", (printed, uid))
            return cur.rowcount > 0

    def mark_sent(self, uid: str) -> int:
        """Count one transmission of a pending entry and stamp its time; returns attempts.

        Returns 0 if the entry is no longer pending (an ack from the MQTT thread can win
        the race with the main loop's send; that is not an error).
        """
        with self._lock, self._write("mark sent") as conn:
            # fetchall: a RETURNING statement must run to completion before COMMIT.
            rows = conn.execute(
                "UPDATE tickets SET attempts = attempts + 1, last_sent_at_ms = ?"
                " WHERE uid = ? AND acked_at_ms IS NULL RETURNING attempts",
                (self._now_ms(), uid),
            ).fetchall()
            return int(rows[0][0]) if rows else 0

    def ack(self, uid: str) -> bool:
        """Remove an entry from the outbox (the consumer acknowledged it end to end).

        Returns False for an unknown or already acknowledged uid, which is harmless: acks
        are at-least-once too. The ticket stays available to :meth:`last_ticket`.
        """
        with self._lock, self._write("ack") as conn:
            cur = conn.execute(
                "UPDATE tickets SET acked_at_ms = ? WHERE uid = ? AND acked_at_ms IS NULL",
                (self._now_ms(), uid),
            )
            if cur.rowcount == 0:
                return False
            self._prune_acked(conn)
            return True

    def pending(self, limit: int | None = None) -> list[OutboxEntry]:
        """Outbox entries not yet acknowledged, oldest first (at most ``limit``)."""
        rows = self._read(
            "list pending",
            f"SELECT {_TICKET_COLUMNS} FROM tickets WHERE acked_at_ms IS NULL"
            " ORDER BY serial LIMIT ?",
            (-1 if limit is None else max(0, int(limit)),),
        )
        return [self._entry(row) for row in rows]

    def get(self, uid: str) -> OutboxEntry | None:
        """The pending outbox entry with this uid, or None (unknown or acknowledged)."""
        rows = self._read(
            "get",
            f"SELECT {_TICKET_COLUMNS} FROM tickets WHERE uid = ? AND acked_at_ms IS NULL",
            (uid,),
        )
        return self._entry(rows[0]) if rows else None

    def code_used(self, code_id: str, now_ms: int) -> bool:
        """True when ``code_id`` already produced a ticket and has not expired yet."""
        rows = self._read("code used", "SELECT expires_at_ms FROM used_codes WHERE code_id = ?",
                          (code_id,))
        return bool(rows) and rows[0][0] >= now_ms

    def depth(self) -> int:
        """Number of pending outbox entries."""
        rows = self._read("count pending", "SELECT COUNT(*) FROM tickets WHERE acked_at_ms IS NULL")
        return int(rows[0][0])

    def oldest_age_s(self, now_ms: int) -> float | None:
        """Seconds since the oldest pending entry was created (wall clock), None if empty.

        Never negative: a wall clock stepped back would otherwise report a negative age.
        """
        rows = self._read(
            "oldest pending",
            "SELECT created_at_ms FROM tickets WHERE acked_at_ms IS NULL ORDER BY serial LIMIT 1",
        )
        if not rows:
            return None
        return max(0, now_ms - rows[0][0]) / 1000.0

    def last_ticket(self) -> OutboxEntry | None:
        """The most recently committed ticket, acknowledged or not (for "reprint last")."""
        rows = self._read(
            "last ticket", f"SELECT {_TICKET_COLUMNS} FROM tickets ORDER BY serial DESC LIMIT 1"
        )
        return self._entry(rows[0]) if rows else None

    def waiting_count(self, service: str) -> int:
        """Tickets this kiosk issued for ``service`` in the last :data:`WAITING_WINDOW_S`.

        An approximation of "people waiting ahead", used until the hall queue system says
        better: it ignores tickets from other kiosks and people already served.
        """
        now_ms = self._now_ms()
        rows = self._read(
            "waiting count",
            "SELECT COUNT(*) FROM issue_log WHERE service = ? AND created_at_ms >= ?",
            (service, now_ms - WAITING_WINDOW_S * 1000),
        )
        return int(rows[0][0])

    # -- lifetime ------------------------------------------------------------------------
    @property
    def path(self) -> Path:
        return self._path

    def close(self) -> None:
        """Close the database (checkpoints the WAL). Safe to call twice."""
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()

    def __enter__(self) -> KioskStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._conn is None else "open"
        return f"KioskStore({str(self._path)!r}, {state})"


def _encode_body(body: object) -> tuple[str, str]:
    """Validate a ticket body; return its ticket_uid and its JSON text."""
    if not isinstance(body, dict):
        raise TypeError(f"make_body must return a dict, got {type(body).__name__}")
    uid = body.get("ticket_uid")
    if not isinstance(uid, str) or not uid:
        raise ValueError("make_body's dict must carry a non-empty 'ticket_uid' string")
    try:
        text = json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"ticket body is not JSON-serialisable: {type(exc).__name__}") from None
    return uid, text
