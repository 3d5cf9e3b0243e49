"""One place that turns the media settings into a store.

The media layer sits below `config`, so it names the settings it reads in a Protocol that
`config.Settings` satisfies, instead of importing them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from pydantic import SecretStr

from auraserve.media.storage import LocalMediaStore, MediaStore


class MediaSettings(Protocol):
    @property
    def media_url(self) -> str: ...
    @property
    def s3_endpoint_url(self) -> str: ...
    @property
    def s3_region(self) -> str: ...
    @property
    def s3_access_key_id(self) -> str: ...
    @property
    def s3_secret_access_key(self) -> SecretStr | None: ...
    @property
    def media_public_base_url(self) -> str: ...
    @property
    def media_presign_seconds(self) -> int: ...
    @property
    def media_dir(self) -> Path: ...
    @property
    def resolved_public_url(self) -> str: ...


def is_s3(settings: MediaSettings) -> bool:
    return settings.media_url.startswith("s3://")


def open_media_store(settings: MediaSettings) -> MediaStore:
    """Files under data_dir/media (served by the API at /media/NAME) or, for `s3://` media
    URLs, an S3-compatible bucket. Settings left empty fall back to boto3's standard AWS
    configuration (environment variables, config files, instance roles)."""
    if not is_s3(settings):
        return LocalMediaStore(settings.media_dir, settings.resolved_public_url)
    # Imported here: boto3 costs a few hundred milliseconds that disk-only processes skip.
    from auraserve.media.s3 import S3Location, S3MediaStore

    secret = settings.s3_secret_access_key
    return S3MediaStore(
        S3Location.parse(settings.media_url),
        endpoint_url=settings.s3_endpoint_url or None,
        region=settings.s3_region or None,
        access_key_id=settings.s3_access_key_id or None,
        secret_access_key=secret.get_secret_value() if secret else None,
        public_base_url=settings.media_public_base_url,
        presign_seconds=settings.media_presign_seconds,
    )
