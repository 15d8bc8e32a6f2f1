"""stdio <-> TCP relay that QEMU's user-mode network runs for each guest connection.

Wiring: ``-netdev user,restrict=on,guestfwd=tcp:10.0.2.100:8883-cmd:python3 relay.py
127.0.0.1 PORT``. For every TCP connection the guest opens to 10.0.2.100:8883, libslirp
starts this script with the connection on its stdin and stdout; the script connects to the
host's test broker on loopback and copies bytes both ways until both sides have closed.

Why not ``guestfwd=...-tcp:127.0.0.1:PORT``: QEMU opens that chardev once, at start-up, and
a second guest connection (the agent reconnecting after a restart) would find it used up.
``cmd:`` gives each connection its own relay. The target must be a loopback address: the
harness never lets the guest reach anything else.

Standard library only, runnable as a plain script (QEMU starts it outside any venv).
"""

from __future__ import annotations

import ipaddress
import os
import selectors
import socket
import sys

CHUNK = 65536


def relay(fd_in: int, fd_out: int, sock: socket.socket) -> None:
    """Copy fd_in -> sock and sock -> fd_out until both directions reach end of file."""
    sel = selectors.DefaultSelector()
    sel.register(fd_in, selectors.EVENT_READ, "guest")
    sel.register(sock, selectors.EVENT_READ, "host")
    open_dirs = 2
    while open_dirs:
        for key, _ in sel.select():
            if key.data == "guest":
                data = os.read(fd_in, CHUNK)
                if data:
                    sock.sendall(data)
                    continue
                sel.unregister(fd_in)
                sock.shutdown(socket.SHUT_WR)      # pass the guest's half-close on
            else:
                try:
                    data = sock.recv(CHUNK)
                except ConnectionResetError:
                    data = b""
                if data:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd_out, view):]
                    continue
                sel.unregister(sock)
                try:
                    # stdout may be the same socket as stdin (libslirp passes one socket).
                    socket.socket(fileno=os.dup(fd_out)).shutdown(socket.SHUT_WR)
                except OSError:
                    os.close(fd_out)
            open_dirs -= 1
    sel.close()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: relay.py HOST PORT   (HOST must be a loopback address)", file=sys.stderr)
        return 2
    host, port = args[0], int(args[1])
    if not ipaddress.ip_address(host).is_loopback:
        print(f"relay.py: refusing non-loopback target {host}", file=sys.stderr)
        return 2
    try:
        sock = socket.create_connection((host, port), timeout=5)
    except OSError as exc:
        print(f"relay.py: cannot reach {host}:{port}: {exc}", file=sys.stderr)
        return 1
    sock.settimeout(None)
    try:
        relay(0, 1, sock)
    except OSError:
        return 1
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
