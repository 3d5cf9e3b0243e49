"""`auraserve serve` and `auraserve worker`: the long-running processes."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from typing import TYPE_CHECKING, Any

from auraserve import __version__
from auraserve.cli.engine import load_models, worker_models
from auraserve.cli.flags import settings_from
from auraserve.cli.stores import FIRST_START, check_store, open_runtime, store_label
from auraserve.config import Settings
from auraserve.errors import ConfigError
from auraserve.observability.logs import configure_logging
from auraserve.observability.metrics import MULTIPROC_ENV

if TYPE_CHECKING:
    from auraserve.runtime import Runtime
    from auraserve.store.keys import CreatedKey

log = logging.getLogger("auraserve")


def cmd_serve(args: argparse.Namespace) -> int:
    from auraserve.api.app import create_app
    from auraserve.api.server import server_config

    settings = settings_from(args)
    _refuse_parallel_with_gpus(args, settings)
    if settings.gpus:
        # The workers run as one child process per GPU beside the API children; none here.
        settings = settings.model_copy(update={"workers": 0})
    models = worker_models(settings, None) if settings.workers else []
    parallel = args.parallel if settings.workers else None
    if parallel:
        from auraserve.engine.parallel import parse_parallel

        parse_parallel(parallel)  # a bad value stops the start before the store opens
    runtime = _open_before_the_model(args, settings)
    group = None
    try:
        if parallel:
            from auraserve.cli.parallel_worker import load_group

            runtime.engine = group = load_group(settings, models, parallel)
        else:
            runtime.engine = load_models(settings, models) if settings.workers else None
    except BaseException:
        runtime.close()
        raise
    created = runtime.bootstrap_key(settings.bootstrap_credits)
    # Lease rescue and the other periodic tasks run in every serving process, API-only too.
    runtime.start_maintenance()
    for _ in range(settings.workers):
        runtime.start_worker(models=models)
    broken = threading.Event()
    if group is not None:

        def on_broken() -> None:
            # A rank died: every batch in hand goes back to the queue (attempt not spent),
            # and the whole process stops as on SIGTERM, then exits 1.
            broken.set()
            for worker in list(runtime.workers):
                worker.hand_back_now()
            os.kill(os.getpid(), signal.SIGTERM)

        group.on_broken = on_broken
    app = create_app(runtime, owns_runtime=True)
    _print_start(args, settings, runtime, created, models or list(settings.presets))
    if settings.api_processes > 1 or settings.gpus:
        # N API processes on one socket; the worker(s) above stay here (cli/processes.py);
        # with --gpus, one worker child per GPU joins them (cli/gpu_workers.py).
        code = _serve_processes(args, settings, runtime)
        return _end_group(group, broken, code)
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
    return _end_group(group, broken, 0)


def _refuse_parallel_with_gpus(args: argparse.Namespace, settings: Settings) -> None:
    if args.parallel and settings.gpus:
        raise ConfigError(
            "--parallel runs one group of ranks; it does not combine with --gpus (yet)"
        )


def _end_group(group: Any, broken: threading.Event, code: int) -> int:
    """After the workers stopped: the parallel group's ranks end too; 1 if one had died."""
    if group is None:
        return code
    group.close()
    if broken.is_set():
        print("auraserve: a rank of the parallel group died; stopping", file=sys.stderr)
        return 1
    return code


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

    from auraserve.cli.gpu_workers import gpu_worker_plans
    from auraserve.cli.processes import ChildPlan, ChildSpec, serve_processes

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
    gpu_plans: list[ChildPlan] = []
    if settings.gpus:
        assert spec.setup_logging is not None
        gpu_plans = gpu_worker_plans(
            settings, worker_models(settings, None), spec.setup_logging, json_lines=args.json
        )
    if not os.environ.get(MULTIPROC_ENV) and settings.api_processes > 1:
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

        return serve_processes(spec, settings.api_processes, on_signal, others=gpu_plans)
    finally:
        runtime.close()


