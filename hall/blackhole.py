"""A loopback TCP relay between the kiosks and the hall broker that can become a blackhole.

``blackhole(True)`` is a network that silently drops packets: the relay keeps reading both
sides (so it sees a client give up) but forwards nothing and closes nothing, so no FIN and
no RST reaches anyone; a client's writes go into its socket buffer and succeed. Only the
client's own keepalive can tell that the broker is gone. A client that closes during the
blackhole is recorded (seconds since it began) and its broker side is left open until the
blackhole ends, as the FIN would have been lost too. New connections wait in the listen
backlog (the kernel completes the handshake, nothing is forwarded) until it ends.

Outside blackholes it is a plain relay: TLS passes through end to end. One selector
thread carries every connection. Loopback only: the project never targets anything else.
"""

from __future__ import annotations

import ipaddress
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field

from hallkiosk.errors import HallkioskError


class ProxyError(HallkioskError, RuntimeError):
    """The relay could not start."""


def _loopback(host: str) -> str:
    try:
        ok = ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = host == "localhost"
    if not ok:
        raise ValueError(f"{host}: the blackhole relay only listens on and connects to loopback")
    return host


@dataclass(eq=False)
class _Pair:
    client: socket.socket
    upstream: socket.socket
    to_up: bytearray = field(default_factory=bytearray)
    to_client: bytearray = field(default_factory=bytearray)
    half_gone: bool = False      # one side closed during a blackhole
    client_gone: bool = False    # the client side closed (recorded once)


