"""The tables, in SQLAlchemy Core. Migrations in `migrations/versions` must match this file
(a test compares them). Times are UNIX seconds as floats: portable across SQLite and
PostgreSQL, cheap to compare, and formatted as ISO 8601 only at the API edge."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    Double,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    text,
)

metadata = MetaData()

# SQLite only autoincrements INTEGER PRIMARY KEY; PostgreSQL wants BIGINT for an append-only log.
AutoId = BigInteger().with_variant(Integer(), "sqlite")

accounts = Table(
    "accounts",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("name", String(200), nullable=False),
    # Credits available to spend now (reservations already taken out). Never negative.
    Column("balance", BigInteger, nullable=False, server_default="0"),
    # Jobs of this account that are QUEUED or PROCESSING, kept in step by store.jobs at every
    # transition, so the per-account queue limit costs O(1) instead of a count of the queue.
    Column("active_jobs", Integer, nullable=False, server_default="0"),
    # The webhook signing secret is derived from the server key and this version
    # (core.credentials.ServerKey), never stored. A rotation bumps the version and keeps the
    # previous one signing until `webhook_previous_until` (UNIX seconds).
    Column("webhook_secret_version", Integer, nullable=False, server_default="1"),
    Column("webhook_previous_version", Integer, nullable=True),
    Column("webhook_previous_until", Double, nullable=True),
    # Per-account overrides; NULL means the server default.
    Column("max_queued", Integer, nullable=True),
    Column("requests_per_minute", Integer, nullable=True),
    Column("max_concurrent", Integer, nullable=True),
    # Operators' accounts: their keys may read deployment state (GET /v2/workers).
    Column("is_admin", Boolean, nullable=False, server_default=text("false")),
    Column("created_at", Double, nullable=False),
    CheckConstraint("balance >= 0", name="ck_accounts_balance_nonnegative"),
    CheckConstraint("active_jobs >= 0", name="ck_accounts_active_nonnegative"),
)

api_keys = Table(
    "api_keys",
    metadata,
    # The public part of the key (it is embedded in the key itself); used to look the key up.
    Column("id", String(40), primary_key=True),
    Column("account_id", String(40), ForeignKey("accounts.id"), nullable=False),
    Column("name", String(200), nullable=False),
    # SHA-256 of the whole key, hex. Keys carry 256 bits of entropy, so a fast hash is safe.
    Column("key_hash", String(64), nullable=False),
    Column("created_at", Double, nullable=False),
    Column("revoked_at", Double, nullable=True),
    Index("ix_api_keys_account", "account_id"),
)

ledger = Table(
    "ledger",
    metadata,
    Column("id", AutoId, primary_key=True, autoincrement=True),
    Column("account_id", String(40), ForeignKey("accounts.id"), nullable=False),
    Column("job_id", String(36), nullable=True),
    # grant | deduct | reserve | capture | release
    Column("kind", String(16), nullable=False),
    # Effect on the available balance: grant +, reserve -, release +, capture 0 (the reserved
    # credits are spent). `amount` keeps the credits concerned, always >= 0.
    Column("amount", BigInteger, nullable=False),
    Column("balance_delta", BigInteger, nullable=False),
    Column("created_at", Double, nullable=False),
    Column("note", String(200), nullable=True),
    # The admin key that wrote the entry over /v2/admin (grant, deduct); NULL for entries the
    # system wrote and for grants made from the shell.
    Column("actor_key_id", String(40), nullable=True),
    CheckConstraint("amount >= 0", name="ck_ledger_amount_nonnegative"),
    Index("ix_ledger_account", "account_id", "id"),
    # At most one reservation and at most one settlement (capture XOR release) per job: the
    # database itself refuses a double charge or a double refund.
    Index(
        "ux_ledger_job_reserve",
        "job_id",
        unique=True,
        sqlite_where=text("kind = 'reserve'"),
        postgresql_where=text("kind = 'reserve'"),
    ),
    Index(
        "ux_ledger_job_settle",
        "job_id",
        unique=True,
        sqlite_where=text("kind IN ('capture', 'release')"),
        postgresql_where=text("kind IN ('capture', 'release')"),
    ),
)

jobs = Table(
    "jobs",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("account_id", String(40), ForeignKey("accounts.id"), nullable=False),
    Column("model_id", String(100), nullable=False),
    # QUEUED | PROCESSING | COMPLETED | FAILED | ERROR | CANCELLED
    Column("status", String(16), nullable=False),
    Column("priority", Integer, nullable=False, server_default="0"),
    # The canonical GenerationRequest as JSON.
    Column("params", Text, nullable=False),
    Column("batch_key", String(200), nullable=False),
    # Images this job adds to a batch; the worker fills batches up to max_batch images.
    Column("num_images", Integer, nullable=False),
    Column("price", BigInteger, nullable=False),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("max_attempts", Integer, nullable=False),
    Column("lease_owner", String(100), nullable=True),
    Column("lease_expires_at", Double, nullable=True),
    Column("progress_step", Integer, nullable=False, server_default="0"),
    Column("progress_total", Integer, nullable=False, server_default="0"),
    # The step this attempt resumed from (a step checkpoint); NULL when it started at step 0.
    Column("progress_resumed_from", Integer, nullable=True),
    # Someone watches this job (an open status stream renews it) until then: its worker makes
    # live previews only while this lies ahead (store.previews).
    Column("preview_wanted_until", Double, nullable=True),
    Column("cancel_requested", Boolean, nullable=False, server_default=text("false")),
    Column("error", Text, nullable=True),
    # {"media": [names], "media_type": ..., "seeds": [...], "prompt_used": ..., "warnings": [...]}
    Column("output", Text, nullable=True),
    # Timestamped progress lines, JSON list of [unix_time, message].
    Column("logs", Text, nullable=True),
    Column("engine_seconds", Double, nullable=True),
    Column("webhook_url", String(2048), nullable=True),
    Column("webhook_mode", String(16), nullable=True),
    Column("created_at", Double, nullable=False),
    Column("updated_at", Double, nullable=False),
    Column("started_at", Double, nullable=True),
    Column("completed_at", Double, nullable=True),
    Index("ix_jobs_queue", "status", "priority", "created_at", "id"),
    Index("ix_jobs_account_status", "account_id", "status"),
    # An account's history, newest first, a page at a time (store/history.py).
    Index("ix_jobs_account_created", "account_id", "created_at", "id"),
    Index("ix_jobs_lease", "status", "lease_expires_at"),
)

# A running job's newest step checkpoint (store.checkpoints): one row per job, replaced as the
# job moves on, so the bytes held are bounded by the running jobs. The object lives in the
# media store under `name`; the row is what keeps the orphan sweep away from it.
job_checkpoints = Table(
    "job_checkpoints",
    metadata,
    Column("job_id", String(36), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    Column("name", String(100), nullable=False, unique=True),
    Column("step", Integer, nullable=False),
    Column("total", Integer, nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("worker_id", String(100), nullable=False),
    Column("created_at", Double, nullable=False),
)

# The newest live preview of a running job (store.previews): small JPEGs, one per image, as a
# JSON list of base64 strings; replaced every few steps, dropped with the job.
job_previews = Table(
    "job_previews",
    metadata,
    Column("job_id", String(36), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    Column("step", Integer, nullable=False),
    Column("total", Integer, nullable=False),
    Column("images", Text, nullable=False),
    Column("created_at", Double, nullable=False),
)

webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    Column("id", AutoId, primary_key=True, autoincrement=True),
    Column("job_id", String(36), nullable=False),
    Column("account_id", String(40), ForeignKey("accounts.id"), nullable=False),
    Column("url", String(2048), nullable=False),
    # The Standard Webhooks `webhook-id`: the same across retries of one event.
    Column("event_id", String(80), nullable=False, unique=True),
    Column("payload", Text, nullable=False),
    Column("terminal", Boolean, nullable=False),
    # pending | delivered | failed | gone | superseded (a newer progress event replaced it)
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("next_attempt_at", Double, nullable=False),
    Column("last_status_code", Integer, nullable=True),
    Column("last_error", Text, nullable=True),
    Column("created_at", Double, nullable=False),
    Column("updated_at", Double, nullable=False),
    Index("ix_webhook_due", "state", "next_attempt_at"),
    Index("ix_webhook_job", "job_id"),
)

idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    Column("account_id", String(40), ForeignKey("accounts.id"), primary_key=True),
    Column("key", String(255), primary_key=True),
    Column("request_hash", String(64), nullable=False),
    Column("job_id", String(36), nullable=True),
    Column("status_code", Integer, nullable=True),
    Column("response", Text, nullable=True),
    Column("created_at", Double, nullable=False),
)

# Every image object a job owns, written in the transaction that completes the job. An object
# in the media store without a row here belongs to nothing (its worker died before completing,
# or the completion was refused) and the sweep removes it after a grace period; retention
# deletes rows and objects together.
media_objects = Table(
    "media_objects",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("job_id", String(36), nullable=False),
    Column("created_at", Double, nullable=False),
    Index("ix_media_objects_job", "job_id"),
    Index("ix_media_objects_created", "created_at"),
)

# Workers register themselves and refresh last_seen_at with their heartbeat, so any process
# can tell which models some live worker serves (store.workers).
workers = Table(
    "workers",
    metadata,
    Column("id", String(100), primary_key=True),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    # JSON list of preset ids this worker claims jobs for.
    Column("models", Text, nullable=False),
    # Human label: weights, device and dtype (Engine.description).
    Column("device", String(255), nullable=False),
    # starting | ready | busy | stopping | stopped
    Column("state", String(16), nullable=False),
    Column("jobs_done", Integer, nullable=False, server_default="0"),
    Column("started_at", Double, nullable=False),
    Column("last_seen_at", Double, nullable=False),
    Column("stopped_at", Double, nullable=True),
    Index("ix_workers_seen", "last_seen_at"),
)
