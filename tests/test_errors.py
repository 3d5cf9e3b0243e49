"""The error tree is the whole list: every exception class of auraserve lives in errors.py."""

from __future__ import annotations

import ast
import builtins
from pathlib import Path

from auraserve import errors

SRC = Path(__file__).resolve().parents[1] / "src" / "auraserve"
ERRORS = SRC / "errors.py"
_BUILTIN_EXCEPTIONS = {
    name
    for name, value in vars(builtins).items()
    if isinstance(value, type) and issubclass(value, BaseException)
}


def _base_names(node: ast.ClassDef) -> list[str]:
    names = []
    for base in node.bases:
        if isinstance(base, ast.Name):
            names.append(base.id)
        elif isinstance(base, ast.Attribute):  # errors.X, sqlalchemy.exc.Y
            names.append(base.attr)
    return names


def _classes(root: Path) -> list[tuple[Path, ast.ClassDef]]:
    found = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        found += [(path, node) for node in ast.walk(tree) if isinstance(node, ast.ClassDef)]
    return found


def exception_classes_outside_errors(root: Path) -> list[str]:
    """Classes defined under `root`, outside errors.py, that derive from an exception: a
    builtin one, one of auraserve's (by name, transitively) or any base named *Error or
    *Exception (a library's)."""
    classes = _classes(root)
    bases: dict[str, set[str]] = {}
    for _, node in classes:
        bases.setdefault(node.name, set()).update(_base_names(node))
    known = set(_BUILTIN_EXCEPTIONS) | {
        name
        for name, value in vars(errors).items()
        if isinstance(value, type) and issubclass(value, BaseException)
    }

    def is_exception(name: str, seen: frozenset[str] = frozenset()) -> bool:
        if name in known or name.endswith(("Error", "Exception")):
            return True
        if name in seen:
            return False
        return any(is_exception(b, seen | {name}) for b in bases.get(name, ()))

    return [
        f"{path.relative_to(root.parent)}:{node.lineno} {node.name}"
        for path, node in classes
        if path != ERRORS and any(is_exception(b) for b in _base_names(node))
    ]


def test_every_exception_class_is_defined_in_errors_py() -> None:
    assert exception_classes_outside_errors(SRC) == []


def test_the_scan_finds_an_exception_class_anywhere(tmp_path: Path) -> None:
    package = tmp_path / "auraserve"
    (package / "store").mkdir(parents=True)
    (package / "store" / "history.py").write_text(
        "class Page:\n    pass\n\nclass BadCursor(ValueError):\n    pass\n"
    )
    (package / "engine.py").write_text(
        "from auraserve.errors import ModelLoadError\n"
        "class Mine(ModelLoadError):\n    pass\n"
        "class Deeper(Mine):\n    pass\n"
        "class Lib(httpx.HTTPError):\n    pass\n"
    )
    assert exception_classes_outside_errors(package) == [
        "auraserve/engine.py:2 Mine",
        "auraserve/engine.py:4 Deeper",
        "auraserve/engine.py:6 Lib",
        "auraserve/store/history.py:4 BadCursor",
    ]


def test_an_outage_is_not_back_pressure() -> None:
    # Both are 503s with Retry-After, but code that sheds load must not swallow an outage.
    assert not issubclass(errors.StoreUnavailable, errors.ServerBusy)
    assert not issubclass(errors.ServerBusy, errors.StoreUnavailable)
    for error in (errors.ServerBusy("full", retry_after=3), errors.StoreUnavailable(retry_after=3)):
        assert isinstance(error, errors.ServiceUnavailable)
        assert error.status == 503
        assert error.headers["Retry-After"] == "3"


def test_store_unavailable_keeps_its_headers_and_extra() -> None:
    error = errors.StoreUnavailable(
        in_doubt=True, headers={"Location": "/x"}, extra={"request_id": "r"}
    )
    assert error.headers == {"Retry-After": "2", "Location": "/x"}
    assert error.extra == {"request_id": "r"}
    assert "may have taken effect" in error.message


def test_moved_classes_keep_their_place_in_the_tree() -> None:
    cursor = errors.BadCursor("not a cursor returned by this endpoint")
    assert isinstance(cursor, errors.InvalidParameter)
    assert (cursor.field, cursor.status) == ("cursor", 400)
    assert issubclass(errors.BadWeights, errors.ModelLoadError)
    assert issubclass(errors.DeductExceedsBalance, errors.RequestConflict)
