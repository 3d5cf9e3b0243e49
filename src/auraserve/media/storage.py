"""Where finished images live. The embedded default is a directory; S3 slots in behind the same
interface. Names are 32 random bytes (base64url), so a media URL is a capability: it can be
fetched without a key, like the seed's CDN URLs, because nobody can guess it."""

from __future__ import annotations

import os
import re
import secrets
import tempfile
from pathlib import Path
from typing import Protocol

from auraserve.core.samplers import MEDIA_TYPES

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{43}\.(png|webp|jpeg)$")


def new_media_name(output_format: str) -> str:
    return f"{secrets.token_urlsafe(32)}.{output_format}"


def media_type_of(name: str) -> str:
    return MEDIA_TYPES[name.rsplit(".", 1)[1]]


class MediaStore(Protocol):
    def put(self, name: str, data: bytes) -> None: ...

    def delete(self, name: str) -> None: ...


class LocalMediaStore:
    """Files under `root`, fanned out by the name's first two characters to keep directories
    small. Writes go to a temporary file first and are renamed into place, so a reader never
    sees half an image."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

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

    def delete(self, name: str) -> None:
        if NAME_PATTERN.match(name):
            (self.root / name[:2] / name).unlink(missing_ok=True)
