"""The SQLite driver: writers of different processes take turns on a lock file."""

from __future__ import annotations

import os
import sqlite3
import stat
import sys
import threading
from pathlib import Path

import pytest
from sqlalchemy import event, text

from auraserve.errors import StoreUnavailable
from auraserve.store.db import Store

# --- SQLite: writers of different processes take turns on a lock file -----------------------

if sys.platform != "win32":
    import fcntl

needs_flock = pytest.mark.skipif(sys.platform == "win32", reason="Windows has no flock")


def _sqlite(tmp_path: Path) -> Store:
    database = Store(f"sqlite:///{tmp_path / 'store.db'}")
    database.migrate()
    return database


def _held_elsewhere(path: Path) -> bool:
    """Whether someone holds the flock on `path`: asked through an open file of our own, which
    flock treats like another process's."""
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the lock if we got it
    return False


@needs_flock
def test_sqlite_writes_hold_a_private_lock_file_for_the_transaction_only(tmp_path: Path) -> None:
    db = _sqlite(tmp_path)
    try:
        lock = db.driver.writer_file_lock
        assert lock is not None and lock.path == tmp_path / "store.db.write-lock"
        assert stat.S_IMODE(lock.path.stat().st_mode) == 0o600
        with db.write() as conn:
            conn.execute(text("SELECT 1"))
            assert _held_elsewhere(lock.path)
        assert not _held_elsewhere(lock.path)
        with pytest.raises(RuntimeError), db.write():
            raise RuntimeError("rolled back")
        assert not _held_elsewhere(lock.path)  # released on the way out of a failure too
        with db.read():
            assert not _held_elsewhere(lock.path)  # readers never take it
    finally:
        db.dispose()


@needs_flock
def test_a_sqlite_writer_waits_for_another_process_and_goes_when_it_releases(
    tmp_path: Path,
) -> None:
    db = _sqlite(tmp_path)
    assert db.driver.writer_file_lock is not None
    other = os.open(db.driver.writer_file_lock.path, os.O_RDWR)  # plays the other process
    fcntl.flock(other, fcntl.LOCK_EX)
    done = threading.Event()

    def writer() -> None:
        with db.write() as conn:
            conn.execute(text("SELECT 1"))
        done.set()

    thread = threading.Thread(target=writer)
    try:
        thread.start()
        assert not done.wait(0.3)  # it waits on the lock file, not past it
        fcntl.flock(other, fcntl.LOCK_UN)
        assert done.wait(2.0)
    finally:
        os.close(other)
        thread.join()
        db.dispose()


@needs_flock
def test_a_writer_outside_the_lock_file_still_makes_writes_unavailable_not_errors(
    tmp_path: Path,
) -> None:
    """Tools that do not take the lock file (the sqlite3 shell) meet SQLite's busy handler:
    past busy_timeout the write is a 503 (StoreUnavailable), and the lock file is let go."""
    db = _sqlite(tmp_path)
    db.engine.dispose()
    event.listen(db.engine, "connect", lambda dbapi, _: dbapi.execute("PRAGMA busy_timeout=50"))
    shell = sqlite3.connect(tmp_path / "store.db", isolation_level=None)
    try:
        shell.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreUnavailable), db.write():
            pass
        assert db.driver.writer_file_lock is not None
        assert not _held_elsewhere(db.driver.writer_file_lock.path)
        shell.execute("ROLLBACK")
        with db.write() as conn:
            conn.execute(text("SELECT 1"))
    finally:
        shell.close()
        db.dispose()


@needs_flock
def test_a_forked_child_locks_through_its_own_open_file(tmp_path: Path) -> None:
    """A child that kept its parent's descriptor would share the parent's lock (flock belongs
    to the open file) instead of excluding it."""
    db = _sqlite(tmp_path)
    lock = db.driver.writer_file_lock
    assert lock is not None
    parent_fd = lock.fileno()
    assert parent_fd is not None
    locked_r, locked_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: hold the lock until told to let go
        try:
            with lock.held():
                os.write(locked_w, b"1")
                os.read(go_r, 1)
        finally:
            os._exit(0)
    try:
        assert os.read(locked_r, 1) == b"1"
        with pytest.raises(BlockingIOError):
            fcntl.flock(parent_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.write(go_w, b"1")
        os.waitpid(pid, 0)
        for fd in (locked_r, locked_w, go_r, go_w):
            os.close(fd)
    assert not _held_elsewhere(lock.path)
    db.dispose()
