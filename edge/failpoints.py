"""Named crash points for the durability tests.

``HALLKIOSK_CRASH_AT=after_commit`` makes the agent SIGKILL itself right after the named
step, exactly as a power cut would, so tests prove what survives. Unset (always, in
production) each call is one dictionary look-up.
"""

from __future__ import annotations

import os
import signal

_ARMED = frozenset(filter(None, os.environ.get("HALLKIOSK_CRASH_AT", "").split(",")))


def crash_point(name: str) -> None:
    if name in _ARMED:
        os.kill(os.getpid(), signal.SIGKILL)
