"""The webhook outbox: deliveries recorded with the status they report, sent after commit.

Three parts, each its own module:

- `transaction`: what runs inside a status change's transaction. `install(db, settings)`
  registers the transition hook that inserts the delivery row with the status, so a committed
  status always has its callback and a rolled-back one never does.
- `read_model`: `webhook_section`, how a job's callbacks fared, for its status body.
- `dispatcher`: `Dispatcher`, the asyncio task that claims, signs, sends and reschedules due
  deliveries (one per API process; replicas share the outbox).

The names below are the package's public surface; import them from here.
"""

from typing import TYPE_CHECKING, Any

from auraserve.webhooks.outbox.read_model import deliveries_in, webhook_section
from auraserve.webhooks.outbox.transaction import (
    DELIVERED,
    FAILED,
    GONE,
    MODES,
    OUTBOX_KEY,
    OUTBOX_KIND,
    PENDING,
    SUPERSEDED,
    SYNC_MODE,
    TERMINAL_MODE,
    enqueue_in,
    event_id,
    install,
    transition_hook,
)

if TYPE_CHECKING:
    from auraserve.webhooks.outbox.dispatcher import Dispatcher


def __getattr__(name: str) -> Any:
    # The dispatcher pulls in the HTTP stack (httpx, anyio); only API processes send, so the
    # CLI and workers, which only record deliveries, do not import it (PEP 562).
    if name == "Dispatcher":
        from auraserve.webhooks.outbox.dispatcher import Dispatcher

        return Dispatcher
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DELIVERED",
    "FAILED",
    "GONE",
    "MODES",
    "OUTBOX_KEY",
    "OUTBOX_KIND",
    "PENDING",
    "SUPERSEDED",
    "SYNC_MODE",
    "TERMINAL_MODE",
    "Dispatcher",
    "deliveries_in",
    "enqueue_in",
    "event_id",
    "install",
    "transition_hook",
    "webhook_section",
]
