"""uvicorn, hardened for a serving fleet: time limits on slow clients and a shutdown that
answers every request that reached the process.

What stock uvicorn (0.54) does not do, and this module adds:
- a connection that never completes its request head is not held forever: the head must
  arrive within ``header_timeout_s`` (else ``408`` and close; a silent one is just closed);
- past ``max_connections`` a new connection is served once, with ``Connection: close``;
- an inference request that admission refuses is answered by the protocol itself from its
  head (``ConnectionPolicy.gate``): no ASGI task, no routing, and its body is never handed
  to the app; when the body is small (``discard_body_bytes``) the parser skips it and the
  connection stays open, so a keep-alive pool does not reconnect for every 503 (httptools
  only: on h11 the ASGI middleware applies the same gate);
- on SIGTERM the signal handler only sets flags (a handler that took a lock, e.g. a
  prometheus-client value lock, could deadlock against the code it interrupted); the server
  keeps serving through the drain delay with ``Connection: close`` on every response, then
  stops taking new handshakes, accepts and serves what is queued in the kernel, gives idle
  keep-alive connections a moment for a request already on the wire, and closes them; in-flight
  requests finish within the grace period. Stock uvicorn closes its listening socket (resetting
  the queued connections) and idle connections at once (racing requests in flight on them).

These hook uvicorn's protocol and ``Server`` internals, which is why uvicorn is pinned to a
minor version in ``pyproject.toml``. Every internal used is listed in ``UVICORN_INTERNALS`` with
what it is for and the public hook that would replace it; ``tests/unit/test_uvicorn_seam.py``
checks each against the installed uvicorn, so an upgrade that moves one fails there by name
rather than in a drain or an overload. The tests that exercise each behaviour run against a
real process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any, ClassVar, Final, Literal, Protocol

import h11
import uvicorn
from uvicorn.protocols.http.flow_control import CLOSE_HEADER
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from resnet_service.asgi.problems import problem_body
from resnet_service.server.sockets import accept_queue_length, stop_new_connections

log = logging.getLogger("resnet_service.server")

#: uvicorn's own exit code for a failed start-up.
_STARTUP_FAILURE: Final = 3

#: After the listener closes, idle keep-alive connections stay open this long, so that a
#: request a client already sent on one is read and answered (with ``Connection: close``).
IDLE_LINGER_S: Final = 1.0
#: Longest wait for the kernel's accept queue to empty after new handshakes are refused.
_ACCEPT_DRAIN_S: Final = 2.0
_POLL_S: Final = 0.01


@dataclass(frozen=True)
class Internal:
    """One uvicorn internal this module relies on."""

    where: str  # a dotted name below ``uvicorn``; ``Class.attr`` for an attribute set in __init__
    why: str
    public_hook: str  # what would replace it, if uvicorn offered it


UVICORN_INTERNALS: Final = (
    Internal(
        "protocols.http.httptools_impl.HttpToolsProtocol._start_asgi_task",
        "admission from the request head, before any ASGI task exists",
        "none: an ASGI middleware runs only after the task starts; a 'request head' callback",
    ),
    Internal(
        "protocols.http.httptools_impl.RequestResponseCycle.body",
        "a refused request's body is dropped as it arrives",
        "an ASGI response sent before the body is read (it is read anyway)",
    ),
    Internal(
        "protocols.http.httptools_impl.RequestResponseCycle.response_complete",
        "a refusal answered without the app completes the cycle (and the next request follows)",
        "none",
    ),
    Internal(
        "protocols.http.httptools_impl.RequestResponseCycle.keep_alive",
        "keep the connection after a refusal, or close it",
        "the 'Connection: close' response header",
    ),
    Internal(
        "protocols.http.httptools_impl.RequestResponseCycle.on_response",
        "hand the connection to the next request after a refusal",
        "none",
    ),
    Internal(
        "protocols.http.httptools_impl.HttpToolsProtocol.expect_100_continue",
        "a client waiting for 100-continue gets its refusal and a closed connection",
        "none",
    ),
    Internal(
        "protocols.http.httptools_impl.STATUS_LINE",
        "the status line of a refusal written by the protocol",
        "none (http.HTTPStatus)",
    ),
    Internal(
        "protocols.http.h11_impl.H11Protocol.conn",
        "tell h11 the connection closes when a head never arrives",
        "uvicorn's own header timeout, if it had one (it has only timeout_keep_alive)",
    ),
    Internal(
        "protocols.http.flow_control.CLOSE_HEADER",
        "'Connection: close' on h11 responses while draining",
        "none",
    ),
    Internal(
        "server.Server._wait_tasks_to_complete",
        "wait for requests in flight within the grace",
        "Config.timeout_graceful_shutdown alone (it also closes idle connections at once)",
    ),
    Internal(
        "server.Server.server_state",
        "the connections to mark closing and the tasks to wait for",
        "none",
    ),
    Internal(
        "server.Server.on_tick",
        "keep serving through the drain delay after SIGTERM",
        "none: uvicorn exits its main loop on the first signal",
    ),
)


class RawAnswer(Protocol):
    """A whole answer given by the protocol layer (``asgi.admission.Refusal``)."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


