"""Images in an S3-compatible bucket (AWS S3, Cloudflare R2, MinIO), for workers and API
replicas on many machines with no shared disk.

The client is boto3 (botocore underneath), chosen over aioboto3 and obstore because:
- its API is synchronous, which is what every caller here is: the worker writes images from its
  own thread, the sweeps run on a maintenance thread and the API reaches the store through
  `Store.call`, like the database;
- presigned GET URLs are built in (`generate_presigned_url`), including the response header
  overrides used below;
- it reads the standard AWS configuration (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
  AWS_REGION, AWS_ENDPOINT_URL_S3, ~/.aws/config profiles, instance roles) when auraserve's own
  settings leave them empty, so an operator configures it like any other AWS tool;
- it is AWS's own, widely deployed and kept current.

This module is imported only when `AURASERVE_MEDIA_URL` is `s3://...` (media.factory), so
processes on local disk never pay for importing boto3.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError
from cachetools import TTLCache

from auraserve.media.storage import CACHE_CONTROL, NAME_PATTERN, media_type_of

# Objects listed per request (the S3 maximum).
_PAGE = 1000
# botocore takes about 2 ms to presign a URL on the 2-core machine, far too slow to do on
# every status poll (target: thousands per second). A URL is reused for this fraction of its
# lifetime, so a client always gets at least 90 % of the configured expiry.
_PRESIGN_REUSE_FRACTION = 0.1
_PRESIGN_CACHE_SIZE = 50_000


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # "" or "some/prefix/" (always ends with "/" when set)

    @classmethod
    def parse(cls, url: str) -> S3Location:
        """`s3://bucket` or `s3://bucket/some/prefix` (settings validate the scheme)."""
        rest = url.removeprefix("s3://")
        bucket, _, prefix = rest.partition("/")
        prefix = prefix.strip("/")
        return cls(bucket, f"{prefix}/" if prefix else "")

    def key(self, name: str) -> str:
        return f"{self.prefix}{name}"


class S3MediaStore:
    """Objects named `prefix/NAME` in one bucket. `url()` is a presigned GET valid
    `presign_seconds`, or `public_base_url/prefix/NAME` when a CDN or public bucket fronts the
    bucket (then nothing is signed and URLs never expire)."""

    def __init__(
        self,
        location: S3Location,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        public_base_url: str = "",
        presign_seconds: int = 3600,
    ) -> None:
        self.location = location
        self.public_base_url = public_base_url.rstrip("/")
        self.presign_seconds = presign_seconds
        config = Config(
            signature_version="s3v4",
            # boto3 >= 1.36 adds CRC checksums to every upload by default; several
            # S3-compatible stores reject or mishandle them. Checksums only where required.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            retries={"mode": "standard", "max_attempts": 3},
            # One client serves the worker, the sweeps and the API's thread pool at once.
            max_pool_connections=32,
        )
        # A session of our own: boto3's default session is not thread-safe to create clients
        # from, and explicit settings must not leak into other boto3 users in the process.
        session = boto3.session.Session()
        self._client: Any = session.client(
            "s3",
            endpoint_url=endpoint_url or None,
            region_name=region or None,
            aws_access_key_id=access_key_id or None,
            aws_secret_access_key=secret_access_key or None,
            config=config,
        )
        ttl = max(1.0, presign_seconds * _PRESIGN_REUSE_FRACTION)
        self._urls: TTLCache[str, str] = TTLCache(maxsize=_PRESIGN_CACHE_SIZE, ttl=ttl)
        self._urls_lock = threading.Lock()

    def check(self) -> None:
        """Raise botocore's error when the bucket cannot be reached with these settings: run
        once at start, so a wrong bucket or key fails the start, not the first finished job."""
        self._client.head_bucket(Bucket=self.location.bucket)

    def _key(self, name: str) -> str:
        if not NAME_PATTERN.match(name):
            raise ValueError(f"invalid media name {name!r}")
        return self.location.key(name)

    def put(self, name: str, data: bytes) -> None:
        # A single PUT is atomic in S3: readers see the whole object or none. The exact
        # Content-Type, inline disposition and immutable caching are what the disk store's
        # route sends; S3 cannot send X-Content-Type-Options, so the presigned URL also forces
        # the response type (see `url`) and the metadata records the intent for proxies.
        media_type = media_type_of(name)
        self._client.put_object(
            Bucket=self.location.bucket,
            Key=self._key(name),
            Body=data,
            ContentType=media_type,
            ContentDisposition="inline",
            CacheControl=CACHE_CONTROL,
            Metadata={"x-content-type-options": "nosniff"},
        )

    def get(self, name: str) -> bytes | None:
        try:
            response = self._client.get_object(Bucket=self.location.bucket, Key=self._key(name))
        except ClientError as exc:
            if _is_missing(exc):
                return None
            raise
        body = response["Body"]
        try:
            return bytes(body.read())
        finally:
            body.close()

    def delete(self, name: str) -> None:
        # DeleteObject succeeds for a missing key, as the protocol wants.
        self._client.delete_object(Bucket=self.location.bucket, Key=self._key(name))
        with self._urls_lock:
            self._urls.pop(name, None)

    def url(self, name: str) -> str:
        if self.public_base_url:
            return f"{self.public_base_url}/{quote(self.location.key(name))}"
        with self._urls_lock:
            cached = self._urls.get(name)
        if cached is not None:
            return cached
        signed: str = self._client.generate_presigned_url(
            "get_object",
            Params={
                "Bucket": self.location.bucket,
                "Key": self._key(name),
                # Whatever the object's stored headers say, the response carries exactly the
                # type its name promises (an object can never be served as HTML).
                "ResponseContentType": media_type_of(name),
            },
            ExpiresIn=self.presign_seconds,
        )
        with self._urls_lock:
            self._urls[name] = signed
        return signed

    def names_older_than(self, cutoff: float) -> Iterator[str]:
        paginator = self._client.get_paginator("list_objects_v2")
        pages = paginator.paginate(
            Bucket=self.location.bucket,
            Prefix=self.location.prefix,
            PaginationConfig={"PageSize": _PAGE},
        )
        prefix_length = len(self.location.prefix)
        for page in pages:
            for item in page.get("Contents", ()):
                name = item["Key"][prefix_length:]
                # Deeper keys ("prefix/x/NAME") and foreign objects are not ours to judge.
                if NAME_PATTERN.match(name) and item["LastModified"].timestamp() < cutoff:
                    yield name

    def close(self) -> None:
        self._client.close()


def _is_missing(exc: ClientError) -> bool:
    code = exc.response.get("Error", {}).get("Code", "")
    return code in ("NoSuchKey", "404", "NotFound")
