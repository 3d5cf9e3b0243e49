"""Settings, read once at start from `AURASERVE_*` variables and an optional TOML file.

Every setting is validated eagerly: a bad value stops the process with a line that names the
environment variable and what it accepts, instead of failing on the first request.
"""

from __future__ import annotations

import difflib
import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from auraserve.core.engine_options import EngineOptions
from auraserve.core.lora import LoraSource, available_loras, is_hub_id
from auraserve.core.presets import ModelPreset, default_presets
from auraserve.errors import ConfigError
from auraserve.outbound import OutboundPolicy, parse_allow_list
from auraserve.store.drivers import check_url, file_url, normalise_url
from auraserve.webhooks.settings import DEFAULT_SCHEDULE, WebhookSettings


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="AURASERVE_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    # Where the embedded default keeps its SQLite file and media.
    data_dir: Path = Path(".auraserve")
    # The server key webhook signing secrets are derived from (HMAC; never stored). Every
    # replica of one deployment must share it: give it here (at least 32 characters) or as a
    # file; with neither, the embedded default creates data_dir/secret.key (mode 0600).
    secret_key: SecretStr | None = None
    secret_key_file: Path | None = None
    # SQLAlchemy URL; empty means SQLite in the data dir. postgresql://… uses psycopg.
    database_url: str = ""
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    # Base of the absolute URLs we hand out (polling_url, media_url); empty means http://host:port.
    public_url: str = ""
    # Weights that every preset runs on when set: a hub id, a local diffusers directory or "tiny".
    model: str = ""
    # Components source for a single weights file given as `model` (see ModelPreset).
    components: str = ""
    presets: dict[str, ModelPreset] = Field(default_factory=default_presets)
    default_preset: str = "auraflow-v0-3"
    # A TOML file of model presets, `[models.<id>]` tables with ModelPreset's fields
    # (weights, components, lora_dir, defaults, price): they replace the built-in presets.
    models_file: Path | None = None

    device: Literal["auto", "cuda", "mps", "cpu"] = "auto"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    offload: Literal["none", "model", "sequential"] = "none"
    # Engine speed modes: a preset of `core.engine_options.PRESETS` and/or field=value pairs,
    # comma separated, e.g. "fast" or "fast,fp8=1"; "default" changes nothing. Given as a mode
    # string (environment, CLI) or as a table of fields (TOML); held as EngineOptions.
    engine_mode: Annotated[EngineOptions, NoDecode] = Field(default_factory=EngineOptions)
    # Sizes the worker compiles and warms up at start, before it reports ready, e.g.
    # "1024x1024,512x512"; empty skips the warm-up (the first request then pays for it).
    warmup_sizes: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Images per transformer forward at most; larger batches run in chunks (bounds memory).
    max_rows: int | None = Field(None, ge=1)
    # LoRA registry (core/lora.py): a folder of `<name>.safetensors` files or diffusers-format
    # `<name>/` folders, plus hub ids a request may name; nothing else is ever loaded.
    lora_dir: Path | None = None
    lora_hub_allowlist: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Bytes of adapter weights kept loaded (LRU), in MiB; at least the largest adapter stays.
    lora_cache_mb: int = Field(1024, ge=0)
    # The highest adapter rank a compiled transformer accepts without recompiling (hot-swap).
    lora_max_rank: int = Field(64, ge=1, le=1024)

    # Prompt expansion (expand_prompt): an OpenAI-compatible chat endpoint (vLLM, Ollama,
    # llama.cpp …) or a local transformers causal LM; with neither, a built-in offline expander.
    expand_url: str = ""
    expand_model: str = ""
    expand_api_key: str = ""
    expand_local_path: str = ""

    # Queue and worker. `workers` is the number of in-process workers `serve` runs: 1 on the
    # embedded default, 0 for API-only replicas when GPU workers run as `auraserve worker`.
    workers: int = Field(1, ge=0, le=16)
    max_batch: int = Field(4, ge=1, le=64)
    lease_seconds: float = Field(30.0, gt=0)
    heartbeat_seconds: float = Field(5.0, gt=0)
    max_attempts: int = Field(3, ge=1, le=100)
    poll_interval_seconds: float = Field(1.0, gt=0)
    max_queued_per_account: int = Field(100, ge=1)

    # API.
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    # HTTP limits (api/server.py), so that no client can hold the process's sockets or memory:
    # the request line and headers together, and any one line of them, in bytes;
    max_header_bytes: int = Field(32 * 1024, ge=1024, le=1024 * 1024)
    max_header_line_bytes: int = Field(8 * 1024, ge=256, le=1024 * 1024)
    # seconds to receive a whole header block, and the longest pause inside a body;
    header_timeout_seconds: float = Field(10.0, gt=0, le=3600)
    body_timeout_seconds: float = Field(15.0, gt=0, le=3600)
    # idle seconds and requests on one keep-alive connection;
    keep_alive_seconds: int = Field(5, ge=1, le=3600)
    keep_alive_max_requests: int = Field(1000, ge=1)
    # open connections per process; at the cap the oldest idle or header-pending one is closed.
    # The process's open-file limit lowers it further (a margin is kept for the store and media).
    max_connections: int = Field(4096, ge=16)
    # Long-lived requests per account (api/limits.py): open status streams, waiting sync requests.
    max_streams_per_account: int = Field(32, ge=1)
    max_sync_waits_per_account: int = Field(32, ge=1)
    bootstrap_credits: int = Field(100_000, ge=0)
    # How long a Sync API or OpenAI Images request waits for its image before answering
    # 504 with the request_id; the job keeps running and stays pollable.
    sync_timeout_seconds: float = Field(300.0, gt=0)
    # Server-sent events on /v2/requests/status/{id}/stream: a comment line this often keeps
    # proxies from closing an idle stream.
    sse_keepalive_seconds: float = Field(15.0, gt=0)
    # Idempotency-Key: how long a key remembers its first response.
    idempotency_ttl_seconds: float = Field(24 * 3600.0, gt=0)

    # Rate limits per account; an account's own requests_per_minute / max_concurrent override
    # these. 0 disables a limit (max_queued_per_account still caps the queue).
    rate_limit_per_minute: int = Field(600, ge=0)
    rate_limit_max_concurrent: int = Field(0, ge=0)
    # Shared limiter state for several API replicas, e.g. redis://127.0.0.1:6379/0; empty
    # keeps counters in this process.
    redis_url: str = ""
    rate_limit_key_prefix: str = Field("auraserve", min_length=1, max_length=100)

    # Webhooks (the Queue API). Hosts or networks that deliveries may reach although they are
    # loopback/private (development and tests), e.g. "127.0.0.1,localhost,::1"; comma separated
    # or a JSON list. Trust for private CAs comes from SSL_CERT_FILE / SSL_CERT_DIR.
    webhook_allow_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Accept plain http:// webhook URLs (development only; the hosted Queue API requires https).
    webhook_allow_http: bool = False
    # The policy built from the two above (`outbound`), with the values it was built from.
    _outbound: tuple[tuple[tuple[str, ...], bool], OutboundPolicy] | None = PrivateAttr(None)
    # Delay before attempt n, in seconds (Standard Webhooks schedule); jittered by ±10 %.
    webhook_schedule: Annotated[list[float], NoDecode] = Field(
        default_factory=lambda: [float(d) for d in DEFAULT_SCHEDULE]
    )
    webhook_timeout_seconds: float = Field(10.0, gt=0, le=120)
    # X-Webhook-Mode: sync sends progress at most this often (the hosted Queue API: 15 s).
    webhook_sync_interval_seconds: float = Field(15.0, gt=0)
    # Deliveries in flight at once per API process.
    webhook_concurrency: int = Field(16, ge=1, le=1000)

    # Media (media/): where finished images live. Empty: files under data_dir/media, served by
    # the API at /media/NAME. `s3://bucket/prefix`: an S3-compatible bucket (AWS S3, R2, MinIO);
    # media_url is then a presigned GET URL valid media_presign_seconds, or a plain URL under
    # media_public_base_url when a CDN or public bucket fronts it. Endpoint, region and
    # credentials fall back to the standard AWS variables (AWS_ENDPOINT_URL, AWS_REGION,
    # AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...) when empty.
    media_url: str = ""
    s3_endpoint_url: str = ""
    s3_region: str = ""
    s3_access_key_id: str = ""
    s3_secret_access_key: SecretStr | None = None
    media_public_base_url: str = ""
    media_presign_seconds: int = Field(3600, ge=60, le=7 * 24 * 3600)
    # Delete outputs this many seconds after their job completed (like hosted APIs that keep
    # outputs for an hour); 0 keeps them forever. Accepts seconds or 30m / 1h / 7d.
    media_retention: Annotated[float, NoDecode] = Field(0.0, ge=0)
    # Objects that no job references are removed once older than this (a worker that died
    # between writing an image and completing its job leaves one behind), checked this often.
    media_orphan_grace_seconds: float = Field(3600.0, gt=0)
    media_sweep_interval_seconds: float = Field(300.0, gt=0)

    # Scale-out. Every process with a store requeues expired leases this often (API replicas
    # too), so a job leaves PROCESSING within lease_seconds + sweep_interval_seconds even when
    # every worker is dead.
    sweep_interval_seconds: float = Field(5.0, gt=0, le=3600)
    # A worker that has not been heard from for this long is not live (`auraserve workers`,
    # GET /v2/workers, "no live worker serves this model" on queued jobs).
    worker_stale_seconds: float = Field(30.0, gt=0)
    # Name a worker registers under; empty means HOST:random.
    worker_id: str = Field("", max_length=100)
    # SIGTERM: stop claiming, finish the batch in hand for up to this long, then hand
    # unfinished jobs back to the queue without spending an attempt (a second signal: at once).
    stop_grace_seconds: float = Field(30.0, ge=0, le=3600)
    # A running job's sampler state is saved into the media store at most this often (at step
    # boundaries), so a worker that takes it over resumes there instead of at step 0. 0: off.
    checkpoint_seconds: float = Field(10.0, ge=0, le=86400)
    # While a status stream watches a job, its worker makes a small preview of each image every
    # this many steps (a latent-to-RGB projection, no VAE pass). 0: no previews.
    preview_every_steps: int = Field(2, ge=0, le=1000)
    # API processes `serve` runs over the one store (the in-process worker stays single).
    api_processes: int = Field(1, ge=1, le=64)
    # One worker process per GPU, each pinned to its device (worker/supervisor.py): "all",
    # or GPU indices as CUDA numbers them ("0,1,3"). Empty: workers share the one `device`.
    gpus: str = Field("", max_length=1000)
    # `--parallel`: how long a rank waits in a collective (or at the start) for a hung peer
    # before the group fails (engine/parallel.py).
    parallel_timeout_s: float = Field(300.0, gt=0, le=86400)
    # Log lines as text for people or as JSON objects (one per line) for collectors.
    log_format: Literal["text", "json"] = "text"

    @field_validator("gpus")
    @classmethod
    def _check_gpus(cls, value: str) -> str:
        value = value.strip()
        if value in ("", "all"):
            return value
        indices = [part.strip() for part in value.split(",")]
        if not all(part.isdigit() for part in indices):
            raise ValueError("must be 'all' or GPU indices separated by commas, e.g. 0,1,3")
        if len(set(indices)) != len(indices):
            raise ValueError("names a GPU twice")
        return ",".join(indices)

    @field_validator("engine_mode", mode="before")
    @classmethod
    def _parse_engine_mode(cls, value: Any) -> Any:
        if isinstance(value, str):
            return EngineOptions.parse(value)  # raises ValueError naming the bad part
        return value

    @field_validator("warmup_sizes")
    @classmethod
    def _valid_sizes(cls, value: list[str]) -> list[str]:
        for size in value:
            w, sep, h = size.lower().partition("x")
            if not (
                sep
                and w.isdigit()
                and h.isdigit()
                and 512 <= int(w) <= 2048
                and 512 <= int(h) <= 2048
            ):
                raise ValueError(f"{size!r} is not WIDTHxHEIGHT with both sides 512 to 2048")
        return value

    @property
    def warmup_size_pairs(self) -> list[tuple[int, int]]:
        return [
            (int(w), int(h)) for w, _, h in (s.lower().partition("x") for s in self.warmup_sizes)
        ]

    @field_validator(
        "webhook_allow_hosts",
        "webhook_schedule",
        "warmup_sizes",
        "lora_hub_allowlist",
        mode="before",
    )
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        # Environment variables carry lists as "a,b,c" (or JSON, for symmetry with TOML).
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("lora_hub_allowlist")
    @classmethod
    def _valid_hub_ids(cls, value: list[str]) -> list[str]:
        for hub_id in value:
            if not is_hub_id(hub_id):
                raise ValueError(f"{hub_id[:100]!r} is not a hub id (owner/name)")
        return value

    @field_validator("webhook_allow_hosts")
    @classmethod
    def _valid_allow_hosts(cls, value: list[str]) -> list[str]:
        parse_allow_list(value)  # raises ValueError naming a bad entry
        return value

    @field_validator("webhook_schedule")
    @classmethod
    def _valid_schedule(cls, value: list[float]) -> list[float]:
        if not value or any(d < 0 for d in value):
            raise ValueError("must be a non-empty list of delays >= 0 (seconds)")
        return value

    @field_validator("secret_key")
    @classmethod
    def _long_secret_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 32:
            raise ValueError("must be at least 32 characters (e.g. `openssl rand -hex 32`)")
        return value

    @field_validator("media_retention", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        # "90", "90s", "30m", "1h", "7d": the forms an operator writes in an environment file.
        if isinstance(value, str):
            text = value.strip().lower()
            units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
            factor = units.get(text[-1:], 0)
            number = text[:-1] if factor else text
            try:
                return float(number) * (factor or 1)
            except ValueError:
                raise ValueError(
                    f"{value[:50]!r} is not a duration: seconds, or a number with s, m, h or d"
                ) from None
        return value

    @field_validator("media_url")
    @classmethod
    def _valid_media_url(cls, value: str) -> str:
        if value and not value.startswith("s3://"):
            raise ValueError("must be empty (files in data_dir/media) or s3://bucket[/prefix]")
        if value and not value[len("s3://") :].split("/", 1)[0]:
            raise ValueError("s3:// URL needs a bucket name: s3://bucket[/prefix]")
        return value

    @field_validator("redis_url")
    @classmethod
    def _valid_redis_url(cls, value: str) -> str:
        if value and not value.startswith(("redis://", "rediss://")):
            raise ValueError("must start with redis:// or rediss://")
        return value

    @model_validator(mode="before")
    @classmethod
    def _presets_from_models_file(cls, data: Any) -> Any:
        """The models file's tables become the presets; a file that cannot be read is left
        to `_valid_models_file`, whose error names AURASERVE_MODELS_FILE."""
        if not isinstance(data, dict) or not data.get("models_file"):
            return data
        try:
            models = _read_models_file(Path(data["models_file"]))
        except ValueError:
            return data
        data = dict(data)
        data["presets"] = models
        if data.get("default_preset") not in models:
            data["default_preset"] = next(iter(models))
        return data

    @field_validator("models_file")
    @classmethod
    def _valid_models_file(cls, value: Path | None) -> Path | None:
        if value is not None:
            _read_models_file(value)
        return value

    # Cross-field checks are field validators (reading the fields declared before), so that an
    # error carries the field that is wrong and load_settings can name what set it.
    @field_validator("default_preset")
    @classmethod
    def _known_preset(cls, value: str, info: ValidationInfo) -> str:
        presets = info.data.get("presets")
        if presets is not None and value not in presets:
            raise ValueError(f"{value!r} is not one of the presets ({', '.join(sorted(presets))})")
        return value

    @field_validator("heartbeat_seconds")
    @classmethod
    def _heartbeat_within_lease(cls, value: float, info: ValidationInfo) -> float:
        lease = info.data.get("lease_seconds")
        if lease is not None and value >= lease:
            raise ValueError(f"must be shorter than lease_seconds ({lease:g})")
        return value

    @field_validator("database_url")
    @classmethod
    def _valid_database_url(cls, value: str) -> str:
        if value:
            check_url(value)
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml_path = os.environ.get("AURASERVE_CONFIG")
        if toml_path:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(toml_path)))
        return tuple(sources)

    # Derived values: computed, never stored, so they cannot disagree with their inputs.
    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return normalise_url(self.database_url)
        return file_url(self.data_dir / "auraserve.db")

    @property
    def media_dir(self) -> Path:
        return self.data_dir / "media"

    @property
    def resolved_public_url(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        return f"http://{self.host}:{self.port}"

    def model_post_init(self, context: Any, /) -> None:
        # Built here, once, rather than on first use: the worker's thread and the API's loop
        # would otherwise race to build it.
        super().model_post_init(context)
        self.outbound  # noqa: B018

    @property
    def outbound(self) -> OutboundPolicy:
        """Where this process may send HTTP requests (webhook deliveries, image fetches).

        Built once, from webhook_allow_hosts and webhook_allow_http (one operator decision for
        every outbound request), and the same object every time after; only a copy with other
        values (`model_copy(update=...)`, a test's assignment) builds its own.
        """
        key = (tuple(self.webhook_allow_hosts), self.webhook_allow_http)
        built = self._outbound
        if built is None or built[0] != key:
            policy = OutboundPolicy.from_allow_list(key[0], allow_http=key[1])
            built = self._outbound = (key, policy)
        return built[1]

    @property
    def webhooks(self) -> WebhookSettings:
        return WebhookSettings(
            outbound=self.outbound,
            schedule=tuple(self.webhook_schedule),
            timeout=self.webhook_timeout_seconds,
            sync_interval=self.webhook_sync_interval_seconds,
            concurrency=self.webhook_concurrency,
            public_url=self.resolved_public_url,
        )

    def weights_for(self, preset_id: str) -> str:
        return self.model or self.presets[preset_id].weights

    def components_for(self, preset_id: str) -> str:
        if self.model:
            return self.components or self.presets[preset_id].components
        return self.presets[preset_id].components

    def loras_for(self, preset_id: str) -> dict[str, LoraSource]:
        """A model's LoRA registry: its own folder when its preset names one."""
        lora_dir = self.presets[preset_id].lora_dir
        if lora_dir is None:
            return self.loras()
        return available_loras(lora_dir, self.lora_hub_allowlist)

    def loras(self) -> dict[str, LoraSource]:
        """The LoRA registry as it is now: the folder is listed on each call, so an adapter
        the operator adds is usable without a restart."""
        return available_loras(self.lora_dir, self.lora_hub_allowlist)


# Settings whose values never appear in an error message (passwords ride in URLs too).
_SECRET_FIELDS = frozenset(
    {
        "secret_key",
        "s3_secret_access_key",
        "s3_access_key_id",
        "expand_api_key",
        "database_url",
        "redis_url",
    }
)


def _read_models_file(path: Path) -> dict[str, Any]:
    """`[models.<id>]` tables of a TOML file; ValueError saying what is wrong."""
    try:
        models = tomllib.loads(path.expanduser().read_text()).get("models")
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path} is not valid TOML: {exc}") from None
    if not isinstance(models, dict) or not models:
        raise ValueError(f"{path} has no [models.<id>] tables")
    return models


