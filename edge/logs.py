"""Logging: one line per record on stdout (journald adds the time and unit), logfmt style.

No personal data is ever passed to a logger: drivers and the session log reasons and counts,
never names or ID numbers (CardData's repr is redacted as a second line of defence).
"""

from __future__ import annotations

import logging
import sys


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage().replace("\n", " ")
        line = f"level={record.levelname.lower()} logger={record.name} msg=\"{msg}\""
        if record.exc_info:
            line += " exc=\"" + self.formatException(record.exc_info).replace("\n", " | ") + "\""
        return line


def setup_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("hallkiosk.mqtt.paho").setLevel(logging.WARNING)
