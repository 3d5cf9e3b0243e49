"""What a client sees of its own account, and the pages built on it: the request history
(`GET /v2/requests`), the credits (`GET /v2/account`), the model catalogue (`GET /v2/models`),
the worker registry for admin keys (`GET /v2/workers`),
the web playground (`GET /`, `/playground`) and the API docs served without a CDN (`/docs`,
`/redoc`).

The history answers in the queue dialect's namespace and shape: each item is the status object
of `GET /v2/requests/status/{id}` (one renderer, `api.results.plain_status`), plus the request's
parameters under the queue dialect's names, so a client can resubmit them as they are.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Query
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field

from auraserve import playground
from auraserve.api import results
from auraserve.api.auth import require_admin
from auraserve.api.deps import CurrentAccount, RuntimeDep, use_dialect
from auraserve.api.dialects.queue import QUEUE
from auraserve.api.openapi import IsoTime, StatusBody
from auraserve.config import Settings
from auraserve.core.jobs import JobStatus
from auraserve.core.lora import LoraSource
from auraserve.core.request import PRESET_DEFAULTS, GenerationRequest
from auraserve.core.samplers import OUTPUT_FORMATS, SAMPLERS, SCHEDULERS
from auraserve.errors import StoreUnavailable, Unauthorized
from auraserve.store import history
from auraserve.store import workers as registry

router = APIRouter(tags=["account"], dependencies=[use_dialect(QUEUE)])

# What /v2/models copies from each canonical field's JSON schema.
_RANGE_KEYS = (
    "type",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "maxItems",
    "enum",
    "description",
)


def queue_parameters(request: GenerationRequest) -> dict[str, Any]:
    """A stored request as the queue dialect's body: submitting it again repeats it."""
    dumped = request.model_dump(mode="json")  # nested values (loras) as plain JSON
    image = dumped.get("image")
    if image is None or not str(image).startswith("https://"):
        # Text-to-image carries no image fields. An inline image is up to megabytes of base64,
        # too much to repeat in every listing: it is left out (with its strength, which means
        # nothing without it). Image URLs are kept, so those requests repeat as they are.
        dumped.pop("image", None)
        dumped.pop("strength", None)
    return {own: dumped[canonical] for canonical, own in QUEUE.names.items() if canonical in dumped}


def parameter_ranges() -> dict[str, dict[str, Any]]:
    """Every queue-dialect parameter's type, range or choices, read from GenerationRequest's
    declared constraints, so the playground's limits cannot drift from the validator's."""
    properties = GenerationRequest.model_json_schema()["properties"]
    return {
        own: {key: value for key, value in properties[canonical].items() if key in _RANGE_KEYS}
        for canonical, own in QUEUE.names.items()
        if canonical in properties
    }


def model_catalogue(
    settings: Settings, live_workers: dict[str, int] | None = None
) -> dict[str, Any]:
    """The catalogue of `GET /v2/models`. `live_workers`: per model, how many live workers
    serve it (None when the store cannot say: the catalogue is still answered)."""
    ranges = parameter_ranges()
    models: list[dict[str, Any]] = []
    sizes: set[tuple[int, int]] = set()
    for model_id, preset in sorted(settings.presets.items()):
        sizes.add((preset.width, preset.height))
        defaults = {QUEUE.names[name]: getattr(preset, name) for name in PRESET_DEFAULTS}
        defaults["num_images"] = GenerationRequest.model_fields["num_images"].default
        defaults["negative_prompt"] = GenerationRequest.model_fields["negative_prompt"].default
        models.append(
            {
                "model_id": model_id,
                "description": preset.description,
                "submit_path": f"/{model_id}/v1/{model_id}-request",
                "price_per_image": preset.price_per_image,
                "defaults": defaults,
                "ranges": ranges,
                "live_workers": None if live_workers is None else live_workers.get(model_id, 0),
                # A model's own adapters: a preset with its own LoRA folder never offers
                # another model's (a Pony adapter is not offered on AuraFlow v0.3).
                "loras": _lora_bodies(settings.loras_for(model_id)),
            }
        )
    return {
        "models": models,
        "samplers": list(SAMPLERS),
        "schedulers": list(SCHEDULERS),
        "output_formats": list(OUTPUT_FORMATS),
        "sizes": [{"width": w, "height": h} for w, h in sorted(sizes)],
        # Names only: where the operator keeps the weights is not the client's business.
        "loras": _lora_bodies(settings.loras()),
    }


def _lora_bodies(adapters: Mapping[str, LoraSource]) -> list[dict[str, str]]:
    return [{"name": name, "source": src.kind} for name, src in adapters.items()]


def live_worker_counts(rows: list[registry.WorkerInfo], stale_seconds: float) -> dict[str, int]:
    """How many live workers serve each model."""
    now = time.time()
    return dict(Counter(m for w in rows if w.is_live(stale_seconds, now) for m in w.models))


