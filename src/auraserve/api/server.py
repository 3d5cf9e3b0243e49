"""The HTTP server: uvicorn's h11 protocol with the limits a public port needs.

uvicorn alone bounds the header block (h11 only: httptools has no such limit) and idle keep-alive
connections, but not a client that sends its headers or its body slowly, nor the number of open
connections (`limit_concurrency` answers 503 to requests, yet still accepts and holds the
sockets), so a few thousand slow clients used to exhaust the file descriptors. `GuardedH11Protocol`
adds, per connection: a deadline for the whole header block, the longest pause inside a body, a
per-line header limit, and a request count per keep-alive connection; per process: a connection
cap, where the oldest connection that holds no request (idle, or still sending its headers) is
closed to admit a new one, so slow clients displace each other instead of everybody else.

Under attack the cost per connection is what matters (bench/edge.py: 20,000 slow-header
connections, 4,000 slow bodies, on the same 2 cores as the attackers): a request is collected
and checked here before uvicorn, h11 or the application set up anything for it, and deadlines
live in two queues instead of a loop timer per connection.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import re
import resource
from collections import deque
from collections.abc import Callable
from typing import Any, ClassVar, cast

import h11
import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from auraserve.api.dialects.queue import QUEUE
from auraserve.config import Settings
from auraserve.errors import AuraserveError, HeadersTooLarge, InvalidParameter, ServerBusy

log = logging.getLogger(__name__)

# File descriptors kept free of client connections: the store, media files, the log, the
# listener itself and worker threads need some.
FD_RESERVE = 128
# The blank line that ends a head, as h11 finds it (bare LF line ends included).
_BLANK_LINE = re.compile(rb"\n\r?\n")
# A body must move at least this much per body timeout, so a client dripping a byte now and
# then cannot hold a request open.
BODY_PROGRESS_BYTES = 1024
# A request's body is collected up to this much before the application sees the request: all
# of a typical JSON or form request, and no more per connection than the kernel's own socket
# buffers (4,096 connections: at most 256 MiB). A longer body is streamed past it, under the
# same pace rule.
HOLD_BODY_BYTES = 64 * 1024


def connection_cap(configured: int) -> int:
    """`configured`, lowered to what the open-file limit allows after raising the soft limit
    as far as the hard one: past it, accept() fails and every new client gets an empty reply."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = configured + FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return configured
    cap = max(16, min(configured, soft - FD_RESERVE))
    if cap < configured:
        log.warning(
            "AURASERVE_MAX_CONNECTIONS lowered from %d to %d by the open-file limit (%d)",
            configured,
            cap,
            soft,
        )
    return cap


