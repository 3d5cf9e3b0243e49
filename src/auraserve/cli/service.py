"""`auraserve serve` and `auraserve worker`: the long-running processes."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import TYPE_CHECKING, Any

from auraserve import __version__
from auraserve.cli.engine import load_engine, served_models
from auraserve.cli.flags import settings_from
from auraserve.cli.stores import open_runtime, store_label
from auraserve.config import Settings
from auraserve.observability.logs import configure_logging
from auraserve.observability.metrics import MULTIPROC_ENV

if TYPE_CHECKING:
    from auraserve.runtime import Runtime

log = logging.getLogger("auraserve")


def cmd_serve(args: argparse.Namespace) -> int:
    from auraserve.api.app import create_app
    from auraserve.api.server import server_config

    settings = settings_from(args)
    weights = settings.weights_for(settings.default_preset)
    engine = load_engine(settings, weights) if settings.workers else None
    runtime = open_runtime(settings, engine)
    created = runtime.bootstrap_key(settings.bootstrap_credits)
    if created is not None:
        print(
            "\nFirst start: created account "
            f"{created.account_id} with {created.credits} credits and this API key "
            f"(shown once, keep it):\n\n    {created.key}\n\n"
            "Make more with: auraserve keys create --name NAME --credits N\n",
            flush=True,
        )
    if runtime.server_key is not None and runtime.server_key.created:
        print(
            f"Server key: {runtime.server_key.source} (created now, mode 0600). Webhook "
            "secrets derive from it: back it up, and give every replica the same key "
            "(AURASERVE_SECRET_KEY or AURASERVE_SECRET_KEY_FILE).",
            flush=True,
        )
    # Lease rescue and the other periodic tasks run in every serving process, API-only too.
    runtime.start_maintenance()
    for _ in range(settings.workers):
        runtime.start_worker(models=served_models(settings, weights))
    app = create_app(runtime, owns_runtime=True)
    print(
        f"auraserve {__version__} listening on http://{settings.host}:{settings.port} "
        f"(store: {store_label(settings)}, "
        f"models: {', '.join(served_models(settings, weights))})",
        flush=True,
    )
    if settings.api_processes > 1:
        # N API processes on one socket; the worker(s) above stay here (api/processes.py).
        return _serve_processes(args, settings, runtime)
    # HTTP limits (header size and time, body stalls, keep-alive, connection cap): api/server.py.
    config = server_config(
        app,
        settings,
        log_level="warning" if not args.verbose else "info",
        access_log=args.access_log,
        timeout_graceful_shutdown=settings.stop_grace_seconds,
        # uvicorn's loggers propagate to ours (observability.logs), in AURASERVE_LOG_FORMAT.
        log_config=None,
    )
    _serve_gracefully(config, runtime)
    runtime.close()  # normally done by the app's shutdown already; not after a forced exit
    return 0


def _serve_gracefully(config: Any, runtime: Runtime) -> None:
    """Run uvicorn with the runtime told about signals. First SIGTERM/SIGINT: in-process
    workers stop claiming, SSE streams end, in-flight requests finish (up to
    AURASERVE_STOP_GRACE_SECONDS), then the app's shutdown stops the workers with what is left
    of the grace. A second signal hands the batch in hand back at once and stops waiting for
    connections. uvicorn would re-raise the signal after its shutdown (exit status 143 for
    SIGTERM); a graceful stop exits 0 instead."""
    import uvicorn

    class GracefulServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            # A signal handler: only events and flags are set here.
            if self.should_exit:
                runtime.hurry.set()
                self.force_exit = True
            runtime.begin_stop()
            self.should_exit = True

    GracefulServer(config).run()


def _serve_processes(args: argparse.Namespace, settings: Settings, runtime: Runtime) -> int:
    import functools

    from auraserve.api.processes import ChildSpec, serve_processes

    # On SQLite, the worker here and the API children hear each other's commits at once
    # (store.events.SqliteFanout, joined by every process that listens).
    runtime.db.start_listener()
    spec = ChildSpec(
        settings=settings,
        uvicorn_options={
            "log_level": "warning" if not args.verbose else "info",
            "access_log": args.access_log,
            "timeout_graceful_shutdown": settings.stop_grace_seconds,
            # uvicorn's loggers propagate to ours, in AURASERVE_LOG_FORMAT, as in one process.
            "log_config": None,
        },
        setup_logging=functools.partial(
            configure_logging, settings.log_format, verbose=args.verbose
        ),
    )
    if not os.environ.get(MULTIPROC_ENV):
        log.warning(
            "%d API processes without %s: each process's /metrics shows its own counters "
            "(set it to an empty directory to have every scrape sum them)",
            settings.api_processes,
            MULTIPROC_ENV,
        )
    try:

        def on_signal(count: int) -> None:
            # A signal handler: only events are set (Runtime.begin_stop / hurry).
            if count == 1:
                runtime.begin_stop()
            else:
                runtime.hurry.set()

        return serve_processes(spec, settings.api_processes, on_signal)
    finally:
        runtime.close()


def cmd_worker(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    weights = settings.weights_for(settings.default_preset)
    engine = load_engine(settings, weights)
    runtime = open_runtime(settings, engine)
    signals = 0

    def _on_signal(signum: int, _frame: Any) -> None:
        # A signal handler: os.write, not print (which may re-enter a buffered stream the
        # interrupted code is writing), and only events are set; the main thread acts.
        nonlocal signals
        signals += 1
        if signals == 1:
            os.write(
                2,
                f"stopping: no new jobs; the batch in hand may finish within "
                f"{settings.stop_grace_seconds:g} s, then goes back to the queue "
                "(signal again to hand it back now)\n".encode(),
            )
            runtime.begin_stop()
        else:
            os.write(2, b"handing the batch in hand back to the queue now\n")
            runtime.hurry.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    # Registers in the store's worker registry, heartbeats, and runs the maintenance tasks
    # (lease rescue) like every serving process.
    worker = runtime.start_worker(models=served_models(settings, weights))
    print(
        f"worker {worker.worker_id} ready (store: {store_label(settings)}, "
        f"models: {', '.join(worker.models)})",
        flush=True,
    )
    while not runtime.stopping.wait(0.5) and not worker.finished:
        pass
    crashed = worker.finished and not runtime.stopping.is_set()
    runtime.close()  # the grace, then the hand-back: Worker.stop
    if crashed:
        print("auraserve: the worker stopped on its own (see the log above)", file=sys.stderr)
        return 1
    print(f"worker {worker.worker_id} stopped", file=sys.stderr, flush=True)
    return 0
