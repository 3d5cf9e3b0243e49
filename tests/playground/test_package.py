"""The page and the docs' assets ship inside the Python package, as they are: no build step at
install, nothing fetched at run time."""

from __future__ import annotations

import tomllib
from fnmatch import fnmatch
from pathlib import Path

from auraserve import playground

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "src" / "auraserve"


def test_package_data_lists_every_playground_file() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["auraserve"]
    files = [
        p.relative_to(PACKAGE).as_posix()
        for folder in (playground.STATIC_DIR, playground.VENDOR_DIR)
        for p in folder.rglob("*")
        if p.is_file()
    ]
    assert files
    # fnmatch's `*` also crosses `/`, setuptools' does not: compare segment counts too.
    missing = [
        f
        for f in files
        if not any(fnmatch(f, pat) and f.count("/") == pat.count("/") for pat in patterns)
    ]
    assert missing == []


def test_the_docs_viewers_are_vendored_with_their_licences() -> None:
    vendor = playground.VENDOR_DIR
    for name in (
        "swagger-ui/swagger-ui-bundle.js",
        "swagger-ui/swagger-ui.css",
        "swagger-ui/LICENSE",
        "redoc/redoc.standalone.js",
        "redoc/LICENSE",
        "VERSIONS",
    ):
        assert (vendor / name).is_file(), name
    for name in ("index.html", "app.js", "api.js", "code.js", "style.css", "favicon.svg"):
        assert (playground.STATIC_DIR / name).is_file(), name