class HeadAdmission(Protocol):
    """Admission from a request's head (its ASGI scope, body unread), as this layer sees
    ``asgi.admission.HeadAdmission``: None lets the request through."""

    delay_s: float

    def __call__(self, scope: Any) -> RawAnswer | None: ...


#: A refused request's body up to this size is read and skipped, keeping the connection.
DISCARD_BODY_BYTES: Final = 1024 * 1024


@dataclass
class ConnectionPolicy:
    """Limits shared by every connection of one server."""

    header_timeout_s: float
    max_connections: int
    #: Set when the server starts draining: every response from then on closes its connection.
    closing: bool = False
    #: Admission from the request head, before the ASGI app (the worker sets it).
    gate: HeadAdmission | None = None
    discard_body_bytes: int = DISCARD_BODY_BYTES


def _raw_problem(status: int, reason: str, code: str, title: str, detail: str) -> bytes:
    """A whole problem+json response, for answers given below the app (then the connection
    closes): the API keeps one error body even for what never reached it."""
    body = problem_body(status=status, code=code, title=title, detail=detail)
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/problem+json\r\n"
        f"connection: close\r\ncontent-length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


_REQUEST_TIMEOUT: Final = _raw_problem(
    408,
    "Request Timeout",
    "request_timeout",
    "Request timeout",
    "The request head did not arrive in time; send it promptly.",
)
_BAD_REQUEST: Final = _raw_problem(
    400,
    "Bad Request",
    "malformed_request",
    "Malformed request",
    "This is not a valid HTTP/1.1 request (request line, method or headers).",
)


class ServiceProtocol(asyncio.Protocol):
    """The hardening shared by both parsers: a request-head timeout and close-after-response
    marks. Mixed into uvicorn's ``H11Protocol`` and ``HttpToolsProtocol`` below, whose
    attributes (``cycle``, ``transport``, ``loop``, ``connections``) it uses."""

    policy: ClassVar[ConnectionPolicy]
    cycle: Any
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop
    connections: set[Any]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_started = False
        #: Answer the next request with ``Connection: close`` (over the cap, or shutting down).
        self.close_after_response = len(self.connections) > self.policy.max_connections
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        cycle = self.cycle
        super().data_received(data)
        if self.cycle is not cycle:  # a request head was parsed
            self._head_started = False
            self._cancel_head_timer()
            if self.close_after_response or self.policy.closing:
                self.mark_closing()
        elif self.awaiting_head() and not self.transport.is_closing():
            self._head_started = True
            if self._head_timer is None:
                self._arm_head_timer()  # the first bytes of a request: its head is on the clock

    def awaiting_head(self) -> bool:
        """Between requests: nothing in progress on this connection."""
        return self.cycle is None or bool(self.cycle.response_complete)

    def mark_closing(self) -> None:
        """The current (or next) response carries ``Connection: close`` and ends the connection."""
        self.close_after_response = True
        cycle = self.cycle
        if cycle is not None and not cycle.response_started:
            cycle.keep_alive = False
            self._announce_close(cycle)

    def _announce_close(self, cycle: Any) -> None:
        """Make sure the response says ``Connection: close`` (parser-specific)."""

    def send_400_response(self, msg: str) -> None:
        """The parser gave up on the request: answer in the API's error format and close."""
        self._cancel_head_timer()
        self.transport.write(_BAD_REQUEST)
        self.transport.close()

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.policy.header_timeout_s, self._head_timeout)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or not self.awaiting_head():
            return
        if self._head_started:  # part of a request arrived: say why it is refused
            self.transport.write(_REQUEST_TIMEOUT)
        self.transport.close()


