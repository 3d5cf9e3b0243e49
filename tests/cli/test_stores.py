"""Which store a command opens, and when it may create one (cli/stores.py's docstring):
the configured location is created on a first start, a `--data-dir` given on the command
line that holds no store needs `--create`, and `postgres://` URLs mean PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from auraserve.config import Settings
from tests.cli.test_cli import run_cli
from tests.conftest import free_port


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment without any AURASERVE_ setting: what a first-time operator has."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AURASERVE_")}
    env.update(extra)
    return env


@pytest.mark.parametrize(
    "args",
    [
        ["serve", "--model", "tiny"],
        ["worker", "--model", "tiny"],
        ["db", "upgrade"],
        ["keys", "create", "--name", "x"],
    ],
)
def test_a_data_dir_flag_without_a_store_needs_create(tmp_path: Path, args: list[str]) -> None:
    typo = tmp_path / "dat"
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "auraserve", *args, "--data-dir", str(typo)],
        capture_output=True,
        text=True,
        env=_clean_env(),
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()  # refused before any model loads
    assert "no store at" in line and str(typo) in line
    assert "--data-dir" in line and "--create" in line
    assert result.stdout == "" and not typo.exists()
    assert time.monotonic() - started < 30


def test_create_makes_the_store_a_flag_names(tmp_path: Path) -> None:
    target = tmp_path / "new"
    result = subprocess.run(
        [sys.executable, "-m", "auraserve", "db", "upgrade", "--data-dir", str(target), "--create"],
        capture_output=True,
        text=True,
        env=_clean_env(),
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert (target / "auraserve.db").is_file()
    assert "new" in result.stderr


def test_the_quick_start_creates_the_default_store_with_no_flags(tmp_path: Path) -> None:
    """README: `auraserve serve --model tiny` on a fresh machine, nothing configured."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "auraserve", "serve", "--model", "tiny"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_clean_env(AURASERVE_PORT=str(port)),
        cwd=tmp_path,
    )
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "listening on" in line:
                break
    finally:
        proc.terminate()
        proc.wait(30)
    text = "".join(lines)
    assert "listening on" in text, text
    assert (tmp_path / ".auraserve" / "auraserve.db").is_file()
    assert "(new: created now)" in lines[-1]


def test_postgres_urls_are_postgresql(tmp_path: Path, settings: Settings) -> None:
    unreachable = f"postgres://auraserve@127.0.0.1:{free_port()}/nowhere"
    result = run_cli(
        "keys",
        "list",
        env={"AURASERVE_DATA_DIR": str(tmp_path), "AURASERVE_DATABASE_URL": unreachable},
    )
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    # Accepted as PostgreSQL and tried: the connection is what fails, not the URL's scheme.
    assert "cannot open the store PostgreSQL" in line and "nowhere" in line, line
    assert "AURASERVE_DATABASE_URL" in line
    if not settings.database_url:
        return
    # On the PostgreSQL backend, the real store answers under its postgres:// name too.
    from auraserve.runtime import Runtime

    Runtime.open(settings).close()
    url = settings.database_url.replace("postgresql://", "postgres://", 1)
    listed = run_cli(
        "keys", "list", env={"AURASERVE_DATA_DIR": str(tmp_path), "AURASERVE_DATABASE_URL": url}
    )
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.startswith("KEY ID")


def test_a_missing_secret_key_file_is_one_line_naming_the_variable(
    tmp_path: Path, settings: Settings
) -> None:
    from auraserve.runtime import Runtime

    Runtime.open(settings).close()
    missing = tmp_path / "no-such.key"
    result = run_cli(
        "keys", "list", settings=settings, env={"AURASERVE_SECRET_KEY_FILE": str(missing)}
    )
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert "AURASERVE_SECRET_KEY_FILE" in line and str(missing) in line