def cmd_worker(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    _refuse_parallel_with_gpus(args, settings)
    if settings.gpus:
        return _gpu_workers(args, settings)
    models = worker_models(settings, args.models)
    if args.parallel:
        from auraserve.engine.parallel import parse_parallel

        parse_parallel(args.parallel)  # a bad value stops the start before the store opens
    runtime = _open_before_the_model(args, settings)
    group = None
    try:
        if args.parallel:
            from auraserve.cli.parallel_worker import load_group

            runtime.engine = group = load_group(settings, models, args.parallel)
        else:
            runtime.engine = load_models(settings, models)
    except BaseException:
        runtime.close()
        raise
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
    worker = runtime.start_worker(models=models)
    broken = False
    if group is not None:

        def on_broken() -> None:
            # A rank died: its batch goes back to the queue (attempt not spent) and this
            # process stops with 1, for the supervisor to start a whole new group.
            nonlocal broken
            broken = True
            worker.hand_back_now()
            runtime.begin_stop()

        group.on_broken = on_broken
    if args.json:
        record = {
            "event": "ready",
            "worker_id": worker.worker_id,
            "store": store_label(settings),
            "store_created": runtime.store_created,
            "models": list(worker.models),
        }
        print(json.dumps(record), flush=True)
    else:
        print(
            f"worker {worker.worker_id} ready (store: {_store_text(settings, runtime)}, "
            f"models: {', '.join(worker.models)})",
            flush=True,
        )
    while not runtime.stopping.wait(0.5) and not worker.finished:
        pass
    crashed = (worker.finished and not runtime.stopping.is_set()) or broken
    runtime.close()  # the grace, then the hand-back: Worker.stop
    if group is not None:
        group.close()
    if broken:
        print("auraserve: a rank of the parallel group died; stopping", file=sys.stderr)
    if crashed:
        print("auraserve: the worker stopped on its own (see the log above)", file=sys.stderr)
        return 1
    print(f"worker {worker.worker_id} stopped", file=sys.stderr, flush=True)
    return 0


def _gpu_workers(args: argparse.Namespace, settings: Settings) -> int:
    """`worker --gpus`: this process supervises one pinned worker child per GPU."""
    import functools

    from auraserve.cli.gpu_workers import gpu_worker_plans
    from auraserve.cli.processes import Supervisor

    plans = gpu_worker_plans(
        settings,
        worker_models(settings, args.models),
        functools.partial(configure_logging, settings.log_format, verbose=args.verbose),
        json_lines=args.json,
    )
    # Reached and migrated once, here, before any child starts (a wrong URL is one line).
    _open_before_the_model(args, settings).close()
    gpus = ", ".join(plan.env["CUDA_VISIBLE_DEVICES"] for plan in plans)
    if args.json:
        print(json.dumps({"event": "supervising", "gpus": gpus.split(", ")}), flush=True)
    else:
        print(f"starting one worker per GPU: {gpus}", flush=True)
    status = Supervisor(plans).run()
    print("workers stopped", file=sys.stderr, flush=True)
    return status


def _open_before_the_model(args: argparse.Namespace, settings: Settings) -> Runtime:
    """The store (and the S3 bucket, when media go there) is reached and migrated before the
    model loads: a wrong URL or a server that is down is one line at once, not after the
    seconds or minutes that the weights take."""
    exists = check_store(args, settings, FIRST_START)
    runtime = open_runtime(args, settings)
    # Said in the start-up line on stdout: stderr is the log, JSON lines only when
    # AURASERVE_LOG_FORMAT=json.
    runtime.store_created = not exists
    return runtime


def browser_url(settings: Settings) -> str:
    """The base URL to open in a browser: the public URL, else this host and port (a
    wildcard listen address is reached as localhost)."""
    if settings.public_url:
        return settings.public_url.rstrip("/")
    host = settings.host
    if host in ("0.0.0.0", "::", ""):
        host = "localhost"
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.port}"


def _print_start(
    args: argparse.Namespace,
    settings: Settings,
    runtime: Runtime,
    created: CreatedKey | None,
    models: list[str],
) -> None:
    """What a first-time operator needs, on stdout: the key (first start only), where the
    playground and the API docs are, and which store and models this is."""
    base = browser_url(settings)
    server_key = runtime.db.server_key if runtime.db.server_key.created else None
    if args.json:
        record: dict[str, Any] = {
            "event": "listening",
            "version": __version__,
            "url": base,
            "playground": f"{base}/playground",
            "docs": f"{base}/docs",
            "store": store_label(settings),
            "store_created": runtime.store_created,
            "models": models,
        }
        if created is not None:
            record["api_key"] = {
                "key": created.key,
                "key_id": created.key_id,
                "account_id": created.account_id,
                "credits": created.credits,
            }
        if server_key is not None:
            record["server_key"] = str(server_key.source)
        print(json.dumps(record), flush=True)
        return
    if created is not None:
        print(
            "\nFirst start: created account "
            f"{created.account_id} with {created.credits} credits and this API key "
            f"(shown once, keep it):\n\n    {created.key}\n\n"
            "Make more with: auraserve keys create --name NAME --credits N",
            flush=True,
        )
    if server_key is not None:
        print(
            f"Server key: {server_key.source} (created now, mode 0600). Webhook "
            "secrets derive from it: back it up, and give every replica the same key "
            "(AURASERVE_SECRET_KEY or AURASERVE_SECRET_KEY_FILE).",
            flush=True,
        )
    key_hint = " (paste the key above)" if created is not None else ""
    print(
        f"\n  playground  {base}/playground{key_hint}\n"
        f"  API docs    {base}/docs\n\n"
        f"auraserve {__version__} listening on http://{settings.host}:{settings.port} "
        f"(store: {_store_text(settings, runtime)}, models: {', '.join(models)})",
        flush=True,
    )


def _store_text(settings: Settings, runtime: Runtime) -> str:
    new = " (new: created now)" if runtime.store_created else ""
    return f"{store_label(settings)}{new}"
