"""`GET /media/{name}`: an image by the name in a status object's output.

On disk (the embedded default) the API serves the file itself. With S3 the status objects
carry presigned or CDN URLs, and this route keeps URLs of the `/media/NAME` form working (handed
out before the move to S3, or built by clients from the name): it redirects, for names some job
owns, to a fresh URL of the object; anything else is a 404, as on disk.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from fastapi.responses import FileResponse, RedirectResponse, Response

from auraserve.errors import RequestNotFound
from auraserve.media.storage import (
    CACHE_CONTROL,
    LocalMediaStore,
    MediaStore,
    is_media_name,
    media_type_of,
    new_media_name,
)
from auraserve.runtime import Runtime
from auraserve.store import media as media_rows


async def serve_media(runtime: Runtime, name: str) -> Response:
    store = runtime.media
    if isinstance(store, LocalMediaStore):
        path = store.path(name)
        if path is None:
            raise RequestNotFound("No such media")
        return FileResponse(
            path,
            media_type=media_type_of(name),
            headers={"X-Content-Type-Options": "nosniff", "Cache-Control": CACHE_CONTROL},
        )
    if not is_media_name(name) or not await runtime.db.call(media_rows.is_owned, runtime.db, name):
        raise RequestNotFound("No such media")
    # 307: the target (a presigned URL) changes over time, so the redirect is never cached.
    return RedirectResponse(store.url(name), status_code=307, headers={"Cache-Control": "no-store"})


def media_origins(store: MediaStore) -> list[str]:
    """The origin media URLs point at (this API, an S3 endpoint or a CDN), for the playground's
    Content-Security-Policy. Read off a URL the store builds, so it follows every setting that
    shapes URLs (endpoint, addressing style, public base URL)."""
    parts = urlsplit(store.url(new_media_name("png")))
    return [f"{parts.scheme}://{parts.netloc}"] if parts.netloc else []
