"""Progress bars on a terminal (migrations, model loading); none in logs and pipes."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
from pathlib import Path


def _stderr_on_a_terminal(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "auraserve", *args],
        stdout=subprocess.DEVNULL,
        stderr=secondary,
        env=dict(os.environ, **env),
    )
    os.close(secondary)
    chunks = []
    while True:
        try:
            data = os.read(primary, 4096)
        except OSError:  # EIO: the process closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(primary)
    return proc.wait(120), b"".join(chunks).decode(errors="replace")


def test_migrations_show_a_bar_on_a_terminal(tmp_path: Path) -> None:
    env = {"AURASERVE_DATA_DIR": str(tmp_path / "d")}
    env_no_pg = {**env, "AURASERVE_DATABASE_URL": ""}
    code, text = _stderr_on_a_terminal(["db", "upgrade"], env_no_pg)
    assert code == 0, text
    assert "migrating the store" in text
    assert re.search(r"(\d+)/\1 ", text), text  # ran to the end: n/n revisions
    # A store already at head has nothing to migrate: no bar.
    code, text = _stderr_on_a_terminal(["db", "upgrade"], env_no_pg)
    assert code == 0 and "migrating" not in text


def test_model_loading_shows_a_bar_on_a_terminal(tmp_path: Path) -> None:
    code, text = _stderr_on_a_terminal(
        [
            "generate",
            "x",
            "-o",
            str(tmp_path / "x.png"),
            "--model",
            "tiny",
            "--steps",
            "1",
            "--width",
            "512",
            "--height",
            "512",
        ],
        {"AURASERVE_DATA_DIR": str(tmp_path / "d")},
    )
    assert code == 0, text
    assert re.search(r"loading model tiny \d\d:\d\d", text), text