class H11ServiceProtocol(ServiceProtocol, H11Protocol):
    """The hardened protocol on h11 (pure Python)."""

    def _announce_close(self, cycle: Any) -> None:
        # uvicorn's h11 cycle copies a request's ``connection: close`` onto its response (and
        # h11 then closes after it): the one hook it offers for telling the client.
        if CLOSE_HEADER not in cycle.scope["headers"]:
            cycle.scope["headers"].append(CLOSE_HEADER)

    def _head_timeout(self) -> None:
        with contextlib.suppress(h11.LocalProtocolError):
            if self.awaiting_head() and not self.transport.is_closing():
                self.conn.send(h11.ConnectionClosed())
        super()._head_timeout()


class HttpToolsServiceProtocol(ServiceProtocol, HttpToolsProtocol):
    """The hardened protocol on httptools (llhttp, in C); its cycle adds ``Connection: close``
    itself whenever keep-alive is off. Refusals from the gate are answered here."""

    expect_100_continue: bool

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        # uvicorn calls this once a request's head is parsed (and again for a pipelined one
        # when its turn comes): the last moment before any ASGI code runs.
        gate = self.policy.gate
        if gate is not None and (answer := gate(cycle.scope)) is not None:
            keep = self._can_discard(cycle)
            if gate.delay_s > 0:
                self.loop.call_later(gate.delay_s, self._answer, cycle, answer, keep)
            else:
                self._answer(cycle, answer, keep)
            return
        super()._start_asgi_task(cycle, app)

    def _can_discard(self, cycle: Any) -> bool:
        """Keep the connection when the body is small and of known length: the parser skips
        it (uvicorn drops body bytes of a completed response) and the next request follows."""
        if not cycle.keep_alive or self.close_after_response or self.policy.closing:
            return False
        if self.expect_100_continue:  # the client waits for a go-ahead it will not get
            return False
        length = None
        for name, value in cycle.scope["headers"]:
            if name == b"transfer-encoding":
                return False
            if name == b"content-length":
                length = int(value) if value.isdigit() else None
        return length is not None and length <= self.policy.discard_body_bytes

    def _answer(self, cycle: Any, answer: RawAnswer, keep: bool) -> None:
        if self.transport.is_closing():
            return
        keep = keep and cycle.keep_alive and not self.policy.closing
        head = [STATUS_LINE[answer.status]]
        head += [name + b": " + value + b"\r\n" for name, value in answer.headers]
        head.append(b"\r\n" if keep else b"connection: close\r\n\r\n")
        cycle.body = bytearray()  # what arrived meanwhile; the rest is skipped from now on
        cycle.response_started = cycle.response_complete = True
        cycle.keep_alive = keep
        self.transport.write(b"".join(head) + answer.body)
        if not keep:
            self.transport.close()
        cycle.on_response()


HttpParser = Literal["httptools", "h11"]


def protocol_class(
    policy: ConnectionPolicy, parser: HttpParser = "httptools"
) -> type[ServiceProtocol]:
    """A protocol class bound to one server's policy (uvicorn instantiates it per connection
    with a fixed signature, so the policy travels as a class attribute)."""
    base = HttpToolsServiceProtocol if parser == "httptools" else H11ServiceProtocol
    return type(f"Bound{base.__name__}", (base,), {"policy": policy})


class Peer(Protocol):
    """Another face served beside HTTP in the same event loop (the gRPC server)."""

    async def start(self) -> None: ...

    async def stop(self, grace_s: float) -> None: ...


