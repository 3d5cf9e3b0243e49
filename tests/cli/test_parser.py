"""Mistakes on the command line: the command's own usage, a did-you-mean, status 2; and every
command takes --json."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from auraserve.cli import build_parser
from tests.cli.test_cli import _subcommands, run_cli


@pytest.mark.parametrize(
    ("args", "usage", "suggestion"),
    [
        (["serv"], "usage: auraserve [", "did you mean 'serve'?"),
        (["keys", "lst"], "usage: auraserve keys [", "did you mean 'list'?"),
        (["credits", "grnt", "acct_x", "5"], "usage: auraserve credits [", "'grant'?"),
        (["keys", "list", "--jsn"], "usage: auraserve keys list [", "did you mean --json"),
        (["serve", "--prot", "80"], "usage: auraserve serve [", "did you mean --port"),
        (["serve", "--device", "cdua"], "usage: auraserve serve [", "did you mean 'cuda'?"),
        (["db", "upgrad"], "usage: auraserve db [", "did you mean 'upgrade'?"),
    ],
)
def test_a_mistake_prints_the_commands_usage_and_a_suggestion(
    tmp_path: object, args: list[str], usage: str, suggestion: str
) -> None:
    result = run_cli(*args, env={"AURASERVE_DATA_DIR": str(tmp_path)})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert lines[0].startswith(usage), result.stderr
    assert suggestion in lines[-1], result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_no_suggestion_when_nothing_is_close(tmp_path: object) -> None:
    result = run_cli("keys", "xyzzy", env={"AURASERVE_DATA_DIR": str(tmp_path)})
    assert result.returncode == 2
    assert "did you mean" not in result.stderr and "invalid choice: 'xyzzy'" in result.stderr


def test_every_command_takes_json() -> None:
    leaves = [
        name
        for name, parser in _subcommands(build_parser())
        if not any(isinstance(a, argparse._SubParsersAction) for a in parser._actions)
    ]
    assert {"serve", "worker", "generate", "keys list", "credits show", "db"} <= set(leaves)
    missing = [
        name
        for name, parser in _subcommands(build_parser())
        if name in leaves and "--json" not in parser._option_string_actions
    ]
    assert missing == []


@pytest.mark.parametrize(
    ("args", "hint"),
    [
        ([], "Run `auraserve COMMAND --help`"),
        (["keys"], "Run `auraserve keys ACTION --help`"),
        (["credits"], "Run `auraserve credits ACTION --help`"),
    ],
)
def test_help_says_how_to_get_a_commands_help(args: list[str], hint: str) -> None:
    result = run_cli(*args, "--help")
    assert result.returncode == 0 and hint in result.stdout


def test_a_reader_that_goes_away_ends_the_command_quietly(tmp_path: Path) -> None:
    """`auraserve keys list | head -1`: the pipe's reader is gone before the output is written.
    The command stops with SIGPIPE's shell status (141) and no traceback, not with a
    BrokenPipeError at the write or at the flush on exit."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody will read: the first write gets EPIPE
    env = {**os.environ, "AURASERVE_DATA_DIR": str(tmp_path)}
    with os.fdopen(write_end, "w") as stdout:
        result = subprocess.run(
            [sys.executable, "-m", "auraserve", "keys", "create", "--name", "a", "--create"],
            stdout=stdout,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            timeout=120,
        )
    assert result.returncode == 141, result.stderr
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, result.stderr
