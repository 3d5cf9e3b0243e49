"""Every failure auraserve can report, drawn once.

```
AuraserveError                      status 500, title, message, headers, extra
├── RequestError                    the client can fix it; rendered 4xx by every dialect
│   ├── InvalidParameter            400  a field is wrong: names the field and its allowed range
│   │   ├── IdempotencyKeyReused    422  an Idempotency-Key sent again with another request
│   │   └── BadCursor               400  a history cursor this server did not hand out
│   ├── ModelNotFound               400  the URL names no configured preset
│   ├── Unauthorized                401  missing, unknown or revoked key
│   ├── Forbidden                   403  a valid key, but an operator route needs an admin account
│   ├── InsufficientBalance         402  (406 in the sync dialect, 429 insufficient_quota in OpenAI)
│   ├── RequestNotFound             404  unknown id, or another account's (never 403)
│   ├── RequestConflict             409  cancel of a finished request
│   │   └── DeductExceedsBalance         an operator's deduct larger than the balance
│   ├── PayloadTooLarge             413  body over AURASERVE_MAX_BODY_BYTES
│   ├── UnsupportedMediaType        415  a body type the route does not read
│   ├── HeadersTooLarge             431  a header line over AURASERVE_MAX_HEADER_LINE_BYTES
│   └── TooManyRequests             429  with Retry-After
│       ├── QueueLimitReached            jobs in flight per account
│       ├── RateLimited                  submits per minute, or concurrent jobs
│       └── LongRequestLimitReached      open status streams or waiting sync requests
├── JobOutcome                      a sync wait ended without an image (the job is terminal)
│   ├── RequestCancelled            409  CANCELLED, not charged
│   ├── GenerationFailed            400  FAILED: the engine refused the request, not charged
│   └── GenerationError             500  ERROR: the server failed, not charged
├── SyncTimeout                     504  the image is not ready yet; the job goes on
├── ServiceUnavailable              503  with Retry-After: try again later
│   ├── ServerBusy                       back-pressure: every connection slot is in use
│   └── StoreUnavailable                 an outage: the database cannot be reached right now
├── ConfigError                     a setting is invalid; the process does not start
├── ModelLoadError                  the weights cannot be loaded; the process does not start
│   └── BadWeights                       the weights are wrong (not unreachable): exit 2
├── UnsupportedRequest              the engine cannot run this request: the job ends FAILED
├── JobCancelled                    inside the engine: every job of the batch was cancelled
├── ExpansionError                  prompt expansion produced nothing usable
└── BlockedAddress                  a webhook host resolves to an address we refuse to reach
```

`status` is the HTTP status a dialect starts from, `headers` are sent with the response and
`extra` fields join the error body. Each dialect renders the tree in its own shape
(`api/dialects/*`); nothing outside the API knows about HTTP bodies. In the worker, only
`UnsupportedRequest` marks a job FAILED ("your request was bad"); any other exception is a
server fault and the job ends in ERROR. Neither is charged.

Every exception class of auraserve is defined here (tests/test_errors.py scans the source), so
this tree is the whole list of what can go wrong.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from typing import Any

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class AuraserveError(Exception):
    """The root: a message for people, plus what an HTTP edge needs to render it."""

    status: int = 500
    title: str = "Internal Server Error"

    def __init__(
        self,
        message: str | None = None,
        *,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        self.message = message or self.title
        self.headers: dict[str, str] = dict(headers or {})
        self.extra: dict[str, Any] = dict(extra or {})
        super().__init__(self.message)


# --- the client can fix it -------------------------------------------------------------------


class RequestError(AuraserveError):
    """A 4xx: the request, the key or the account's state is the problem."""

    status = 400
    title = "Bad Request"


