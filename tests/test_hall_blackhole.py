"""The blackhole relay (hall/blackhole.py) at the socket level, against a real Mosquitto.

tests/test_hall_parts.py already covers a publish through the relay, keepalive detection
and the heal with a reconnection, and the loopback-only refusal. These tests cover what a
blackhole must keep true on each side of the wire: the client learns of it only from its
own keepalive (paho's reason is "Keep alive timeout", not a lost connection, so no FIN or
RST reached it), the broker too ("exceeded timeout"), a close during the blackhole is not
forwarded, a new connection is held by the kernel and forwarded only after it, and outside
blackholes a close on either side closes the other.
"""

from __future__ import annotations

import socket
import struct
import threading

import paho.mqtt.client as paho
import pytest

from hall.blackhole import BlackholeProxy, ProxyError
from tests.conftest import wait_for

KEEPALIVE_S = 2
CONNACK_OK = b"\x20\x02\x00\x00"


def _connect_packet(client_id: str, keepalive_s: int = 0) -> bytes:
    """An MQTT 3.1.1 CONNECT, clean session (spec 3.1): protocol name "MQTT", level 4, flags
    0x02, keepalive in seconds (0: the broker never times the connection out)."""
    cid = client_id.encode()
    body = (b"\x00\x04MQTT\x04\x02" + struct.pack("!H", keepalive_s)
            + struct.pack("!H", len(cid)) + cid)
    return bytes([0x10, len(body)]) + body   # remaining length < 128: one byte


def _raw_mqtt(port: int, client_id: str) -> socket.socket:
    """A bare socket through the relay that has had its CONNACK: it sends nothing more, so
    whatever it receives next is the relay's doing."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(_connect_packet(client_id))
    assert _recv_exactly(s, 4) == CONNACK_OK
    return s


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf


def _logged(broker, text: str) -> bool:
    return any(text in line for line in broker.log_messages())


class _Paho:
    """A paho client whose callbacks only record (they run on paho's thread)."""

    def __init__(self, port: int, client_id: str, keepalive_s: int = 60) -> None:
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.reasons: list[str] = []
        self.msgs: list[bytes] = []
        self.c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id)
        self.c.on_connect = lambda *a: self.connected.set()
        self.c.on_subscribe = lambda *a: self.subscribed.set()
        self.c.on_disconnect = lambda _c, _u, _f, rc, _p: self.reasons.append(str(rc))
        self.c.on_message = lambda _c, _u, m: self.msgs.append(m.payload)
        self.c.connect("127.0.0.1", port, keepalive=keepalive_s)
        self.c.loop_start()
        assert self.connected.wait(10), f"{client_id} did not connect on port {port}"

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def test_a_subscriber_through_the_relay_receives_and_both_directions_are_counted(broker):
    with BlackholeProxy(broker.host, broker.port) as proxy:
        sub = _Paho(proxy.port, "sub")
        sub.c.subscribe("t/#", 1)
        assert sub.subscribed.wait(5)
        pub = _Paho(broker.port, "pub")
        pub.c.publish("t/1", b"to the relayed subscriber", qos=1).wait_for_publish(5)
        wait_for(lambda: sub.msgs, 10, "the message down through the relay")
        assert sub.msgs == [b"to the relayed subscriber"]
        assert proxy.connections == 1
        assert proxy.bytes_up > 0 and proxy.bytes_down > len(b"to the relayed subscriber")
        for c in (sub, pub):
            c.close()


@pytest.mark.e2e
def test_a_blackhole_reaches_neither_side_as_a_close(broker):
    with BlackholeProxy(broker.host, broker.port) as proxy:
        k = _Paho(proxy.port, "k2", keepalive_s=KEEPALIVE_S)
        proxy.blackhole(True)
        wait_for(lambda: k.reasons, 3 * KEEPALIVE_S, "paho's keepalive giving up")
        # A FIN or RST would read "Unspecified error" (paho's connection lost).
        assert k.reasons[0] == "Keep alive timeout"
        wait_for(proxy.closed_by_client_during_blackhole, 2, "the client's close recorded")
        (detected_s,) = proxy.closed_by_client_during_blackhole()
        assert KEEPALIVE_S / 2 <= detected_s <= 2 * KEEPALIVE_S + 1
        assert proxy.open_at_blackhole == 1
        # The broker also had to time the client out itself (1.5 x keepalive): no FIN reached it.
        wait_for(lambda: _logged(broker, "Client k2 has exceeded timeout"), 2 * KEEPALIVE_S,
                 "the broker's own keepalive timeout")
        assert not _logged(broker, "Client k2 closed its connection")
        k.c.loop_stop()
        proxy.blackhole(False)


def test_a_close_during_a_blackhole_is_not_forwarded(broker):
    with BlackholeProxy(broker.host, broker.port) as proxy:
        s = _raw_mqtt(proxy.port, "held")       # keepalive 0: the broker never times it out
        proxy.blackhole(True)
        s.close()
        wait_for(proxy.closed_by_client_during_blackhole, 5, "the client's close recorded")
        # The broker still holds the connection: a second "held" takes it over.
        direct = _Paho(broker.port, "held")
        wait_for(lambda: _logged(broker, "Client held already connected, closing old"), 5,
                 "the broker closing the old, still open connection")
        assert not _logged(broker, "Client held closed its connection")
        direct.close()
        proxy.blackhole(False)


