"""The operator's console API, `/v2/admin/…`: accounts with balances and usage, recent jobs of
every account, API keys (create, revoke) and credits (grant, deduct).

Only keys of an admin account (`auraserve keys create --name NAME --admin`) get in; every other
valid key gets 403 before its parameters or body are even read, so a tenant learns nothing
from probing these routes. Each grant and deduct is a ledger entry that names the admin key
that made it and the reason given; a deduct larger than the balance is refused whole (409),
so a balance never goes below zero.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticCustomError

from auraserve.api.account_routes import queue_parameters
from auraserve.api.auth import current_account, presented_key, require_admin
from auraserve.api.deps import RuntimeDep, use_dialect
from auraserve.api.dialects.queue import QUEUE
from auraserve.api.openapi import IsoTime, StatusBody
from auraserve.core.jobs import JobStatus
from auraserve.core.status import iso, status_body
from auraserve.errors import RequestConflict, RequestNotFound
from auraserve.runtime import Runtime
from auraserve.store import admin, keys
from auraserve.store.keys import Account


async def admin_account(request: Request) -> Account:
    account = await current_account(request)
    require_admin(account)
    return account


router = APIRouter(
    prefix="/v2/admin",
    tags=["admin"],
    # The dialect first (errors in its shape), then the admin check, before any parameter.
    dependencies=[use_dialect(QUEUE), Depends(admin_account)],
)

# Names and reasons end up in the ledger and on the console: printable text, not blank.
_TEXT = r"^[^\x00-\x1f\x7f]*[^\x00-\x20\x7f][^\x00-\x1f\x7f]*$"
# Ids are ASCII (`acct_<hex>`, 16-hex key ids, UUIDs): anything else is refused by the pattern
# before it reaches a query (PostgreSQL refuses NUL bytes in text with an error of its own).
_ID = r"^[A-Za-z0-9_-]{1,40}$"
_JOB_ID = r"^[0-9a-f-]{36}$"
_ACCOUNT_ID = Annotated[
    str, Path(max_length=40, pattern=_ID, description="`account_id`, e.g. acct_…")
]
MAX_CREDITS = 10**15


def _whole_number(value: object) -> object:
    """JSON integers only, as everywhere in this API: `3` and `3.0` (a zero fraction is an
    integer in JSON Schema), never `2.5`, `"3"` or `true`."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise PydanticCustomError("whole_number", "Input should be a whole number (a JSON integer)")
    return value


Credits = Annotated[int, BeforeValidator(_whole_number)]


def _responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    return QUEUE.error_responses(*codes, 403)


def _caller_key_id(request: Request) -> str:
    """The id of the admin key this request came with (the key passed `current_account`, so
    it has the `aura_<key id>_<secret>` form)."""
    raw = presented_key(request) or ""
    return raw.split("_")[1]


# ---- response and body models (they describe the JSON the routes build) --------------------


class KeyBody(BaseModel):
    key_id: str
    name: str
    created_at: IsoTime
    revoked_at: IsoTime = Field(description="null while the key works")


class UsageBody(BaseModel):
    requests: int = Field(description="Requests submitted, in any status")
    completed: int
    images: int = Field(description="Images of completed requests")
    spent: int = Field(description="Credits captured by completed requests")
    granted: int
    deducted: int
    last_request_at: IsoTime


class AdminAccountBody(BaseModel):
    account_id: str
    name: str
    is_admin: bool
    balance: int = Field(description="Credits available now (reservations already taken out)")
    reserved: int = Field(description="Credits held for queued and running requests")
    active_jobs: int
    created_at: IsoTime
    usage: UsageBody
    keys: list[KeyBody] = Field(description="Oldest first, revoked ones included")


class AccountsBody(BaseModel):
    accounts: list[AdminAccountBody] = Field(description="Newest first")
    total: int = Field(description="Accounts in the store")


class AdminJobBody(StatusBody):
    account_id: str
    account_name: str
    price: int = Field(description="Credits reserved at submit; spent only if it completes")
    parameters: dict[str, Any] = Field(description="The submit body's parameters")


class JobsBody(BaseModel):
    items: list[AdminJobBody] = Field(description="Newest first, every account")
    next_before: str | None = Field(
        description="Pass as `before` for the next (older) page; null on the last page"
    )