def _raw_response(error: AuraserveError) -> bytes:
    """A complete `Connection: close` response in the default (queue) shape, for refusals
    made before any route, hence any dialect, is known."""
    problem = QUEUE.problem(error)
    body = json.dumps(QUEUE.error_body(problem), separators=(",", ":")).encode()
    head = [f"HTTP/1.1 {problem.status} {error.title}"]
    head += [f"{name}: {value}" for name, value in problem.headers.items()]
    head += [
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


class Deadlines:
    """Deadlines that all lie the same `delay` after they are set: they expire in the order they
    were set, so a queue replaces a loop timer per connection (a storm of connections adds
    one tuple each, not a timer each), and one loop timer waits for the oldest. Cancelling is
    lazy: a connection forgets its deadline, and the entry is skipped when it comes up. Entries
    expire in batches, at most `GRANULE` late."""

    GRANULE = 0.05

    def __init__(self, delay: float, expire: Callable[[GuardedH11Protocol, float], None]) -> None:
        self.delay = delay
        self._expire = expire
        self._queue: deque[tuple[float, GuardedH11Protocol]] = deque()
        self._timer: asyncio.TimerHandle | None = None

    def add(self, loop: asyncio.AbstractEventLoop, protocol: GuardedH11Protocol) -> float:
        """Set a deadline for `protocol`; returns it, for the protocol to keep as its own."""
        when = loop.time() + self.delay
        self._queue.append((when, protocol))
        if self._timer is None:
            self._timer = loop.call_at(when + self.GRANULE, self._run, loop)
        return when

    def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        queue, now = self._queue, loop.time()
        while queue and queue[0][0] <= now:
            when, protocol = queue.popleft()
            self._expire(protocol, when)
        if queue:
            self._timer = loop.call_at(max(queue[0][0], now) + self.GRANULE, self._run, loop)

    def __len__(self) -> int:
        return len(self._queue)


class CoalescingTransport:
    """A transport whose writes within one event-loop iteration leave as one `send`.

    uvicorn writes a response's head and its body separately: two system calls, and two TCP
    segments with TCP_NODELAY, for every small JSON answer. Joining them before the loop's next
    iteration halves the calls on the hottest path (status polls; measured in
    docs/benchmarks.md "Scale-out"). Everything but `write` and `close` is the real
    transport's, so flow control and `is_closing` behave as before."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._pending: list[bytes] = []
        self._loop = asyncio.get_running_loop()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(bytes(data))

    def flush(self) -> None:
        if not self._pending:
            return
        data = b"".join(self._pending)
        self._pending.clear()
        if not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class GuardedH11Protocol(H11Protocol):
    """One connection. Subclassed per server by `protocol_class`, which sets the class-level
    limits, the server's registry of connections that hold no request and its deadline queues.

    A new request's bytes are collected here, not given to h11, until its head is complete and
    its body (up to `HOLD_BODY_BYTES`) has arrived, as a buffering proxy would. Until then the
    connection costs a buffer and two timestamps: no h11 parser, no flow control and no
    application task, so clients that drip their headers or bodies cost next to nothing, and
    one that stalls is closed before the application ever saw its request (no route, no key
    lookup, no half-read body to clean up). uvicorn's own per-connection state is set up only
    when the first request is handed over (`_start_h11`)."""

    # The server's settings, and its connection cap (`connection_cap`).
    limits: ClassVar[Settings]
    max_connections: ClassVar[int]
    # Insertion-ordered: the first is the longest without a request, the one to close at the cap.
    holding_no_request: ClassVar[dict[GuardedH11Protocol, None]]
    # Closed to make room but not yet gone from uvicorn's set of connections.
    evicted: ClassVar[set[GuardedH11Protocol]]
    header_deadlines: ClassVar[Deadlines]
    body_deadlines: ClassVar[Deadlines]

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        # Not H11Protocol.__init__ yet (see the class docstring): only what the server's
        # connection registry and shutdown need.
        self._h11_args = (config, server_state, app_state, _loop)
        self._h11 = False
        self.loop = _loop or asyncio.get_event_loop()
        self.connections = server_state.connections
        # The request being collected: its bytes so far, where its head ends (-1: not yet),
        # how many bytes to wait for before handing it over, and the header-line scan state.
        self._pending = bytearray()
        self._head_end = -1
        self._hold_until = 0
        self._scanned = 0
        self._line = 0
        # The deadline each queue holds for this connection (None: none running). An entry of
        # a queue whose time differs from this one is stale.
        self._header_due: float | None = None
        self._body_due: float | None = None
        self._body_progress = 0
        self._requests = 0
        self._cycle_seen: object = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport
        self.connections.add(self)
        self._header_due = self.header_deadlines.add(self.loop, self)
        self._admit()

    def connection_lost(self, exc: Exception | None) -> None:
        self._header_due = self._body_due = None
        self.holding_no_request.pop(self, None)
        self.evicted.discard(self)
        if self._h11:
            super().connection_lost(exc)
        else:
            self.connections.discard(self)

    def shutdown(self) -> None:
        if self._h11:
            super().shutdown()
        else:
            self.transport.close()

    def pause_writing(self) -> None:
        if self._h11:
            super().pause_writing()

    def resume_writing(self) -> None:
        if self._h11:
            super().resume_writing()

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():
            return
        if self._pending or self._collecting():
            self._collect(data)
            return
        self._body_progress += len(data)
        super().data_received(data)
        self._track_state()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may start a pipelined request
        if self.transport.is_closing():
            return
        self._track_state()
        if self.conn.their_state is h11.IDLE:
            # Idle again: the keep-alive timer runs, and it may be closed at the cap.
            self.holding_no_request[self] = None

    # --- collecting a request --------------------------------------------------------------

    def _collecting(self) -> bool:
        """Whether the next bytes start a request of ours to collect: h11 holds nothing of a
        request (a pipelined one it buffered stays with it)."""
        if not self._h11:
            return True
        return self.conn.their_state is h11.IDLE and not self.conn.trailing_data[0]

    def _collect(self, data: bytes) -> None:
        if self._h11:
            self._unset_keepalive_if_required()  # a further request has begun
        if not self._pending:
            if self._header_due is None:  # the first byte of a further request on this connection
                self._header_due = self.header_deadlines.add(self.loop, self)
            if data[0] < 0x21:
                # Not a request line (a TLS handshake, a blank line): h11 answers 400 at once.
                self._pending += data
                self._hand_over()
                return
        if self._head_end < 0:
            start = max(0, len(self._pending) - 2)
            self._pending += data
            if not self._head_fits(start):
                return
            if self._head_end < 0:
                return
            self._hold_until = self._hold_target()
            self._header_due = None
            if self._hold_until > len(self._pending):
                # The head is complete, its body is coming: the body's pace rule applies.
                self._body_progress = len(self._pending) - self._head_end
                self._body_due = self.body_deadlines.add(self.loop, self)
                return
        else:
            self._pending += data
            self._body_progress += len(data)
            if self._hold_until > len(self._pending):
                return
        self._hand_over()

    def _head_fits(self, start: int) -> bool:
        """Find the end of the head from `start` and check the head received so far against
        both size limits; refuse with 431."""
        head = self._pending
        match = _BLANK_LINE.search(head, start)
        if match is not None:
            self._head_end = match.end()
        size = len(head) if match is None else match.start()
        limits = self.limits
        # Only the new bytes are scanned: a client sending its head a byte at a time must not
        # make every byte cost a scan of all it sent before.
        parts = bytes(head[self._scanned : size]).split(b"\n")
        first = self._line + len(parts[0])
        longest = max(first, *(len(p) for p in parts[1:])) if len(parts) > 1 else first
        self._line = len(parts[-1]) if len(parts) > 1 else first
        self._scanned = size
        if longest > limits.max_header_line_bytes:
            return self._refuse(
                HeadersTooLarge(
                    f"a request header line exceeds {limits.max_header_line_bytes} bytes "
                    "(AURASERVE_MAX_HEADER_LINE_BYTES)"
                )
            )
        if size > limits.max_header_bytes:
            return self._refuse(
                HeadersTooLarge(
                    f"request headers exceed {limits.max_header_bytes} bytes "
                    "(AURASERVE_MAX_HEADER_BYTES)"
                )
            )
        return True

    def _hold_target(self) -> int:
        """How many bytes of the connection to collect before h11 and the application see the
        request: its head, and a Content-Length body up to `HOLD_BODY_BYTES`. Anything this
        cheap reading is unsure of (chunked bodies, `Expect: 100-continue`, which waits for the
        application, a malformed or oversized length) goes to h11 at once, as before."""
        head = bytes(self._pending[: self._head_end]).lower()
        if b"\ntransfer-encoding:" in head or b"\nexpect:" in head:
            return self._head_end
        at = head.find(b"\ncontent-length:")
        if at < 0:
            return self._head_end
        end = head.find(b"\n", at + 1)
        value = head[at + len(b"\ncontent-length:") : end].strip()
        if not value.isdigit() or len(value) > 18:
            return self._head_end
        length = int(value)
        if length > self.limits.max_body_bytes:
            return self._head_end  # the application answers 413 without reading it
        return self._head_end + min(length, HOLD_BODY_BYTES)

    def _hand_over(self) -> None:
        """Give the collected bytes to h11, which starts the request."""
        data = bytes(self._pending)
        self._reset_collected()
        self._header_due = self._body_due = None
        self._body_progress = 0
        if not self._h11:
            self._start_h11()
        super().data_received(data)
        self._track_state()

    def _start_h11(self) -> None:
        transport = cast(asyncio.Transport, CoalescingTransport(self.transport))
        H11Protocol.__init__(self, *self._h11_args)
        H11Protocol.connection_made(self, transport)
        self._h11 = True

    def _reset_collected(self) -> None:
        self._pending = bytearray()
        self._head_end = -1
        self._hold_until = 0
        self._scanned = 0
        self._line = 0

    def send_400_response(self, msg: str) -> None:
        """h11 could not parse the request: uvicorn's answer is plain text; ours is the JSON
        error shape every other refusal has."""
        self._refuse(
            InvalidParameter(
                field="request",
                message="request: malformed HTTP (the request line or headers cannot be parsed)",
            )
        )

    def _refuse(self, error: AuraserveError) -> bool:
        self.transport.write(_raw_response(error))
        self.transport.close()
        self._reset_collected()
        return False

    # --- request state -> deadlines --------------------------------------------------------

    def _track_state(self) -> None:
        if self.cycle is not None and self.cycle is not self._cycle_seen:
            self._cycle_seen = self.cycle
            self._requests += 1
            if self._requests >= self.limits.keep_alive_max_requests:
                # uvicorn answers a request that asked to close with `Connection: close`.
                self.headers.append((b"connection", b"close"))
        state = self.conn.their_state
        if state is h11.IDLE:
            return
        self.holding_no_request.pop(self, None)
        self._header_due = None
        if state is h11.SEND_BODY:
            if self._body_due is None:
                self._body_progress = 0
                self._body_due = self.body_deadlines.add(self.loop, self)
        else:
            self._body_due = None

    @staticmethod
    def _header_expired(protocol: GuardedH11Protocol, when: float) -> None:
        if protocol._header_due != when or protocol.transport.is_closing():
            return
        protocol._header_due = None
        protocol.transport.close()

    @staticmethod
    def _body_expired(protocol: GuardedH11Protocol, when: float) -> None:
        """A body must move `BODY_PROGRESS_BYTES` per body timeout, or the connection closes."""
        if protocol._body_due != when or protocol.transport.is_closing():
            return
        protocol._body_due = None
        paused = protocol._h11 and protocol.flow.read_paused
        # A paused read is the application not reading: the pause is ours, not the client's.
        if protocol._body_progress >= BODY_PROGRESS_BYTES or paused:
            protocol._body_progress = 0
            protocol._body_due = protocol.body_deadlines.add(protocol.loop, protocol)
            return
        protocol.transport.close()

    # --- the connection cap ----------------------------------------------------------------

    def _admit(self) -> None:
        if len(self.connections) - len(self.evicted) <= self.max_connections:
            self.holding_no_request[self] = None
            return
        for other in self.holding_no_request:
            self.holding_no_request.pop(other)
            other._header_due = other._body_due = None
            other.transport.close()
            self.evicted.add(other)
            self.holding_no_request[self] = None
            return
        self._refuse(ServerBusy("every connection of this server holds a request; retry"))


def protocol_class(settings: Settings) -> type[GuardedH11Protocol]:
    """A protocol class of its own for one server: limits, registry and deadline queues are
    per server."""
    protocol = GuardedH11Protocol
    attributes: dict[str, Any] = {
        "limits": settings,
        "max_connections": connection_cap(settings.max_connections),
        "holding_no_request": {},
        "evicted": set(),
        "header_deadlines": Deadlines(settings.header_timeout_seconds, protocol._header_expired),
        "body_deadlines": Deadlines(settings.body_timeout_seconds, protocol._body_expired),
    }
    return type("ServerH11Protocol", (GuardedH11Protocol,), attributes)


class FreezeAfterStartup:
    """ASGI wrapper: once the application has started, move every object alive then (the app,
    its routes and models, the ORM, the runtime: hundreds of thousands, living as long as the
    server) out of the garbage collector's reach, until shutdown. Full collections then walk
    only what was made since; under a connection storm they ran every few seconds and walked
    everything, stopping the event loop for 0.3-0.7 s each (bench/edge.py)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def receiving() -> Message:
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                gc.unfreeze()
            return message

        async def sending(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                gc.freeze()
            await send(message)

        await self.app(scope, receiving, sending)


def server_config(app: Any, settings: Settings, **options: Any) -> uvicorn.Config:
    """uvicorn's configuration for `app` under `settings`' HTTP limits; `options` go to
    uvicorn as they are (log level, graceful shutdown...)."""
    return uvicorn.Config(
        FreezeAfterStartup(app),
        host=settings.host,
        port=settings.port,
        http=protocol_class(settings),
        h11_max_incomplete_event_size=settings.max_header_bytes,
        timeout_keep_alive=settings.keep_alive_seconds,
        # The connection cap is ours (above); uvicorn's would hold the sockets and answer 503.
        limit_concurrency=None,
        # Connections the kernel queues before accept(); past it a SYN is dropped and the
        # client retries after 1, 3, 7 s... The kernel lowers this to net.core.somaxconn
        # (4096 since Linux 5.4), so that sysctl alone decides; see docs/deploy.md.
        backlog=65535,
        **options,
    )
