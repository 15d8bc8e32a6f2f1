"""The ESC/POS ticket printer.

``escpos`` is the pure protocol (builder, ticket layout, status decoding, stream parser),
shared with the emulator; ``printer`` is the driver, handed an open pyserial-like port.
"""

from edge.printer.escpos import PrinterStatus, TicketLayout, render_ticket
from edge.printer.printer import PrinterNotReady, TicketPrinter

__all__ = ["PrinterNotReady", "PrinterStatus", "TicketLayout", "TicketPrinter", "render_ticket"]
