"""Is the wall clock trustworthy? A Raspberry Pi has no real-time clock: until NTP syncs it
runs from the last saved time (fake-hwclock) or 1970. Tickets issued before the clock is
trusted are flagged (``clock_trusted: false``) and say so on paper.

The kernel knows: adjtimex(2) returns TIME_ERROR while the clock is unsynchronised (set by
systemd-timesyncd / chrony once they discipline it). Read-only call, no privileges needed.
"""

from __future__ import annotations

import ctypes
import functools

TIME_ERROR = 5


class _Timex(ctypes.Structure):
    # struct timex from <sys/timex.h> (x86-64 and arm64 layouts agree: longs are 64 bit);
    # the kernel struct has 11 reserved ints at the end, sized generously here.
    _fields_ = [("modes", ctypes.c_uint), ("offset", ctypes.c_long), ("freq", ctypes.c_long),
                ("maxerror", ctypes.c_long), ("esterror", ctypes.c_long), ("status", ctypes.c_int),
                ("constant", ctypes.c_long), ("precision", ctypes.c_long),
                ("tolerance", ctypes.c_long), ("time_sec", ctypes.c_long),
                ("time_usec", ctypes.c_long), ("tick", ctypes.c_long), ("ppsfreq", ctypes.c_long),
                ("jitter", ctypes.c_long), ("shift", ctypes.c_int), ("stabil", ctypes.c_long),
                ("jitcnt", ctypes.c_long), ("calcnt", ctypes.c_long), ("errcnt", ctypes.c_long),
                ("stbcnt", ctypes.c_long), ("tai", ctypes.c_int), ("_pad", ctypes.c_int * 16)]


@functools.cache
def _libc():
    # The process's own symbols include the C library's adjtimex; ctypes.util.find_library
    # would run ldconfig in a subprocess and load tempfile and shutil for nothing.
    return ctypes.CDLL(None, use_errno=True)


def clock_trusted() -> bool:
    """True when the kernel reports a synchronised clock."""
    try:
        tx = _Timex()
        state = _libc().adjtimex(ctypes.byref(tx))
    except (OSError, AttributeError):
        return False
    return state not in (-1, TIME_ERROR)
