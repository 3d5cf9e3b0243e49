"""The failures auraserve can report, drawn once.

Each is a domain error with an HTTP status and a short title; `api/errors.py` renders it in the
shape each dialect's clients expect. Nothing outside the API knows about HTTP bodies.
"""

from __future__ import annotations


class AuraserveError(Exception):
    status_code: int = 500
    title: str = "Internal Server Error"

    def __init__(self, message: str | None = None) -> None:
        self.message = message or self.title
        super().__init__(self.message)


class InvalidParameter(AuraserveError):
    status_code = 400
    title = "Invalid parameter"

    def __init__(self, *, field: str, message: str, allowed: str | None = None) -> None:
        self.field = field
        self.allowed = allowed
        super().__init__(message)


class ModelNotFound(AuraserveError):
    status_code = 400
    title = "Model not found"

    def __init__(self, model_id: str) -> None:
        self.model_id = model_id
        super().__init__(f"Model '{model_id}' not found or is disabled")


class Unauthorized(AuraserveError):
    status_code = 401
    title = "Unauthorized"


class InsufficientBalance(AuraserveError):
    status_code = 402
    title = "Insufficient Balance"

    def __init__(self, message: str = "Your wallet does not have enough balance.") -> None:
        super().__init__(message)


class RequestNotFound(AuraserveError):
    status_code = 404
    title = "Not Found"


class QueueLimitReached(AuraserveError):
    status_code = 429
    title = "Too Many Requests"

    def __init__(self, message: str, retry_after: int = 5) -> None:
        self.retry_after = retry_after
        super().__init__(message)


class PayloadTooLarge(AuraserveError):
    status_code = 413
    title = "Payload Too Large"


class ModelLoadError(AuraserveError):
    """The weights could not be loaded; the message says why and what to do."""


class JobCancelled(Exception):
    """Raised inside the engine when every job of a batch was cancelled."""
