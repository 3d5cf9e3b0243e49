"""Several models in one worker: one engine per distinct weights, each batch run by the
engine of its model (a batch never mixes models: the model is part of the batch key).

Presets that share weights (and components) share one engine, so `auraflow-v0-3` and its
512 px variant cost one load; presets with other weights (a Pony V7 file, a GGUF quant) each
get their own. The worker claims jobs only for the models it was given.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from PIL import Image

from auraserve.core.request import GenerationRequest, check_one_batch
from auraserve.engine.base import CancelCheck, Engine, JobResult, StepCallback
from auraserve.errors import UnsupportedRequest


class FleetEngine:
    """The `Engine` for several models: model id → the engine that runs it."""

    def __init__(self, engines: Mapping[str, Engine]) -> None:
        if not engines:
            raise ValueError("a fleet needs at least one model")
        self.engines = dict(engines)
        distinct = list({id(e): e for e in self.engines.values()}.values())
        self.description = "; ".join(
            f"{', '.join(m for m, e in self.engines.items() if e is engine)}: {engine.description}"
            for engine in distinct
        )
        self.is_test_model = all(engine.is_test_model for engine in distinct)
        self.optimization_log: list[str] = [
            line for engine in distinct for line in getattr(engine, "optimization_log", [])
        ]

    @property
    def models(self) -> list[str]:
        return list(self.engines)

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        *,
        on_step: StepCallback | None = None,
        cancelled: CancelCheck | None = None,
        init_images: Sequence[Image.Image | None] | None = None,
        **checkpoints: Any,
    ) -> list[JobResult]:
        """Runs the batch on its model's engine. ``checkpoints``: `AuraFlowEngine.generate`'s
        checkpoint and preview arguments, passed through as given."""
        check_one_batch(requests)  # the key holds the model: one engine runs the batch
        model = requests[0].model if requests else ""
        engine = self.engines.get(model)
        if engine is None:
            raise UnsupportedRequest(
                f"model {model!r} is not loaded by this worker (it serves "
                f"{', '.join(self.engines)})"
            )
        kwargs: dict[str, Any] = {"on_step": on_step, "cancelled": cancelled}
        if init_images is not None:
            kwargs["init_images"] = init_images
        kwargs.update(checkpoints)  # only when asked for: an engine without them refuses
        return engine.generate(requests, **kwargs)

    @property
    def supports_checkpoints(self) -> bool:
        """Whether every model's engine takes generate's checkpoint and preview arguments."""
        return all(getattr(e, "supports_checkpoints", False) for e in self.engines.values())

    def warmup(self, sizes: Sequence[tuple[int, int]], steps: int = 2) -> float:
        seconds = 0.0
        for engine in {id(e): e for e in self.engines.values()}.values():
            warm = getattr(engine, "warmup", None)
            if warm is not None:
                seconds += float(warm(sizes, steps=steps))
        return seconds


# What a hub id or diffusers folder of AuraFlow v0.3 holds in bf16 (transformer, text encoder,
# VAE): `engine.weights.footprint`; plus CUDA's context and activations at 1024².
_FOLDER_BYTES = 15_210_000_000
_OVERHEAD_BYTES = 2 * 2**30


def estimate_bytes(weights: str) -> int:
    """Device bytes a model's weights need, from the file's header for a single file (its
    size, plus a bf16 text encoder and VAE unless inside), else v0.3's bf16 pipeline."""
    from pathlib import Path

    from auraserve.engine.weights.footprint import TEXT_ENCODER_BYTES, VAE_BYTES
    from auraserve.engine.weights.probe import probe

    if weights == "tiny":
        return 10 * 2**20
    path = Path(weights).expanduser()
    if not path.is_file():
        return _FOLDER_BYTES + _OVERHEAD_BYTES
    info = probe(path)
    inside = info.components_inside
    extra = (0 if "text_encoder" in inside else TEXT_ENCODER_BYTES) + (
        0 if "vae" in inside else VAE_BYTES
    )
    return info.size + extra + _OVERHEAD_BYTES


def models_that_fit(
    models: Mapping[str, str], budget: int | None, size: Callable[[str], int] = estimate_bytes
) -> list[str]:
    """The models (id → weights) a worker can hold together in `budget` bytes (None: all),
    in order, weights shared by several presets counted once."""
    if budget is None:
        return list(models)
    chosen: list[str] = []
    held: dict[str, int] = {}
    for model, weights in models.items():
        cost = 0 if weights in held else size(weights)
        if sum(held.values()) + cost <= budget:
            held.setdefault(weights, cost)
            chosen.append(model)
    return chosen


def load_fleet(
    models: Mapping[str, tuple[str, str]], load: Callable[[str, str], Engine]
) -> FleetEngine:
    """`models`: model id → (weights, components). `load(weights, components)` is called once
    per distinct pair, in the order models are given (the first failure stops the start)."""
    engines: dict[tuple[str, str], Engine] = {}
    by_model: dict[str, Engine] = {}
    for model, key in models.items():
        if key not in engines:
            engines[key] = load(*key)
        by_model[model] = engines[key]
    return FleetEngine(by_model)


__all__ = ["FleetEngine", "estimate_bytes", "load_fleet", "models_that_fit"]
