"""Several API processes on one port: `auraserve serve --api-processes N`.

One Python process serves about 2,500 status polls/s on one core of the 2-core test machine
(docs/benchmarks.md); the GIL keeps it there however many cores the machine has. The
supervisor (the `serve` process itself) reserves the port and starts N children that each
listen on it (SO_REUSEPORT), each a whole API: its own store connections, outbox dispatcher,
rate limiter, and our `GuardedH11Protocol` limits (`api.server.server_config`), the
connection cap counting per child.

Why SO_REUSEPORT rather than one inherited listening socket: with a shared socket, whichever
child wakes first accepts a whole burst of connections, and keep-alive clients then stay on it
(measured: 16 wrk connections, one child at 0.94 cores, the other at 0.01). With a socket per
child the kernel spreads new connections over the children by their address hash. The cost: the
connections waiting in a child's own accept queue when that child dies are reset (clients retry;
a graceful stop closes the listener first, so only a crash loses them).

Why our own supervisor rather than uvicorn's `Multiprocess`: uvicorn pickles its `Config`,
which cannot carry the per-server protocol class `server_config` builds, and it offers no hook
to keep the in-process worker and the key bootstrap out of the children. What we keep from it:
children are *spawned*, not forked, so none inherits the supervisor's threads, database
connections or model, and a child can be restarted at any time, even while the worker runs.

Where things run, and why:
- Migrations and the first-start key: in the supervisor, once, before any child starts.
- The in-process worker(s): in the supervisor. It is idle otherwise, so the worker gets a GIL of
  its own instead of sharing an API child's; the model is loaded once; and a crashed or
  restarted API child never takes a batch in progress with it. The children stay torch-free.
- Cross-process wake-ups: on PostgreSQL every process LISTENs; on SQLite every process joins
  the store's datagram fan-out (`store.drivers.sqlite.SqliteFanout`), so a child's sync waiter hears
  the supervisor's worker complete its job at once, and the worker hears a child's submit.

A child that exits is started again (after a growing pause if it keeps dying young). SIGTERM or
SIGINT stops the children gracefully (they finish in-flight requests), then the worker; a
second signal hurries the children.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.context import SpawnProcess
from multiprocessing.synchronize import Event as MpEvent
from typing import Any

from auraserve.config import Settings

log = logging.getLogger(__name__)

_SPAWN = multiprocessing.get_context("spawn")
# A child that dies within this long of starting is "dying young": it is restarted after a
# pause that doubles each time (a broken configuration must not become a fork bomb).
YOUNG_SECONDS = 10.0
MAX_RESTART_PAUSE = 30.0
# How long the supervisor waits for children to finish in-flight requests after a signal,
# beyond their own graceful-shutdown timeout, before it kills them.
STOP_MARGIN_SECONDS = 5.0
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class ChildSpec:
    """Everything a child needs, pickled to it at spawn: the settings as `serve` resolved them
    (flags included), uvicorn's options, and how to set up logging (a module-level callable,
    so it pickles)."""

    settings: Settings
    uvicorn_options: dict[str, Any] = field(default_factory=dict)
    setup_logging: Callable[[], object] | None = None


def bind_listener(settings: Settings, backlog: int = 4096, *, listen: bool = True) -> socket.socket:
    """A socket on the serving port in the SO_REUSEPORT group. Without `listen` it only holds
    the port (the supervisor's: a port in use fails `serve` at once, and no other program can
    take the port while children restart); the children's listen and share the connections."""
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((settings.host, settings.port))
    if listen:
        sock.listen(backlog)
    return sock


