"""A loopback TCP relay between the kiosks and the hall broker that can become a blackhole.

``blackhole(True)`` is a network that silently drops packets: the relay keeps reading both
sides (so it sees a client give up) but forwards nothing and closes nothing, so no FIN and
no RST reaches anyone; a client's writes go into its socket buffer and succeed. Only the
client's own keepalive can tell that the broker is gone. A client that closes during the
blackhole is recorded (seconds since it began) and its broker side is left open until the
blackhole ends, as the FIN would have been lost too. New connections wait in the listen
backlog (the kernel completes the handshake, nothing is forwarded) until it ends.

``cut(True)`` is a link that is down and says so: every open connection is reset (RST on
both sides) and new ones are refused (the listening socket is closed) until ``cut(False)``
listens again on the same port. The city tier cuts one hall's bridge this way: a peer that
refuses is what Mosquitto's blocking bridge connect survives, where a blackhole's silent
accept stalls the whole hall broker (docs/city.md).

With ``refuse_when_upstream_down`` the relay also refuses while its upstream does: when a
connection to the upstream is refused (or the upstream closes a relayed connection and a
fresh one is refused), the relay stops listening until a probe connects again, so a client
sees a dead node as refused, as it would without the relay, instead of a connection that
is accepted and then closed.

Otherwise it is a plain relay: TLS passes through end to end. One selector thread carries
every connection. Loopback only: the project never targets anything else.
"""

from __future__ import annotations

import ipaddress
import selectors
import socket
import struct
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
                 listen_port: int = 0, refuse_when_upstream_down: bool = False) -> None:
        self.upstream = (_loopback(upstream_host), upstream_port)
        self._listen = (_loopback(listen_host), listen_port)
        self._sel = selectors.DefaultSelector()
        self._pairs: set[_Pair] = set()
        self._lock = threading.Lock()
        self._hole_since: float | None = None
        self._cut = False
        self._cut_error: ProxyError | None = None
        self._mirror = refuse_when_upstream_down
        self._upstream_down = False     # listener closed until a probe reaches the upstream
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
        self.resets = 0                 # connections reset by cuts

    @property
    def port(self) -> int:
        return self._listen[1]

    def _bind(self) -> socket.socket:
        srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            srv.bind(self._listen)
        except OSError as exc:
            srv.close()
            raise ProxyError(f"cannot listen on {self._listen}: {exc}") from exc
        srv.listen(256)
        srv.setblocking(False)
        # The port chosen for 0 is kept: a cut ends by listening on the same one again.
        self._listen = srv.getsockname()[:2]
        return srv

    def start(self) -> "BlackholeProxy":
        srv = self._bind()
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
            if on and self._cut:
                raise ProxyError("the link is cut: end the cut before a blackhole")
            if on and self._hole_since is None:
                self._hole_since = time.monotonic()
                self._detected = []
                self.open_at_blackhole = len(self._pairs)
            elif not on:
                self._hole_since = None
            self._switched.clear()
        self._wait_switched(timeout_s)

    def cut(self, on: bool, timeout_s: float = 5.0) -> None:
        """Down (``True``): every connection reset, new ones refused. Up (``False``): the
        relay listens on its port again. Returns once the relay's thread has switched."""
        with self._lock:
            if on and self._hole_since is not None:
                raise ProxyError("the link is a blackhole: end it before a cut")
            self._cut = on
            self._cut_error = None
            self._switched.clear()
        self._wait_switched(timeout_s)
        if self._cut_error is not None:
            raise self._cut_error

    @property
    def is_cut(self) -> bool:
        return self._cut

    def _wait_switched(self, timeout_s: float) -> None:
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
        was_holed = was_cut = False
        while not self._stopping:
            with self._lock:
                holed, cut = self._holed, self._cut
                if holed != was_holed:
                    self._switch(holed)
                    was_holed = holed
                if cut != was_cut:
                    self._switch_cut(cut)
                    was_cut = self._cut      # still cut when the port could not be had
                self._switched.set()
                if self._upstream_down and not self._cut and self._probe():
                    self._listen_again()
            for key, mask in self._sel.select(0.2 if self._upstream_down else 1.0):
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

    def _probe(self) -> bool:
        try:
            socket.create_connection(self.upstream, timeout=1).close()
            return True
        except OSError:
            return False

    def _stop_listening(self) -> None:
        if self._server is not None:
            self._sel.unregister(self._server)
            self._server.close()
            self._server = None

    def _listen_again(self) -> None:
        try:
            self._server = self._bind()
        except ProxyError:
            return                      # tried again at the next round
        self._upstream_down = False
        self._sel.register(self._server, selectors.EVENT_READ, "accept")

    def _upstream_gone(self) -> None:
        """The upstream refused: refuse too, until a probe connects (mirror mode)."""
        if self._mirror and not self._upstream_down:
            self._upstream_down = True
            self._stop_listening()

    @staticmethod
    def _reset(s: socket.socket) -> None:
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass

    def _switch_cut(self, cut: bool) -> None:
        if cut:
            # Closing the listener makes the kernel answer new SYNs with RST (refused);
            # SO_LINGER 0 makes each close an RST rather than a FIN.
            self._stop_listening()
            for p in list(self._pairs):
                for s in (p.client, p.upstream):
                    self._reset(s)
                self._close(p)
                self.resets += 1
        else:
            self._upstream_down = False
            try:
                self._server = self._bind()
            except ProxyError as exc:
                # Someone took the port meanwhile: the link stays down and cut() says why.
                self._cut = True
                self._cut_error = exc
                return
            self._sel.register(self._server, selectors.EVENT_READ, "accept")

    def _accept(self) -> None:
        if self._holed or self._server is None:
            return                 # switched in this round: the connection waits in the backlog
        try:
            c, _ = self._server.accept()
        except BlockingIOError:
            return
        try:
            u = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            # The broker is down: refused, as it would be without us (an RST, and in mirror
            # mode no more accepting until it is back).
            self._reset(c)
            c.close()
            self._upstream_gone()
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
            if side == "upstream" and self._mirror and not self._probe():
                # The upstream went away: stop listening before the client learns of it, so
                # its reconnection is refused rather than accepted and dropped.
                self._upstream_gone()
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
