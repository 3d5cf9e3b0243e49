"""Parts of the crash test (test_crash.py): auraserve processes that run as on separate
machines, an HTTPS webhook receiver, a retrying client and the checks that follow a run (the S3
server is tests/s3_server.py).

Everything is real: `auraserve serve` / `auraserve worker` subprocesses, each with its own data
dir, sharing only the PostgreSQL database, the S3 bucket and the server key; a uvicorn HTTPS
receiver with a `trustme` CA; httpx clients.
"""

from __future__ import annotations

import hashlib
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trustme
import uvicorn
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.pool import NullPool
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

TERMINAL = ("COMPLETED", "FAILED", "ERROR", "CANCELLED")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on 127.0.0.1:{port}") from None
            time.sleep(0.05)


# --- processes ----------------------------------------------------------------------------------


class Proc:
    """One subprocess with its output in a log file that survives restarts (each start is
    marked), so a failure can show what every process said."""

    def __init__(
        self, name: str, argv: list[str], env: dict[str, str], log_path: Path, ready: str
    ) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = log_path
        self.ready = re.compile(ready)
        self.popen: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._offset = 0
        self.exits: list[int] = []  # return codes of earlier runs, in order

    def start(self) -> None:
        assert self.popen is None or self.popen.poll() is not None, f"{self.name} is running"
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"\n===== {self.name}: start {self.starts} at {time.time():.3f}\n".encode())
            self._offset = log.tell()
            self.popen = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env
            )

    def wait_ready(self, timeout: float) -> re.Match[str]:
        """The ready line of the current run; raises with the log's tail if it never came."""
        deadline = time.monotonic() + timeout
        while True:
            with self.log_path.open("rb") as log:
                log.seek(self._offset)
                out = log.read().decode(errors="replace")
            match = self.ready.search(out)
            if match:
                return match
            if self.popen is not None and self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.popen.returncode}):\n{out[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} not ready after {timeout} s:\n{out[-3000:]}")
            time.sleep(0.1)

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def send(self, sig: signal.Signals) -> None:
        assert self.popen is not None
        self.popen.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.popen is not None
        rc = self.popen.wait(timeout)
        self.exits.append(rc)
        return rc

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a while: for the end of a test, never for its checks."""
        if not self.alive():
            return
        self.send(signal.SIGTERM)
        try:
            self.wait(15)
        except subprocess.TimeoutExpired:
            self.send(signal.SIGKILL)
            self.wait(10)

    def tail(self, lines: int = 60) -> str:
        try:
            text_ = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text_.splitlines()[-lines:])


# --- the webhook receiver -----------------------------------------------------------------------

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


@dataclass
class Hook:
    """One delivery attempt as the receiver saw it."""

    account_id: str
    webhook_id: str
    verified: bool
    request_id: str | None
    status: str | None
    answered: int
    at: float


class WebhookReceiver:
    """HTTPS on loopback with a certificate from a test CA, one path per account
    (`/hook/{account_id}`) so each delivery is verified with its account's secret. The first
    attempt of every third event is answered 503, so retries happen and the test can see that
    a retry carries the same `webhook-id`."""

    def __init__(self, workdir: Path) -> None:
        self.ca = trustme.CA()
        self.ca_file = workdir / "ca.pem"
        self.ca.cert_pem.write_to_path(self.ca_file)
        self.secrets: dict[str, str] = {}
        self.hooks: list[Hook] = []
        self._seen: set[str] = set()
        self._lock = threading.Lock()
        self._workdir = workdir
        self.port = 0
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def url(self, account_id: str) -> str:
        return f"https://localhost:{self.port}/hook/{account_id}"

    @staticmethod
    def refuses_first(webhook_id: str) -> bool:
        return int(hashlib.sha256(webhook_id.encode()).hexdigest(), 16) % 3 == 0

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        account_id = scope["path"].rsplit("/", 1)[-1]
        secret = self.secrets.get(account_id)
        verified = False
        if secret is not None:
            try:
                Webhook(secret).verify(body, headers)
                verified = True
            except WebhookVerificationError:
                pass
        try:
            payload = json.loads(body)
        except ValueError:
            payload = {}
        webhook_id = headers.get("webhook-id", "")
        with self._lock:
            first = webhook_id not in self._seen
            self._seen.add(webhook_id)
            status = 503 if first and self.refuses_first(webhook_id) else 200
            if not verified:
                status = 401
            self.hooks.append(
                Hook(
                    account_id,
                    webhook_id,
                    verified,
                    payload.get("request_id"),
                    payload.get("status"),
                    status,
                    time.time(),
                )
            )
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json"), (b"retry-after", b"0")],
            }
        )
        await send({"type": "http.response.body", "body": b"{}"})

    def start(self) -> None:
        cert = self.ca.issue_cert("localhost", "127.0.0.1")
        cert_path = self._workdir / "receiver-cert.pem"
        key_path = self._workdir / "receiver-key.pem"
        cert.cert_chain_pems[0].write_to_path(cert_path)
        for extra in cert.cert_chain_pems[1:]:
            extra.write_to_path(cert_path, append=True)
        cert.private_key_pem.write_to_path(key_path)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            ssl_certfile=str(cert_path),
            ssl_keyfile=str(key_path),
            log_level="error",
            lifespan="off",
            interface="asgi3",
            access_log=False,
            timeout_graceful_shutdown=1,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("webhook receiver did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(5)

    def snapshot(self) -> list[Hook]:
        with self._lock:
            return list(self.hooks)


# --- the cluster --------------------------------------------------------------------------------


@dataclass
class Account:
    account_id: str
    key: str
    webhook_secret: str


class Cluster:
    """API processes and workers as on separate machines: each has its own data dir and
    shares only the database URL, the media settings and the server key."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir = workdir
        self.env = env
        self.apis: list[Proc] = []
        self.api_ports: list[int] = []
        self.workers: list[Proc] = []
        self.others: list[Proc] = []

    def add_api(self) -> Proc:
        index = len(self.apis)
        port = free_port()
        data_dir = self.workdir / f"api{index}"
        env = dict(self.env, AURASERVE_DATA_DIR=str(data_dir))
        argv = [sys.executable, "-m", "auraserve", "serve", "--workers", "0", "--model", "tiny"]
        argv += ["--port", str(port)]
        proc = Proc(f"api{index}", argv, env, self.workdir / f"api{index}.log", r"listening on")
        self.apis.append(proc)
        self.api_ports.append(port)
        return proc

    def add_worker(self) -> Proc:
        index = len(self.workers)
        data_dir = self.workdir / f"worker{index}"
        env = dict(
            self.env,
            AURASERVE_DATA_DIR=str(data_dir),
            AURASERVE_WORKER_ID=f"crash-worker-{index}",
            # Three workers share the CI machine's two cores: one thread each, no oversubscription.
            OMP_NUM_THREADS="1",
        )
        argv = [sys.executable, "-m", "auraserve", "worker", "--model", "tiny"]
        proc = Proc(
            f"worker{index}",
            argv,
            env,
            self.workdir / f"worker{index}.log",
            r"worker (\S+) ready",
        )
        self.workers.append(proc)
        return proc

    def api_url(self, index: int) -> str:
        return f"http://127.0.0.1:{self.api_ports[index]}"

    @property
    def api_urls(self) -> list[str]:
        return [self.api_url(i) for i in range(len(self.apis))]

    def wait_api(self, index: int, timeout: float = 60) -> None:
        self.apis[index].wait_ready(timeout)
        deadline = time.monotonic() + timeout
        while True:
            try:
                httpx.get(f"{self.api_url(index)}/health", timeout=2)
                return
            except httpx.TransportError:
                if time.monotonic() > deadline or not self.apis[index].alive():
                    raise RuntimeError(f"api{index} does not answer HTTP") from None
                time.sleep(0.05)

    def worker_id(self, index: int, timeout: float = 300) -> str:
        return self.workers[index].wait_ready(timeout).group(1)

    def stop(self) -> None:
        for proc in [*self.workers, *self.apis, *self.others]:
            proc.stop()

    def logs(self, lines: int = 80) -> str:
        parts = []
        for proc in [*self.apis, *self.workers, *self.others]:
            parts.append(f"----- {proc.name} ({proc.log_path}) last {lines} lines -----")
            parts.append(proc.tail(lines))
        return "\n".join(parts)


# --- the client ---------------------------------------------------------------------------------

# Answers a client retries with the same Idempotency-Key: the store or a process is briefly
# away (503 with Retry-After, connection errors), a proxy could not reach a replica (502), the
# sync wait ran out (504: the job is still running) or a limit said "later" (429).
RETRY_STATUSES = frozenset({429, 502, 503, 504})
# A 500 is retried a few times too: with the same key a retry can never make a second job, and
# a submit that raced a database outage must not leave the client without an answer.
MAX_500_RETRIES = 3


@dataclass
class Submission:
    index: int
    dialect: str  # queue | sync | openai
    account: Account
    # None: a client that sends no Idempotency-Key and follows the 503's own words instead
    # (`send_unkeyed`): resend only a 503 that names no request, else fetch the named one.
    idempotency_key: str | None
    home: int  # the API process it is sent to first (a load balancer's choice)
    method: str
    path: str
    headers: dict[str, str]
    json_body: dict[str, Any] | None = None
    form: dict[str, str] | None = None
    tries: list[str] = field(default_factory=list)
    status_code: int | None = None
    request_id: str | None = None
    content: bytes = b""
    content_type: str = ""
    seconds: float = 0.0

    def send(self, api_urls: Callable[[], list[str]], deadline: float) -> None:
        """Send until an answer that ends the request; retries alternate between the API
        processes like a load balancer that took a failed replica out."""
        if self.idempotency_key is None:
            self.send_unkeyed(api_urls, deadline)
            return
        start = time.monotonic()
        headers = {**self.headers, "Idempotency-Key": self.idempotency_key}
        attempt = 0
        errors_500 = 0
        while True:
            urls = api_urls()
            base = urls[(self.home + attempt) % len(urls)]
            attempt += 1
            retry_after = 0.2
            try:
                response = httpx.request(
                    self.method,
                    base + self.path,
                    headers=headers,
                    json=self.json_body,
                    # multipart/form-data, as seed 000's clients send it
                    files={k: (None, v) for k, v in self.form.items()} if self.form else None,
                    timeout=httpx.Timeout(120, connect=5),
                )
            except httpx.TransportError as exc:
                self.tries.append(type(exc).__name__)
            else:
                self.tries.append(str(response.status_code))
                retry = response.status_code in RETRY_STATUSES
                if response.status_code == 500 and errors_500 < MAX_500_RETRIES:
                    errors_500 += 1
                    retry = True
                if not retry:
                    self._answer(response)
                    break
                self._answer(response)  # kept in case the deadline ends the retries
                retry_after = _retry_after(response)
            if time.monotonic() + retry_after > deadline:
                self.tries.append("gave up")
                break
            time.sleep(retry_after)
        self.seconds = time.monotonic() - start

    def send_unkeyed(self, api_urls: Callable[[], list[str]], deadline: float) -> None:
        """Without an Idempotency-Key, a resend can make a second job, so this client resends
        only what the service says was not written (a 503 without a request id); an answer
        that names its request (a 503 or 504 with request_id) is fetched by that id, never
        sent again. Sent to its home process only (one that no fault kills: a connection cut
        mid-request leaves such a client unable to tell either way)."""
        start = time.monotonic()
        while True:
            base = api_urls()[self.home]
            try:
                response = httpx.request(
                    self.method,
                    base + self.path,
                    headers=self.headers,
                    json=self.json_body,
                    files={k: (None, v) for k, v in self.form.items()} if self.form else None,
                    timeout=httpx.Timeout(180, connect=5),
                )
            except httpx.TransportError as exc:
                self.tries.append(type(exc).__name__)
                break  # unknowable: not resent (the check reports it)
            self.tries.append(str(response.status_code))
            self._answer(response)
            named = response.status_code in (503, 504) and self.request_id
            if named:
                self._fetch_by_id(base, deadline)
                break
            if response.status_code != 503 or time.monotonic() > deadline:
                break
            time.sleep(_retry_after(response))  # nothing was written: resending is safe
        self.seconds = time.monotonic() - start

    def _fetch_by_id(self, base: str, deadline: float) -> None:
        """Poll the named request until it ends; a completed one's image is the answer."""
        assert self.request_id is not None
        url = f"{base}/v2/requests/status/{self.request_id}"
        headers = {"x-api-key": self.account.key}
        with httpx.Client(timeout=30) as client:
            while time.monotonic() < deadline + 120:
                try:
                    status = client.get(url, headers=headers)
                except httpx.TransportError:
                    time.sleep(0.5)
                    continue
                body = status.json() if status.status_code == 200 else {}
                if body.get("status") in TERMINAL:
                    self.tries.append(f"fetched {body['status']}")
                    if body["status"] == "COMPLETED":
                        image = client.get(body["output"]["media_url"][0])
                        self.status_code = 200
                        self.content = image.content
                        self.content_type = image.headers.get("content-type", "")
                    return
                time.sleep(0.5)
        self.tries.append("fetch gave up")

    def _answer(self, response: httpx.Response) -> None:
        self.status_code = response.status_code
        self.content = response.content
        self.content_type = response.headers.get("content-type", "")
        # The job's id, not the HTTP request's (both are sent as x-request-id; a job's has "_").
        request_id = next((v for v in response.headers.get_list("x-request-id") if "_" in v), None)
        if request_id is None and self.content_type.startswith("application/json"):
            try:
                body = response.json()
            except ValueError:
                body = {}
            if isinstance(body, dict):
                request_id = body.get("request_id")
        self.request_id = request_id

    @property
    def retried(self) -> bool:
        return len(self.tries) > 1


def _retry_after(response: httpx.Response) -> float:
    value = response.headers.get("retry-after", "")
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.2
    # The test's outages last seconds; waiting the full hint would only slow the run.
    return min(max(seconds, 0.1), 1.0)


# --- the database, as the checks see it ---------------------------------------------------------


class Store:
    """Read-only queries for the checks, each on a fresh connection (NullPool), so a
    pg_terminate_backend in the middle of the run leaves nothing stale behind."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine: Engine = create_engine(
            url.replace("postgresql://", "postgresql+psycopg://", 1), poolclass=NullPool
        )

    def rows(self, sql: str, **params: Any) -> list[Any]:
        for attempt in range(5):
            try:
                with self.engine.connect() as conn:
                    return list(conn.execute(text(sql), params).all())
            except Exception:
                if attempt == 4:
                    raise
                time.sleep(0.5)
        raise AssertionError("unreachable")

    def scalar(self, sql: str, **params: Any) -> Any:
        return self.rows(sql, **params)[0][0]

    def leased_by(self, worker_id: str) -> list[str]:
        return [
            r.id
            for r in self.rows(
                "SELECT id FROM jobs WHERE status = 'PROCESSING' AND lease_owner = :w", w=worker_id
            )
        ]

    def terminal_count(self) -> int:
        return int(
            self.scalar(
                "SELECT count(*) FROM jobs WHERE status IN "
                "('COMPLETED', 'FAILED', 'ERROR', 'CANCELLED')"
            )
        )

    def terminate_connections(self, admin_url: str) -> int:
        """pg_terminate_backend for every connection to this test's database but our own;
        other databases (other test sessions) are left alone."""
        database = self.url.rsplit("/", 1)[-1]
        admin = create_engine(
            admin_url.replace("postgresql://", "postgresql+psycopg://", 1),
            poolclass=NullPool,
            isolation_level="AUTOCOMMIT",
        )
        try:
            with admin.connect() as conn:
                rows = conn.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = :d AND pid <> pg_backend_pid()"
                    ),
                    {"d": database},
                ).all()
        finally:
            admin.dispose()
        return sum(1 for r in rows if r[0])

    def dispose(self) -> None:
        self.engine.dispose()


# --- checks -------------------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class Report:
    """What the run showed: facts (numbers) and checks (claims that hold or not), printed as
    one summary so a failure shows every check, not only the first one that failed."""

    facts: dict[str, Any] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def event(self, line: str) -> None:
        self.events.append(f"{time.monotonic() - self.started:7.1f}s  {line}")

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append(Check(name, bool(ok), detail))
        return bool(ok)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def summary(self) -> str:
        lines = ["", "===== crash test summary ====="]
        lines += [f"  {k}: {v}" for k, v in self.facts.items()]
        lines.append("  events:")
        lines += [f"    {e}" for e in self.events]
        lines.append("  checks:")
        for c in self.checks:
            mark = "PASS" if c.ok else "FAIL"
            lines.append(f"    [{mark}] {c.name}" + (f": {c.detail}" if c.detail else ""))
        return "\n".join(lines)


def sample(items: Iterable[Any], n: int = 5) -> str:
    """A few examples for a failure message, not thousands."""
    listed = list(items)
    more = f" … (+{len(listed) - n} more)" if len(listed) > n else ""
    return ", ".join(str(i) for i in listed[:n]) + more


def group_by(items: list[Any], key: Callable[[Any], Any]) -> dict[Any, list[Any]]:
    grouped: dict[Any, list[Any]] = defaultdict(list)
    for item in items:
        grouped[key(item)].append(item)
    return grouped
