"""The hall's ticket ledger: every ticket any kiosk issued, once, durably.

An ack is published only after the ticket's row is committed (synchronous=FULL), so a kiosk
deletes its outbox entry only when the ticket is safe on this side. Dedupe is by
``ticket_uid``: kiosks re-send unacknowledged tickets with fresh envelopes.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from hallkiosk.errors import StateError

SCHEMA = """
CREATE TABLE IF NOT EXISTS tickets (
    ledger_id      INTEGER PRIMARY KEY AUTOINCREMENT,
    ticket_uid     TEXT NOT NULL UNIQUE,
    ticket_id      TEXT NOT NULL,
    device         TEXT NOT NULL,
    service        TEXT NOT NULL,
    number         INTEGER NOT NULL,
    issued_at_ms   INTEGER NOT NULL,
    clock_trusted  INTEGER NOT NULL,
    priority       TEXT NOT NULL,
    appointment_id TEXT,
    citizen        TEXT,
    source         TEXT NOT NULL,
    printed        TEXT NOT NULL,
    received_at_ms INTEGER NOT NULL,
    deliveries     INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS tickets_device ON tickets(device, ledger_id);
"""


@dataclass(frozen=True, slots=True)
class LedgerRow:
    ledger_id: int
    ticket_uid: str
    ticket_id: str
    device: str
    service: str
    printed: str
    priority: str
    deliveries: int


class TicketLedger:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.executescript(SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise StateError(f"{self.path}: ticket ledger unusable: {exc}") from exc

    def record(self, device: str, body: dict) -> tuple[int, bool]:
        """Store a verified ticket. Returns (ledger_id, new). A duplicate updates nothing but
        the delivery count (and 'printed', which only a later transmission can know)."""
        with self._lock:
            cur = self._db.execute("BEGIN IMMEDIATE")
            try:
                row = cur.execute("SELECT ledger_id FROM tickets WHERE ticket_uid=?",
                                  (body["ticket_uid"],)).fetchone()
                if row is not None:
                    cur.execute("UPDATE tickets SET deliveries=deliveries+1, printed=? WHERE ledger_id=?",
                                (body["printed"], row[0]))
                    cur.execute("COMMIT")
                    return row[0], False
                cur.execute(
                    "INSERT INTO tickets (ticket_uid, ticket_id, device, service, number, issued_at_ms,"
                    " clock_trusted, priority, appointment_id, citizen, source, printed, received_at_ms)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (body["ticket_uid"], body["ticket_id"], device, body["service"], body["number"],
                     body["issued_at_ms"], int(body["clock_trusted"]), body["priority"],
                     body["appointment_id"], body["citizen"], body["source"], body["printed"],
                     int(time.time() * 1000)))
                ledger_id = cur.lastrowid
                cur.execute("COMMIT")
                return ledger_id, True
            except BaseException:
                cur.execute("ROLLBACK")
                raise

    def lookup(self, ticket_uid: str) -> LedgerRow | None:
        with self._lock:
            r = self._db.execute(
                "SELECT ledger_id, ticket_uid, ticket_id, device, service, printed, priority, deliveries"
                " FROM tickets WHERE ticket_uid=?", (ticket_uid,)).fetchone()
        return LedgerRow(*r) if r else None

    def rows(self) -> list[LedgerRow]:
        with self._lock:
            rs = self._db.execute(
                "SELECT ledger_id, ticket_uid, ticket_id, device, service, printed, priority, deliveries"
                " FROM tickets ORDER BY ledger_id").fetchall()
        return [LedgerRow(*r) for r in rs]

    def count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT count(*) FROM tickets").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
