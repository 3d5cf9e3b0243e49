"""The web playground and the offline API docs' assets: plain files shipped in the package.

No build step and no CDN: `static/` holds the page (HTML, CSS, ES modules) as written, and
`vendor/` the Swagger UI and ReDoc bundles copied from their npm packages (versions and
licences in `vendor/VERSIONS`), so the page and `/docs` work on a machine without internet.

Everything is served with a strict Content-Security-Policy. The page itself needs no inline
script, no `eval` and no other origin, so a prompt that smuggles markup in can do nothing even
if some future code path forgot to render it as text.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from starlette.staticfiles import StaticFiles
from starlette.types import Message, Receive, Scope, Send

HERE = Path(__file__).parent
STATIC_DIR = HERE / "static"
VENDOR_DIR = HERE / "vendor"
INDEX_HTML = STATIC_DIR / "index.html"

# URL prefixes the API mounts the two folders at.
STATIC_PREFIX = "/playground/static"
VENDOR_PREFIX = "/playground/vendor"


def page_policy(media_origins: Iterable[str] = ()) -> str:
    """The playground's CSP. `media_origins`: where images come from besides this origin (a
    `public_url` on another host)."""
    images = " ".join(["'self'", "blob:", "data:", *sorted(set(media_origins))])
    return "; ".join(
        [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            f"img-src {images}",
            "connect-src 'self'",
            "font-src 'self'",
            "manifest-src 'self'",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )


_INLINE_SCRIPT = re.compile(r"<script(?![^>]*\bsrc=)[^>]*>(.*?)</script>", re.DOTALL)


def docs_policy(html: str) -> str:
    """The CSP for the Swagger UI / ReDoc pages. FastAPI's page templates start the viewer
    from one inline script: it is allowed by its hash, not by 'unsafe-inline'. Both viewers
    inject style attributes and ReDoc runs its search index in a blob: worker, so styles and
    workers are looser than on the playground; scripts still come only from this origin."""
    hashes = [
        "'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'"
        for body in _INLINE_SCRIPT.findall(html)
    ]
    return "; ".join(
        [
            "default-src 'none'",
            "script-src " + " ".join(["'self'", *hashes]),
            "style-src 'self' 'unsafe-inline'",
            "img-src 'self' data:",
            "connect-src 'self'",
            "font-src 'self' data:",
            "worker-src 'self' blob:",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )


def security_headers(policy: str) -> dict[str, str]:
    return {
        "Content-Security-Policy": policy,
        # For browsers older than frame-ancestors.
        "X-Frame-Options": "DENY",
        # A media or docs link followed from the page must not carry the page's URL along.
        "Referrer-Policy": "no-referrer",
        "X-Content-Type-Options": "nosniff",
        "Cross-Origin-Opener-Policy": "same-origin",
    }


class SecuredFiles:
    """A static folder whose every response carries `headers` (CSP and friends). Revalidated
    on each load (ETag), so an upgraded server never runs a stale mix of modules."""

    def __init__(self, directory: Path, headers: Mapping[str, str]) -> None:
        self.files = StaticFiles(directory=directory, follow_symlink=False)
        self.headers = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
        self.headers.append((b"cache-control", b"no-cache"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *self.headers]
            await send(message)

        await self.files(scope, receive, send_secured)