def load_settings(*, flags: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Settings from `overrides` (command-line values), the environment and the TOML file
    that AURASERVE_CONFIG names, in that order of precedence.

    A bad value raises ConfigError naming what the user set: the flag (`flags` maps a field to
    the flag that gave it, e.g. {"port": "--port"}), else the environment variable, else the
    key in the settings file."""
    given = {k: v for k, v in overrides.items() if v is not None}
    toml_path = os.environ.get("AURASERVE_CONFIG", "")
    try:
        return Settings(**given)
    except ValidationError as exc:
        table = _toml_table(toml_path)
        lines = [
            _describe(err, flags or {}, given, toml_path, table)
            for err in exc.errors(include_url=False)
        ]
    except (OSError, ValueError) as exc:  # the settings file: missing, unreadable, not TOML
        raise ConfigError(
            f"cannot read the settings file AURASERVE_CONFIG={toml_path}: {exc}"
        ) from None
    raise ConfigError("invalid configuration: " + "; ".join(lines) + " (see README, Configuration)")


def _toml_table(path: str) -> dict[str, Any]:
    if not path:
        return {}
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except (OSError, ValueError):
        return {}


def _describe(
    err: ErrorDetails,
    flags: Mapping[str, str],
    given: Mapping[str, Any],
    toml_path: str,
    table: Mapping[str, Any],
) -> str:
    loc = [str(part) for part in err["loc"]]
    message = err["msg"].removeprefix("Value error, ")
    if not loc:
        return f"settings: {message}"
    field = loc[0]
    if err["type"] == "extra_forbidden":
        close = difflib.get_close_matches(field, Settings.model_fields, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        where = f"{field} in {toml_path}" if field in table else field
        return f"{where}: unknown setting{hint}"
    origin = _origin(loc, flags, given, toml_path, table)
    value = err.get("input")
    if (
        field not in _SECRET_FIELDS
        and isinstance(value, str | int | float)
        and len(str(value)) < 60
    ):
        if origin.startswith("--"):
            origin = f"{origin} {value}"
        elif origin.startswith("AURASERVE_"):
            origin = f"{origin}={value}"
    return f"{origin}: {message}"


def _origin(
    loc: list[str],
    flags: Mapping[str, str],
    given: Mapping[str, Any],
    toml_path: str,
    table: Mapping[str, Any],
) -> str:
    """What set the field at `loc`: a flag, an environment variable, a settings file key."""
    field = loc[0]
    if field in flags:
        return flags[field]
    if field in given:
        # Set in code (tests, embedding): the setting's variable names it best.
        return "AURASERVE_" + field.upper()
    # pydantic-settings matches variable names case-insensitively; nested values may come
    # whole (AURASERVE_PRESETS as JSON) or per part (AURASERVE_PRESETS__NAME__STEPS).
    environment = {name.upper(): name for name in os.environ}
    for depth in range(len(loc), 0, -1):
        name = "AURASERVE_" + "__".join(loc[:depth]).upper()
        if name in environment:
            return environment[name]
    if field in table:
        return f"{'.'.join(loc)} in {toml_path} (AURASERVE_CONFIG)"
    return "AURASERVE_" + field.upper()  # a default that no longer fits what was set


def setting_origin(field: str, flags: Mapping[str, str]) -> str | None:
    """Where a valid setting came from, for messages: the flag, the environment variable or
    the settings-file key that set it; None when it is the default."""
    toml_path = os.environ.get("AURASERVE_CONFIG", "")
    table = _toml_table(toml_path)
    origin = _origin([field], flags, {}, toml_path, table)
    if origin == "AURASERVE_" + field.upper() and origin not in {n.upper() for n in os.environ}:
        return None
    return origin
