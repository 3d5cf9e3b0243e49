"""The app's own state, typed: one `ApiState`, made by `app.create_app` and stored once on the
app (never ad-hoc attributes of `app.state`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from starlette.requests import HTTPConnection

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from auraserve.api.limits import LongLivedSlots
    from auraserve.api.ratelimit import RateLimiter
    from auraserve.api.submit_batching import SubmitBatcher
    from auraserve.runtime import Runtime
    from auraserve.webhooks.outbox import Dispatcher

_KEY = "auraserve"


@dataclass
class ApiState:
    runtime: Runtime
    submits: SubmitBatcher
    long_lived: LongLivedSlots
    # Made by the lifespan (they live on its event loop): the webhook dispatcher and the
    # per-account rate limiter.
    limiter: RateLimiter | None = None
    outbox: Dispatcher | None = field(default=None, repr=False)

    def attach(self, app: Starlette) -> None:
        """Store this on `app`, once."""
        setattr(app.state, _KEY, self)


def state_of(app: Starlette) -> ApiState:
    state: ApiState = getattr(app.state, _KEY)
    return state


def api_state(request: HTTPConnection) -> ApiState:
    """The state of the app serving `request`."""
    return state_of(request.app)
