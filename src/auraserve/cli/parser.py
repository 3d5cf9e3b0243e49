"""The command line: every command, its flags and its help, and `main`."""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from auraserve import __version__
from auraserve.cli import admin, engine, service
from auraserve.cli.flags import add_setting_flags, other_settings_epilog
from auraserve.errors import (
    AuraserveError,
    BadWeights,
    ConfigError,
    ModelLoadError,
    RequestError,
)
from auraserve.observability.logs import configure_logging

DESCRIPTION = """\
Self-hosted text-to-image API for AuraFlow. Start with `auraserve serve --model tiny` (a random
test model) or `auraserve serve` (AuraFlow v0.3), then open the playground URL it prints.

Every command takes --json for machine-readable output on stdout; notes go to stderr.
Exit status: 0 done; 1 the command ran and the answer is no (no such account to show, no
active key to revoke) or the weights cannot be loaded; 2 the command cannot run as given (a
wrong flag or value, an invalid setting, a store that is not there or cannot be reached, bad
weights: a truncated file, another architecture, a shape or quant type that does not fit).
"""


_FLAG_GIVEN = (
    "needed for a --data-dir given on this command line; the configured store is made on a "
    "first start without it"
)
_SUBCOMMAND_HINT = "Run `{prog} {metavar} --help` for the flags of one, e.g. `{example}`."


