"""edge.sdnotify against real AF_UNIX SOCK_DGRAM sockets: a path socket and an abstract one,
playing systemd's side of NOTIFY_SOCKET."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import struct
import tempfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.clock import ManualClock
from edge.sdnotify import MAX_STATUS_CHARS, Notifier


class FakeSystemd:
    """The receiving end: a bound datagram socket that also asks for the sender's
    credentials, since systemd attributes each message to a PID."""

    def __init__(self, address) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(address)
        self.sock.settimeout(5.0)

    def recv(self) -> tuple[bytes, int | None]:
        data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        pid = None
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid, _uid, _gid = struct.unpack("iII", payload[:12])
        return data, pid

    def next(self) -> bytes:
        return self.recv()[0]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def short_dir():
    # AF_UNIX paths are limited to 108 bytes; pytest's tmp_path can be longer.
    d = tempfile.mkdtemp(prefix="sdn-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def path_systemd(short_dir):
    s = FakeSystemd(os.path.join(short_dir, "notify"))
    yield s
    s.close()


@pytest.fixture
def abstract_systemd():
    name = f"hallkiosk-test-{secrets.token_hex(6)}"
    s = FakeSystemd(b"\0" + name.encode())
    s.env_value = "@" + name
    yield s
    s.close()


def test_ready_with_status_on_a_path_socket(path_systemd):
    n = Notifier.from_env({"NOTIFY_SOCKET": path_systemd.address})
    assert n.enabled
    assert n.ready("serving 3 services") is True
    data, pid = path_systemd.recv()
    assert data == b"READY=1\nSTATUS=serving 3 services"
    assert pid == os.getpid()          # systemd would attribute it to the main PID
    n.close()


def test_abstract_namespace_socket(abstract_systemd):
    n = Notifier.from_env({"NOTIFY_SOCKET": abstract_systemd.env_value, "WATCHDOG_USEC": "20000000"})
    assert n.enabled and n.watchdog_interval_s == 10.0
    assert n.watchdog() is True
    assert abstract_systemd.next() == b"WATCHDOG=1"
    assert n.stopping("SIGTERM: finishing the ticket in progress") is True
    assert abstract_systemd.next() == b"STOPPING=1\nSTATUS=SIGTERM: finishing the ticket in progress"
    n.close()


def test_not_under_systemd_is_a_silent_no_op():
    n = Notifier.from_env({})
    assert not n.enabled
    assert n.watchdog_interval_s is None and n.next_watchdog_deadline() is None
    assert not n.watchdog_due()
    for call in (n.ready, lambda: n.status("x"), n.watchdog, n.stopping, n.reloading,
                 n.watchdog_trigger, lambda: n.extend_timeout(5)):
        assert call() is False
    n.close()
    n.close()


@pytest.mark.parametrize("value", ["", "relative/path", "vsock:2:1234", "@"])
def test_unusable_notify_socket_values_disable_notification(value):
    n = Notifier.from_env({"NOTIFY_SOCKET": value, "WATCHDOG_USEC": "1000000"})
    assert not n.enabled and n.watchdog_interval_s is None
    assert n.ready() is False


@pytest.mark.parametrize("env, expected", [
    ({"WATCHDOG_USEC": "30000000"}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, 15.0),       # ours (pid=4242)
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4243"}, None),       # another process's
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}, None),
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "-5"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
    ({}, None),
])
def test_watchdog_usec_and_pid_semantics(path_systemd, env, expected):
    n = Notifier.from_env({"NOTIFY_SOCKET": path_systemd.address, **env}, pid=4242)
    assert n.watchdog_interval_s == expected


def test_watchdog_for_another_process_is_not_sent(path_systemd):
    n = Notifier.from_env({"NOTIFY_SOCKET": path_systemd.address, "WATCHDOG_USEC": "2000000",
                           "WATCHDOG_PID": str(os.getpid() + 1)})
    assert n.watchdog() is False
    n.notify({"MARK": "1"})
    # Datagrams on one socket keep their order: had the ping gone out, it would come first.
    assert path_systemd.next() == b"MARK=1"


def test_unset_removes_the_variables_for_children(path_systemd):
    env = {"NOTIFY_SOCKET": path_systemd.address, "WATCHDOG_USEC": "4000000",
           "WATCHDOG_PID": str(os.getpid()), "OTHER": "kept"}
    n = Notifier.from_env(env, unset=True)
    assert env == {"OTHER": "kept"}
    assert n.watchdog_interval_s == 2.0 and n.watchdog()
    assert path_systemd.next() == b"WATCHDOG=1"


def test_status_is_one_line_and_only_sent_when_it_changes(path_systemd):
    n = Notifier.from_env({"NOTIFY_SOCKET": path_systemd.address})
    assert n.status("degraded:\nprinter paper_out") is True
    assert n.status("degraded: printer paper_out") is False       # same text once normalised
    assert n.status("degraded: printer paper_out", force=True) is True
    assert n.status("online") is True
    assert [path_systemd.next() for _ in range(3)] == [
        b"STATUS=degraded: printer paper_out", b"STATUS=degraded: printer paper_out",
        b"STATUS=online"]


def test_reloading_and_extend_timeout(path_systemd):
    clock = ManualClock(start_mono=12.5)
    n = Notifier.from_env({"NOTIFY_SOCKET": path_systemd.address}, clock=clock)
    assert n.reloading() and n.extend_timeout(7.5) and n.ready()
    assert path_systemd.next() == b"RELOADING=1\nMONOTONIC_USEC=12500000"
    assert path_systemd.next() == b"EXTEND_TIMEOUT_USEC=7500000"
    assert path_systemd.next() == b"READY=1"
    with pytest.raises(ValueError):
        n.extend_timeout(0)


@pytest.mark.parametrize("fields", [{"A=B": "1"}, {"A\nB": "1"}, {"": "1"}, {"STATUS": "two\nlines"}])
def test_malformed_assignments_are_caller_mistakes(path_systemd, fields):
    n = Notifier.from_env({"NOTIFY_SOCKET": path_systemd.address})
    with pytest.raises(ValueError):
        n.notify(fields)


def test_watchdog_pacing_uses_the_monotonic_clock(path_systemd):
    clock = ManualClock(start_mono=100.0)
    n = Notifier.from_env({"NOTIFY_SOCKET": path_systemd.address, "WATCHDOG_USEC": "10000000"},
                          clock=clock)
    assert n.next_watchdog_deadline() == 100.0 and n.watchdog_due()     # never pinged: due now
    assert n.watchdog()
    assert n.next_watchdog_deadline() == 105.0 and not n.watchdog_due()
    clock.set_wall(0)                                                  # an NTP step changes nothing
    clock.advance(4.9)
    assert not n.watchdog_due()
    clock.advance(0.1)
    assert n.watchdog_due()


def test_socket_gone_returns_false_and_recovers_when_it_is_back(short_dir, caplog):
    address = os.path.join(short_dir, "notify")
    first = FakeSystemd(address)
    n = Notifier.from_env({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "2000000"})
    assert n.watchdog() and first.next() == b"WATCHDOG=1"
    first.close()
    os.unlink(address)
    assert n.watchdog() is False                      # systemd restarted: no socket for a moment
    assert n.watchdog() is False
    assert sum("cannot notify systemd" in r.getMessage() for r in caplog.records) == 1
    second = FakeSystemd(address)
    try:
        assert n.watchdog() is True
        assert second.next() == b"WATCHDOG=1"
    finally:
        second.close()
        n.close()


def test_pings_from_another_thread_carry_the_process_pid(path_systemd):
    import threading

    n = Notifier.from_env({"NOTIFY_SOCKET": path_systemd.address, "WATCHDOG_USEC": "2000000"})
    t = threading.Thread(target=n.watchdog)
    t.start()
    t.join(5)
    data, pid = path_systemd.recv()
    assert data == b"WATCHDOG=1" and pid == os.getpid()


@pytest.fixture(scope="module")
def shared_systemd():
    # Module scope: hypothesis runs every example in one test call.
    s = FakeSystemd(b"\0" + f"hallkiosk-test-{secrets.token_hex(6)}".encode())
    yield s
    s.close()


@settings(max_examples=200, deadline=None)
@given(text=st.text(st.characters(categories=["Cs", "Cc", "Zl", "Zs", "L", "N", "P"])))
def test_any_status_text_is_exactly_one_bounded_assignment(shared_systemd, text):
    n = Notifier(shared_systemd.address)
    n.status(text, force=True)
    data = shared_systemd.next()
    assert data.startswith(b"STATUS=") and b"\n" not in data and b"\0" not in data
    assert len(data.decode()[len("STATUS="):]) <= MAX_STATUS_CHARS
    n.close()
