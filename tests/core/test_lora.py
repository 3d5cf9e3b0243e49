"""The LoRA registry (names only, never paths) and LoRA in the canonical request: ranges,
errors naming the entry, the batch key and the price."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from auraserve.core.lora import MAX_LORAS, LoraSource, LoraSpec, available_loras
from auraserve.core.presets import default_presets
from auraserve.core.request import GenerationRequest, build_request
from auraserve.errors import InvalidParameter

PRESET = default_presets()["auraflow-v0-3"]
REGISTRY = {name: LoraSource(name, "file", f"/loras/{name}.safetensors") for name in "abcde"}


def _build(loras: object, registry: dict[str, LoraSource] | None = None) -> GenerationRequest:
    return build_request(
        {"prompt": "a cat", "loras": loras},
        model="auraflow-v0-3",
        preset=PRESET,
        loras=REGISTRY if registry is None else registry,
    )


def test_registry_lists_files_and_diffusers_folders_only(tmp_path: Path) -> None:
    (tmp_path / "style.safetensors").write_bytes(b"x")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "pytorch_lora_weights.safetensors").write_bytes(b"x")
    (tmp_path / "empty").mkdir()  # no weights: not an adapter
    (tmp_path / ".hidden.safetensors").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("x")
    outside = tmp_path.parent / f"{tmp_path.name}-outside.safetensors"
    outside.write_bytes(b"x")
    os.symlink(outside, tmp_path / "escape.safetensors")  # leaves the folder: skipped
    registry = available_loras(tmp_path, ["owner/hub-lora", "not a hub id"])
    assert list(registry) == ["folder", "owner/hub-lora", "style"]
    assert registry["style"].kind == "file"
    assert registry["folder"].kind == "folder"
    assert registry["owner/hub-lora"] == LoraSource("owner/hub-lora", "hub", "owner/hub-lora")
    assert available_loras(None) == {}
    assert available_loras(tmp_path / "missing") == {}


def test_a_request_names_registry_entries_never_paths(tmp_path: Path) -> None:
    (tmp_path / "style.safetensors").write_bytes(b"x")
    registry = available_loras(tmp_path)
    for name in ("../style", str(tmp_path / "style.safetensors"), "https://x.test/a", "style/"):
        with pytest.raises(InvalidParameter) as info:
            _build([{"name": name}], registry)
        assert info.value.field == "loras[0].name"
        assert "unknown LoRA" in info.value.message
    assert _build([{"name": "style"}], registry).loras == (LoraSpec(name="style", scale=1.0),)


@pytest.mark.parametrize(
    ("loras", "field", "text"),
    [
        ([{"name": "zzz"}], "loras[0].name", "unknown LoRA 'zzz'; available: a, b, c, d, e"),
        ([{"name": "a"}, {"name": "b", "scale": 2.5}], "loras[1].scale", "less than or equal to 2"),
        ([{"name": "a", "scale": -2.01}], "loras[0].scale", "greater than or equal to -2"),
        ([{"name": "a", "scale": True}], "loras[0].scale", "wrong type"),
        ([{"name": "a", "scale": "x"}], "loras[0].scale", "valid number"),
        ([{"name": n} for n in "abcde"], "loras", f"at most {MAX_LORAS} adapters"),
        ([{"name": "a"}, {"name": "a"}], "loras", "each adapter may appear once"),
        ([{"scale": 1}], "loras[0].name", "is required"),
        ([{"name": "a", "weight": 1}], "loras[0].weight", "unknown field"),
        ("a", "loras", "must be a list"),
        (["a"], "loras[0]", "must be an object"),
    ],
)
def test_bad_loras_name_the_entry_and_the_range(loras: object, field: str, text: str) -> None:
    with pytest.raises(InvalidParameter) as info:
        _build(loras)
    assert info.value.field == field
    assert text in info.value.message
    if "unknown LoRA" not in text:
        assert "scale from -2 to 2" in info.value.message


def test_without_a_registry_no_adapter_is_accepted() -> None:
    with pytest.raises(InvalidParameter, match="none are configured"):
        _build([{"name": "a"}], {})
    assert _build([], {}).loras == ()


def test_batch_key_and_price_include_the_adapters() -> None:
    plain = _build([])
    one = _build([{"name": "a", "scale": 0.5}])
    assert one.batch_key != plain.batch_key
    assert one.batch_key != _build([{"name": "a", "scale": 0.6}]).batch_key
    assert one.batch_key != _build([{"name": "b", "scale": 0.5}]).batch_key
    # Order is part of the key: adapters add up in order, and float addition is not exact.
    ab = _build([{"name": "a"}, {"name": "b"}])
    assert ab.batch_key != _build([{"name": "b"}, {"name": "a"}]).batch_key
    assert one.batch_key == _build([{"name": "a", "scale": 0.5}]).batch_key
    # Each adapter adds 10 % of the base price per image, rounded up.
    assert plain.price(PRESET) == 100
    assert one.price(PRESET) == 110
    assert ab.price(PRESET) == 120
    assert _build([{"name": n} for n in "abcd"]).price(PRESET) == 140


def test_a_stored_request_round_trips() -> None:
    request = _build([{"name": "a", "scale": -1.25}, {"name": "b"}])
    again = GenerationRequest.model_validate_json(request.model_dump_json())
    assert again == request
    assert again.batch_key == request.batch_key