class InvalidParameter(RequestError):
    status = 400
    title = "Invalid parameter"

    def __init__(
        self,
        *,
        field: str,
        message: str,
        allowed: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.field = field
        self.allowed = allowed
        super().__init__(message, headers=headers)


class IdempotencyKeyReused(InvalidParameter):
    status = 422
    title = "Idempotency key reused"

    header = "Idempotency-Key"

    def __init__(self, key: str) -> None:
        super().__init__(
            field=self.header,
            message=f"{self.header} '{key[:64]}' was already used with a different request; "
            "use a new key for a new request",
        )


class BadCursor(InvalidParameter):
    """A history `cursor` that is not one the server made (store.history decodes them)."""

    def __init__(self, reason: str) -> None:
        super().__init__(field="cursor", message=f"cursor: {reason}")


class ModelNotFound(RequestError):
    status = 400
    title = "Model not found"

    def __init__(self, model_id: str) -> None:
        self.model_id = model_id
        super().__init__(f"Model '{model_id[:200]}' not found or is disabled")


class Unauthorized(RequestError):
    status = 401
    title = "Unauthorized"


class Forbidden(RequestError):
    """403: a valid key whose account may not use this route (operator routes need an admin
    account, `auraserve keys create --admin`). Only for routes that are not per-account data:
    another account's request stays a 404, indistinguishable from a missing one."""

    status = 403
    title = "Forbidden"


class InsufficientBalance(RequestError):
    status = 402
    title = "Insufficient Balance"

    def __init__(self, message: str = "Your wallet does not have enough balance.") -> None:
        super().__init__(message)


class RequestNotFound(RequestError):
    status = 404
    title = "Not Found"


class RequestConflict(RequestError):
    status = 409
    title = "Conflict"


class DeductExceedsBalance(RequestConflict):
    """A deduct larger than the balance: refused whole, so the balance never goes below zero."""

    def __init__(self, amount: int, balance: int) -> None:
        self.amount = amount
        self.balance = balance
        super().__init__(
            f"Cannot deduct {amount} credits: the balance is {balance}. Deduct at most {balance}."
        )


class PayloadTooLarge(RequestError):
    status = 413
    title = "Payload Too Large"


class UnsupportedMediaType(RequestError):
    status = 415
    title = "Unsupported Media Type"

    def __init__(self, reason: str, accepted: Sequence[str]) -> None:
        """`reason` says what is wrong with the sent type; `accepted` lists the types read."""
        super().__init__(
            f"{reason}; send Content-Type: {' or '.join(accepted)} (UTF-8)",
            extra={"accepted": list(accepted)},
        )


class HeadersTooLarge(RequestError):
    status = 431
    title = "Request Header Fields Too Large"


class TooManyRequests(RequestError):
    """429 with `Retry-After` (seconds) always set."""

    status = 429
    title = "Too Many Requests"

    def __init__(
        self, message: str, *, retry_after: int = 5, headers: Mapping[str, str] | None = None
    ) -> None:
        self.retry_after = retry_after
        super().__init__(message, headers={"Retry-After": str(retry_after), **(headers or {})})


class QueueLimitReached(TooManyRequests):
    """The account has as many jobs queued or running as it may."""


class RateLimited(TooManyRequests):
    """Too many submits this minute, or too many jobs in flight for the account's plan."""


class LongRequestLimitReached(TooManyRequests):
    """The account holds as many open status streams, or waiting sync requests, as it may."""


# --- a sync wait ended without an image ------------------------------------------------------


class JobOutcome(AuraserveError):
    """A sync-dialect request whose job ended without an image; `extra` carries its ids."""


class RequestCancelled(JobOutcome):
    status = 409
    title = "Cancelled"


class GenerationFailed(JobOutcome):
    status = 400
    title = "Generation failed"


class GenerationError(JobOutcome):
    status = 500
    title = "Server Error"


class SyncTimeout(AuraserveError):
    status = 504
    title = "Gateway Timeout"


class ServiceUnavailable(AuraserveError):
    """A 503 with `Retry-After`: the request was fine, the server cannot take it now. Two
    different causes, caught apart: back-pressure (`ServerBusy`) and an outage
    (`StoreUnavailable`)."""

    status = 503
    title = "Service Unavailable"

    def __init__(
        self,
        message: str | None = None,
        *,
        retry_after: int = 1,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        self.retry_after = retry_after
        super().__init__(
            message, headers={"Retry-After": str(retry_after), **(headers or {})}, extra=extra
        )


class ServerBusy(ServiceUnavailable):
    """Every connection slot of the process holds a request in progress: try again shortly."""

    def __init__(self, message: str, *, retry_after: int = 1) -> None:
        super().__init__(message, retry_after=retry_after)


class StoreUnavailable(ServiceUnavailable):
    """The database cannot be reached (restart, failover, network).

    As raised by the store, `in_doubt` tells whether a write may have happened anyway: False,
    the transaction never reached its COMMIT (nothing was written, the client may resend);
    True, the connection failed during the COMMIT (or the one autocommit statement), so the
    server may have committed it. The API turns the in-doubt case, and any outage after a
    request's job exists, into a 503 that names the request (`extra`: request_id,
    polling_url) instead of inviting a resend that would make a second job."""

    def __init__(
        self,
        message: str | None = None,
        *,
        retry_after: int = 2,
        in_doubt: bool = False,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        if message is None:
            message = (
                "The service's database became unavailable while committing this request, so "
                "it may have taken effect: check before resending it"
                if in_doubt
                else "The service's database is unavailable; retry shortly"
            )
        super().__init__(message, retry_after=retry_after, headers=headers, extra=extra)
        self.in_doubt = in_doubt


# --- process start ----------------------------------------------------------------------------


class ConfigError(AuraserveError):
    """A setting is invalid; the message names it and ends with a hint."""


class ModelLoadError(AuraserveError):
    """The weights could not be loaded; the message says why and what to do."""


class BadWeights(ModelLoadError):
    """The weights given are wrong, not unreachable: a truncated file, another architecture,
    a shape that does not fit the components, an unknown quant type, an adapter that does not
    fit. One line naming the file and the problem; the command exits 2 (the same weights will
    never load, unlike a hub that is down)."""


# --- inside the worker and the engine ---------------------------------------------------------


class UnsupportedRequest(AuraserveError):
    """The engine cannot run this request as given (the job ends FAILED, charged nothing)."""

    status = 400
    title = "Generation failed"


class CheckpointMismatch(AuraserveError, ValueError):
    """A step checkpoint cannot resume this run: another request, sampler, schedule or shape,
    an unknown format version, or bytes that are no checkpoint at all. The worker then runs the
    job from step 0; nothing is guessed."""


class JobCancelled(AuraserveError):
    """Raised inside the engine when every job of a batch was cancelled."""


class ExpansionError(AuraserveError):
    """The prompt expander could not produce a usable prompt."""


class BlockedAddress(AuraserveError):
    """An outbound request's host (a webhook's, an image URL's) resolves, at least partly, to
    an address we refuse to connect to.

    `host` is the name as given in the URL, `address` the offending address (None when the
    name resolved to nothing) and `reason` a short classification ("loopback", ...).
    """

    status = 400
    title = "Invalid parameter"

    def __init__(self, host: str, address: IPAddress | None, reason: str) -> None:
        self.host = host
        self.address = address
        self.reason = reason
        if address is None or str(address) == host:
            text = f"host {host!r} is not allowed: {reason}"
        else:
            text = f"host {host!r} resolves to {address}, which is not allowed: {reason}"
        super().__init__(text)
