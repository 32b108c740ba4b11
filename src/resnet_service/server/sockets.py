"""Listening sockets of the worker processes: one SO_REUSEPORT socket per worker, and a way to
close one without resetting the connections waiting in its accept queue.

Why per-worker sockets: with one shared socket, asyncio accepts up to ``backlog`` connections
per wake-up, so whichever worker wakes first takes every keep-alive connection (measured: one
worker 96% idle). With SO_REUSEPORT the kernel spreads connections over the workers' sockets,
and a worker binds its socket only once its model is warm, so it never gets a connection it
cannot serve.

Why the filter: closing a listening socket resets every connection in its accept queue (their
handshake is complete: the clients have sent requests). Linux cannot hand them to another
socket here (``tcp_migrate_req`` is not a namespaced sysctl a pod may set), so on shutdown we
first attach a socket filter that drops new SYNs (those clients retry and find the socket gone:
a refused connection, never a lost request), accept what is queued, and only then close.
No library does this; it is a few lines of ``setsockopt``.
"""

from __future__ import annotations

import ctypes
import socket
import struct
from typing import Final

SO_ATTACH_FILTER: Final = 26
#: ``struct tcp_info``: 8 one-byte fields, then u32 rto, ato, snd_mss, rcv_mss, unacked...;
#: for a listening socket ``tcpi_unacked`` is the accept-queue length.
_TCPI_UNACKED_OFFSET: Final = 24
_TCP_INFO_SIZE: Final = 104
#: Classic BPF ``ret #0``: drop every packet.
_DROP_ALL: Final = struct.pack("HBBI", 0x06, 0, 0, 0)


class PortInUse(OSError):
    """Something already listens on the address: refuse to start (a second server would
    otherwise silently share the port with the first through SO_REUSEPORT)."""


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def check_port_free(host: str, port: int) -> None:
    """Raise ``PortInUse`` when the port is taken (by anyone, reuse-port sockets included)."""
    if port == 0:
        return
    probe = socket.socket(_family(host), socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
    except OSError as exc:
        raise PortInUse(exc.errno, f"cannot bind {host}:{port}: {exc.strerror}") from None
    finally:
        probe.close()


def reserve_port(host: str, port: int) -> socket.socket:
    """A bound, *not listening* reuse-port socket: holds the port (and resolves port 0) for
    the workers' sockets; it never receives a connection."""
    sock = socket.socket(_family(host), socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def reuseport_listener(host: str, port: int, backlog: int) -> socket.socket:
    """A worker's own listening socket in the port's reuse-port group.

    Declared IPPROTO_TCP so that asyncio turns TCP_NODELAY on for its connections (a socket
    made with proto 0 keeps Nagle's algorithm: measured 56 ms instead of 10 ms per request at
    concurrency 1, each response waiting for a delayed ACK)."""
    sock = socket.socket(_family(host), socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


def stop_new_connections(sock: socket.socket) -> None:
    """Drop every new SYN to this listening socket; the queued connections stay acceptable."""
    program = ctypes.create_string_buffer(_DROP_ALL)
    fprog = struct.pack("HL", 1, ctypes.addressof(program))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def accept_queue_length(sock: socket.socket) -> int:
    """Connections whose handshake completed and that nobody accepted yet."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
    (queued,) = struct.unpack_from("I", info, _TCPI_UNACKED_OFFSET)
    return int(queued)
