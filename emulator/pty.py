"""A serial device on the master side of a pseudo-terminal.

The agent opens ``device.path`` with pyserial exactly as it would open
``/dev/serial/by-id/...`` on a kiosk: it cannot tell the difference. ``path`` is a
symlink we own, so ``unplug()`` / ``replug()`` can close and recreate the pty at the same
path, which is what a USB adapter does when it is pulled and pushed back.

Closing the master behaves like a USB unplug for the other side: pyserial's ``read()``
raises ``SerialException`` and ``write()`` raises ``EIO`` (measured, see PROTOCOLS.md).
A pty ignores baud rate and modem lines.
"""

from __future__ import annotations

import os
import select
import selectors
import threading
import tty
from pathlib import Path


class PtyDevice:
    """Base class: subclasses implement :meth:`on_bytes` (called on the device thread)."""

    #: Name used in thread names and log lines.
    kind = "pty-device"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._master: int | None = None
        self._slave: int | None = None
        self._wake_r, self._wake_w = os.pipe()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.plugged = False
        self._open_pty()

    # -- lifecycle -----------------------------------------------------------------
    def _open_pty(self) -> None:
        master, slave = os.openpty()
        tty.setraw(master)
        tty.setraw(slave)
        os.set_blocking(master, False)
        tmp = self.path + ".new"
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        os.symlink(os.ttyname(slave), tmp)
        os.replace(tmp, self.path)
        with self._lock:
            self._master, self._slave = master, slave
            self.plugged = True
        self._thread = threading.Thread(target=self._run, args=(master,),
                                        name=f"emu-{self.kind}", daemon=True)
        self._thread.start()

    def unplug(self) -> None:
        """Pull the cable: the port vanishes and the path with it."""
        with self._lock:
            if not self.plugged:
                return
            self.plugged = False
            master, slave = self._master, self._slave
            self._master = self._slave = None
        os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(timeout=2)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        for fd in (master, slave):
            if fd is not None:
                os.close(fd)
        self._drain_wake()

    def replug(self) -> None:
        """Push the cable back: a new pty appears at the same path, device reset."""
        if self.plugged:
            return
        self.on_replug()
        self._open_pty()

    def close(self) -> None:
        if self._closed:
            return
        self.unplug()
        self._closed = True
        os.close(self._wake_r)
        os.close(self._wake_w)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- I/O -------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        """Send bytes to the agent (dropped silently when unplugged, like a real cable)."""
        with self._lock:
            master = self._master
            if master is None:
                return
            view = memoryview(data)
            while view:
                try:
                    n = os.write(master, view)
                except BlockingIOError:
                    # The agent is not reading fast enough; wait until the pty drains.
                    select.select([], [master], [], 1.0)
                    continue
                except OSError:
                    return
                view = view[n:]

    def _drain_wake(self) -> None:
        os.set_blocking(self._wake_r, False)
        try:
            while os.read(self._wake_r, 64):
                pass
        except BlockingIOError:
            pass

    def _run(self, master: int) -> None:
        sel = selectors.DefaultSelector()
        sel.register(master, selectors.EVENT_READ)
        sel.register(self._wake_r, selectors.EVENT_READ)
        try:
            while True:
                for key, _ in sel.select():
                    if key.fd == self._wake_r:
                        return
                    try:
                        data = os.read(master, 65536)
                    except BlockingIOError:
                        continue
                    except OSError:
                        # EIO while the agent has the port closed: wait for it to reopen.
                        data = b""
                    if data:
                        try:
                            self.on_bytes(data)
                        except Exception as exc:  # a device bug must not kill the pty
                            self.on_error(exc)
                    else:
                        sel.unregister(master)
                        self._wait_reopen(sel, master)
        finally:
            sel.close()

    def _wait_reopen(self, sel: selectors.BaseSelector, master: int) -> None:
        # When no process has the slave open, the master reads EIO at once. We keep our
        # own slave fd open, so this happens only in odd cases; back off without spinning.
        import time

        time.sleep(0.05)
        sel.register(master, selectors.EVENT_READ)

    # -- for subclasses ---------------------------------------------------------------
    def on_bytes(self, data: bytes) -> None:
        raise NotImplementedError

    def on_error(self, exc: BaseException) -> None:
        import logging

        logging.getLogger("emulator").exception("%s at %s: device model failed", self.kind, self.path)

    def on_replug(self) -> None:
        """Reset the device's state as a power cycle would (subclasses override)."""
