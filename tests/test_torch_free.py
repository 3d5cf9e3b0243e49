"""The service side never loads the model stack (issue 8, point 1).

import-linter checks the static imports; these tests check what a real process ends up with,
which also catches lazy imports inside functions and imports made by third-party packages we
call. Each check runs in a fresh interpreter: this test process has torch loaded already.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from auraserve.config import Settings
from tests.conftest import free_port

MODEL_STACK = ("torch", "diffusers", "transformers", "accelerate")

# Prefixed to every script: `_report()` prints the model-stack modules loaded so far.
_REPORT = f"""
import json as _json, sys as _sys

def _report() -> None:
    loaded = [m for m in {MODEL_STACK!r} if m in _sys.modules]
    print("LOADED=" + _json.dumps(loaded), flush=True)
"""


def _env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ, AURASERVE_DATA_DIR=str(settings.data_dir))
    if settings.database_url:
        env["AURASERVE_DATABASE_URL"] = settings.database_url
    return env


def _loaded(script: str, settings: Settings) -> list[str]:
    """Runs `script` (which must call `_report()`) in a fresh interpreter."""
    result = subprocess.run(
        [sys.executable, "-c", _REPORT + textwrap.dedent(script)],
        capture_output=True,
        text=True,
        env=_env(settings),
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    (line,) = [ln for ln in result.stdout.splitlines() if ln.startswith("LOADED=")]
    loaded: list[str] = json.loads(line.removeprefix("LOADED="))
    return loaded


def test_service_modules_and_the_whole_app_load_no_model_stack(settings: Settings) -> None:
    script = """
        import importlib, pkgutil
        import auraserve

        # Every module of the service side, not only what the app happens to import.
        # Alembic's env.py runs migrations when imported, so migrations are left to the app.
        service = ("config", "core", "store", "outbound", "webhooks", "media", "api", "worker")
        for package in service:
            module = importlib.import_module(f"auraserve.{package}")
            for info in pkgutil.walk_packages(
                getattr(module, "__path__", []), prefix=f"auraserve.{package}."
            ):
                if ".migrations" not in info.name:
                    importlib.import_module(info.name)
        importlib.import_module("auraserve.engine.base")

        from fastapi.testclient import TestClient

        from auraserve.api.app import create_app
        from auraserve.config import load_settings
        from auraserve.runtime import Runtime

        runtime = Runtime.open(load_settings())
        with TestClient(create_app(runtime, owns_runtime=True)) as client:
            assert client.get("/health").status_code == 200
        _report()
    """
    assert _loaded(script, settings) == []


def test_admin_command_loads_no_model_stack(settings: Settings) -> None:
    from auraserve.runtime import Runtime

    Runtime.open(settings).close()  # `keys list` refuses a store that does not exist
    script = """
        from auraserve.cli import main

        try:
            main(["keys", "list"])
        except SystemExit as exc:
            assert exc.code == 0, exc.code
        _report()
    """
    assert _loaded(script, settings) == []


def test_serve_without_workers_loads_no_model_stack(settings: Settings) -> None:
    """`serve --workers 0` (an API replica) answers /health without the model stack."""
    port = free_port()
    script = f"""
        import os, threading, time, urllib.request

        def report_when_up() -> None:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    urllib.request.urlopen("http://127.0.0.1:{port}/health", timeout=1)
                except OSError:
                    time.sleep(0.05)
                else:
                    _report()
                    os._exit(0)
            os._exit(3)

        threading.Thread(target=report_when_up, daemon=True).start()
        from auraserve.cli import main

        main(["serve", "--workers", "0", "--port", "{port}"])
    """
    assert _loaded(script, settings) == []
