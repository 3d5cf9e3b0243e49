"""The seeds' own example clients, run unchanged but for URL and key, against a live server.

`seed_clients/seed002_requests.py` is seed 002's Python `requests` example verbatim;
`seed_clients/seed000_aura_flow.js` is seed 000's Node (axios + form-data) example with its
gaps completed. Both must work by pointing them at auraserve, which is the product's promise.
"""

from __future__ import annotations

import ast
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from PIL import Image

from auraserve.config import Settings
from tests.conftest import LiveServer, Tenant

CLIENTS = Path(__file__).parent / "seed_clients"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"sync_timeout_seconds": 600.0})


def _run(args: list[str], *, env: dict[str, str] | None = None, timeout: float) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, f"{args[0]} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_seed002_python_requests_example(
    server: LiveServer, tenant: Tenant, tmp_path: Path
) -> None:
    script = (CLIENTS / "seed002_requests.py").read_text()
    assert (
        script.count("https://gateway.pixazo.ai") == 1
        and script.count("YOUR_SUBSCRIPTION_KEY") == 1
    )
    script = script.replace("https://gateway.pixazo.ai", server.url)
    script = script.replace("YOUR_SUBSCRIPTION_KEY", tenant.key)
    (tmp_path / "client.py").write_text(script)
    printed = _run([sys.executable, str(tmp_path / "client.py")], timeout=60)
    answer = ast.literal_eval(printed.strip())
    assert answer["status"] == "QUEUED"
    assert answer["request_id"].startswith("auraflow-v0-3-512_")
    assert answer["polling_url"] == f"{server.url}/v2/requests/status/{answer['request_id']}"
    # The seed's "Typical workflow": poll the polling_url, then download output.media_url.
    headers = {"Ocp-Apim-Subscription-Key": tenant.key}
    deadline = time.monotonic() + 180
    while True:
        status = requests.get(answer["polling_url"], headers=headers, timeout=30).json()
        if status["status"] not in ("QUEUED", "PROCESSING"):
            break
        assert time.monotonic() < deadline, status
        time.sleep(0.5)
    assert status["status"] == "COMPLETED", status
    [url] = status["output"]["media_url"]
    image = Image.open(io.BytesIO(requests.get(url, timeout=30).content))
    assert image.size == (512, 512)
    # The example asks for expand_prompt: the expansion reaches the model whole. The status
    # shows the prompt used: the example's words first, then detail, within the 256 tokens
    # of the model's own tokenizer, and no warning says any of it was ignored.
    sent = _example_body(script)
    assert sent["expand_prompt"] is True
    used = status["prompt"]
    assert used.startswith(sent["prompt"]) and len(used) > len(sent["prompt"]) + 20, used
    assert len(server.runtime.engine.pipe.tokenizer(used).input_ids) <= 256
    assert not any("ignored" in w or "left out" in w for w in status.get("warnings") or [])


def _example_body(script: str) -> dict[str, object]:
    """The `data = {...}` literal of the seed's Python example."""
    for node in ast.walk(ast.parse(script)):
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "data":
            body: dict[str, object] = ast.literal_eval(node.value)
            return body
    raise AssertionError("the example has no `data = {...}`")


def _node_modules() -> Path:
    modules = CLIENTS / "node_modules"
    if not (modules / "axios").is_dir() or not (modules / "form-data").is_dir():
        npm = shutil.which("npm")
        assert npm is not None, "node is installed but npm is not: cannot install axios/form-data"
        _run([npm, "ci", "--no-audit", "--no-fund", "--prefix", str(CLIENTS)], timeout=300)
    return modules


def test_seed000_node_axios_example(server: LiveServer, tenant: Tenant, tmp_path: Path) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    modules = _node_modules()
    script = (CLIENTS / "seed000_aura_flow.js").read_text()
    assert script.count("https://YOUR-AURASERVE-HOST") == 1 and script.count("YOUR API-KEY") == 1
    script = script.replace("https://YOUR-AURASERVE-HOST", server.url)
    script = script.replace("YOUR API-KEY", tenant.key)
    (tmp_path / "client.js").write_text(script)
    output = tmp_path / "output.webp"
    env = {**os.environ, "NODE_PATH": str(modules), "OUTPUT_FILE": str(output)}
    printed = _run([node, str(tmp_path / "client.js")], env=env, timeout=600)
    answer = json.loads(printed.strip().splitlines()[-1])
    assert answer["status"] == 200
    headers = answer["headers"]
    assert headers["content-type"] == "image/webp"
    assert headers["x-seed"] == "2425367"
    assert int(headers["x-remaining-credits"]) >= 0
    assert headers["x-request-id"].startswith("auraflow-v0-3_")
    assert float(headers["x-generation-time"]) > 0
    image = Image.open(output)
    assert image.format == "WEBP" and image.size == (1024, 1024)
