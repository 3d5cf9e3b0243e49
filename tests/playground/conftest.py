"""A real `auraserve serve --model tiny` on loopback and Debian's chromium driven headless by
Playwright (the Python package only: no browser download; `.ci/run` installs chromium).

Under CI a missing browser fails the run; elsewhere the browser tests skip, saying why.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from tests.conftest import free_port

if TYPE_CHECKING:
    from playwright.sync_api import Browser, BrowserContext, Page

CHROMIUM = Path("/usr/bin/chromium")


def _need_browser(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must run the browser tests: .ci/run installs chromium)")
    pytest.skip(f"{reason}; install it with: apt-get install chromium && pip install playwright")


@dataclass
class Serve:
    """A running `auraserve serve` subprocess and the environment that points at its store."""

    url: str
    env: dict[str, str]
    proc: subprocess.Popen[str]
    log: list[str] = field(default_factory=list)

    def cli(self, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "auraserve", *args],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    def new_key(self, name: str, credits: int) -> str:
        record = json.loads(
            self.cli("keys", "create", "--name", name, "--credits", str(credits), "--json")
        )
        return str(record["key"])


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory, pg_database_url: str | None) -> Iterator[Serve]:
    port = free_port()
    env = dict(
        os.environ,
        AURASERVE_DATA_DIR=str(tmp_path_factory.mktemp("serve")),
        AURASERVE_HOST="127.0.0.1",
        AURASERVE_PORT=str(port),
        AURASERVE_MODEL="tiny",
    )
    if pg_database_url:
        env["AURASERVE_DATABASE_URL"] = pg_database_url
    proc = subprocess.Popen(
        # -v and --access-log: every request line is logged, so a test can show the key is not.
        [sys.executable, "-m", "auraserve", "-v", "serve", "--model", "tiny", "--access-log"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    running = Serve(url=f"http://127.0.0.1:{port}", env=env, proc=proc)
    assert proc.stdout is not None

    def drain() -> None:
        # Read everything the server prints: a full pipe would block it.
        assert proc.stdout is not None
        for line in proc.stdout:
            running.log.append(line)

    threading.Thread(target=drain, daemon=True).start()
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{running.url}/health").json()["status"] == "ok":
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise RuntimeError("auraserve serve did not start:\n" + "".join(running.log))
        time.sleep(0.1)
    yield running
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _need_browser("the playwright package is not installed")
    if not CHROMIUM.exists():
        _need_browser(f"{CHROMIUM} is missing")
    with sync_playwright() as pw:
        # --no-sandbox: CI runs as root, where chromium's sandbox refuses to start.
        launched = pw.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"]
        )
        yield launched
        launched.close()


@dataclass
class Watched:
    """A page plus what it must never do: reach another host, break its CSP, raise."""

    page: Page
    foreign: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)

    def assert_clean(self) -> None:
        assert self.foreign == [], f"requests to other hosts: {self.foreign}"
        assert self.problems == [], self.problems
        assert self.dialogs == [], f"dialogs opened (script ran?): {self.dialogs}"


@pytest.fixture
def open_page(browser: Browser, serve: Serve) -> Iterator[Any]:
    """Opens pages in fresh contexts (a new tab's sessionStorage) with every request to
    another host aborted, as on a machine without internet."""
    contexts: list[BrowserContext] = []
    watched: list[Watched] = []

    def opener(
        path: str = "/",
        *,
        width: int = 1440,
        height: int = 1000,
        before: Callable[[Page], None] | None = None,
    ) -> Watched:
        context = browser.new_context(viewport={"width": width, "height": height})
        contexts.append(context)
        page = context.new_page()
        result = Watched(page)
        watched.append(result)

        def route(r: Any) -> None:
            if r.request.url.startswith(serve.url + "/") or r.request.url == serve.url:
                r.continue_()
            else:
                result.foreign.append(r.request.url)
                r.abort()

        context.route("**/*", route)

        def console(message: Any) -> None:
            text = message.text
            if "Content Security Policy" in text or (message.type == "error" and "refused" in text):
                result.problems.append(text)

        page.on("console", console)
        page.on("pageerror", lambda e: result.problems.append(f"page error: {e}"))

        def dialog(d: Any) -> None:
            result.dialogs.append(d.message)
            d.dismiss()

        page.on("dialog", dialog)
        if before is not None:
            before(page)
        page.goto(serve.url + path)
        return result

    yield opener
    for context in contexts:
        context.close()


def save_screenshot(page: Page, path: Path) -> None:
    """The viewport as a 256-colour PNG: the tiny model's noise images made full-colour
    screenshots of over a megabyte each, and these are committed (docs/screenshots)."""
    import io

    from PIL import Image

    shot = Image.open(io.BytesIO(page.screenshot())).convert("RGB")
    shot.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
        path, optimize=True
    )


@pytest.fixture(scope="module")
def screenshot_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the tests save their screenshots: AURASERVE_SCREENSHOT_DIR when set (the committed
    ones in docs/screenshots are refreshed that way), else a temporary folder."""
    chosen = os.environ.get("AURASERVE_SCREENSHOT_DIR")
    path = Path(chosen) if chosen else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path
