"""The `auraserve` command: serve, worker, generate, keys, credits, db.

Errors a user can fix (bad configuration, weights that cannot be loaded) end the command with
one line that says what went wrong and what to do, and exit status 2 (configuration) or 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from auraserve import __version__
from auraserve.config import ConfigError, Settings, load_settings
from auraserve.errors import AuraserveError, ModelLoadError

log = logging.getLogger("auraserve")


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(
        host=getattr(args, "host", None),
        port=getattr(args, "port", None),
        data_dir=getattr(args, "data_dir", None),
        model=getattr(args, "model", None),
        workers=getattr(args, "workers", None),
    )


def _load_engine(settings: Settings, weights: str) -> Any:
    from auraserve.engine.expand import make_expander
    from auraserve.engine.pipeline import load_engine

    print(f"loading model {weights} …", file=sys.stderr, flush=True)
    engine = load_engine(
        weights,
        device=settings.device,
        dtype=settings.dtype,
        offload=settings.offload,
        max_rows=settings.max_rows,
        options=settings.engine_mode,
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
    import uvicorn

    from auraserve.api.app import create_app
    from auraserve.runtime import Runtime

    settings = _settings(args)
    weights = settings.weights_for(settings.default_preset)
    engine = _load_engine(settings, weights) if settings.workers else None
    runtime = Runtime.open(settings, engine=engine)
    created = runtime.bootstrap_key(settings.bootstrap_credits)
    if created is not None:
        print(
            "\nFirst start: created account "
            f"{created.account_id} with {created.credits} credits and this API key "
            f"(shown once, keep it):\n\n    {created.key}\n\n"
            "Make more with: auraserve keys create --name NAME --credits N\n",
            flush=True,
        )
    for _ in range(settings.workers):
        runtime.start_worker(models=_served_models(settings, weights))
    app = create_app(runtime, owns_runtime=True)
    print(
        f"auraserve {__version__} listening on http://{settings.host}:{settings.port} "
        f"(store: {'SQLite' if runtime.db.is_sqlite else 'PostgreSQL'}, "
        f"models: {', '.join(_served_models(settings, weights))})",
        flush=True,
    )
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level="warning" if not args.verbose else "info",
        access_log=args.access_log,
        timeout_graceful_shutdown=30,
    )
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from auraserve.runtime import Runtime
    from auraserve.worker.loop import Worker

    settings = _settings(args)
    weights = settings.weights_for(settings.default_preset)
    engine = _load_engine(settings, weights)
    runtime = Runtime.open(settings, engine=engine)
    runtime.db.start_listener()
    worker = Worker(
        db=runtime.db,
        settings=settings,
        engine=engine,
        media=runtime.media,
        models=_served_models(settings, weights),
    )
    stop = threading.Event()

    def _on_signal(signum: int, _frame: Any) -> None:
        print("stopping after the current batch …", file=sys.stderr, flush=True)
        stop.set()
        worker.stop(timeout=0)

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    print(f"worker {worker.worker_id} ready (models: {', '.join(worker.models)})", flush=True)
    worker.run()
    runtime.close()
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from auraserve.core.request import build_request
    from auraserve.media.encode import encode_image

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
        metadata = {
            "prompt": result.prompt_used,
            "negative_prompt": request.negative_prompt,
            "steps": request.steps,
            "sampler": request.sampler,
            "scheduler": request.scheduler,
            "cfg": request.guidance_scale,
            "shift": request.shift,
            "seed": seed,
            "width": result.width,
            "height": result.height,
            "model": preset_id,
        }
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


def _open_admin(args: argparse.Namespace) -> Any:
    from auraserve.runtime import Runtime

    return Runtime.open(_settings(args))


def cmd_keys(args: argparse.Namespace) -> int:
    from auraserve.store import keys

    runtime = _open_admin(args)
    try:
        if args.keys_cmd == "create":
            if args.account:
                created = keys.create_key(runtime.db, args.account, args.name)
            else:
                created = keys.create_account(runtime.db, args.name, credits=args.credits)
            record = {
                "key": created.key,
                "key_id": created.key_id,
                "account_id": created.account_id,
                "credits": created.credits,
                "webhook_secret": created.webhook_secret,
                "name": created.name,
            }
            if args.json:
                print(json.dumps(record))
            else:
                print(f"API key (shown once): {created.key}")
                print(
                    f"key id {created.key_id}, account {created.account_id}, "
                    f"credits {created.credits}"
                )
                print(f"webhook signing secret: {created.webhook_secret}")
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
    finally:
        runtime.close()
    return 0


def cmd_credits(args: argparse.Namespace) -> int:
    from auraserve.store import ledger

    runtime = _open_admin(args)
    try:
        if args.credits_cmd == "grant":
            if args.amount <= 0:
                print("amount must be a positive integer", file=sys.stderr)
                return 2
            balance = ledger.grant(runtime.db, args.account_id, args.amount, note="cli grant")
        else:
            balance = ledger.balance(runtime.db, args.account_id)
        print(json.dumps({"account_id": args.account_id, "credits": balance}))
    except LookupError:
        print(f"no account {args.account_id}", file=sys.stderr)
        return 1
    finally:
        runtime.close()
    return 0


def cmd_db(args: argparse.Namespace) -> int:
    runtime = _open_admin(args)  # opening migrates
    print(f"store at head revision ({'SQLite' if runtime.db.is_sqlite else 'PostgreSQL'})")
    runtime.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="auraserve", description=__doc__)
    parser.add_argument("--version", action="version", version=f"auraserve {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, *, model: bool = False) -> None:
        p.add_argument("--data-dir", type=Path, help="data directory (default ./.auraserve)")
        if model:
            p.add_argument(
                "--model",
                help="weights: a Hugging Face id (default fal/AuraFlow-v0.3), a local "
                "diffusers directory, or 'tiny' (random test model that draws noise)",
            )

    serve = sub.add_parser("serve", help="run the API and one in-process worker")
    serve.add_argument("--host", help="listen address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (default 8000)")
    serve.add_argument("--access-log", action="store_true", help="log every request")
    serve.add_argument("--workers", type=int, help="in-process workers (default 1; 0 = API only)")
    common(serve, model=True)
    serve.set_defaults(func=cmd_serve)

    worker = sub.add_parser("worker", help="run a worker alone against the configured store")
    common(worker, model=True)
    worker.set_defaults(func=cmd_worker)

    gen = sub.add_parser("generate", help="make images locally, without a server")
    gen.add_argument("prompt")
    gen.add_argument("-o", "--output", required=True, help="output file (.webp, .png, .jpg)")
    gen.add_argument("--preset", help="model preset for defaults (default auraflow-v0-3)")
    gen.add_argument("--negative-prompt", default="")
    gen.add_argument("--steps", type=int)
    gen.add_argument("--cfg", type=float)
    gen.add_argument("--width", type=int)
    gen.add_argument("--height", type=int)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--shift", type=float)
    gen.add_argument("--sampler")
    gen.add_argument("--scheduler")
    gen.add_argument("--format", choices=["png", "webp", "jpeg"])
    gen.add_argument("--quality", type=int)
    gen.add_argument("-n", "--num-images", type=int, default=1)
    common(gen, model=True)
    gen.set_defaults(func=cmd_generate)

    keys_p = sub.add_parser("keys", help="manage API keys")
    keys_sub = keys_p.add_subparsers(dest="keys_cmd", required=True)
    create = keys_sub.add_parser("create", help="new account and key (or key for --account)")
    create.add_argument("--name", required=True)
    create.add_argument("--credits", type=int, default=0)
    create.add_argument("--account", help="add a key to this existing account")
    create.add_argument("--json", action="store_true")
    common(create)
    lst = keys_sub.add_parser("list", help="list keys")
    lst.add_argument("--json", action="store_true")
    common(lst)
    revoke = keys_sub.add_parser("revoke", help="revoke a key by id")
    revoke.add_argument("key_id")
    common(revoke)
    keys_p.set_defaults(func=cmd_keys)

    credits = sub.add_parser("credits", help="grant or show credits")
    credits_sub = credits.add_subparsers(dest="credits_cmd", required=True)
    grant = credits_sub.add_parser("grant")
    grant.add_argument("account_id")
    grant.add_argument("amount", type=int)
    common(grant)
    show = credits_sub.add_parser("show")
    show.add_argument("account_id")
    common(show)
    credits.set_defaults(func=cmd_credits)

    db = sub.add_parser("db", help="apply migrations to the configured store")
    db.add_argument("action", choices=["upgrade"])
    common(db)
    db.set_defaults(func=cmd_db)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        code = args.func(args)
    except ConfigError as exc:
        print(f"auraserve: {exc}", file=sys.stderr)
        code = 2
    except ModelLoadError as exc:
        print(f"auraserve: {exc.message}", file=sys.stderr)
        code = 1
    except AuraserveError as exc:
        print(f"auraserve: {exc.message}", file=sys.stderr)
        code = 1
    sys.exit(code)