class HistoryItem(StatusBody):
    parameters: dict[str, Any] = Field(
        description="The request's parameters under the submit body's names"
    )


class HistoryPage(BaseModel):
    items: list[HistoryItem] = Field(description="Newest first")
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next (older) page; null on the last page"
    )


class LedgerEntryBody(BaseModel):
    id: int
    kind: str = Field(description="grant | reserve | release | capture")
    amount: int = Field(description="Credits concerned, never negative")
    balance_delta: int = Field(description="Effect on the balance: reserve −, release +")
    created_at: IsoTime
    note: str | None
    request_id: str | None = Field(description="The request it belongs to; null for grants")


class AccountBody(BaseModel):
    account_id: str
    name: str
    is_admin: bool = Field(
        description="An operator's account: its keys also reach /v2/admin/… and /v2/workers"
    )
    balance: int = Field(description="Credits available now (reservations already taken out)")
    reserved: int = Field(
        description="Credits held for queued and running requests: spent if they complete, "
        "given back otherwise"
    )
    ledger: list[LedgerEntryBody] = Field(description="Newest first")


class ModelBody(BaseModel):
    model_id: str
    description: str
    submit_path: str
    price_per_image: int = Field(description="Credits per 1024x1024 image at 25 steps")
    defaults: dict[str, Any]
    ranges: dict[str, dict[str, Any]] = Field(
        description="Each body field's JSON-schema type, minimum/maximum or enum"
    )
    live_workers: int | None = Field(
        description="Live workers serving this model now (0: its jobs wait until one starts); "
        "null while the store cannot be reached"
    )
    loras: list[LoraBody] = Field(
        description="The LoRA adapters a request for this model may name (its own folder when "
        "its preset names one, else the server's)"
    )


class LoraBody(BaseModel):
    name: str = Field(description="The value for `loras[i].name`")
    source: str = Field(description="file | folder (AURASERVE_LORA_DIR) | hub (the allowlist)")


class WorkerBody(BaseModel):
    id: str = Field(description="AURASERVE_WORKER_ID, or HOST:random")
    host: str
    pid: int
    models: list[str] = Field(description="The presets this worker claims jobs for")
    device: str = Field(description="Weights, device and dtype")
    state: str = Field(description="starting | ready | busy | stopping | stopped, as last reported")
    liveness: str = Field(
        description="live (heard from within AURASERVE_WORKER_STALE_SECONDS), stale (not heard "
        "from since: crashed, frozen or cut off) or stopped (it said so at exit)"
    )
    jobs_done: int = Field(description="Jobs this worker completed since it started")
    started_at: str | None
    last_seen_at: str | None
    stopped_at: str | None
    seconds_since_seen: float


class WorkersBody(BaseModel):
    workers: list[WorkerBody] = Field(description="Most recently heard from first")
    live_models: list[str] = Field(description="Presets at least one live worker serves")
    stale_after_seconds: float = Field(description="AURASERVE_WORKER_STALE_SECONDS")


class Size(BaseModel):
    width: int
    height: int


class ModelsBody(BaseModel):
    models: list[ModelBody]
    samplers: list[str]
    schedulers: list[str]
    output_formats: list[str]
    sizes: list[Size] = Field(description="The presets' default sizes")
    loras: list[LoraBody] = Field(description="LoRA adapters a request may name in `loras`")


@router.get(
    "/v2/requests",
    summary="The caller's own requests, newest first",
    description="Cursor-paginated. Each item is the status object of "
    "`GET /v2/requests/status/{request_id}` plus the request's `parameters`.",
    response_model=HistoryPage,
    responses=QUEUE.error_responses(400, 401),
)
async def list_requests(
    runtime: RuntimeDep,
    account: CurrentAccount,
    limit: Annotated[int, Query(ge=1, le=history.MAX_PAGE, description="Items per page")] = 20,
    cursor: Annotated[
        str | None, Query(max_length=200, description="`next_cursor` of the previous page")
    ] = None,
    status: Annotated[JobStatus | None, Query(description="Only requests in this status")] = None,
) -> Response:
    # A cursor the server did not make raises errors.BadCursor, a 400 naming `cursor`.
    page = await runtime.db.call(
        history.list_jobs,
        runtime.db,
        account.id,
        limit=limit,
        cursor=cursor,
        status=status,
    )
    return JSONResponse(
        {
            "items": [
                {**results.plain_status(runtime, job), "parameters": queue_parameters(job.request)}
                for job in page.jobs
            ],
            "next_cursor": page.next_cursor,
        }
    )


