"""What a single weights file lacks, from a components source: a diffusers folder or hub id.

A single file holds the transformer (and an all-in-one file the text encoder and VAE too);
the tokenizer, the scheduler, whatever else it lacks, and the transformer config values that
shapes cannot decide (the attention head split) come from a diffusers-format source,
`--components` (default fal/AuraFlow-v0.3). From a hub id only the folders needed are
fetched: the local cache first, the network only when the cache lacks them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from auraserve.errors import ModelLoadError

# A folder's files that every single-file load needs, and the ones each missing part adds.
_ALWAYS = (
    "model_index.json",
    "scheduler/*",
    "tokenizer/*",
    "transformer/config.json",
    # Configs only: a bundled text encoder or VAE takes its shapes from them.
    "text_encoder/config.json",
    "vae/config.json",
)


def resolve(source: str, parts: Sequence[str]) -> Path:
    """A local diffusers folder holding `parts` (e.g. "text_encoder", "vae") and the files
    every load needs; a hub id is fetched (only those folders) into the hub cache."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(
                f"components {source} is not a diffusers folder (no model_index.json); "
                "pass an AuraFlow diffusers folder or hub id with --components"
            )
        return path
    from huggingface_hub import snapshot_download

    patterns = [*_ALWAYS, *(f"{part}/*" for part in parts)]
    try:
        return Path(snapshot_download(source, allow_patterns=patterns, local_files_only=True))
    except Exception as cache_miss:
        try:
            return Path(snapshot_download(source, allow_patterns=patterns))
        except Exception as exc:
            reason = (str(exc).strip() or type(exc).__name__).splitlines()[0][:200]
            raise ModelLoadError(
                f"cannot get components {source} ({', '.join(['tokenizer', *parts])}): "
                f"{reason}; pass a local diffusers folder with --components"
            ) from cache_miss


def dtype_kwargs(dtype: Any) -> dict[str, Any]:
    """Newer diffusers renamed from_pretrained's `torch_dtype` to `dtype` (and warns on the
    old name); older ones only know `torch_dtype`."""
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401
    except ImportError:
        return {"torch_dtype": dtype}
    return {"dtype": dtype}


def transformer_config(folder: Path) -> dict[str, Any]:
    config_path = folder / "transformer" / "config.json"
    try:
        config: dict[str, Any] = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"components {folder}: cannot read transformer/config.json ({exc}); it gives the "
            "transformer's attention heads"
        ) from exc
    return config


def part_config(folder: Path, part: str) -> dict[str, Any]:
    try:
        config: dict[str, Any] = json.loads((folder / part / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"components {folder}: cannot read {part}/config.json ({exc})"
        ) from exc
    return config


__all__ = ["dtype_kwargs", "part_config", "resolve", "transformer_config"]