class GracefulServer(uvicorn.Server):
    """A uvicorn server whose SIGTERM starts a drain and whose shutdown loses no request; its
    ``peers`` start before it listens and stop after it drained, before the app's lifespan
    ends (which stops the classifier they share)."""

    def __init__(
        self,
        config: uvicorn.Config,
        policy: ConnectionPolicy,
        *,
        drain_delay_s: float,
        peers: Sequence[Peer] = (),
        on_signal: Callable[[], None] = lambda: None,
        on_draining: Callable[[], None] = lambda: None,
        on_started: Callable[[], None] = lambda: None,
    ) -> None:
        super().__init__(config)
        self.policy = policy
        self.drain_delay_s = drain_delay_s
        self.peers = list(peers)
        self.drain_started: float | None = None
        self._on_signal = on_signal
        self._on_draining = on_draining
        self._on_started = on_started
        self._draining_announced = False

    # --- signals (signal context: plain assignments only) ------------------------------
    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain_started is not None:
            if sig == signal.SIGINT:
                self.force_exit = True  # a second Ctrl-C: stop waiting
            return
        self.drain_started = time.monotonic()
        self.policy.closing = True
        self._on_signal()

    async def on_tick(self, counter: int) -> bool:
        if self.drain_started is not None:
            if not self._draining_announced:
                self._draining_announced = True
                log.info("SIGTERM: readiness is now 503; draining for %.1fs", self.drain_delay_s)
                self._on_draining()
            if time.monotonic() - self.drain_started >= self.drain_delay_s:
                return True
        return await super().on_tick(counter)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            for peer in self.peers:
                await peer.start()
        except OSError as exc:  # a peer's port is taken: fail the start like uvicorn would
            log.critical("start-up failed: %s", exc)
            sys.exit(_STARTUP_FAILURE)
        await super().startup(sockets)
        if self.started and not self.should_exit:
            self._on_started()

    # --- shutdown ------------------------------------------------------------------------
    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        log.info("stopping: no new connections; serving the ones queued and in flight")
        self.policy.closing = True
        await self._close_listeners()
        self._mark_connections_closing()
        await self._linger()
        for connection in list(self.server_state.connections):
            connection.shutdown()  # idle ones close now, busy ones after their response
        try:
            await asyncio.wait_for(
                self._wait_tasks_to_complete(), timeout=self.config.timeout_graceful_shutdown
            )
        except TimeoutError:
            log.error(
                "shutdown grace exceeded: cancelling %d request(s)", len(self.server_state.tasks)
            )
            for task in self.server_state.tasks:
                task.cancel(msg="shutdown grace exceeded")
        for peer in self.peers:  # HTTP has drained: now the other faces
            await peer.stop(self.config.timeout_graceful_shutdown or 0)
        if not self.force_exit:
            await self.lifespan.shutdown()

    async def _close_listeners(self) -> None:
        listeners = [sock for server in self.servers for sock in (server.sockets or ())]
        raw = [socket.socket(fileno=s.fileno()) for s in listeners]  # same fd, for setsockopt
        try:
            for sock in raw:
                stop_new_connections(sock)
            deadline = time.monotonic() + _ACCEPT_DRAIN_S
            # The kernel's accept queue has no event to wait on: poll it while the event loop
            # accepts what is queued.
            while any(accept_queue_length(s) for s in raw) and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(_POLL_S)
        finally:
            for sock in raw:
                sock.detach()  # the asyncio server owns the descriptor
        for server in self.servers:
            server.close()

    def _mark_connections_closing(self) -> None:
        for connection in self.server_state.connections:
            if isinstance(connection, ServiceProtocol):
                connection.mark_closing()

    async def _linger(self) -> None:
        """Idle connections get ``IDLE_LINGER_S`` for a request already sent to arrive."""
        deadline = time.monotonic() + IDLE_LINGER_S
        while self.server_state.connections and time.monotonic() < deadline:
            if self.force_exit:
                return
            await asyncio.sleep(_POLL_S)
