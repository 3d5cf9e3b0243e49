"""The store a command works on: where it is, whether it exists, opening it.

When a store is created (the choice, README "Command line"):
- `serve`, `worker` and `db upgrade` create the store at the configured location on their
  first start when that location is the default data dir or comes from the environment or the
  settings file: that is a deployment's first start (the quick start, Docker, Compose,
  Kubernetes' migrate job), and a typo there shows on every start after.
- A location given on this command line (`--data-dir`) that holds no store is refused unless
  `--create` is given too: a mistyped path would otherwise become a new, empty store.
- `keys create` makes a store only with `--create`, wherever it is: a key made in a store the
  server never reads is the mistake this guards against.
- Every other command needs rows that are already there and refuses a missing store.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from auraserve.cli.flags import given_flags, settings_from
from auraserve.config import Settings, setting_origin
from auraserve.errors import ConfigError

if TYPE_CHECKING:
    from auraserve.runtime import Runtime
    from auraserve.store.db import Store


def store_label(settings: Settings) -> str:
    """Where the store is, for people (its driver's label: no password)."""
    from auraserve.store.drivers import open_driver

    return open_driver(settings.resolved_database_url).label()


def store_setting(args: argparse.Namespace) -> str:
    """What chose the store, as the user wrote it: the flag, variable or settings-file key."""
    flags = given_flags(args)
    database = setting_origin("database_url", flags)
    if database is not None:
        return database
    return setting_origin("data_dir", flags) or "the default data dir"


def store_exists(settings: Settings) -> bool:
    from auraserve.store.drivers import open_driver

    return open_driver(settings.resolved_database_url).exists()


@contextmanager
def reaching_store(settings: Settings, origin: str) -> Iterator[None]:
    """A store that cannot be reached (server down, no such database, a data dir that cannot
    be written) is a setting to fix: one line with the driver's own first line of cause."""
    from sqlalchemy.exc import DBAPIError

    from auraserve.errors import StoreUnavailable

    try:
        yield
    except DBAPIError as exc:
        reason = str(exc.orig or exc).strip().splitlines()[0]
    except StoreUnavailable as exc:
        reason = exc.message
    except OSError as exc:
        reason = f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc)
    else:
        return
    raise ConfigError(
        f"cannot open the store {store_label(settings)}: {reason} (check {origin})"
    ) from None


@dataclass(frozen=True)
class StorePolicy:
    """Whether this command may create a store that is not there (module docstring)."""

    makes_stores: bool  # serve, worker, db upgrade, keys create (a new account)
    implicit: bool  # creates one at a configured (not flag-given) location without --create


NEEDS_ROWS = StorePolicy(makes_stores=False, implicit=False)
FIRST_START = StorePolicy(makes_stores=True, implicit=True)
ON_REQUEST = StorePolicy(makes_stores=True, implicit=False)


def check_store(args: argparse.Namespace, settings: Settings, policy: StorePolicy) -> bool:
    """Reach the store and refuse a missing one this command may not create; True when it is
    there already. Runs before anything slow (the model), so a wrong setting shows at once."""
    origin = store_setting(args)
    with reaching_store(settings, origin):
        exists = store_exists(settings)
    if exists:
        return True
    asked = bool(getattr(args, "create", False))
    flag_given = "data_dir" in given_flags(args) and not settings.database_url
    if policy.makes_stores and (asked or (policy.implicit and not flag_given)):
        return False
    label = store_label(settings)
    if policy.makes_stores:
        raise ConfigError(
            f"no store at {label} (from {origin}): check the path, or add --create to "
            "make a new, empty store there"
        )
    raise ConfigError(
        f"no store at {label} (from {origin}): run this where the server runs, or point "
        "--data-dir (AURASERVE_DATA_DIR) or AURASERVE_DATABASE_URL at the server's store"
    )


def open_runtime(args: argparse.Namespace, settings: Settings, *, progress: bool = True) -> Runtime:
    """Open the store (migrating it, with a progress bar on a terminal) and check the media
    bucket when media go to S3."""
    from auraserve.cli.progress import migration_bar
    from auraserve.runtime import Runtime

    with reaching_store(settings, store_setting(args)):
        if progress:
            with migration_bar() as on_step:
                runtime = Runtime.open(settings, on_migration_step=on_step)
        else:
            runtime = Runtime.open(settings)
    try:
        check_media(settings, runtime)
    except BaseException:
        runtime.close()
        raise
    return runtime


def check_media(settings: Settings, runtime: Runtime) -> None:
    """An S3 bucket that cannot be reached fails the start, not the first finished job."""
    check: Callable[[], None] | None = getattr(runtime.media, "check", None)
    if not settings.media_url or check is None:
        return
    from botocore.exceptions import BotoCoreError, ClientError

    origin = setting_origin("media_url", {}) or "AURASERVE_MEDIA_URL"
    try:
        check()
    except ClientError as exc:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", "?"))
        reason = {
            "404": "no such bucket",
            "NoSuchBucket": "no such bucket",
            "403": "access denied (check the S3 credentials: AURASERVE_S3_ACCESS_KEY_ID or "
            "AWS_ACCESS_KEY_ID)",
        }.get(code, f"{code} {error.get('Message', '')}".strip())
    except BotoCoreError as exc:
        reason = str(exc)
    else:
        return
    raise ConfigError(f"cannot reach the media bucket {settings.media_url}: {reason} ({origin})")


def open_admin(
    args: argparse.Namespace, policy: StorePolicy = NEEDS_ROWS
) -> tuple[Settings, Store]:
    """Open the configured store for an admin command (the store only: no media, no
    maintenance, no runtime) and say on stderr which one it is.

    A store that does not exist is refused unless `policy` lets this command create it (module
    docstring): the command was most likely run from another directory than the server, and
    an empty new store would hand out keys and credits that the server never sees."""
    from auraserve.cli.progress import migration_bar
    from auraserve.runtime import open_store

    settings = settings_from(args)
    exists = check_store(args, settings, policy)
    with reaching_store(settings, store_setting(args)), migration_bar() as on_step:
        store = open_store(settings, on_step)
    note = "" if exists else " (new and empty: created by this command)"
    print(
        f"store: {store_label(settings)}{note}{new_server_key(store)}",
        file=sys.stderr,
        flush=True,
    )
    return settings, store


def new_server_key(store: Store) -> str:
    """Where a server key made by this process lives, for the line the command prints."""
    key = store.server_key
    if not key.created:
        return ""
    return f"; webhook secrets derive from the new server key {key.source} (0600): back it up"