class BlackholeProxy:
    def __init__(self, upstream_host: str, upstream_port: int, *, listen_host: str = "127.0.0.1",
                 listen_port: int = 0) -> None:
        self.upstream = (_loopback(upstream_host), upstream_port)
        self._listen = (_loopback(listen_host), listen_port)
        self._sel = selectors.DefaultSelector()
        self._pairs: set[_Pair] = set()
        self._lock = threading.Lock()
        self._hole_since: float | None = None
        self._detected: list[float] = []
        self._wake_r, self._wake_w = socket.socketpair()
        self._server: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._stopped = False
        self._switched = threading.Event()
        self.connections = 0
        self.open_at_blackhole = 0      # connections open when the last blackhole began
        self.bytes_up = 0
        self.bytes_down = 0

    @property
    def port(self) -> int:
        return self._server.getsockname()[1] if self._server else self._listen[1]

    def start(self) -> "BlackholeProxy":
        srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            srv.bind(self._listen)
        except OSError as exc:
            srv.close()
            raise ProxyError(f"cannot listen on {self._listen}: {exc}") from exc
        srv.listen(256)
        srv.setblocking(False)
        self._server = srv
        self._sel.register(srv, selectors.EVENT_READ, "accept")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread = threading.Thread(target=self._loop, name="blackhole-proxy", daemon=True)
        self._thread.start()
        return self

    def blackhole(self, on: bool, timeout_s: float = 5.0) -> None:
        """Returns once the relay's thread has switched: no connection is accepted after
        ``blackhole(True)`` returns."""
        with self._lock:
            if on and self._hole_since is None:
                self._hole_since = time.monotonic()
                self._detected = []
                self.open_at_blackhole = len(self._pairs)
            elif not on:
                self._hole_since = None
            self._switched.clear()
        self._wake_w.send(b"x")
        if self._thread is not None and self._thread.is_alive():
            if not self._switched.wait(timeout_s):
                raise ProxyError(f"the relay did not switch within {timeout_s} s")

    def closed_by_client_during_blackhole(self) -> list[float]:
        """Seconds from the start of the last blackhole to each client closing during it."""
        with self._lock:
            return list(self._detected)

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._stopping = True
        self._wake_w.send(b"x")
        if self._thread is not None:
            self._thread.join(5)
        for p in list(self._pairs):
            self._close(p)
        if self._server is not None:
            self._server.close()
        self._wake_r.close()
        self._wake_w.close()
        self._sel.close()

    def __enter__(self) -> "BlackholeProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- the loop ------------------------------------------------------------------------------
    @property
    def _holed(self) -> bool:
        return self._hole_since is not None

    def _loop(self) -> None:
        was_holed = False
        while not self._stopping:
            with self._lock:
                holed = self._holed
                if holed != was_holed:
                    self._switch(holed)
                    was_holed = holed
                self._switched.set()
            for key, mask in self._sel.select(1.0):
                what = key.data
                if what == "wake":
                    self._wake_r.recv(4096)
                elif what == "accept":
                    self._accept()
                else:
                    pair, side = what
                    if pair in self._pairs:
                        self._service(pair, side, mask)

    def _switch(self, holed: bool) -> None:
        if holed:
            # Packets in flight are lost with the rest; new connections wait in the backlog.
            self._sel.unregister(self._server)
            for p in self._pairs:
                p.to_up.clear()
                p.to_client.clear()
                for sock, side in ((p.client, "client"), (p.upstream, "upstream")):
                    if sock.fileno() >= 0:
                        self._sel.modify(sock, selectors.EVENT_READ, (p, side))
        else:
            self._sel.register(self._server, selectors.EVENT_READ, "accept")
            for p in [p for p in self._pairs if p.half_gone]:
                self._close(p)      # the close the blackhole ate arrives now

    def _accept(self) -> None:
        if self._holed:
            return                 # switched in this round: the connection waits in the backlog
        try:
            c, _ = self._server.accept()
        except BlockingIOError:
            return
        try:
            u = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            c.close()          # the broker is down: refused, as it would be without us
            return
        for s in (c, u):
            s.setblocking(False)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        p = _Pair(c, u)
        self._pairs.add(p)
        self.connections += 1
        self._sel.register(c, selectors.EVENT_READ, (p, "client"))
        self._sel.register(u, selectors.EVENT_READ, (p, "upstream"))

    def _service(self, p: _Pair, side: str, mask: int) -> None:
        sock = p.client if side == "client" else p.upstream
        if mask & selectors.EVENT_READ:
            try:
                data = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self._eof(p, side)
                return
            if self._holed:
                return             # dropped on the floor, as a blackhole does
            if side == "client":
                p.to_up += data
                self.bytes_up += len(data)
            else:
                p.to_client += data
                self.bytes_down += len(data)
        if not self._holed:
            self._flush(p)

    def _flush(self, p: _Pair) -> None:
        for sock, buf in ((p.upstream, p.to_up), (p.client, p.to_client)):
            if buf:
                try:
                    n = sock.send(buf)
                    del buf[:n]
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError:
                    self._close(p)
                    return
            want = selectors.EVENT_READ | (selectors.EVENT_WRITE if buf else 0)
            try:
                self._sel.modify(sock, want, (p, "client" if sock is p.client else "upstream"))
            except (KeyError, ValueError):
                pass

    def _eof(self, p: _Pair, side: str) -> None:
        with self._lock:
            since = self._hole_since
            # The broker's side may have gone first (its own keepalive, 1.5x): the client's
            # close is still what shows the client noticed.
            if since is not None and side == "client" and not p.client_gone:
                p.client_gone = True
                self._detected.append(time.monotonic() - since)
        if since is None:
            self._close(p)
            return
        # Nothing crosses a blackhole, not even a close: the other side stays open.
        sock = p.client if side == "client" else p.upstream
        p.half_gone = True
        try:
            self._sel.unregister(sock)
        except (KeyError, ValueError):
            pass
        sock.close()

    def _close(self, p: _Pair) -> None:
        self._pairs.discard(p)
        for s in (p.client, p.upstream):
            try:
                self._sel.unregister(s)
            except (KeyError, ValueError):
                pass
            try:
                s.close()
            except OSError:
                pass
