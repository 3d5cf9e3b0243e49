"""Progress bars (tqdm) for the long steps of a start: migrations and loading the model.

They draw only on a terminal (tqdm's `disable=None`): logs and scripts that read stderr get the
plain lines, not carriage-return redraws."""

from __future__ import annotations

import shutil
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tqdm import tqdm


def _size() -> dict[str, int]:
    # A terminal that reports no size (0x0: some ptys, `script`, serial consoles) would get no
    # bar at all from tqdm's own sizing; shutil falls back to $COLUMNS/$LINES, then 80x24.
    columns, lines = shutil.get_terminal_size()
    return {"ncols": columns, "nrows": lines}


@contextmanager
def migration_bar() -> Iterator[Callable[[int, int], None]]:
    """An `on_step(done, total)` for Store.migrate; draws only once a migration starts."""
    bar: tqdm[None] | None = None

    def on_step(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(
                total=total,
                desc="migrating the store",
                unit="revision",
                file=sys.stderr,
                disable=None,
                **_size(),
            )
        bar.update(done - bar.n)

    try:
        yield on_step
    finally:
        if bar is not None:
            bar.close()


@contextmanager
def elapsed_bar(desc: str) -> Iterator[None]:
    """A bar for a step that reports no progress of its own (loading weights): it shows that
    the process is alive and for how long it has been at it."""
    bar = tqdm(desc=desc, bar_format="{desc} {elapsed}", file=sys.stderr, disable=None, **_size())
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(0.5):
            bar.refresh()

    ticker = threading.Thread(target=tick, name="progress", daemon=True)
    if not bar.disable:
        ticker.start()
    try:
        yield
    finally:
        stop.set()
        if ticker.is_alive():
            ticker.join()
        bar.close()
