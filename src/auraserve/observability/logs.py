"""Log setup: text for people (the default) or one JSON object per line for collectors.

`AURASERVE_LOG_FORMAT=json` gives lines like
`{"time": "2026-05-22T13:17:32.110Z", "level": "ERROR", "logger": "auraserve.api.errors",
"message": "...", "request_id": "…", "exc_info": "Traceback …"}`; `request_id` is present for
lines logged while a request is handled (the API's middleware sets `REQUEST_ID`).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from contextvars import ContextVar
from typing import Any

from auraserve.observability.metrics import STORE_UNAVAILABLE

REQUEST_ID: ContextVar[str | None] = ContextVar("auraserve_request_id", default=None)
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (tracebacks are escaped into `exc_info`)."""

    def format(self, record: logging.LogRecord) -> str:
        seconds = time.gmtime(record.created)
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", seconds) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None) or REQUEST_ID.get()
        if request_id:
            entry["request_id"] = request_id
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc_info"] = record.exc_text
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def formatter(fmt: str) -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT)


def configure_logging(fmt: str = "text", *, verbose: bool = False) -> None:
    """One handler on the root logger, in `fmt` ("text" or "json"); safe to call again (the
    CLI calls it before and after reading the settings). uvicorn's loggers propagate here when
    uvicorn is started with `log_config=None`."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_auraserve", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(fmt))
    handler._auraserve = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(logging.INFO if verbose else logging.WARNING)


def describe(exc: BaseException) -> str:
    """One line naming a failure and its root cause (no traceback): what an outage log needs."""
    parts = [f"{type(exc).__name__}: {_first_line(exc)}"]
    cause = exc.__cause__ or exc.__context__
    seen = {id(exc)}
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        parts.append(f"{type(cause).__name__}: {_first_line(cause)}")
        cause = cause.__cause__ or cause.__context__
    return " <- ".join(parts[:3])


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else ""


class OutageLog:
    """A database outage logged once, not once per retry: the first failure at error level,
    the recovery at warning level. For loops that retry a store call (worker, outbox)."""

    def __init__(self, logger: logging.Logger, component: str) -> None:
        self._log = logger
        self.component = component
        self.down_since: float | None = None
        self.failures = 0
        # Several threads of one component may meet the same outage (a worker's loop and
        # its heartbeats): it is still one line.
        self._lock = threading.Lock()

    def failed(self, exc: BaseException) -> None:
        STORE_UNAVAILABLE.labels(self.component).inc()
        with self._lock:
            self.failures += 1
            first = self.down_since is None
            if first:
                self.down_since = time.monotonic()
        if first:
            self._log.error(
                "%s: database unavailable, retrying until it returns: %s",
                self.component,
                describe(exc),
            )

    def recovered(self) -> None:
        with self._lock:
            if self.down_since is None:
                return
            down, failures = time.monotonic() - self.down_since, self.failures
            self.down_since = None
            self.failures = 0
        self._log.warning(
            "%s: database reachable again after %.1f s (%d failed attempts)",
            self.component,
            down,
            failures,
        )