def die_with_parent() -> None:
    """Linux: get SIGTERM when the supervisor dies, even by SIGKILL, so no child outlives it
    and keeps the port."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() == 1:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def child_main(spec: ChildSpec, ready: MpEvent) -> None:
    """One API process: open the store (already migrated: a no-op check), serve on `sock`."""
    die_with_parent()
    if spec.setup_logging is not None:
        spec.setup_logging()
    # Imported here, in the child: the supervisor's own imports stay what `serve` needs.
    import uvicorn

    from auraserve.api.app import create_app
    from auraserve.api.server import server_config
    from auraserve.runtime import Runtime

    sock = bind_listener(spec.settings)
    runtime = Runtime.open(spec.settings)
    # Workers in the supervisor, or (`serve --gpus`) in its per-GPU children: readiness then
    # waits for one of them to warm up (the registry says).
    runtime.workers_in_supervisor = spec.settings.workers > 0 or bool(spec.settings.gpus)
    app = create_app(runtime, owns_runtime=True)
    config = server_config(app, spec.settings, **spec.uvicorn_options)

    class ChildServer(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started:
                ready.set()

        def handle_exit(self, sig: int, frame: Any) -> None:
            # As `serve` in one process: status streams end at once instead of holding the
            # graceful shutdown open; a second signal stops waiting for connections.
            if self.should_exit:
                self.force_exit = True
            runtime.begin_stop()
            self.should_exit = True

    try:
        ChildServer(config).run(sockets=[sock])
    finally:
        # multiprocessing ends a child with os._exit: atexit handlers would not run, so the
        # runtime (its store's fan-out socket included) is closed here if the app did not.
        runtime.close()


@dataclass(frozen=True)
class ChildPlan:
    """One supervised child: what it runs, how it is named in the log, and the environment
    variables it is born with (the per-GPU workers' CUDA_VISIBLE_DEVICES: set at birth, so
    no library in the child can see another device). `target(*args, ready)` must set `ready`
    once it serves; `grace` is how long it may take to stop after SIGTERM."""

    label: str
    target: Callable[..., None]
    args: tuple[Any, ...]
    grace: float
    env: dict[str, str] = field(default_factory=dict)


def api_plans(spec: ChildSpec, count: int) -> list[ChildPlan]:
    grace = float(spec.uvicorn_options.get("timeout_graceful_shutdown") or 30)
    return [ChildPlan(f"API process {i}", child_main, (spec,), grace) for i in range(count)]


@dataclass
class _Child:
    index: int
    process: SpawnProcess
    ready: MpEvent
    started_at: float


class Supervisor:
    """Keeps its children (API processes, per-GPU workers: `ChildPlan`) alive until told to
    stop."""

    def __init__(
        self,
        plans: list[ChildPlan],
        on_signal: Callable[[int], None] | None = None,
    ) -> None:
        self.plans = plans
        # Told the signal count (1: stop gracefully, 2+: hurry): the in-process workers live
        # here, in the supervisor, and stop with the children.
        self.on_signal = on_signal
        self.children: dict[int, _Child] = {}
        self._signals = 0
        self._ever_ready = False
        self._young_deaths: dict[int, int] = {}
        self._restart_at: dict[int, float] = {}

    # --- public -----------------------------------------------------------------------------

    def run(self) -> int:
        """Start the children, keep them alive until SIGTERM/SIGINT, stop them; exit status."""
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            for index in range(len(self.plans)):
                self._start(index)
            while not self._signals:
                if not self._reap_and_restart():
                    self._stop_all()
                    return 1
            return self._stop_all()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def pids(self) -> list[int]:
        return [c.process.pid for c in self.children.values() if c.process.pid is not None]

    # --- internals --------------------------------------------------------------------------

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._signals += 1
        if self.on_signal is not None:
            self.on_signal(self._signals)
        if self._signals > 1:
            # uvicorn treats SIGINT during a graceful shutdown as "exit now"; a worker child
            # takes a second signal as "hand the batch back now".
            for child in self.children.values():
                self._send(child, signal.SIGINT)

    def _start(self, index: int) -> None:
        plan = self.plans[index]
        ready = _SPAWN.Event()
        process = _SPAWN.Process(
            target=plan.target,
            args=(*plan.args, ready),
            name=f"auraserve-{plan.label.lower().replace(' ', '-')}",
            daemon=False,
        )
        with _environment(plan.env):
            process.start()
        self.children[index] = _Child(index, process, ready, time.monotonic())
        log.info("%s started (pid %s)", plan.label, process.pid)

    def _reap_and_restart(self) -> bool:
        """Restart children that exited; False when one failed before any child ever served
        (the configuration is broken: every restart would fail the same way)."""
        sentinels = {c.process.sentinel: c for c in self.children.values()}
        timeout = 0.5
        if self._restart_at:
            timeout = max(0.0, min(timeout, min(self._restart_at.values()) - time.monotonic()))
        exited = multiprocessing.connection.wait(list(sentinels), timeout=timeout)
        # Asked after the wait: a child may have become ready while we waited (a sibling
        # killed from outside just after the first child served must be restarted, not taken
        # for a broken configuration).
        self._ever_ready = self._ever_ready or any(c.ready.is_set() for c in self.children.values())
        for sentinel in exited:
            if self._signals:
                return True  # stopping: an exit now is expected
            child = sentinels[sentinel]  # type: ignore[index]
            label = self.plans[child.index].label
            child.process.join()
            del self.children[child.index]
            if not self._ever_ready and not child.ready.is_set():
                log.error(
                    "%s failed to start (exit status %s); stopping",
                    label,
                    child.process.exitcode,
                )
                return False
            lived = time.monotonic() - child.started_at
            young = lived < YOUNG_SECONDS
            deaths = self._young_deaths.get(child.index, 0) + 1 if young else 0
            self._young_deaths[child.index] = deaths
            pause = min(MAX_RESTART_PAUSE, 0.5 * 2 ** (deaths - 1)) if young else 0.0
            log.error(
                "%s (pid %s) exited with status %s after %.1f s; restarting%s",
                label,
                child.process.pid,
                child.process.exitcode,
                lived,
                f" in {pause:.1f} s" if pause else "",
            )
            self._restart_at[child.index] = time.monotonic() + pause
        now = time.monotonic()
        for index, at in list(self._restart_at.items()):
            if at <= now and not self._signals:
                del self._restart_at[index]
                self._start(index)
        return True

    def _stop_all(self) -> int:
        for child in self.children.values():
            self._send(child, signal.SIGTERM)
        start = time.monotonic()
        for child in self.children.values():
            plan = self.plans[child.index]
            deadline = start + plan.grace + STOP_MARGIN_SECONDS
            child.process.join(max(0.0, deadline - time.monotonic()))
            if child.process.exitcode is None:
                log.error("%s did not stop in time; killing it", plan.label)
                child.process.kill()
                child.process.join()
        return 0

    @staticmethod
    def _send(child: _Child, signum: int) -> None:
        if child.process.pid is not None and child.process.exitcode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.process.pid, signum)


@contextlib.contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    """`env` set in os.environ while a child is spawned: the spawned interpreter inherits the
    process environment at exec, so the child is born with it. Only the supervisor's main
    thread spawns."""
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def serve_processes(
    spec: ChildSpec,
    count: int,
    on_signal: Callable[[int], None] | None = None,
    others: Sequence[ChildPlan] = (),
) -> int:
    """Hold the port, run `count` API children on it (and `others`, e.g. the per-GPU
    workers) until a signal stops them."""
    sock = bind_listener(spec.settings, listen=False)
    try:
        return Supervisor([*api_plans(spec, count), *others], on_signal).run()
    finally:
        sock.close()
