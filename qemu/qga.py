"""A small client for the QEMU guest agent (qemu-ga), over QEMU's unix socket chardev.

Wiring: the guest image has Debian's ``qemu-guest-agent``; QEMU exposes a virtio-serial port
named ``org.qemu.guest_agent.0`` whose host end is a unix socket the harness connects to.
Protocol (QEMU's qga docs): one JSON command per line, one JSON answer per line.
``guest-sync-delimited`` makes the agent answer after a 0xFF byte, which resynchronises a
stream that may hold a stale answer (a previous client, or an agent that just restarted).

Until qemu-ga runs in the guest, QEMU accepts the connection and swallows what is written:
:meth:`GuestAgent.wait_ready` retries the sync with short timeouts until an answer comes.
"""

from __future__ import annotations

import base64
import json
import random
import socket
import time
from dataclasses import dataclass

from hallkiosk.errors import HallkioskError


class GuestAgentError(HallkioskError, RuntimeError):
    """The guest agent did not answer, or answered with an error."""


@dataclass(frozen=True, slots=True)
class ExecResult:
    """A finished guest command: exit code and captured output (text, decoded leniently)."""

    exitcode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.exitcode == 0


class GuestAgent:
    """``with GuestAgent(path) as ga: ga.wait_ready(60); ga.exec(["systemctl", ...])``."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self._sock: socket.socket | None = None
        self._buf = b""

    # -- transport ---------------------------------------------------------------------------
    def _connect(self) -> socket.socket:
        if self._sock is None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(self.socket_path)
            self._sock = s
            self._buf = b""
        return self._sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> "GuestAgent":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _send(self, obj: dict, *, prefix: bytes = b"") -> None:
        self._connect().sendall(prefix + json.dumps(obj).encode() + b"\n")

    def _read_line(self, timeout_s: float) -> bytes:
        sock = self._connect()
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise GuestAgentError(f"guest agent at {self.socket_path}: no answer within {timeout_s} s")
            sock.settimeout(left)
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                continue
            if not chunk:
                self.close()
                raise GuestAgentError(f"guest agent at {self.socket_path}: connection closed")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    # -- commands ----------------------------------------------------------------------------
    def sync(self, timeout_s: float = 2.0) -> None:
        """Resynchronise: send a random id, skip everything up to the 0xFF and that id's answer."""
        ident = random.randrange(1, 2**31)
        self._buf = b""
        # A leading 0xFF also resets qemu-ga's own JSON parser, in case half a command is queued.
        self._send({"execute": "guest-sync-delimited", "arguments": {"id": ident}}, prefix=b"\xff")
        deadline = time.monotonic() + timeout_s
        while True:
            line = self._read_line(max(0.01, deadline - time.monotonic()))
            line = line.rsplit(b"\xff", 1)[-1].strip()
            if not line:
                continue
            try:
                answer = json.loads(line)
            except ValueError:
                continue
            if answer.get("return") == ident:
                return

    def wait_ready(self, timeout_s: float) -> float:
        """Block until the guest agent answers; returns the seconds waited."""
        start = time.monotonic()
        deadline = start + timeout_s
        while True:
            try:
                self.sync(timeout_s=min(2.0, max(0.1, deadline - time.monotonic())))
                return time.monotonic() - start
            except (GuestAgentError, OSError) as exc:
                self.close()
                if time.monotonic() >= deadline:
                    raise GuestAgentError(f"guest agent not ready within {timeout_s} s: {exc}") from None
                # The socket is there before the guest is: retry the sync, which has its own
                # timeout; this pause only avoids a tight loop when QEMU refuses the connect.
                time.sleep(0.2)

    def call(self, command: str, arguments: dict | None = None, *, timeout_s: float = 10.0):
        """Run one qga command and return its ``return`` value."""
        msg: dict = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self._send(msg)
        while True:
            answer = json.loads(self._read_line(timeout_s))
            if "error" in answer:
                err = answer["error"]
                raise GuestAgentError(f"{command}: {err.get('class')}: {err.get('desc')}")
            if "return" in answer:
                return answer["return"]

    def exec(self, argv: list[str], *, timeout_s: float = 30.0, poll_s: float = 0.1) -> ExecResult:
        """Run ``argv`` in the guest as root and wait for it (output captured)."""
        started = self.call("guest-exec", {"path": argv[0], "arg": argv[1:], "capture-output": True})
        pid = started["pid"]
        deadline = time.monotonic() + timeout_s
        while True:
            st = self.call("guest-exec-status", {"pid": pid})
            if st.get("exited"):
                def text(key: str) -> str:
                    return base64.b64decode(st.get(key, "")).decode("utf-8", "replace")

                return ExecResult(int(st.get("exitcode", -1)), text("out-data"), text("err-data"))
            if time.monotonic() > deadline:
                raise GuestAgentError(f"guest command {argv[0]} still running after {timeout_s} s")
            time.sleep(poll_s)   # qemu-ga has no completion event: poll its status

    def shutdown(self, mode: str = "powerdown") -> None:
        """Ask the guest to shut down cleanly (``shutdown -P now``); qga sends no answer."""
        self._send({"execute": "guest-shutdown", "arguments": {"mode": mode}})
