"""The ticket printer as the main loop sees it: opened lazily, reopened after an unplug.

Printing runs on the main loop (a ticket is one short write plus three one-byte status
exchanges); the port is opened here, through edge.serialdev, and handed to the driver.
"""

from __future__ import annotations

import logging

from edge.clock import Clock
from edge.printer.escpos import PrinterStatus, TicketLayout
from edge.printer.printer import TicketPrinter
from edge.serialdev import open_serial
from hallkiosk.errors import DeviceGone

log = logging.getLogger("hallkiosk.printer")


class PrinterHandle:
    device = "ticket-printer"

    def __init__(self, url: str, *, timeout_s: float, encoding: str, clock: Clock,
                 open_port=open_serial) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.encoding = encoding
        self.clock = clock
        self._open_port = open_port
        self._port = None
        self._printer: TicketPrinter | None = None
        self.last_status: PrinterStatus | None = None

    def _driver(self) -> TicketPrinter:
        if self._printer is None:
            self._port = self._open_port(self.url, timeout_s=0.05)
            self._printer = TicketPrinter(self._port, name=self.device, timeout_s=self.timeout_s,
                                          encoding=self.encoding, clock=self.clock)
        return self._printer

    def _drop(self) -> None:
        port, self._port, self._printer = self._port, None, None
        if port is not None:
            try:
                port.close()
            except Exception:
                log.debug("printer port close failed", exc_info=True)

    def print_ticket(self, layout: TicketLayout) -> PrinterStatus:
        # No retry here: a write that failed half way may have printed; the caller records
        # the ticket as printed "unknown" rather than risk a second paper.
        try:
            self.last_status = self._driver().print_ticket(layout)
            return self.last_status
        except DeviceGone:
            self._drop()
            raise

    def status(self) -> PrinterStatus:
        """Ask the printer; after an unplug and replug the old port is dead, so a DeviceGone
        on a port opened earlier is retried once on a freshly opened one (status queries are
        harmless to repeat, and the citizen's ticket must not pay for a stale handle)."""
        fresh = self._printer is None
        try:
            return self._query()
        except DeviceGone:
            if fresh:
                raise
        return self._query()

    def _query(self) -> PrinterStatus:
        try:
            self.last_status = self._driver().status()
            return self.last_status
        except DeviceGone:
            self._drop()
            raise

    def close(self) -> None:
        self._drop()