def test_a_connection_made_during_a_blackhole_is_held_until_it_ends(broker):
    with BlackholeProxy(broker.host, broker.port) as proxy:
        proxy.blackhole(True)
        # blackhole() returns once the relay's thread has stopped accepting (it used to
        # return before, and a connection made in that window was accepted: 1 run in ~10).
        # The kernel completes the handshake (listen backlog); nothing reaches the broker.
        s = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        s.sendall(_connect_packet("late"))
        s.settimeout(0.5)
        with pytest.raises(TimeoutError):
            s.recv(4)
        assert proxy.connections == 0
        proxy.blackhole(False)
        s.settimeout(5)
        assert _recv_exactly(s, 4) == CONNACK_OK
        assert proxy.connections == 1
        s.close()


def test_outside_blackholes_a_close_on_either_side_closes_the_other(broker):
    with BlackholeProxy(broker.host, broker.port) as proxy:
        # The client goes (no DISCONNECT packet): the relay closes the broker's side.
        _raw_mqtt(proxy.port, "leaver").close()
        wait_for(lambda: _logged(broker, "Client leaver closed its connection"), 5,
                 "the relay's close of the upstream side")
        # The broker goes (a session takeover closes the old connection): the relay closes
        # the client's side.
        s = _raw_mqtt(proxy.port, "dup")
        direct = _Paho(broker.port, "dup")
        s.settimeout(5)
        assert s.recv(1) == b""
        s.close()
        direct.close()
        assert proxy.closed_by_client_during_blackhole() == []


def test_a_port_already_taken_is_a_proxy_error_that_names_it(broker):
    with pytest.raises(ProxyError, match=str(broker.port)):
        BlackholeProxy(broker.host, broker.port, listen_port=broker.port).start()


@pytest.mark.parametrize("where", [{"upstream_host": "10.0.0.1"},
                                   {"upstream_host": "broker.hall.example"},
                                   {"listen_host": "::"}])
def test_non_loopback_addresses_are_refused(where):
    kw = {"upstream_host": "127.0.0.1", **where}
    with pytest.raises(ValueError, match="loopback"):
        BlackholeProxy(kw.pop("upstream_host"), 1883, **kw)


def test_stop_is_safe_twice(broker):
    proxy = BlackholeProxy(broker.host, broker.port).start()
    proxy.stop()
    proxy.stop()


def test_a_cut_resets_both_sides_and_refuses_until_it_ends(broker):
    """cut(True) is a link that is down and says so (the city tier's bridge cut): the open
    connection is reset, not left hanging, the broker sees it go at once, new connections
    are refused; cut(False) listens again on the same port."""
    with BlackholeProxy(broker.host, broker.port) as proxy:
        port = proxy.port
        s = _raw_mqtt(port, "cutme")
        proxy.cut(True)
        assert proxy.is_cut and proxy.resets == 1
        s.settimeout(5)
        with pytest.raises(ConnectionResetError):
            s.recv(1)          # an RST, not a FIN (which would read b"")
        s.close()
        wait_for(lambda: _logged(broker, "Client cutme") and not _logged(broker, "Client cutme has exceeded timeout"),
                 5, "the broker told of the cut at once")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5)
        assert proxy.connections == 1
        with pytest.raises(ProxyError, match="cut"):
            proxy.blackhole(True)
        proxy.cut(False)
        assert proxy.port == port and not proxy.is_cut
        s = _raw_mqtt(port, "again")
        assert proxy.connections == 2
        s.close()


def test_a_cut_that_cannot_listen_again_says_so(broker):
    with BlackholeProxy(broker.host, broker.port) as proxy:
        port = proxy.port
        proxy.cut(True)
        squatter = socket.socket()
        squatter.bind(("127.0.0.1", port))
        squatter.listen(1)
        try:
            with pytest.raises(ProxyError, match=str(port)):
                proxy.cut(False)
            assert proxy.is_cut
        finally:
            squatter.close()
        proxy.cut(False)
        _raw_mqtt(port, "back").close()


def test_in_mirror_mode_a_dead_upstream_is_refused_not_accepted_and_dropped(broker):
    """The city's uplink relays refuse while their node is down, as the node itself would:
    Mosquitto 2.0.11's bridge stalled for good on connections that were accepted and then
    closed during its TLS handshake (docs/city.md)."""
    with BlackholeProxy(broker.host, broker.port, refuse_when_upstream_down=True) as proxy:
        s = _raw_mqtt(proxy.port, "m1")
        broker.kill()
        s.settimeout(5)
        assert s.recv(1) == b""       # the upstream's close reached the client...
        s.close()
        # ...after the relay stopped listening: the reconnection is refused at once.
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        broker.start()
        # A probe finds the broker back and the relay listens again on the same port.
        wait_for(lambda: _connects(proxy.port), 10, "the relay listening again")
        _raw_mqtt(proxy.port, "m2").close()


def test_without_mirror_mode_a_dead_upstream_is_accepted_then_reset(broker):
    with BlackholeProxy(broker.host, broker.port) as proxy:
        broker.kill()
        s = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        s.settimeout(5)
        with pytest.raises(ConnectionResetError):
            s.recv(1)
        s.close()


def _connects(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False