@router.get(
    "/v2/account",
    summary="The caller's balance, reserved credits and recent ledger entries",
    response_model=AccountBody,
    responses=QUEUE.error_responses(400, 401),
)
async def account_state(
    runtime: RuntimeDep,
    account: CurrentAccount,
    entries: Annotated[
        int,
        Query(ge=0, le=history.MAX_LEDGER_ENTRIES, description="Ledger entries to include"),
    ] = 20,
) -> Response:
    summary = await runtime.db.call(
        history.account_summary, runtime.db, account.id, entries=entries
    )
    if summary is None:  # deleted between the key check and this read
        raise Unauthorized()
    ledger = [LedgerEntryBody.model_validate(e, from_attributes=True) for e in summary.entries]
    body = AccountBody(
        account_id=summary.account_id,
        name=summary.name,
        is_admin=account.is_admin,
        balance=summary.balance,
        reserved=summary.reserved,
        ledger=ledger,
    )
    return JSONResponse(body.model_dump(mode="json"))


@router.get(
    "/v2/workers",
    summary="The registered GPU workers and whether each is live (admin keys only)",
    description="Every worker that registered with this store (in-process and `auraserve "
    "worker` processes on any machine), the most recently heard from first. Only keys of an "
    "admin account (`auraserve keys create --admin`) may read it; other keys get 403.",
    response_model=WorkersBody,
    responses=QUEUE.error_responses(401, 403),
)
async def list_workers(runtime: RuntimeDep, account: CurrentAccount) -> Response:
    require_admin(account)
    rows = await runtime.db.call(registry.list_workers, runtime.db)
    return JSONResponse(
        registry.report(rows, stale_seconds=runtime.settings.worker_stale_seconds, now=time.time())
    )


@router.get(
    "/v2/models",
    summary="The model presets: defaults, parameter ranges, samplers and schedulers",
    description="Public (no key): it describes the server, not an account, and the "
    "playground builds its form from it before a key is entered.",
    response_model=ModelsBody,
)
async def models(runtime: RuntimeDep) -> Response:
    settings = runtime.settings
    try:
        rows = await runtime.db.call(registry.list_workers, runtime.db)
    except StoreUnavailable:
        # The playground builds its form from this; it must not fail with the database.
        return JSONResponse(model_catalogue(settings))
    return JSONResponse(
        model_catalogue(settings, live_worker_counts(rows, settings.worker_stale_seconds))
    )


def install(app: FastAPI, media_origins: list[str]) -> None:
    """Add the account routes, the playground and the offline docs to `app` (which must be
    built with `docs_url=None, redoc_url=None`: these replace FastAPI's CDN pages).
    `media_origins`: where the playground's images come from (this API, an S3 endpoint, a
    CDN)."""
    app.include_router(router)
    # Built per app: the pages' headers depend on where media come from.
    pages = APIRouter(include_in_schema=False)
    page_headers = playground.security_headers(playground.page_policy(media_origins))
    asset_headers = playground.security_headers(playground.page_policy())
    app.mount(
        playground.STATIC_PREFIX,
        playground.SecuredFiles(playground.STATIC_DIR, asset_headers),
        name="playground-static",
    )
    app.mount(
        playground.VENDOR_PREFIX,
        playground.SecuredFiles(playground.VENDOR_DIR, asset_headers),
        name="playground-vendor",
    )

    async def page() -> Response:
        return FileResponse(
            playground.INDEX_HTML,
            media_type="text/html; charset=utf-8",
            headers={**page_headers, "Cache-Control": "no-cache"},
        )

    pages.add_api_route("/", page, methods=["GET"], name="playground")
    pages.add_api_route("/playground", page, methods=["GET"], name="playground_alias")

    openapi_url = app.openapi_url or "/openapi.json"
    favicon = f"{playground.STATIC_PREFIX}/favicon.svg"
    swagger = bytes(
        get_swagger_ui_html(
            openapi_url=openapi_url,
            title=f"{app.title} — API docs",
            swagger_js_url=f"{playground.VENDOR_PREFIX}/swagger-ui/swagger-ui-bundle.js",
            swagger_css_url=f"{playground.VENDOR_PREFIX}/swagger-ui/swagger-ui.css",
            swagger_favicon_url=favicon,
        ).body
    ).decode()
    redoc = bytes(
        get_redoc_html(
            openapi_url=openapi_url,
            title=f"{app.title} — API reference",
            redoc_js_url=f"{playground.VENDOR_PREFIX}/redoc/redoc.standalone.js",
            redoc_favicon_url=favicon,
            with_google_fonts=False,
        ).body
    ).decode()

    def docs_page(html: str) -> Callable[[], Awaitable[Response]]:
        headers = playground.security_headers(playground.docs_policy(html))

        async def serve() -> Response:
            return HTMLResponse(html, headers=headers)

        return serve

    pages.add_api_route("/docs", docs_page(swagger), methods=["GET"], name="swagger_ui")
    pages.add_api_route("/redoc", docs_page(redoc), methods=["GET"], name="redoc")
    app.include_router(pages)
