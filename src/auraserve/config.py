"""Settings, read once at start from `AURASERVE_*` variables and an optional TOML file.

Every setting is validated eagerly: a bad value stops the process with a line that names the
environment variable and what it accepts, instead of failing on the first request.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from auraserve.core.samplers import OUTPUT_FORMATS, SAMPLERS, SCHEDULERS

DEFAULT_WEIGHTS = "fal/AuraFlow-v0.3"
TINY_MODEL = "tiny"


class ModelPreset(BaseModel):
    """A model id that clients name in URLs, mapped to weights and default parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    weights: str = DEFAULT_WEIGHTS
    description: str = ""
    width: int = Field(1024, ge=512, le=2048)
    height: int = Field(1024, ge=512, le=2048)
    steps: int = Field(25, ge=1, le=100)
    guidance_scale: float = Field(3.5, ge=0, le=20)
    shift: float = Field(1.73, ge=0, le=10)
    sampler: str = "euler"
    scheduler: str = "normal"
    output_format: str = "png"
    output_quality: int = Field(80, ge=0, le=100)
    # Credits for one 1024x1024 image at 25 steps; other sizes and step counts scale linearly.
    price_per_image: int = Field(100, ge=0)

    @field_validator("sampler")
    @classmethod
    def _known_sampler(cls, value: str) -> str:
        if value not in SAMPLERS:
            raise ValueError(f"must be one of {', '.join(SAMPLERS)}")
        return value

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, value: str) -> str:
        if value not in SCHEDULERS:
            raise ValueError(f"must be one of {', '.join(SCHEDULERS)}")
        return value

    @field_validator("output_format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        if value not in OUTPUT_FORMATS:
            raise ValueError(f"must be one of {', '.join(OUTPUT_FORMATS)}")
        return value


def default_presets() -> dict[str, ModelPreset]:
    return {
        "auraflow-v0-3": ModelPreset(description="AuraFlow v0.3, 1024x1024 by default"),
        # The seed's gateway URL names this id; same weights, 512x512 by default.
        "auraflow-v0-3-512": ModelPreset(
            description="AuraFlow v0.3, 512x512 by default", width=512, height=512
        ),
    }


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="AURASERVE_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    # Where the embedded default keeps its SQLite file and media.
    data_dir: Path = Path(".auraserve")
    # SQLAlchemy URL; empty means SQLite in the data dir. postgresql://… uses psycopg.
    database_url: str = ""
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    # Base of the absolute URLs we hand out (polling_url, media_url); empty means http://host:port.
    public_url: str = ""
    # Weights that every preset runs on when set: a hub id, a local diffusers directory or "tiny".
    model: str = ""
    presets: dict[str, ModelPreset] = Field(default_factory=default_presets)
    default_preset: str = "auraflow-v0-3"

    device: Literal["auto", "cuda", "mps", "cpu"] = "auto"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    offload: Literal["none", "model", "sequential"] = "none"

    # Queue and worker.
    max_batch: int = Field(4, ge=1, le=64)
    lease_seconds: float = Field(30.0, gt=0)
    heartbeat_seconds: float = Field(5.0, gt=0)
    max_attempts: int = Field(3, ge=1, le=100)
    poll_interval_seconds: float = Field(1.0, gt=0)
    max_queued_per_account: int = Field(100, ge=1)

    # API.
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    bootstrap_credits: int = Field(100_000, ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.default_preset not in self.presets:
            raise ValueError(
                f"default_preset {self.default_preset!r} is not one of the presets "
                f"({', '.join(sorted(self.presets))})"
            )
        if self.heartbeat_seconds >= self.lease_seconds:
            raise ValueError("heartbeat_seconds must be shorter than lease_seconds")
        if self.database_url and not self.database_url.startswith(("sqlite", "postgresql")):
            raise ValueError("database_url must start with sqlite:// or postgresql://")
        return self

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
            url = self.database_url
            if url.startswith("postgresql://"):
                url = "postgresql+psycopg://" + url[len("postgresql://") :]
            return url
        return f"sqlite:///{(self.data_dir / 'auraserve.db').resolve()}"

    @property
    def media_dir(self) -> Path:
        return self.data_dir / "media"

    @property
    def resolved_public_url(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        return f"http://{self.host}:{self.port}"

    def weights_for(self, preset_id: str) -> str:
        return self.model or self.presets[preset_id].weights


class ConfigError(Exception):
    """Raised with a message that names the offending setting and ends with a hint."""


def load_settings(**overrides: Any) -> Settings:
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            name = "_".join(str(p) for p in err["loc"]).upper()
            setting = f"AURASERVE_{name}" if name else "settings"
            lines.append(f"{setting}: {err['msg']}")
        raise ConfigError(
            "invalid configuration: " + "; ".join(lines) + " (see README, Configuration)"
        ) from None
