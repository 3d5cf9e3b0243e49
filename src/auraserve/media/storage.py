"""Where finished images live. The embedded default is a directory; S3 (media/s3.py) slots in
behind the same interface. Names are 32 random bytes (base64url), so a media URL is a
capability: it can be fetched without a key, like hosted APIs' CDN URLs, because nobody can guess
it."""

from __future__ import annotations

import os
import re
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from auraserve.core.samplers import MEDIA_TYPES

# Images, and running jobs' step checkpoints (`.ckpt`, never served: no image row owns one).
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{43}\.(png|webp|jpeg|ckpt)$")
CHECKPOINT_SUFFIX = "ckpt"


def new_media_name(output_format: str) -> str:
    return f"{secrets.token_urlsafe(32)}.{output_format}"


def media_type_of(name: str) -> str:
    return MEDIA_TYPES.get(name.rsplit(".", 1)[1], "application/octet-stream")


def is_media_name(name: str) -> bool:
    return NAME_PATTERN.match(name) is not None


# Every object is written once under a fresh random name and never changes.
CACHE_CONTROL = "public, max-age=31536000, immutable"


class MediaStore(Protocol):
    """What the worker, the API and the lifecycle sweeps need from a place for images."""

    def put(self, name: str, data: bytes) -> None:
        """Store `data` under `name` (atomically: readers see all of it or nothing)."""
        ...

    def get(self, name: str) -> bytes | None:
        """The object's bytes; None when there is no such object. Other failures raise."""
        ...

    def delete(self, name: str) -> None:
        """Remove the object; a missing one is not an error."""
        ...

    def url(self, name: str) -> str:
        """The absolute URL a client fetches the object by."""
        ...

    def names_older_than(self, cutoff: float) -> Iterator[str]:
        """Names of stored objects last written before `cutoff` (UNIX seconds). Only valid
        media names: anything else sharing the directory or bucket prefix is never ours."""
        ...

    def close(self) -> None:
        """Release connections (the process is closing its runtime)."""
        ...


class LocalMediaStore:
    """Files under `root`, fanned out by the name's first two characters to keep directories
    small. Writes go to a temporary file first and are renamed into place, so a reader never
    sees half an image."""

    def __init__(self, root: Path, public_url: str = "") -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        # The API serves these files at /media/NAME (api/app.py).
        self.public_url = public_url.rstrip("/")

    def path(self, name: str) -> Path | None:
        """The file for a valid, existing name; None otherwise (never escapes `root`)."""
        if not NAME_PATTERN.match(name):
            return None
        path = self.root / name[:2] / name
        return path if path.is_file() else None

    def put(self, name: str, data: bytes) -> None:
        if not NAME_PATTERN.match(name):
            raise ValueError(f"invalid media name {name!r}")
        folder = self.root / name[:2]
        folder.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, folder / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, name: str) -> bytes | None:
        path = self.path(name)
        if path is None:
            return None
        try:
            return path.read_bytes()
        except FileNotFoundError:  # deleted between the check and the read
            return None

    def delete(self, name: str) -> None:
        if NAME_PATTERN.match(name):
            (self.root / name[:2] / name).unlink(missing_ok=True)

    def url(self, name: str) -> str:
        return f"{self.public_url}/media/{name}"

    def names_older_than(self, cutoff: float) -> Iterator[str]:
        for folder in self.root.iterdir():
            if not folder.is_dir():
                continue
            for entry in os.scandir(folder):
                if not NAME_PATTERN.match(entry.name):
                    continue
                try:
                    mtime = entry.stat().st_mtime
                except FileNotFoundError:
                    continue
                if mtime < cutoff:
                    yield entry.name

    def close(self) -> None:
        pass  # nothing held open
