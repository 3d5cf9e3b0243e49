"""Loading the model, and `auraserve generate` (images without a server or store)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from auraserve.cli.flags import settings_from
from auraserve.config import Settings
from auraserve.errors import ConfigError

if TYPE_CHECKING:
    from auraserve.core.request import GenerationRequest
    from auraserve.engine.base import Engine
    from auraserve.engine.parallel import ParallelSpec


def load_engine(
    settings: Settings, weights: str, components: str = "", lora_model: str | None = None
) -> Engine:
    """One engine on `weights` (a single file takes what it lacks from `components`).
    `lora_model`: the preset whose LoRA folder this engine serves (its own or the global)."""
    # The model stack loads here and only here: the admin commands never reach this.
    from auraserve.cli.progress import elapsed_bar
    from auraserve.core.presets import DEFAULT_WEIGHTS
    from auraserve.engine.expand import make_expander
    from auraserve.engine.lora import LoraOptions, check_registry_fits
    from auraserve.engine.pipeline import load_engine as load_auraflow

    lora = None
    lora_dir = settings.presets[lora_model].lora_dir if lora_model in settings.presets else None
    if settings.lora_dir or settings.lora_hub_allowlist or lora_dir:
        # The registry is listed again for every batch, so adapters dropped into the folder
        # are served without a restart.
        registry = settings.loras if lora_model is None else lambda: settings.loras_for(lora_model)
        lora = LoraOptions(
            registry=registry,
            cache_bytes=settings.lora_cache_mb * 2**20,
            max_rank=settings.lora_max_rank,
        )
    print(f"loading model {weights} …", file=sys.stderr, flush=True)
    with elapsed_bar(f"loading model {weights}"):
        engine = load_auraflow(
            weights,
            components=components or DEFAULT_WEIGHTS,
            device=settings.device,
            dtype=settings.dtype,
            offload=settings.offload,
            max_rows=settings.max_rows,
            options=settings.engine_mode,
            lora=lora,
            expander=make_expander(
                settings.expand_url or None,
                settings.expand_model or None,
                settings.expand_api_key or None,
                settings.expand_local_path or None,
            ),
        )
    if lora is not None and engine.lora is not None and engine.lora.unavailable is None:
        # Every adapter already in the folder must fit this model (rank, targets, shapes):
        # one that does not stops the start with a line naming it (BadWeights, exit 2).
        check_registry_fits(lora.registry(), engine.pipe.transformer, lora.max_rank)
    for line in getattr(engine, "optimization_log", []):
        print(f"engine: {line}", file=sys.stderr)
    if engine.is_test_model:
        print(
            "WARNING: running the tiny TEST model with random weights: it draws noise, not "
            "pictures (use --model fal/AuraFlow-v0.3 or a local directory for real images)",
            file=sys.stderr,
        )
    return engine


def served_models(settings: Settings, weights: str) -> list[str]:
    return [p for p in settings.presets if settings.weights_for(p) == weights]


def worker_models(settings: Settings, requested: str | None) -> list[str]:
    """The presets a worker loads: `--models a,b`, else every preset this machine can hold
    (on a GPU, by its memory and each preset's weights; elsewhere all of them)."""
    if requested:
        names = [name.strip() for name in requested.split(",") if name.strip()]
        unknown = [name for name in names if name not in settings.presets]
        if unknown or not names:
            raise ConfigError(
                f"--models {requested}: unknown preset {', '.join(unknown) or '(none)'}; "
                f"choose from {', '.join(settings.presets)}"
            )
        return names
    from auraserve.engine.fleet import models_that_fit

    budget = None
    if settings.device in ("auto", "cuda") and settings.offload == "none":
        import torch

        if torch.cuda.is_available():
            budget = int(torch.cuda.get_device_properties(0).total_memory)
    models = {p: settings.weights_for(p) for p in settings.presets}
    chosen = models_that_fit(models, budget)
    if not chosen:  # not even one fits: load the default and let offload advice speak
        chosen = served_models(settings, settings.weights_for(settings.default_preset))
    return chosen


def load_models(settings: Settings, models: list[str]) -> Engine:
    """The engine for `models`: one load per distinct weights; several become a fleet."""
    from auraserve.engine.fleet import FleetEngine, load_fleet

    pairs = {m: (settings.weights_for(m), settings.components_for(m)) for m in models}
    loras = {m: settings.presets[m].lora_dir for m in models}
    if len(set(pairs.values())) == 1 and len({str(d) for d in loras.values()}) == 1:
        weights, components = next(iter(pairs.values()))
        return load_engine(settings, weights, components, lora_model=models[0])
    owner = {pair: m for m, pair in reversed(list(pairs.items()))}
    keyed = {m: (*pairs[m], str(loras[m])) for m in models}
    fleet: FleetEngine = load_fleet(
        {m: (key[0], key[1] + "\0" + key[2]) for m, key in keyed.items()},
        lambda weights, rest: load_engine(
            settings,
            weights,
            rest.split("\0", 1)[0],
            lora_model=owner.get((weights, rest.split("\0", 1)[0])),
        ),
    )
    return fleet


def cmd_models_inspect(args: argparse.Namespace) -> int:
    from auraserve.engine.weights.probe import inspect

    text, code = inspect(args.path, as_json=args.json)
    if code and not args.json:
        print(f"auraserve: {text}", file=sys.stderr)
    else:
        print(text)
    return code


def cmd_generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from auraserve.core.request import build_request
    from auraserve.media.encode import encode_image, generation_metadata

    settings = settings_from(args)
    preset_id = args.preset or settings.default_preset
    if preset_id not in settings.presets:
        given = "--preset" if args.preset else "AURASERVE_DEFAULT_PRESET"
        raise ConfigError(
            f"{given} {preset_id}: unknown preset; choose from {', '.join(settings.presets)}"
        )
    out = Path(args.output)
    fmt = args.format or {".jpg": "jpeg", ".jpeg": "jpeg", ".png": "png", ".webp": "webp"}.get(
        out.suffix.lower(), "png"
    )
    fields = {
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "steps": args.steps,
        "guidance_scale": args.cfg,
        "width": args.width,
        "height": args.height,
        "seed": args.seed,
        "shift": args.shift,
        "sampler": args.sampler,
        "scheduler": args.scheduler,
        "output_format": fmt,
        "output_quality": args.quality,
        "num_images": args.num_images,
    }
    request = build_request(fields, model=preset_id, preset=settings.presets[preset_id])
    group = None
    if args.parallel:
        from auraserve.engine.parallel import install, parse_parallel, start_group

        spec = parse_parallel(args.parallel)
        group = start_group(
            _generate_follower,
            (spec, settings, preset_id, request),
            spec,
            settings.device,
            settings.parallel_timeout_s,
        )
    try:
        engine = _preset_engine(settings, preset_id)
        if group is not None:
            install(engine, group.split)
        with tqdm(total=request.steps, desc="denoising", unit="step", file=sys.stderr) as bar:

            def on_step(step: int, total: int) -> None:
                bar.update(step - bar.n)

            (result,) = engine.generate([request], on_step=on_step)
    except BaseException:
        if group is not None:
            group.abort()
        raise
    if group is not None:
        group.finish()
    paths = []
    for i, (image, seed) in enumerate(zip(result.images, result.seeds, strict=True)):
        path = out if len(result.images) == 1 else out.with_stem(f"{out.stem}-{i}")
        metadata = generation_metadata(
            request, seed=seed, prompt_used=result.prompt_used, fidelity=result.fidelity
        )
        metadata.update(width=result.width, height=result.height)
        path.write_bytes(encode_image(image, fmt, request.output_quality, metadata=metadata))
        paths.append(str(path))
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    record = {
        "files": paths,
        "seeds": result.seeds,
        "width": result.width,
        "height": result.height,
        "seconds": round(result.engine_seconds, 3),
    }
    if args.json:
        print(json.dumps(record))
    else:
        seeds = ", ".join(str(seed) for seed in result.seeds)
        print(
            f"wrote {', '.join(paths)} ({result.width}x{result.height}, seed {seeds}, "
            f"{result.engine_seconds:.1f} s)"
        )
    return 0


def _preset_engine(settings: Settings, preset_id: str) -> Engine:
    return load_engine(
        settings,
        settings.weights_for(preset_id),
        settings.components_for(preset_id),
        lora_model=preset_id,
    )


def _generate_follower(
    index: int,
    port: int,
    spec: ParallelSpec,
    settings: Settings,
    preset_id: str,
    request: GenerationRequest,
) -> None:
    """Rank index+1 of `generate --parallel`: the same generation, its share of the rows
    and tokens; rank 0 writes the files."""
    from auraserve.engine.parallel import install, join_group, leave_group

    split = join_group(index + 1, spec, port, settings.device, settings.parallel_timeout_s)
    try:
        engine = _preset_engine(settings, preset_id)
        install(engine, split)
        engine.generate([request])
    finally:
        leave_group()
