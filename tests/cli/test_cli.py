"""The `auraserve` command as scripts use it: real subprocesses, real store."""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.pool import NullPool

from auraserve.cli import SETTING_FLAGS, build_parser
from auraserve.config import Settings
from auraserve.media.encode import read_parameters
from tests.conftest import PG_ADMIN_URL, LiveServer, free_port, wait_for_status
from tests.store_jobs import submit_one


def run_cli(
    *args: str,
    settings: Settings | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    full_env = dict(os.environ)
    if settings is not None:
        full_env["AURASERVE_DATA_DIR"] = str(settings.data_dir)
        if settings.database_url:
            full_env["AURASERVE_DATABASE_URL"] = settings.database_url
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "auraserve", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
    )


def test_keys_and_credits_commands(settings: Settings) -> None:
    created = run_cli(
        "keys", "create", "--name", "ci", "--credits", "500", "--json", "--create",
        settings=settings,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    record = json.loads(created.stdout)
    assert {"key", "key_id", "account_id", "credits", "webhook_secret"} <= set(record)
    assert record["credits"] == 500
    assert re.fullmatch(r"aura_[0-9a-f]{16}_[A-Za-z0-9_-]{43}", record["key"])
    assert record["webhook_secret"].startswith("whsec_")

    listed = run_cli("keys", "list", settings=settings)
    assert record["key_id"] in listed.stdout and record["key"] not in listed.stdout

    granted = run_cli("credits", "grant", record["account_id"], "250", "--json", settings=settings)
    assert json.loads(granted.stdout) == {
        "account_id": record["account_id"],
        "name": "ci",
        "credits": 750,
        "reserved": 0,
    }
    shown = run_cli("credits", "show", record["account_id"], "--json", settings=settings)
    assert json.loads(shown.stdout)["credits"] == 750
    table = run_cli("credits", "show", record["account_id"], settings=settings).stdout
    assert table.splitlines()[0].split() == ["ACCOUNT", "NAME", "BALANCE", "RESERVED"]
    assert table.splitlines()[1].split() == [record["account_id"], "ci", "750", "0"]
    assert run_cli("credits", "show", "acct_nope", settings=settings).returncode == 1

    assert run_cli("keys", "revoke", record["key_id"], settings=settings).returncode == 0
    assert run_cli("keys", "revoke", record["key_id"], settings=settings).returncode == 1


def test_cli_works_while_the_server_runs(
    server: LiveServer, client: httpx.Client, settings: Settings
) -> None:
    created = run_cli(
        "keys", "create", "--name", "live", "--credits", "1000", "--json", settings=settings
    )
    assert created.returncode == 0, created.stderr
    key = json.loads(created.stdout)["key"]
    headers = {"x-api-key": key}
    rid = client.post(
        "/auraflow-v0-3-512/v1/auraflow-v0-3-request",
        headers=headers,
        json={"prompt": "from the CLI", "num_inference_steps": 2},
    ).json()["request_id"]
    assert wait_for_status(client, rid, headers)["status"] == "COMPLETED"


def _start_serve(
    tmp_path: Path, settings: Settings
) -> tuple[subprocess.Popen[str], int, list[str]]:
    port = free_port()
    env = dict(os.environ, AURASERVE_DATA_DIR=str(tmp_path / "serve"))
    if settings.database_url:
        env["AURASERVE_DATABASE_URL"] = settings.database_url
    proc = subprocess.Popen(
        [sys.executable, "-m", "auraserve", "serve", "--model", "tiny", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if "listening on" in line:
            break
    return proc, port, lines


def test_serve_prints_a_key_on_first_start_only(tmp_path: Path, settings: Settings) -> None:
    proc, port, lines = _start_serve(tmp_path, settings)
    try:
        text = "".join(lines)
        match = re.search(r"(aura_[0-9a-f]{16}_[A-Za-z0-9_-]{43})", text)
        assert match, text
        assert "auraserve keys create" in text
        assert "TEST model" in text  # the tiny model is clearly labelled
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                health = httpx.get(f"{base}/health").json()
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert health["test_model"] is True
        headers = {"Ocp-Apim-Subscription-Key": match.group(1)}
        with httpx.Client(base_url=base) as client:
            rid = client.post(
                "/auraflow-v0-3/v1/x-request",
                headers=headers,
                json={"prompt": "first", "num_inference_steps": 1, "width": 512, "height": 512},
            ).json()["request_id"]
            assert wait_for_status(client, rid, headers)["status"] == "COMPLETED"
    finally:
        proc.terminate()
        proc.wait(30)
    proc, _, lines = _start_serve(tmp_path, settings)
    proc.terminate()
    proc.wait(30)
    assert not re.search(r"aura_[0-9a-f]{16}_", "".join(lines))


def test_generate_writes_an_image_with_a_progress_bar(tmp_path: Path) -> None:
    out = tmp_path / "out.webp"
    result = run_cli(
        "generate",
        "a red cube",
        "-o",
        str(out),
        "--model",
        "tiny",
        "--steps",
        "3",
        "--seed",
        "5",
        "--width",
        "512",
        "--height",
        "512",
        "--cfg",
        "4.5",
        "--json",
        env={"AURASERVE_DATA_DIR": str(tmp_path / "d")},
    )
    assert result.returncode == 0, result.stderr
    assert "denoising" in result.stderr and "3/3" in result.stderr
    info: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    assert info["seeds"] == [5] and info["width"] == 512
    assert out.read_bytes()[:4] == b"RIFF"
    # The parameters text names the CFG scale like the worker's images do.
    params = read_parameters(out.read_bytes())
    assert params is not None and params["guidance_scale"] == 4.5 and params["seed"] == 5


def test_generate_parallel_matches_one_process(tmp_path: Path) -> None:
    """`--parallel cfg=2` starts its second rank itself (gloo) and draws the same image; so do
    `ulysses=4` and `cfg=2,ulysses=2` on four ranks (the tiny model has 4 heads)."""
    common = ["x", "--model", "tiny", "--device", "cpu", "--steps", "2", "--seed", "9"]
    common += ["--cfg", "4", "--sampler", "euler_ancestral", "--json"]
    env = {"AURASERVE_DATA_DIR": str(tmp_path / "d")}
    one = run_cli("generate", "-o", str(tmp_path / "one.png"), *common, env=env)
    assert one.returncode == 0, one.stderr
    two = run_cli(
        "generate", "-o", str(tmp_path / "two.png"), *common, "--parallel", "cfg=2", env=env
    )
    assert two.returncode == 0, two.stderr
    assert two.stderr.count("loading model tiny") == 2  # rank 1 ran: it loads its own model
    assert json.loads(two.stdout.strip().splitlines()[-1])["files"] == [str(tmp_path / "two.png")]
    a, b = (np.asarray(Image.open(tmp_path / n), np.int16) for n in ("one.png", "two.png"))
    assert np.abs(a - b).max() <= 1
    for mode in ("ulysses=4", "cfg=2,ulysses=2"):
        out4 = str(tmp_path / "4.png")
        four = run_cli("generate", "-o", out4, *common, "--parallel", mode, env=env, timeout=300)
        assert four.returncode == 0, four.stderr
        assert four.stderr.count("loading model tiny") == 4
        c = np.asarray(Image.open(tmp_path / "4.png"), np.int16)
        assert np.abs(a - c).max() <= 1, mode
    bad = run_cli("generate", "-o", str(tmp_path / "b.png"), *common, "--parallel", "cfg=4")
    assert bad.returncode == 2 and "--parallel cfg=4" in bad.stderr
    gpus = run_cli("worker", "--parallel", "cfg=2", "--gpus", "0", env=env)
    assert gpus.returncode == 2 and "--gpus" in gpus.stderr, gpus.stderr


def test_unloadable_model_ends_with_one_clear_line(tmp_path: Path) -> None:
    result = run_cli(
        "generate",
        "x",
        "-o",
        str(tmp_path / "o.png"),
        "--model",
        str(tmp_path / "no-such-dir"),
        env={"HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 1
    lines = [ln for ln in result.stderr.strip().splitlines() if ln.startswith("auraserve:")]
    assert len(lines) == 1, result.stderr
    assert "--model" in lines[0]


def test_bad_setting_names_the_variable(tmp_path: Path) -> None:
    result = run_cli(
        "keys", "list", env={"AURASERVE_LEASE_SECONDS": "-3", "AURASERVE_DATA_DIR": str(tmp_path)}
    )
    assert result.returncode == 2
    assert "AURASERVE_LEASE_SECONDS" in result.stderr


def test_worker_command_runs_jobs_from_the_store(tmp_path: Path, settings: Settings) -> None:
    """`auraserve worker` alone, against the configured store (no API in its process)."""
    from auraserve.core.request import build_request
    from auraserve.runtime import Runtime
    from auraserve.store import jobs, keys

    env = dict(
        os.environ, AURASERVE_DATA_DIR=str(settings.data_dir), AURASERVE_POLL_INTERVAL_SECONDS="0.2"
    )
    if settings.database_url:
        env["AURASERVE_DATABASE_URL"] = settings.database_url
    rt = Runtime.open(settings)
    proc = subprocess.Popen(
        [sys.executable, "-m", "auraserve", "worker", "--model", "tiny"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        acct = keys.create_account(rt.db, "w", credits=1000)
        preset = settings.presets["auraflow-v0-3-512"]
        req = build_request(
            {"prompt": "alone", "steps": 2}, model="auraflow-v0-3-512", preset=preset
        )
        job_id = submit_one(
            rt.db,
            account_id=acct.account_id,
            request=req,
            price=req.price(preset),
            max_queued=10,
            max_attempts=3,
        ).job.id
        deadline = time.monotonic() + 90
        while (job := jobs.get(rt.db, job_id)) is not None and not job.is_terminal:
            assert time.monotonic() < deadline, "worker did not finish the job"
            time.sleep(0.1)
        assert job is not None and job.status.value == "COMPLETED"
        assert rt.media.path(job.output["media"][0]) is not None
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
        rt.close()
    assert "ready" in out


def test_generate_with_model_dir_equals_diffusers(tmp_path: Path) -> None:
    """Issue 3, point 3, through the user-facing path: `--model DIR` on a tiny model saved in
    diffusers format, euler/normal, fp32 CPU, against AuraFlowPipeline on the same directory."""
    import numpy as np
    import torch
    from diffusers import AuraFlowPipeline, FlowMatchEulerDiscreteScheduler
    from PIL import Image

    from auraserve.engine.tiny import save_tiny_model

    model_dir = save_tiny_model(tmp_path / "tiny-model")
    out = tmp_path / "ours.png"
    result = run_cli(
        "generate",
        "a lighthouse at dusk",
        "-o",
        str(out),
        "--model",
        str(model_dir),
        "--sampler",
        "euler",
        "--scheduler",
        "normal",
        "--steps",
        "4",
        "--cfg",
        "5",
        "--shift",
        "1.73",
        "--seed",
        "1234",
        "--negative-prompt",
        "blurry",
        "--width",
        "512",
        "--height",
        "512",
        "--format",
        "png",
        env={
            "AURASERVE_DATA_DIR": str(tmp_path / "d"),
            "AURASERVE_DEVICE": "cpu",
            "AURASERVE_DTYPE": "float32",
            "HF_HUB_OFFLINE": "1",
        },
    )
    assert result.returncode == 0, result.stderr
    pipe = AuraFlowPipeline.from_pretrained(model_dir, torch_dtype=torch.float32)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=1.73)
    reference = pipe(
        "a lighthouse at dusk",
        negative_prompt="blurry",
        guidance_scale=5.0,
        num_inference_steps=4,
        height=512,
        width=512,
        generator=torch.Generator("cpu").manual_seed(1234),
    ).images[0]
    ours = np.asarray(Image.open(out).convert("RGB"), dtype=np.int16)
    theirs = np.asarray(reference.convert("RGB"), dtype=np.int16)
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() <= 1
    assert ours.std() > 1  # not a flat image that would match anything


# --- mistakes and stores (issue 8, point 8) ---------------------------------------------------


def _problem_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    """stderr without the note naming the store, which admin commands always print first,
    and without the usage block that a command-line mistake prints before its line."""
    lines = [ln for ln in result.stderr.splitlines() if not ln.startswith("store: ")]
    if lines and lines[0].startswith("usage: "):
        lines = [ln for ln in lines[1:] if not ln.startswith(" ")]
    return lines


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["keys", "create", "--name", "x", "--credits", "-3"], "--credits"),
        (["keys", "create", "--name", "x", "--credits", "lots"], "--credits"),
        (["keys", "create", "--name", "x", "--account", "acct_nope"], "acct_nope"),
        (["keys", "create", "--name", "x", "--account", "acct_a", "--credits", "5"], "--credits"),
        (["keys", "create", "--credits", "5"], "--name"),
        (["credits", "grant", "acct_nope", "5"], "acct_nope"),
        (["credits", "grant", "acct_nope", "0"], "amount"),
        (["credits", "frobnicate"], "frobnicate"),
        (["db", "downgrade"], "downgrade"),
        (["serve", "--port", "http"], "--port"),
        (["serve", "--device", "tpu"], "--device"),
        (["generate", "x", "-o", "x.png", "--steps", "0"], "steps"),
        (["generate", "x", "-o", "x.png", "--preset", "nope"], "--preset nope"),
        (["nonsense"], "nonsense"),
    ],
)
def test_fixable_mistakes_end_with_one_line_and_status_2(
    settings: Settings, args: list[str], named: str
) -> None:
    from auraserve.runtime import Runtime

    Runtime.open(settings).close()
    result = run_cli(*args, settings=settings)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    (line,) = _problem_lines(result)
    assert named in line
    assert result.stdout == ""


def _store_names(settings: Settings) -> str:
    """What a store note must contain for people to recognise the store."""
    if settings.database_url:
        return settings.database_url.rsplit("/", 1)[-1]  # the database name
    return str((settings.data_dir / "auraserve.db").resolve())


def test_admin_commands_name_their_store_on_stderr(settings: Settings) -> None:
    created = run_cli("keys", "create", "--name", "n", "--json", "--create", settings=settings)
    assert created.returncode == 0, created.stderr
    account = json.loads(created.stdout)["account_id"]  # stdout stays machine-readable
    for args in (
        ["keys", "list", "--json"],
        ["credits", "grant", account, "5", "--json"],
        ["credits", "show", account, "--json"],
        ["db", "upgrade", "--json"],
    ):
        result = run_cli(*args, settings=settings)
        assert result.returncode == 0, result.stderr
        (note,) = result.stderr.splitlines()
        assert note.startswith("store: ") and _store_names(settings) in note, note
        assert "new" not in note
        json.loads(result.stdout)
    assert _store_names(settings) in created.stderr


@dataclass
class NewStore:
    """A store location with nothing in it yet, and how to tell whether a store appeared."""

    env: dict[str, str]
    names: str  # what a message about it must contain
    exists: Callable[[], bool]


@pytest.fixture
def new_store(tmp_path: Path, settings: Settings) -> Iterator[NewStore]:
    if not settings.database_url:
        data_dir = tmp_path / "elsewhere"
        db_file = data_dir / "auraserve.db"
        yield NewStore({"AURASERVE_DATA_DIR": str(data_dir)}, str(db_file), db_file.exists)
        return
    # PostgreSQL: an empty database of its own, next to the test session's.
    base, _ = settings.database_url.rsplit("/", 1)
    name = f"auraserve_cli_{secrets.token_hex(4)}"
    admin = create_engine(
        PG_ADMIN_URL.replace("postgresql://", "postgresql+psycopg://", 1),
        isolation_level="AUTOCOMMIT",
        poolclass=NullPool,
    )
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = f"{base}/{name}"

    def exists() -> bool:
        engine = create_engine(
            url.replace("postgresql://", "postgresql+psycopg://", 1), poolclass=NullPool
        )
        try:
            with engine.connect() as conn:
                return inspect(conn).has_table("alembic_version")
        finally:
            engine.dispose()

    yield NewStore(
        {"AURASERVE_DATA_DIR": str(tmp_path / "elsewhere"), "AURASERVE_DATABASE_URL": url},
        name,
        exists,
    )
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.mark.parametrize(
    "args",
    [
        ["keys", "list"],
        ["keys", "list", "--json"],
        ["credits", "show", "acct_x"],
        ["credits", "grant", "acct_x", "5"],
        ["keys", "revoke", "0123456789abcdef"],
        ["keys", "create", "--name", "x", "--account", "acct_x"],
    ],
)
def test_commands_that_need_a_store_refuse_a_missing_one(
    new_store: NewStore, args: list[str]
) -> None:
    result = run_cli(*args, env=new_store.env)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert "no store at" in line and new_store.names in line
    assert "AURASERVE_DATA_DIR" in line  # says how to point at the right one
    assert result.stdout == ""
    assert not new_store.exists()  # looked, created nothing


def test_unreachable_store_is_one_line(tmp_path: Path) -> None:
    result = run_cli(
        "keys",
        "list",
        env={
            "AURASERVE_DATA_DIR": str(tmp_path),
            "AURASERVE_DATABASE_URL": f"postgresql://127.0.0.1:{free_port()}/nowhere",
        },
    )
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert "cannot open the store" in line and "nowhere" in line


def test_keys_create_makes_a_store_only_when_told(new_store: NewStore) -> None:
    refused = run_cli("keys", "create", "--name", "first", "--json", env=new_store.env)
    assert refused.returncode == 2, refused.stderr
    (line,) = refused.stderr.splitlines()
    assert "no store at" in line and new_store.names in line and "--create" in line
    assert refused.stdout == "" and not new_store.exists()

    created = run_cli("keys", "create", "--name", "first", "--json", "--create", env=new_store.env)
    assert created.returncode == 0, created.stderr
    (note,) = created.stderr.splitlines()
    assert new_store.names in note and "new" in note
    key_id = json.loads(created.stdout)["key_id"]
    assert new_store.exists()

    listed = run_cli("keys", "list", env=new_store.env)
    assert listed.returncode == 0, listed.stderr
    assert key_id in listed.stdout
    (note,) = listed.stderr.splitlines()
    assert new_store.names in note and "new" not in note


def test_db_upgrade_creates_a_store_and_says_so(new_store: NewStore) -> None:
    result = run_cli("db", "upgrade", env=new_store.env)
    assert result.returncode == 0, result.stderr
    (note,) = result.stderr.splitlines()
    assert new_store.names in note and "new" in note
    assert new_store.exists()


def _subcommands(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    # argparse has no public way to walk its subparsers; _actions is stable since Python 3.2.
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield name, child
                for sub_name, grandchild in _subcommands(child):
                    yield f"{name} {sub_name}", grandchild


def test_every_option_of_every_command_has_help() -> None:
    missing = [
        f"auraserve {name} {action.dest}"
        for name, parser in _subcommands(build_parser())
        for action in parser._actions
        if not isinstance(action, argparse._SubParsersAction)
        and (not action.help or action.help == argparse.SUPPRESS)
    ]
    assert missing == []


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_service_help_shows_every_setting(command: str) -> None:
    result = run_cli(command, "--help")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    flags = [s for s in SETTING_FLAGS if command in s.commands]
    assert {"data_dir", "model", "device", "dtype", "offload", "engine_mode"} <= {
        s.name for s in flags
    }
    if command == "serve":
        assert {"host", "port", "workers"} <= {s.name for s in flags}
    for setting in flags:
        # The flag, and beside it the environment variable that sets the same thing.
        assert setting.flag in text and setting.env in text, setting.name
    # Every other setting is at least named, with where it is read from.
    for name in Settings.model_fields:
        assert f"AURASERVE_{name.upper()}" in text, name


def test_webhook_secret_rotation_commands(settings: Settings) -> None:
    created = json.loads(
        run_cli("keys", "create", "--name", "hooks", "--json", "--create", settings=settings).stdout
    )
    account = created["account_id"]
    shown = run_cli("keys", "webhook-secret", account, "--json", settings=settings)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["webhook_secrets"] == [created["webhook_secret"]]

    rotated = run_cli(
        "keys", "rotate-webhook-secret", account, "--grace-hours", "2", "--json", settings=settings
    )
    assert rotated.returncode == 0, rotated.stderr
    record = json.loads(rotated.stdout)
    assert record["previous_webhook_secret"] == created["webhook_secret"]
    assert record["webhook_secret"].startswith("whsec_")
    assert record["webhook_secret"] != created["webhook_secret"]
    assert record["previous_signs_until"] > time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    both = json.loads(
        run_cli("keys", "webhook-secret", account, "--json", settings=settings).stdout
    )
    assert both["webhook_secrets"] == [record["webhook_secret"], created["webhook_secret"]]

    text_out = run_cli("keys", "rotate-webhook-secret", account, settings=settings)
    assert "new webhook signing secret: whsec_" in text_out.stdout
    assert "keeps signing beside it until" in text_out.stdout
    missing = run_cli("keys", "rotate-webhook-secret", "acct_nope", settings=settings)
    assert missing.returncode == 2 and "no such account" in missing.stderr


def test_a_new_data_dir_is_private(tmp_path: Path) -> None:
    data_dir = tmp_path / "fresh" / "data"
    env = {"AURASERVE_DATA_DIR": str(data_dir), "AURASERVE_DATABASE_URL": ""}
    created = run_cli("keys", "create", "--name", "a", "--create", env=env)
    assert created.returncode == 0, created.stderr
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    key_file = data_dir / "secret.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert str(key_file) in created.stderr  # the first start says where the key is
    sqlite_files = [p for p in data_dir.iterdir() if p.name.startswith("auraserve.db")]
    assert sqlite_files
    for path in sqlite_files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    # The key is made once: the secret shown at creation is the one derived later.
    account = json.loads(run_cli("keys", "create", "--name", "b", "--json", env=env).stdout)[
        "account_id"
    ]
    shown = run_cli("keys", "webhook-secret", account, env=env)
    assert shown.returncode == 0 and shown.stdout.startswith("whsec_")
    assert "secret.key" not in run_cli("keys", "list", env=env).stderr


def test_the_engine_of_serve_and_worker_serves_the_lora_registry(tmp_path: Path) -> None:
    """`serve`/`worker` build their engine with LoRA slots when a registry is configured."""
    from auraserve.cli.engine import load_engine
    from auraserve.config import load_settings

    (tmp_path / "loras").mkdir()
    plain = load_engine(load_settings(data_dir=tmp_path / "d", device="cpu"), "tiny")
    with_lora = load_engine(
        load_settings(data_dir=tmp_path / "d", device="cpu", lora_dir=tmp_path / "loras"), "tiny"
    )
    assert getattr(plain, "lora", None) is None
    assert getattr(with_lora, "lora", None) is not None