class _Parser(argparse.ArgumentParser):
    """argparse, with this command's own usage and a did-you-mean on a mistake; the last line
    on stderr names the problem."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(
            2, f"{self.prog}: {message}{self._suggestion(message)} (see {self.prog} --help)\n"
        )

    def _suggestion(self, message: str) -> str:
        choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if choice:
            options = re.findall(r"'([^']*)'", choice.group(2)) or choice.group(2).split(", ")
            close = difflib.get_close_matches(choice.group(1), options, n=1, cutoff=0.5)
            return f"; did you mean {close[0]!r}?" if close else ""
        if message.startswith("unrecognized arguments: "):
            hints = []
            for word in message.removeprefix("unrecognized arguments: ").split():
                if not word.startswith("-"):
                    continue
                flag = word.split("=", 1)[0]
                close = difflib.get_close_matches(flag, list(self._option_string_actions), n=1)
                if close:
                    hints.append(f"did you mean {close[0]} for {flag}?")
            return "; " + "; ".join(hints) if hints else ""
        return ""


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
        description=DESCRIPTION,
        epilog=_SUBCOMMAND_HINT.format(
            prog="auraserve", metavar="COMMAND", example="auraserve serve --help"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"auraserve {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        parent: Any,
        name: str,
        help: str,
        *,
        settings: str,
        epilog: bool = False,
        json_help: str = "print JSON on stdout instead of text",
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(
            name,
            help=help,
            description=help,
            epilog=other_settings_epilog(settings) if epilog else None,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        add_setting_flags(p, settings)
        p.add_argument("--json", action="store_true", help=json_help)
        # An unknown flag is reported by this command's parser (main), with its usage.
        p.set_defaults(parser=p)
        return p

    def may_create(p: argparse.ArgumentParser, what: str) -> None:
        p.add_argument(
            "--create",
            action="store_true",
            help=f"make a new, empty store if none is there yet ({what})",
        )

    serve = command(
        sub, "serve", "run the API and its in-process workers", settings="serve", epilog=True
    )
    serve.add_argument("--access-log", action="store_true", help="log every request")
    may_create(serve, _FLAG_GIVEN)
    serve.add_argument(
        "--parallel",
        help="one image across several processes for the in-process workers: cfg=2, "
        "ulysses=N or cfg=2,ulysses=N (cfg·N ranks, started here; this process claims and "
        "settles, every rank computes)",
    )
    serve.set_defaults(func=service.cmd_serve)

    worker = command(
        sub,
        "worker",
        "run a worker alone against the configured store",
        settings="worker",
        epilog=True,
    )
    may_create(worker, _FLAG_GIVEN)
    worker.add_argument(
        "--models",
        help="preset ids to load and claim jobs for, comma separated (default: every preset "
        "this machine can hold; presets sharing weights share one load)",
    )
    worker.add_argument(
        "--parallel",
        help="one image across several processes: cfg=2, ulysses=N or cfg=2,ulysses=N "
        "(cfg·N ranks, started here; this process claims and settles the jobs, every rank "
        "computes)",
    )
    worker.set_defaults(func=service.cmd_worker)

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
    gen.add_argument(
        "--parallel",
        help="one image across several processes: cfg=2 runs the uncond and cond rows of "
        "every transformer call on two ranks, ulysses=N splits its tokens over N ranks (N "
        "divides the heads: 2, 3, 4, 6 or 12 for AuraFlow), cfg=2,ulysses=N does both on 2·N "
        "ranks (gloo on the CPU, nccl on one GPU per rank), started here; same image as one "
        "process",
    )
    gen.set_defaults(func=engine.cmd_generate)

    keys_p, keys_sub = _group(sub, "keys", "manage API keys", "auraserve keys create --help")
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
        help=(
            "make the new account an operator's: its keys reach the admin API (/v2/admin/...,"
            " the playground's Admin tab) and GET /v2/workers"
        ),
    )
    may_create(
        create,
        "never made without it: a key in a store that the server does not read is useless",
    )
    command(keys_sub, "list", "list keys (never the keys themselves)", settings="keys")
    revoke = command(keys_sub, "revoke", "revoke a key by id", settings="keys")
    revoke.add_argument("key_id", help="the key id (16 hex characters, shown by keys list)")
    secret = command(
        keys_sub, "webhook-secret", "show an account's webhook signing secrets", settings="keys"
    )
    secret.add_argument("account", metavar="ACCOUNT", help="the account id (acct_…)")
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
    keys_p.set_defaults(func=admin.cmd_keys)

    credits, credits_sub = _group(
        sub, "credits", "grant or show credits", "auraserve credits grant --help"
    )
    grant = command(credits_sub, "grant", "add credits to an account", settings="credits")
    grant.add_argument("account_id", help="the account (acct_…)")
    grant.add_argument("amount", type=_at_least(1), help="credits to add")
    show = command(credits_sub, "show", "show an account's balance", settings="credits")
    show.add_argument("account_id", help="the account (acct_…)")
    credits.set_defaults(func=admin.cmd_credits)

    workers = command(
        sub,
        "workers",
        "list the workers registered with the store: live, stale or stopped",
        settings="workers",
    )
    workers.add_argument(
        "--all", action="store_true", help="also workers that stopped over an hour ago"
    )
    workers.set_defaults(func=admin.cmd_workers)

    _models, models_sub = _group(
        sub, "models", "look at weights files", "auraserve models inspect --help"
    )
    inspect = command(
        models_sub,
        "inspect",
        "what a weights file holds (format, layout, architecture, dtypes, components), read "
        "from its header alone; exit 2 if it cannot be served",
        settings="models",
    )
    inspect.add_argument("path", metavar="PATH", help="a .safetensors or .gguf file")
    inspect.set_defaults(func=engine.cmd_models_inspect)

    db = command(sub, "db", "apply migrations to the configured store", settings="db")
    db.add_argument("action", choices=["upgrade"], help="upgrade: migrate to the newest schema")
    may_create(db, _FLAG_GIVEN)
    db.set_defaults(func=admin.cmd_db)
    return parser


def main(argv: list[str] | None = None) -> None:
    try:
        _main(argv)
    except BrokenPipeError:
        # The reader went away (`auraserve keys list | head -1`): stop quietly, as `cat` does,
        # with the status a shell gives a process killed by SIGPIPE. Python ignores SIGPIPE, so
        # without this the write raises, and so would the flush at exit: stdout goes to
        # /dev/null first so that last flush has somewhere to go.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(128 + 13)


def _main(argv: list[str] | None) -> None:
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:
        # The command's own parser reports it: its usage, and a did-you-mean for its flags.
        getattr(args, "parser", parser).error(f"unrecognized arguments: {' '.join(extras)}")
    # Text unless AURASERVE_LOG_FORMAT=json; `settings_from` sets it again from the settings.
    configure_logging(os.environ.get("AURASERVE_LOG_FORMAT", "text"), verbose=args.verbose)
    try:
        code = args.func(args)
    except ConfigError as exc:
        print(f"auraserve: {exc.message}", file=sys.stderr)
        code = 2
    except RequestError as exc:  # e.g. `generate --steps 0`: the message names the field
        print(f"auraserve: {exc.message}", file=sys.stderr)
        code = 2
    except BadWeights as exc:  # the same weights will never load: a usage error
        print(f"auraserve: {exc.message}", file=sys.stderr)
        code = 2
    except (ModelLoadError, AuraserveError) as exc:
        print(f"auraserve: {exc.message}", file=sys.stderr)
        code = 1
    sys.exit(code)


def _group(
    sub: Any, name: str, help_text: str, example: str
) -> tuple[argparse.ArgumentParser, Any]:
    """A command with actions of its own (`keys create`, …): its parser and its actions'."""
    group = sub.add_parser(
        name,
        help=help_text,
        description=help_text,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_SUBCOMMAND_HINT.format(prog=f"auraserve {name}", metavar="ACTION", example=example),
    )
    actions = group.add_subparsers(dest=f"{name}_cmd", required=True, metavar="ACTION")
    return group, actions
