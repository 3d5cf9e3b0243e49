"""A database outage once a request's job exists (or may exist): ride it out, and when that is
not possible, answer a 503 that names the request instead of one that invites a resend.

A plain 503 ("retry shortly", no request id) is true only while nothing was written. A sync or
OpenAI request whose job is in the queue, or a submit whose COMMIT was cut off (in doubt),
would make a second job, charged again, if its client resent it. So those requests keep
trying the store until their wait limit (`ride_out`), and if it stays away they answer with
`request_was_accepted` or `request_may_exist`: the request id, where to fetch the result, and
not to resend it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from auraserve.errors import StoreUnavailable
from auraserve.runtime import Runtime

P = ParamSpec("P")
T = TypeVar("T")

# How often a request riding out an outage asks the store again.
RETRY_SECONDS = 0.5
# How long a submit whose COMMIT was cut off waits for the store to say whether its job exists.
IN_DOUBT_SECONDS = 10.0


async def ride_out(
    runtime: Runtime, deadline: float, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs
) -> T:
    """`Store.call(fn, ...)`, tried again every RETRY_SECONDS while the store is unavailable,
    until `deadline` (the event loop's clock); then the last StoreUnavailable is raised."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            return await runtime.db.call(fn, *args, **kwargs)
        except StoreUnavailable:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise
            await asyncio.sleep(min(RETRY_SECONDS, remaining))


def request_ids(runtime: Runtime, request_id: str) -> dict[str, str]:
    """The request id and the URL to poll it at, for answers that name a request."""
    base = runtime.settings.resolved_public_url
    return {
        "request_id": request_id,
        "polling_url": f"{base}/v2/requests/status/{request_id}",
    }


def request_was_accepted(runtime: Runtime, request_id: str) -> StoreUnavailable:
    """The 503 of a request whose job exists: fetch it, do not resend."""
    ids = request_ids(runtime, request_id)
    return StoreUnavailable(
        f"The request was accepted as {request_id} (its credits are reserved), but the "
        "service's database became unavailable before its result could be answered. Do not "
        f"resend it (that would make and charge a second request): fetch its result with GET "
        f"{ids['polling_url']} after Retry-After.",
        headers={"x-request-id": request_id},
        extra=ids,
    )


def request_may_exist(runtime: Runtime, request_id: str) -> StoreUnavailable:
    """The 503 of a submit whose COMMIT was cut off and whose outcome the store could not yet
    tell: the request id it would have, and how to find out."""
    ids = request_ids(runtime, request_id)
    return StoreUnavailable(
        "The service's database became unavailable while this request was being committed, "
        f"so it may have been accepted as {request_id}. Before resending, GET "
        f"{ids['polling_url']} after Retry-After: a status means it was accepted (do not "
        "resend), 404 means nothing was written.",
        headers={"x-request-id": request_id},
        extra=ids,
    )


def keyed_request_may_exist() -> StoreUnavailable:
    """The in-doubt 503 of a submit with an Idempotency-Key: resending it is safe."""
    return StoreUnavailable(
        "The service's database became unavailable while this request was being committed, "
        "so it may have been accepted. Resend it with the same Idempotency-Key after "
        "Retry-After: that answers with this request if it was accepted, and makes it if not."
    )
