"""The `auraserve` command: serve, worker, generate, keys, credits, db.

Exit status: 0 done; 1 the command ran and the answer is no (no such account to show, no
active key to revoke) or the weights cannot be loaded; 2 the command cannot run as given (a
wrong flag or value, an invalid setting, a store that is not there, an account that does not
exist). Every failure a user can fix ends with one line on stderr that names the problem,
never a traceback.

The admin commands (keys, credits, workers, db) name on stderr the store they used, so a key made
against the wrong data directory is noticed at once; the commands that need existing accounts
refuse a store that does not exist instead of creating an empty one.

Only `generate`, `worker` and `serve` with in-process workers load the model stack (torch,
diffusers); they import it inside the command, so the admin commands and API-only replicas
(`serve --workers 0`) start without it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import textwrap
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from auraserve import __version__
from auraserve.config import Settings, load_settings
from auraserve.errors import AuraserveError, ConfigError, ModelLoadError, RequestError
from auraserve.observability.logs import configure_logging
from auraserve.observability.metrics import MULTIPROC_ENV

if TYPE_CHECKING:
    from auraserve.engine.base import Engine
    from auraserve.runtime import Runtime

log = logging.getLogger("auraserve")


# --- settings given as flags ------------------------------------------------------------------


@dataclass(frozen=True)
class SettingFlag:
    """A setting that a command also takes as a flag; the flag wins over the environment."""

    name: str  # the Settings field
    help: str
    commands: frozenset[str]
    parse: type = str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "AURASERVE_" + self.name.upper()


_ALL = frozenset({"serve", "worker", "generate", "keys", "credits", "db", "workers"})
_ENGINE = frozenset({"serve", "worker", "generate"})
_SERVICE = frozenset({"serve", "worker"})

SETTING_FLAGS: tuple[SettingFlag, ...] = (
    SettingFlag("data_dir", "data directory: the SQLite store and the media", _ALL, Path),
    SettingFlag(
        "model",
        "weights for every preset: a Hugging Face id, a local diffusers directory, or 'tiny' "
        "(random test model that draws noise); empty: each preset's own weights",
        _ENGINE,
    ),
    SettingFlag("host", "listen address", frozenset({"serve"})),
    SettingFlag("port", "listen port", frozenset({"serve"}), int),
    SettingFlag(
        "workers",
        "in-process workers; 0 runs the API alone (no model loaded), for replicas in front "
        "of separate `auraserve worker` processes",
        frozenset({"serve"}),
        int,
    ),
    SettingFlag("device", "where the model runs", _ENGINE),
    SettingFlag("dtype", "weight precision; auto: bfloat16 on CUDA, float32 on the CPU", _ENGINE),
    SettingFlag(
        "offload",
        "move model parts to the GPU only while they run: less VRAM, slower",
        _ENGINE,
    ),
    SettingFlag(
        "engine_mode",
        "speed modes: a preset and/or field=value pairs, comma separated, e.g. 'fast,fp8=1'",
        _ENGINE,
    ),
    SettingFlag("max_rows", "images per transformer forward at most (bounds memory)", _ENGINE, int),
    SettingFlag("max_batch", "images a worker claims and runs together at most", _SERVICE, int),
    SettingFlag(
        "api_processes",
        "API processes on the one port (the in-process workers stay single, in the parent)",
        frozenset({"serve"}),
        int,
    ),
)


def _choices(name: str) -> tuple[str, ...] | None:
    annotation = Settings.model_fields[name].annotation
    if typing.get_origin(annotation) is typing.Literal:
        return tuple(str(a) for a in typing.get_args(annotation))
    return None


def _default_text(name: str) -> str:
    field = Settings.model_fields[name]
    if field.default_factory is not None or field.default in ("", None):
        return "none"
    return str(field.default)


def _add_setting_flags(parser: argparse.ArgumentParser, command: str) -> None:
    for setting in SETTING_FLAGS:
        if command in setting.commands:
            parser.add_argument(
                setting.flag,
                dest=setting.name,
                type=setting.parse,
                choices=_choices(setting.name),
                help=f"{setting.help} (default {_default_text(setting.name)}; "
                f"environment {setting.env})",
            )


def _other_settings_epilog(command: str) -> str:
    flagged = {s.name for s in SETTING_FLAGS if command in s.commands}
    others = ", ".join(
        f"AURASERVE_{name.upper()}" for name in Settings.model_fields if name not in flagged
    )
    return "\n".join(
        [
            "Every other setting comes from the environment, or from the TOML file that",
            "AURASERVE_CONFIG names (README, Configuration):",
            textwrap.fill(others, width=78, initial_indent="  ", subsequent_indent="  "),
        ]
    )


def _settings(args: argparse.Namespace) -> Settings:
    settings = load_settings(**{s.name: getattr(args, s.name, None) for s in SETTING_FLAGS})
    configure_logging(settings.log_format, verbose=getattr(args, "verbose", False))
    return settings


# --- the store the command works on -----------------------------------------------------------


def store_label(settings: Settings) -> str:
    """Where the store is, for people: the SQLite file, or the PostgreSQL URL without password."""
    url = settings.resolved_database_url
    if url.startswith("sqlite"):
        return f"SQLite {url.split(':///', 1)[-1]}"
    from sqlalchemy.engine import make_url

    shown = make_url(settings.database_url).render_as_string(hide_password=True)
    return f"PostgreSQL {shown}"


def _store_exists(settings: Settings) -> bool:
    url = settings.resolved_database_url
    if url.startswith("sqlite"):
        path = url.split(":///", 1)[-1]
        return path not in ("", ":memory:") and Path(path).is_file()
    from sqlalchemy import create_engine, inspect
    from sqlalchemy.pool import NullPool

    # Migrations record themselves in alembic_version: without it the database holds no store.
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return inspect(conn).has_table("alembic_version")
    finally:
        engine.dispose()


@contextmanager
def _reaching_store(settings: Settings) -> Iterator[None]:
    """A store that cannot be reached (server down, no such database) is a setting to fix."""
    from sqlalchemy.exc import OperationalError

    try:
        yield
    except OperationalError as exc:
        reason = str(exc.orig or exc).strip().splitlines()[0]
        raise ConfigError(
            f"cannot open the store {store_label(settings)}: {reason} "
            "(check AURASERVE_DATABASE_URL)"
        ) from None


def _open_runtime(settings: Settings, engine: Engine | None = None) -> Runtime:
    from auraserve.runtime import Runtime

    with _reaching_store(settings):
        return Runtime.open(settings, engine=engine)


def _open_admin(args: argparse.Namespace, *, may_create: bool) -> Runtime:
    """Open the configured store for an admin command and say on stderr which one it is.

    Without `may_create`, a store that does not exist is refused: the command was most likely
    run from another directory than the server, and an empty new store would hand out keys
    and credits that the server never sees."""
    settings = _settings(args)
    label = store_label(settings)
    with _reaching_store(settings):
        exists = _store_exists(settings)
    if not exists and not may_create:
        raise ConfigError(
            f"no store at {label}: run this where the server runs, or point --data-dir "
            "(AURASERVE_DATA_DIR) or AURASERVE_DATABASE_URL at the server's store"
        )
    runtime = _open_runtime(settings)
    note = "" if exists else " (new and empty: created by this command)"
    print(f"store: {label}{note}{_new_server_key(runtime)}", file=sys.stderr, flush=True)
    return runtime


def _new_server_key(runtime: Runtime) -> str:
    """Where a server key made by this process lives, for the line the command prints."""
    key = runtime.server_key
    if key is None or not key.created:
        return ""
    return f"; webhook secrets derive from the new server key {key.source} (0600): back it up"


# --- model commands ---------------------------------------------------------------------------


def _load_engine(settings: Settings, weights: str) -> Engine:
    # The model stack loads here and only here: the admin commands never reach this.
    from auraserve.engine.expand import make_expander
    from auraserve.engine.lora import LoraOptions
    from auraserve.engine.pipeline import load_engine

    lora = None
    if settings.lora_dir or settings.lora_hub_allowlist:
        # The registry is listed again for every batch, so adapters dropped into the folder
        # are served without a restart.
        lora = LoraOptions(
            registry=settings.loras,
            cache_bytes=settings.lora_cache_mb * 2**20,
            max_rank=settings.lora_max_rank,
        )
    print(f"loading model {weights} …", file=sys.stderr, flush=True)
    engine = load_engine(
        weights,
        device=settings.device,
        dtype=settings.dtype,
        offload=settings.offload,
        max_rows=settings.max_rows,
        options=settings.engine_mode,
        lora=lora,
        expander=make_expander(
            settings.expand_url or None,
            settings.expand_model or None,
            settings.expand_api_key or None,
            settings.expand_local_path or None,
        ),
    )
    for line in getattr(engine, "optimization_log", []):
        print(f"engine: {line}", file=sys.stderr)
    if engine.is_test_model:
        print(
            "WARNING: running the tiny TEST model with random weights: it draws noise, not "
            "pictures (use --model fal/AuraFlow-v0.3 or a local directory for real images)",
            file=sys.stderr,
        )
    return engine


def _served_models(settings: Settings, weights: str) -> list[str]:
    return [p for p in settings.presets if settings.weights_for(p) == weights]


def cmd_serve(args: argparse.Namespace) -> int:
    from auraserve.api.app import create_app
    from auraserve.api.server import server_config

    settings = _settings(args)
    weights = settings.weights_for(settings.default_preset)
    engine = _load_engine(settings, weights) if settings.workers else None
    runtime = _open_runtime(settings, engine)
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
        runtime.start_worker(models=_served_models(settings, weights))
    app = create_app(runtime, owns_runtime=True)
    print(
        f"auraserve {__version__} listening on http://{settings.host}:{settings.port} "
        f"(store: {store_label(settings)}, "
        f"models: {', '.join(_served_models(settings, weights))})",
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
    settings = _settings(args)
    weights = settings.weights_for(settings.default_preset)
    engine = _load_engine(settings, weights)
    runtime = _open_runtime(settings, engine)
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
    worker = runtime.start_worker(models=_served_models(settings, weights))
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


def cmd_generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from auraserve.core.request import build_request
    from auraserve.media.encode import encode_image, generation_metadata

    settings = _settings(args)
    preset_id = args.preset or settings.default_preset
    if preset_id not in settings.presets:
        raise ConfigError(
            f"unknown preset {preset_id!r}; choose from {', '.join(settings.presets)}"
        )
    out = Path(args.output)
    fmt = args.format or {".jpg": "jpeg", ".jpeg": "jpeg", ".png": "png", ".webp": "webp"}.get(
        out.suffix.lower(), "png"
    )
    fields = {
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "steps": args.steps,
        "guidance_scale": args.cfg,
        "width": args.width,
        "height": args.height,
        "seed": args.seed,
        "shift": args.shift,
        "sampler": args.sampler,
        "scheduler": args.scheduler,
        "output_format": fmt,
        "output_quality": args.quality,
        "num_images": args.num_images,
    }
    request = build_request(fields, model=preset_id, preset=settings.presets[preset_id])
    engine = _load_engine(settings, settings.weights_for(preset_id))
    with tqdm(total=request.steps, desc="denoising", unit="step", file=sys.stderr) as bar:

        def on_step(step: int, total: int) -> None:
            bar.update(step - bar.n)

        (result,) = engine.generate([request], on_step=on_step)
    paths = []
    for i, (image, seed) in enumerate(zip(result.images, result.seeds, strict=True)):
        path = out if len(result.images) == 1 else out.with_stem(f"{out.stem}-{i}")
        metadata = generation_metadata(request, seed=seed, prompt_used=result.prompt_used)
        metadata.update(width=result.width, height=result.height)
        path.write_bytes(encode_image(image, fmt, request.output_quality, metadata=metadata))
        paths.append(str(path))
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(
        json.dumps(
            {
                "files": paths,
                "seeds": result.seeds,
                "width": result.width,
                "height": result.height,
                "seconds": round(result.engine_seconds, 3),
            }
        )
    )
    return 0


# --- admin commands ---------------------------------------------------------------------------


def _refuse(message: str) -> int:
    print(f"auraserve: {message}", file=sys.stderr)
    return 2


def cmd_keys(args: argparse.Namespace) -> int:
    from auraserve.store import keys

    if args.keys_cmd == "create" and args.account and args.credits is not None:
        return _refuse(
            "--credits is for a new account; give an existing account credits with "
            f"`auraserve credits grant {args.account} N`"
        )
    if args.keys_cmd == "create" and args.account and args.admin:
        return _refuse(
            "--admin makes a new admin account; an existing account stays what it is "
            "(make an operator account with `auraserve keys create --name NAME --admin`)"
        )
    # Only a new account makes sense on a new store; everything else needs existing rows.
    may_create = args.keys_cmd == "create" and not args.account
    runtime = _open_admin(args, may_create=may_create)
    try:
        if args.keys_cmd == "create":
            if args.account:
                try:
                    created = keys.create_key(runtime.db, args.account, args.name)
                except LookupError:
                    return _refuse(f"--account {args.account}: no such account in this store")
            else:
                created = keys.create_account(
                    runtime.db, args.name, credits=args.credits or 0, is_admin=args.admin
                )
            record = {
                "key": created.key,
                "key_id": created.key_id,
                "account_id": created.account_id,
                "credits": created.credits,
                "webhook_secret": created.webhook_secret,
                "name": created.name,
            }
            if args.admin:
                record["admin"] = True
            if args.json:
                print(json.dumps(record))
            else:
                print(f"API key (shown once): {created.key}")
                print(
                    f"key id {created.key_id}, account {created.account_id}, "
                    f"credits {created.credits}"
                )
                print(f"webhook signing secret: {created.webhook_secret}")
                if args.admin:
                    print("admin account: its keys may also read GET /v2/workers")
        elif args.keys_cmd == "list":
            rows = keys.list_keys(runtime.db)
            if args.json:
                print(json.dumps([r.__dict__ for r in rows]))
            for r in rows if not args.json else []:
                state = "revoked" if r.revoked_at else "active"
                print(f"{r.key_id}\t{r.account_id}\t{state}\t{r.name}")
        elif args.keys_cmd == "revoke":
            if not keys.revoke_key(runtime.db, args.key_id):
                print(f"no active key {args.key_id}", file=sys.stderr)
                return 1
            print(f"revoked {args.key_id}")
        elif args.keys_cmd == "webhook-secret":
            try:
                current = keys.webhook_secrets(runtime.db, args.account)
            except LookupError:
                return _refuse(f"{args.account}: no such account in this store")
            if args.json:
                print(json.dumps({"account_id": args.account, "webhook_secrets": list(current)}))
            else:
                print("\n".join(current))
        elif args.keys_cmd == "rotate-webhook-secret":
            try:
                rotation = keys.rotate_webhook_secret(
                    runtime.db, args.account, grace_seconds=args.grace_hours * 3600
                )
            except LookupError:
                return _refuse(f"{args.account}: no such account in this store")
            until = datetime.fromtimestamp(rotation.previous_until, UTC).isoformat(
                timespec="seconds"
            )
            if args.json:
                print(
                    json.dumps(
                        {
                            "account_id": rotation.account_id,
                            "webhook_secret": rotation.secret,
                            "previous_webhook_secret": rotation.previous_secret,
                            "previous_signs_until": until,
                        }
                    )
                )
            else:
                print(f"new webhook signing secret: {rotation.secret}")
                print(f"the previous secret keeps signing beside it until {until}")
    finally:
        runtime.close()
    return 0


def cmd_credits(args: argparse.Namespace) -> int:
    from auraserve.store import ledger

    runtime = _open_admin(args, may_create=False)
    try:
        if args.credits_cmd == "grant":
            try:
                balance = ledger.grant(runtime.db, args.account_id, args.amount, note="cli grant")
            except LookupError:
                return _refuse(f"no account {args.account_id} in this store")
        else:
            try:
                balance = ledger.balance(runtime.db, args.account_id)
            except LookupError:
                # Status 1, not 2: the question was well formed and the answer is "none".
                print(f"no account {args.account_id}", file=sys.stderr)
                return 1
        print(json.dumps({"account_id": args.account_id, "credits": balance}))
    finally:
        runtime.close()
    return 0


def cmd_workers(args: argparse.Namespace) -> int:
    import time

    from auraserve.store import workers as registry

    runtime = _open_admin(args, may_create=False)
    try:
        stale = runtime.settings.worker_stale_seconds
        now = time.time()
        rows = [
            w
            for w in registry.list_workers(runtime.db)
            if args.all or w.stopped_at is None or now - w.stopped_at < _RECENTLY_STOPPED
        ]
        if args.json:
            print(json.dumps(registry.report(rows, stale_seconds=stale, now=now)))
            return 0
        if not rows:
            print("no workers have registered with this store", file=sys.stderr)
            return 0
        table = [("ID", "HOST", "PID", "STATE", "LIVENESS", "SEEN", "JOBS", "MODELS", "DEVICE")]
        for w in rows:
            table.append(
                (
                    w.id,
                    w.host,
                    str(w.pid),
                    w.state,
                    w.liveness(stale, now),
                    f"{max(0.0, now - w.last_seen_at):.0f}s ago",
                    str(w.jobs_done),
                    ",".join(w.models),
                    w.device,
                )
            )
        widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
        for row in table:
            cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
            print("  ".join([*cells, row[-1]]))
        print(
            f"live: heard from within {stale:g} s (AURASERVE_WORKER_STALE_SECONDS); "
            "stale: not heard from since (crashed or cut off); its leased jobs are requeued "
            "by any serving process once their lease expires",
            file=sys.stderr,
        )
    finally:
        runtime.close()
    return 0


# `auraserve workers` hides workers that stopped longer ago than this (--all shows them).
_RECENTLY_STOPPED = 3600.0


def cmd_db(args: argparse.Namespace) -> int:
    runtime = _open_admin(args, may_create=True)  # opening migrates
    print(f"store at head revision ({store_label(runtime.settings)})")
    runtime.close()
    return 0


# --- command line -----------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse, but a command-line mistake ends with one line instead of the usage text."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {minimum} or more, not {value}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="auraserve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"auraserve {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        parent: Any, name: str, help: str, *, settings: str, epilog: bool = False
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(
            name,
            help=help,
            description=help,
            epilog=_other_settings_epilog(settings) if epilog else None,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _add_setting_flags(p, settings)
        return p

    serve = command(
        sub, "serve", "run the API and its in-process workers", settings="serve", epilog=True
    )
    serve.add_argument("--access-log", action="store_true", help="log every request")
    serve.set_defaults(func=cmd_serve)

    worker = command(
        sub,
        "worker",
        "run a worker alone against the configured store",
        settings="worker",
        epilog=True,
    )
    worker.set_defaults(func=cmd_worker)

    gen = command(
        sub, "generate", "make images locally, without a server or store", settings="generate"
    )
    gen.add_argument("prompt", help="what to draw")
    gen.add_argument(
        "-o", "--output", required=True, help="output file; its suffix picks the format"
    )
    gen.add_argument("--preset", help="model preset for defaults (default auraflow-v0-3)")
    gen.add_argument("--negative-prompt", default="", help="what to keep out of the image")
    gen.add_argument("--steps", type=int, help="denoising steps (default: the preset's)")
    gen.add_argument("--cfg", type=float, help="guidance scale (default: the preset's)")
    gen.add_argument("--width", type=int, help="width in pixels, rounded to a multiple of 16")
    gen.add_argument("--height", type=int, help="height in pixels, rounded to a multiple of 16")
    gen.add_argument("--seed", type=int, help="seed of the first image (default: random)")
    gen.add_argument("--shift", type=float, help="timestep shift (default: the preset's)")
    gen.add_argument("--sampler", help="sampler name, as in ComfyUI (default: the preset's)")
    gen.add_argument("--scheduler", help="scheduler name, as in ComfyUI (default: the preset's)")
    gen.add_argument(
        "--format",
        choices=["png", "webp", "jpeg"],
        help="image format (default: from the output file's suffix, else png)",
    )
    gen.add_argument("--quality", type=int, help="JPEG/WebP quality (default: the preset's)")
    gen.add_argument("-n", "--num-images", type=int, default=1, help="images to make (default 1)")
    gen.set_defaults(func=cmd_generate)

    keys_p = sub.add_parser("keys", help="manage API keys", description="manage API keys")
    keys_sub = keys_p.add_subparsers(dest="keys_cmd", required=True, metavar="ACTION")
    create = command(
        keys_sub, "create", "new account and key (or another key for --account)", settings="keys"
    )
    create.add_argument("--name", required=True, help="a name for the account and the key")
    create.add_argument(
        "--credits",
        type=_at_least(0),
        help="credits the new account starts with (default 0)",
    )
    create.add_argument("--account", help="add a key to this existing account instead")
    create.add_argument(
        "--admin",
        action="store_true",
        help="make the new account an operator's: its keys may also read GET /v2/workers",
    )
    create.add_argument("--json", action="store_true", help="print one JSON object")
    lst = command(keys_sub, "list", "list keys (never the keys themselves)", settings="keys")
    lst.add_argument("--json", action="store_true", help="print one JSON array")
    revoke = command(keys_sub, "revoke", "revoke a key by id", settings="keys")
    revoke.add_argument("key_id", help="the key id (16 hex characters, shown by keys list)")
    secret = command(
        keys_sub, "webhook-secret", "show an account's webhook signing secrets", settings="keys"
    )
    secret.add_argument("account", metavar="ACCOUNT", help="the account id (acct_…)")
    secret.add_argument("--json", action="store_true", help="print one JSON object")
    rotate = command(
        keys_sub,
        "rotate-webhook-secret",
        "new webhook signing secret; the old one keeps signing for a grace period",
        settings="keys",
    )
    rotate.add_argument("account", metavar="ACCOUNT", help="the account id (acct_…)")
    rotate.add_argument(
        "--grace-hours",
        type=_at_least(0),
        default=24,
        help="hours the previous secret keeps signing beside the new one (default 24)",
    )
    rotate.add_argument("--json", action="store_true", help="print one JSON object")
    keys_p.set_defaults(func=cmd_keys)

    credits = sub.add_parser(
        "credits", help="grant or show credits", description="grant or show credits"
    )
    credits_sub = credits.add_subparsers(dest="credits_cmd", required=True, metavar="ACTION")
    grant = command(credits_sub, "grant", "add credits to an account", settings="credits")
    grant.add_argument("account_id", help="the account (acct_…)")
    grant.add_argument("amount", type=_at_least(1), help="credits to add")
    show = command(credits_sub, "show", "show an account's balance", settings="credits")
    show.add_argument("account_id", help="the account (acct_…)")
    credits.set_defaults(func=cmd_credits)

    workers = command(
        sub,
        "workers",
        "list the workers registered with the store: live, stale or stopped",
        settings="workers",
    )
    workers.add_argument(
        "--all", action="store_true", help="also workers that stopped over an hour ago"
    )
    workers.add_argument("--json", action="store_true", help="print one JSON object")
    workers.set_defaults(func=cmd_workers)

    db = command(sub, "db", "apply migrations to the configured store", settings="db")
    db.add_argument("action", choices=["upgrade"], help="upgrade: migrate to the newest schema")
    db.set_defaults(func=cmd_db)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    # Text unless AURASERVE_LOG_FORMAT=json; `_settings` sets it again from the settings.
    configure_logging(os.environ.get("AURASERVE_LOG_FORMAT", "text"), verbose=args.verbose)
    try:
        code = args.func(args)
    except ConfigError as exc:
        print(f"auraserve: {exc.message}", file=sys.stderr)
        code = 2
    except RequestError as exc:  # e.g. `generate --steps 0`: the message names the field
        print(f"auraserve: {exc.message}", file=sys.stderr)
        code = 2
    except (ModelLoadError, AuraserveError) as exc:
        print(f"auraserve: {exc.message}", file=sys.stderr)
        code = 1
    sys.exit(code)
