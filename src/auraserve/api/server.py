"""The HTTP server: uvicorn's h11 protocol with the limits a public port needs.

uvicorn alone bounds the header block (h11 only: httptools has no such limit) and idle keep-alive
connections, but not a client that sends its headers or its body slowly, nor the number of open
connections (`limit_concurrency` answers 503 to requests, yet still accepts and holds the
sockets), so a few thousand slow clients used to exhaust the file descriptors. `GuardedH11Protocol`
adds, per connection: a deadline for the whole header block, the longest pause inside a body, a
per-line header limit, and a request count per keep-alive connection; per process: a connection
cap, where the oldest connection that holds no request (idle, or still sending its headers) is
closed to admit a new one, so slow clients displace each other instead of everybody else.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
from dataclasses import dataclass
from typing import Any, ClassVar

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from auraserve.api.dialects.queue import QUEUE
from auraserve.config import Settings
from auraserve.errors import AuraserveError, HeadersTooLarge, ServerBusy

log = logging.getLogger(__name__)

# File descriptors kept free of client connections: the store, media files, the log, the
# listener itself and worker threads need some.
FD_RESERVE = 128
_END_OF_HEAD = b"\r\n\r\n"
# A body's timer restarts only after this much progress, so a client dripping a byte now and
# then cannot hold a request open: a body must move at least this much per body timeout.
BODY_PROGRESS_BYTES = 1024


@dataclass(frozen=True)
class HttpLimits:
    max_header_bytes: int
    max_header_line_bytes: int
    header_timeout: float
    body_timeout: float
    keep_alive_seconds: int
    keep_alive_max_requests: int
    max_connections: int

    @classmethod
    def from_settings(cls, settings: Settings) -> HttpLimits:
        return cls(
            max_header_bytes=settings.max_header_bytes,
            max_header_line_bytes=settings.max_header_line_bytes,
            header_timeout=settings.header_timeout_seconds,
            body_timeout=settings.body_timeout_seconds,
            keep_alive_seconds=settings.keep_alive_seconds,
            keep_alive_max_requests=settings.keep_alive_max_requests,
            max_connections=connection_cap(settings.max_connections),
        )


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


class GuardedH11Protocol(H11Protocol):
    """One connection. Subclassed per server by `protocol_class`, which sets the class-level
    limits and the server's registry of connections that hold no request."""

    limits: ClassVar[HttpLimits]
    # Insertion-ordered: the first is the longest without a request, the one to close at the cap.
    holding_no_request: ClassVar[dict[GuardedH11Protocol, None]]
    # Closed to make room but not yet gone from uvicorn's set of connections.
    evicted: ClassVar[set[GuardedH11Protocol]]
    # The header block received so far, how much of it was scanned for line lengths, and the
    # length of its last, unfinished line.
    _head: bytearray
    _scanned: int
    _line: int

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._reset_head()
        self._body_progress = 0
        self._requests = 0
        self._cycle_seen: object = None
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._arm_header_timer()
        self._admit()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        self.holding_no_request.pop(self, None)
        self.evicted.discard(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():
            return
        if self.conn.their_state is h11.IDLE and not self._head_fits(data):
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

    # --- the header block ------------------------------------------------------------------

    def _head_fits(self, data: bytes) -> bool:
        """Check the header block received so far against both size limits; refuse with 431."""
        if self._header_timer is None:
            self._arm_header_timer()  # the first byte of a further request on this connection
        start = max(0, len(self._head) - len(_END_OF_HEAD) + 1)
        self._head += data
        end = self._head.find(_END_OF_HEAD, start)
        size = len(self._head) if end < 0 else end
        limits = self.limits
        # Only the new bytes are scanned: a client sending its head a byte at a time must not
        # make every byte cost a scan of all it sent before.
        parts = bytes(self._head[self._scanned : size]).split(b"\n")
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
        if end >= 0:
            self._reset_head()
        return True

    def _reset_head(self) -> None:
        self._head = bytearray()
        self._scanned = 0
        self._line = 0

    def _refuse(self, error: AuraserveError) -> bool:
        self.transport.write(_raw_response(error))
        self.transport.close()
        self._reset_head()
        return False

    # --- request state -> timers -----------------------------------------------------------

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
        self._cancel(self._header_timer)
        self._header_timer = None
        if state is h11.SEND_BODY:
            if self._body_timer is None or self._body_progress >= BODY_PROGRESS_BYTES:
                self._body_progress = 0
                self._cancel(self._body_timer)
                self._body_timer = self.loop.call_later(
                    self.limits.body_timeout, self._body_stalled
                )
        else:
            self._cancel(self._body_timer)
            self._body_timer = None

    def _arm_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(self.limits.header_timeout, self._too_slow)

    def _too_slow(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()

    def _body_stalled(self) -> None:
        self._body_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.SEND_BODY:
            return
        if self.flow.read_paused:
            # The application is not reading: the pause is ours, not the client's.
            self._body_progress = 0
            self._body_timer = self.loop.call_later(self.limits.body_timeout, self._body_stalled)
            return
        self.transport.close()

    def _cancel_timers(self) -> None:
        self._cancel(self._header_timer)
        self._cancel(self._body_timer)
        self._header_timer = self._body_timer = None

    @staticmethod
    def _cancel(timer: asyncio.TimerHandle | None) -> None:
        if timer is not None:
            timer.cancel()

    # --- the connection cap ----------------------------------------------------------------

    def _admit(self) -> None:
        if len(self.connections) - len(self.evicted) <= self.limits.max_connections:
            self.holding_no_request[self] = None
            return
        for other in self.holding_no_request:
            self.holding_no_request.pop(other)
            other._cancel_timers()
            other.transport.close()
            self.evicted.add(other)
            self.holding_no_request[self] = None
            return
        self._refuse(ServerBusy("every connection of this server holds a request; retry"))


def protocol_class(limits: HttpLimits) -> type[GuardedH11Protocol]:
    """A protocol class of its own for one server: limits and registry are per server."""
    attributes: dict[str, Any] = {"limits": limits, "holding_no_request": {}, "evicted": set()}
    return type("ServerH11Protocol", (GuardedH11Protocol,), attributes)


def server_config(app: Any, settings: Settings, **options: Any) -> uvicorn.Config:
    """uvicorn's configuration for `app` under `settings`' HTTP limits; `options` go to
    uvicorn as they are (log level, graceful shutdown...)."""
    limits = HttpLimits.from_settings(settings)
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=protocol_class(limits),
        h11_max_incomplete_event_size=limits.max_header_bytes,
        timeout_keep_alive=limits.keep_alive_seconds,
        # The connection cap is ours (above); uvicorn's would hold the sockets and answer 503.
        limit_concurrency=None,
        # Connections the kernel queues before accept(); bursts past it are dropped and the
        # client retries its SYN after 1, 3, 7 s... (the kernel caps it at net.core.somaxconn).
        backlog=4096,
        **options,
    )
