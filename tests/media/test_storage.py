from pathlib import Path

import pytest

from auraserve.media.storage import LocalMediaStore, new_media_name


def test_put_then_path_and_delete(tmp_path: Path) -> None:
    store = LocalMediaStore(tmp_path)
    name = new_media_name("png")
    store.put(name, b"\x89PNG")
    path = store.path(name)
    assert path is not None and path.read_bytes() == b"\x89PNG"
    assert not list(path.parent.glob(".tmp-*"))  # written atomically
    store.delete(name)
    assert store.path(name) is None


@pytest.mark.parametrize(
    "bad", ["../etc/passwd", "x.png", "a" * 43 + ".gif", "/abs.png", "a" * 42 + "/.png", ""]
)
def test_names_never_escape_the_root(tmp_path: Path, bad: str) -> None:
    store = LocalMediaStore(tmp_path)
    assert store.path(bad) is None
    with pytest.raises(ValueError, match="invalid media name"):
        store.put(bad, b"x")


def test_names_are_unguessable() -> None:
    names = {new_media_name("webp") for _ in range(1000)}
    assert len(names) == 1000
    assert all(len(n) == 43 + len(".webp") for n in names)