class NewKey(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(min_length=1, max_length=200, pattern=_TEXT, description="A label")
    account_id: str | None = Field(
        None,
        max_length=40,
        pattern=_ID,
        description="Add a key to this existing account; omitted: a new tenant account "
        "(admin accounts are made from the shell only)",
    )
    credits: Credits = Field(
        0,
        ge=0,
        le=MAX_CREDITS,
        description="A new account's starting credits (a ledger grant); 0 with `account_id`",
    )


class CreatedKeyBody(BaseModel):
    key: str = Field(description="The API key: shown once, never stored")
    key_id: str
    account_id: str
    name: str
    balance: int


class RevokedBody(BaseModel):
    key_id: str
    account_id: str
    revoked_at: str | None


class CreditChange(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    action: Literal["grant", "deduct"]
    amount: Credits = Field(ge=1, le=MAX_CREDITS, description="Whole credits")
    reason: str = Field(
        min_length=1, max_length=200, pattern=_TEXT, description="Kept in the ledger entry"
    )


class CreditChangeBody(BaseModel):
    account_id: str
    kind: str = Field(description="grant | deduct: the ledger entry written")
    amount: int
    balance: int = Field(description="The balance after the change")
    reason: str
    actor_key_id: str = Field(description="The admin key that made the change")


# ---- routes --------------------------------------------------------------------------------


@router.get(
    "/accounts",
    summary="Every account with its balance, usage and keys (admin keys only)",
    response_model=AccountsBody,
    responses=_responses(400, 401),
)
async def list_accounts(
    runtime: RuntimeDep,
    limit: Annotated[int, Query(ge=1, le=admin.MAX_ACCOUNTS, description="Accounts")] = 100,
    offset: Annotated[int, Query(ge=0, le=10**9, description="Accounts to skip")] = 0,
) -> Response:
    page = await runtime.db.call(admin.list_accounts, runtime.db, limit=limit, offset=offset)
    body = AccountsBody.model_validate(page, from_attributes=True)
    return JSONResponse(body.model_dump(mode="json"))


def _job(runtime: Runtime, row: admin.JobRow) -> dict[str, Any]:
    job = row.job
    return {
        **status_body(job, runtime.media.url),
        "account_id": job.account_id,
        "account_name": row.account_name,
        "price": job.price,
        "parameters": queue_parameters(job.request),
    }


@router.get(
    "/jobs",
    summary="Recent requests of every account, newest first (admin keys only)",
    response_model=JobsBody,
    responses=_responses(400, 401),
)
async def list_jobs(
    runtime: RuntimeDep,
    limit: Annotated[int, Query(ge=1, le=admin.MAX_JOBS, description="Items per page")] = 50,
    before: Annotated[
        str | None,
        Query(max_length=36, pattern=_JOB_ID, description="`next_before` of the previous page"),
    ] = None,
    status: Annotated[JobStatus | None, Query(description="Only requests in this status")] = None,
    account_id: Annotated[
        str | None,
        Query(max_length=40, pattern=_ID, description="Only this account's requests"),
    ] = None,
) -> Response:
    page = await runtime.db.call(
        admin.recent_jobs,
        runtime.db,
        limit=limit,
        before=before,
        status=status,
        account_id=account_id,
    )
    return JSONResponse(
        {"items": [_job(runtime, r) for r in page.jobs], "next_before": page.next_before}
    )


@router.post(
    "/keys",
    status_code=201,
    summary="Create an API key: a new tenant account, or another key for an account",
    response_model=CreatedKeyBody,
    responses=_responses(400, 401, 404, 409),
)
async def create_key(runtime: RuntimeDep, body: NewKey, request: Request) -> Response:
    db = runtime.db
    if body.account_id is not None:
        if body.credits:
            raise RequestConflict(
                "credits are for a new account; grant an existing account credits with "
                f"POST /v2/admin/accounts/{body.account_id}/credits"
            )
        try:
            created = await runtime.db.call(keys.create_key, db, body.account_id, body.name)
        except LookupError:
            raise RequestNotFound(f"No account {body.account_id}") from None
        balance = created.credits
    else:
        created = await runtime.db.call(keys.create_account, db, body.name)
        balance = 0
        if body.credits:
            change = await runtime.db.call(
                admin.adjust_credits,
                db,
                created.account_id,
                "grant",
                body.credits,
                reason="initial credits",
                actor_key_id=_caller_key_id(request),
            )
            balance = change.balance
    return JSONResponse(
        {
            "key": created.key,
            "key_id": created.key_id,
            "account_id": created.account_id,
            "name": created.name,
            "balance": balance,
        },
        status_code=201,
    )


@router.post(
    "/keys/{key_id}/revoke",
    summary="Revoke an API key: it stops working at once (admin keys only)",
    response_model=RevokedBody,
    responses=_responses(400, 401, 404, 409),
)
async def revoke_key(
    runtime: RuntimeDep,
    request: Request,
    key_id: Annotated[
        str, Path(max_length=40, pattern=_ID, description="The key id (not the key)")
    ],
) -> Response:
    if key_id == _caller_key_id(request):
        # Revoking the key in use would lock the console out mid-session; make another first.
        raise RequestConflict(
            "This is the key you are using: create another admin key, sign in with it, then "
            "revoke this one"
        )
    found = await runtime.db.call(keys.get_key, runtime.db, key_id)
    if found is None:
        raise RequestNotFound(f"No key {key_id}")
    if found.revoked_at is not None or not await runtime.db.call(
        keys.revoke_key, runtime.db, key_id
    ):
        raise RequestConflict(f"Key {key_id} is already revoked")
    revoked = await runtime.db.call(keys.get_key, runtime.db, key_id)
    return JSONResponse(
        {
            "key_id": key_id,
            "account_id": found.account_id,
            "revoked_at": iso(revoked.revoked_at if revoked else None),
        }
    )


@router.post(
    "/accounts/{account_id}/credits",
    summary="Grant or deduct credits, with a reason (admin keys only)",
    description="One ledger entry, kind `grant` or `deduct`, with the admin key's id and the "
    "reason. A deduct larger than the balance is refused (409) and changes nothing.",
    response_model=CreditChangeBody,
    responses=_responses(400, 401, 404, 409),
)
async def change_credits(
    runtime: RuntimeDep,
    request: Request,
    account_id: _ACCOUNT_ID,
    body: CreditChange,
) -> Response:
    actor = _caller_key_id(request)
    try:
        change = await runtime.db.call(
            admin.adjust_credits,
            runtime.db,
            account_id,
            body.action,
            body.amount,
            reason=body.reason,
            actor_key_id=actor,
        )
    except LookupError:
        raise RequestNotFound(f"No account {account_id}") from None
    return JSONResponse(
        {
            "account_id": account_id,
            "kind": change.kind,
            "amount": change.amount,
            "balance": change.balance,
            "reason": body.reason,
            "actor_key_id": actor,
        }
    )
