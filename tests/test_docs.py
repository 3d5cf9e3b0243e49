"""The project's docs stand alone and name the APIs as users know them: no references to files
outside the repository (the reference pages the APIs were built from, a shared design file), no
tracker issue numbers, and no "seed 000"/"seed 002" names, which read like the RNG `seed`."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Case-insensitive, as `grep -i` would find them.
FORBIDDEN = re.compile(
    r"seed[ -]?00\d|seeds/|DESIGN\.md|\.\./shared|/work/shared|issues? #?\d", re.IGNORECASE
)
# Third-party files shipped as they are.
VENDORED = ROOT / "src" / "auraserve" / "playground" / "vendor"


def _published_files() -> list[Path]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    for path in sorted((ROOT / "src").rglob("*")):
        published = path.suffix in {".py", ".md", ".js", ".html", ".css", ".toml"}
        if path.is_file() and published and VENDORED not in path.parents:
            files.append(path)
    return files


@pytest.mark.parametrize("path", _published_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_outside_references_or_old_names(path: Path) -> None:
    hits = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if FORBIDDEN.search(line)
    ]
    assert not hits, "\n".join(hits)


def test_the_user_docs_name_the_three_apis() -> None:
    text = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    for name in ("## Queue API", "## Sync API", "## OpenAI Images"):
        assert name in text
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for name in ("Queue API", "Sync API", "OpenAI Images"):
        assert name in readme
