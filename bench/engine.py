"""Engine benchmark: our AuraFlowEngine against plain diffusers AuraFlowPipeline.

Both run on the *same* pipeline object (same weights, same device and dtype), the same prompt,
size, steps, guidance and seed, in one process, alternating so that machine noise hits both:

* "diffusers": `AuraFlowPipeline.__call__` with `FlowMatchEulerDiscreteScheduler(shift)`;
* "auraserve": `AuraFlowEngine.generate` with sampler euler, scheduler normal (the
  configuration that reproduces diffusers), so the difference is pure engine overhead.

With `--batch N` it also times N different requests batched in one `generate` call against
N sequential diffusers calls (what a server without batching would do).

Beside plain text-to-image it times image-to-image (`--strength`, default 0.6) on the same
request, with our own text-to-image output as the input: VAE encode, round(steps × strength)
steps, decode. Its "vs diffusers" ratio is against diffusers' *text-to-image* run (diffusers
has no AuraFlow image-to-image pipeline), so it shows what the shorter schedule saves.

LoRA rows (`--lora-rank`, default 16; 0 leaves them out) run last, on the same pipeline with
adapter slots added: one random adapter, a hot-swap between two adapters on every run, and a
plain request on that engine. `--lora-compile` compiles the blocks first and reports how many
graphs were compiled while the swaps were timed (hot-swap must add none).

Times: median and best of `--repeats`; on a shared machine other processes only ever add time,
so the best-of ratio is the steadier one there.

Memory: on CUDA, `torch.cuda.max_memory_allocated` per run (reset before each); on the CPU, the
process's peak resident set size during the run, sampled every 2 ms (ru_maxrss only ever grows,
so it cannot tell two runs in one process apart).

    python bench/engine.py                          # tiny model on the CPU, 512², 8 steps
    python bench/engine.py --full --out bench/results/engine-full.json
        # AuraFlow v0.3's full architecture (random weights) on CUDA in bf16, 1024², 25 steps
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import (
    AuraFlowPipeline,
    AuraFlowTransformer2DModel,
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
)
from transformers import UMT5Config, UMT5EncoderModel

from auraserve.core.image_input import steps_to_run
from auraserve.core.request import GenerationRequest
from auraserve.engine.loading import DTYPES, device_name
from auraserve.engine.pipeline import AuraFlowEngine
from auraserve.engine.pos_embed import install_pos_embed_interpolation
from auraserve.engine.tiny import build_tiny_pipeline, build_tiny_tokenizer

PROMPT = "a cat holding a sign that says hello world, golden hour, 35mm photo"
NEGATIVE = "blurry, low quality"
MIB = 2**20


# --- models ----------------------------------------------------------------------------------


def full_size_pipeline(device: torch.device, dtype: torch.dtype) -> AuraFlowPipeline:
    """AuraFlow v0.3's architecture with random weights, materialised directly on `device`.

    Built on the meta device and filled in place on the GPU: initialising 8 B parameters on
    the CPU first would take minutes and 32 GB of RAM for weights we throw away anyway.
    """
    with torch.device("meta"):
        transformer = AuraFlowTransformer2DModel(
            sample_size=64,
            patch_size=2,
            in_channels=4,
            num_mmdit_layers=4,
            num_single_dit_layers=32,
            attention_head_dim=256,
            num_attention_heads=12,
            joint_attention_dim=2048,
            caption_projection_dim=3072,
            out_channels=4,
            pos_embed_max_size=96 * 96,
        )
        text_encoder = UMT5EncoderModel(
            UMT5Config(
                vocab_size=32128,
                d_model=2048,
                d_kv=64,
                d_ff=5120,
                num_layers=24,
                num_heads=32,
                feed_forward_proj="gated-silu",
                is_encoder_decoder=False,
                use_cache=False,
            )
        )
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            sample_size=1024,
            scaling_factor=0.13025,
            force_upcast=True,
        )
    generator = torch.Generator(device).manual_seed(0)
    transformer, text_encoder, vae = (
        _materialise(module, device, dtype, generator)
        for module in (transformer, text_encoder, vae)
    )
    return AuraFlowPipeline(
        tokenizer=build_tiny_tokenizer(),
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.73),
    )


def _materialise(
    module: torch.nn.Module, device: torch.device, dtype: torch.dtype, generator: torch.Generator
) -> Any:
    """Allocate a meta-device module on `device` in `dtype` and give it plausible values:
    norms at identity, everything else N(0, 0.02) — enough for timing, which is all we do."""
    module = module.to(dtype).to_empty(device=device)  # cast while still free on meta
    with torch.no_grad():
        for sub in module.modules():
            is_norm = "Norm" in type(sub).__name__
            for name, param in sub.named_parameters(recurse=False):
                if is_norm:
                    param.fill_(1.0 if name == "weight" else 0.0)
                elif name == "bias":
                    param.zero_()
                else:
                    param.normal_(0.0, 0.02, generator=generator)
    # None of the three has buffers (which would come back empty from the meta device).
    assert not list(module.buffers()), "a buffer would be left uninitialised"
    return module.eval()


def tiny_pipeline(device: torch.device, dtype: torch.dtype) -> AuraFlowPipeline:
    pipe = build_tiny_pipeline()
    return pipe.to(device=device, dtype=dtype) if dtype != torch.float32 else pipe.to(device)


# --- measurement -------------------------------------------------------------------------------


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: psutil if present, else nothing
        try:
            import psutil
        except ImportError:
            return 0
        return int(psutil.Process().memory_info().rss)


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, float]]:
    """Yields a dict that holds `peak_mib` once the block ends."""
    result: dict[str, float] = {}
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        yield result
        torch.cuda.synchronize()
        result["peak_mib"] = torch.cuda.max_memory_allocated() / MIB
        return
    peak = [_rss_bytes()]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.002):
            peak[0] = max(peak[0], _rss_bytes())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        result["peak_mib"] = max(peak[0], _rss_bytes()) / MIB


@dataclass
class Timing:
    name: str
    images: int
    runs_s: list[float] = field(default_factory=list)
    peak_mib: float = 0.0

    @property
    def median_s(self) -> float:
        return statistics.median(self.runs_s)


def timed(fn: Callable[[], Any], timing: Timing, device: torch.device) -> Any:
    with peak_memory(device) as memory:
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        timing.runs_s.append(time.perf_counter() - started)
    timing.peak_mib = max(timing.peak_mib, memory["peak_mib"])
    return out


# --- the two contenders --------------------------------------------------------------------------


def request(args: argparse.Namespace, **overrides: Any) -> GenerationRequest:
    fields: dict[str, Any] = {
        "model": "bench",
        "prompt": PROMPT,
        "negative_prompt": NEGATIVE,
        "guidance_scale": args.guidance,
        "steps": args.steps,
        "width": args.size,
        "height": args.size,
        "seed": args.seed,
        "shift": 1.73,
        "sampler": "euler",
        "scheduler": "normal",
        "output_format": "png",
        "output_quality": 80,
    }
    fields.update(overrides)
    return GenerationRequest(**fields)


def run_diffusers(pipe: AuraFlowPipeline, req: GenerationRequest) -> Any:
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=req.shift)
    return pipe(
        req.prompt,
        negative_prompt=req.negative_prompt,
        guidance_scale=req.guidance_scale,
        num_inference_steps=req.steps,
        height=req.height,
        width=req.width,
        generator=torch.Generator("cpu").manual_seed(req.seed),
    ).images[0]


def bench(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    started = time.perf_counter()
    pipe = full_size_pipeline(device, dtype) if args.full else tiny_pipeline(device, dtype)
    build_s = time.perf_counter() - started
    pipe.set_progress_bar_config(disable=True)
    install_pos_embed_interpolation(pipe)
    engine = AuraFlowEngine(pipe, description="bench", is_test_model=not args.full)
    req = request(args)

    # Warm-up (kernel selection, allocator): one short run of each.
    warm = req.model_copy(update={"steps": 1})
    engine.generate([warm])
    run_diffusers(pipe, warm)

    ours, theirs = Timing("auraserve", 1), Timing("diffusers", 1)
    image_ours = image_theirs = None
    for _ in range(args.repeats):  # alternate so drift and noise hit both alike
        image_theirs = timed(lambda: run_diffusers(pipe, req), theirs, device)
        image_ours = timed(lambda: engine.generate([req])[0].images[0], ours, device)
    diff = int(
        np.abs(
            np.asarray(image_ours, dtype=np.int16) - np.asarray(image_theirs, dtype=np.int16)
        ).max()
    )
    timings = [theirs, ours]

    # Image-to-image beside it: same request, our own image as the input.
    assert image_ours is not None
    init = image_ours
    img2img_req = req.model_copy(update={"image": "bench", "strength": args.strength})
    engine.generate([img2img_req.model_copy(update={"steps": 1})], init_images=[init])
    img2img = Timing(f"auraserve img2img (strength {args.strength:g})", 1)
    for _ in range(args.repeats):
        timed(lambda: engine.generate([img2img_req], init_images=[init]), img2img, device)
    timings.append(img2img)

    if args.lora_rank:
        lora_rows, lora_config = lora_timings(args, pipe, req, device)
        timings += lora_rows
    else:
        lora_config = {}

    if args.batch > 1:
        batch = [
            request(
                args,
                seed=args.seed + 1000 * i,
                guidance_scale=args.guidance + i % 3,
                prompt=f"{PROMPT}, variation {i}",
            )
            for i in range(args.batch)
        ]
        seq = Timing(f"diffusers ×{args.batch} sequential", args.batch)
        batched = Timing(f"auraserve ×{args.batch} batched", args.batch)
        for _ in range(args.repeats):
            timed(lambda: [run_diffusers(pipe, r) for r in batch], seq, device)
            timed(lambda: engine.generate(batch), batched, device)
        timings += [seq, batched]

    return {
        "config": {
            "model": "AuraFlow v0.3 architecture, random weights" if args.full else "tiny",
            "device": str(device),
            "device_name": device_name(device),
            "torch_threads": torch.get_num_threads(),
            "dtype": args.dtype,
            "size": args.size,
            "steps": args.steps,
            "img2img_strength": args.strength,
            "img2img_steps_run": steps_to_run(args.steps, args.strength),
            "guidance_scale": args.guidance,
            "repeats": args.repeats,
            "build_s": round(build_s, 3),
            "torch": torch.__version__,
            "python": sys.version.split()[0],
            **lora_config,
        },
        "results": [
            {**asdict(t), "median_s": t.median_s, "s_per_image": t.median_s / t.images}
            for t in timings
        ],
        "ratio_auraserve_over_diffusers": ours.median_s / theirs.median_s,
        # Best-of ratio: on a shared machine other processes only ever add time.
        "ratio_best_auraserve_over_diffusers": min(ours.runs_s) / min(theirs.runs_s),
        "max_abs_pixel_diff": diff,
    }


def _random_adapter(pipe: AuraFlowPipeline, folder: Path, name: str, rank: int, seed: int) -> None:
    """A rank-`rank` adapter on every attention and feed-forward linear layer of the blocks, in
    diffusers' key layout, with small random weights (what a trained adapter costs to run)."""
    from safetensors.torch import save_file

    generator = torch.Generator("cpu").manual_seed(seed)
    weights: dict[str, torch.Tensor] = {}
    for module_name, module in pipe.transformer.named_modules():
        if not isinstance(module, torch.nn.Linear) or "_blocks." not in module_name:
            continue
        if not any(part in module_name for part in (".attn.", ".ff.", ".ff_context.")):
            continue
        a = torch.randn(rank, module.in_features, generator=generator) * 0.01
        b = torch.randn(module.out_features, rank, generator=generator) * 0.01
        weights[f"transformer.{module_name}.lora_A.weight"] = a.to(torch.bfloat16)
        weights[f"transformer.{module_name}.lora_B.weight"] = b.to(torch.bfloat16)
    save_file(weights, str(folder / f"{name}.safetensors"))


def lora_timings(
    args: argparse.Namespace, pipe: AuraFlowPipeline, req: GenerationRequest, device: torch.device
) -> tuple[list[Timing], dict[str, Any]]:
    """LoRA rows, run last because the adapter slots change `pipe` in place: one adapter on
    the same request, a hot-swap between two adapters on every run, and a plain request on
    the LoRA engine (the cost of the slots when no adapter is asked for). With
    `--lora-compile` the blocks are compiled and the graphs compiled during the timed runs are
    counted: hot-swap must add none."""
    import tempfile

    from auraserve.core.engine_options import EngineOptions
    from auraserve.core.lora import LoraSpec, available_loras
    from auraserve.engine.lora import LoraOptions

    folder = Path(tempfile.mkdtemp(prefix="auraserve-bench-lora-"))
    for index, name in enumerate(("bench-a", "bench-b")):
        _random_adapter(pipe, folder, name, args.lora_rank, seed=index)
    options = EngineOptions(compile="blocks") if args.lora_compile else None
    engine = AuraFlowEngine(
        pipe,
        description="bench+lora",
        is_test_model=not args.full,
        options=options,
        lora=LoraOptions(registry=lambda: available_loras(folder), max_rank=args.lora_rank),
    )
    assert engine.lora is not None
    with_a = req.model_copy(update={"loras": (LoraSpec(name="bench-a"),)})
    with_b = req.model_copy(update={"loras": (LoraSpec(name="bench-b", scale=0.8),)})
    # Warm-up: compile (if asked), read both adapters into the cache.
    for warm in (req, with_a, with_b):
        engine.generate([warm.model_copy(update={"steps": 1})])
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    swaps_before = engine.lora.swaps
    one = Timing(f"auraserve + LoRA (rank {args.lora_rank})", 1)
    swap = Timing("auraserve + LoRA, hot-swap A↔B each run", 1)
    plain = Timing("auraserve plain on the LoRA engine", 1)
    for i in range(args.repeats):
        timed(lambda: engine.generate([with_a]), one, device)
        timed(lambda i=i: engine.generate([with_b if i % 2 == 0 else with_a]), swap, device)
        timed(lambda: engine.generate([req]), plain, device)
    config = {
        "lora_rank": args.lora_rank,
        "lora_compiled": bool(args.lora_compile),
        "lora_swaps_timed": engine.lora.swaps - swaps_before,
        "lora_graphs_compiled_while_timed": torch._dynamo.utils.counters["stats"]["unique_graphs"]
        - graphs_before,
        "lora_log": engine.lora.log_line,
    }
    return [one, swap, plain], config


def table(report: dict[str, Any]) -> str:
    config = report["config"]
    results = report["results"]
    base = {r["images"]: r for r in results if r["name"].startswith("diffusers")}
    lines = [
        f"{config['model']} on {config['device']} ({config['dtype']}), "
        f"{config['size']}², {config['steps']} steps, CFG {config['guidance_scale']:g}, "
        f"median of {config['repeats']}",
        "",
        "| run | images | median s | best s | s / image | s / step | peak MiB "
        "| vs diffusers (median) | (best) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        steps = config["steps"]
        if r["name"].startswith("auraserve img2img"):
            steps = config.get("img2img_steps_run") or steps  # the steps it actually ran
        per_step = r["median_s"] / max(1, steps)
        ref = base[r["images"]]
        ratio = r["median_s"] / ref["median_s"]
        best_ratio = min(r["runs_s"]) / min(ref["runs_s"])
        lines.append(
            f"| {r['name']} | {r['images']} | {r['median_s']:.3f} | {min(r['runs_s']):.3f} | "
            f"{r['s_per_image']:.3f} | {per_step:.3f} | {r['peak_mib']:.0f} | "
            f"{ratio:.2f}× | {best_ratio:.2f}× |"
        )
    lines.append("")
    lines.append(f"max |pixel difference| auraserve vs diffusers: {report['max_abs_pixel_diff']}")
    if config.get("lora_rank"):
        lines.append(
            f"LoRA: {config['lora_log']}; {config['lora_swaps_timed']} hot-swaps timed, "
            f"{config['lora_graphs_compiled_while_timed']} graphs compiled meanwhile "
            f"({'compiled' if config['lora_compiled'] else 'eager'} transformer)"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--full", action="store_true", help="full-size AuraFlow v0.3 architecture, CUDA, bf16"
    )
    parser.add_argument("--device", default=None, help="default: cuda with --full, else cpu")
    parser.add_argument("--dtype", default=None, choices=tuple(DTYPES))
    parser.add_argument("--size", type=int, default=None, help="square size in px (multiple of 16)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--guidance", type=float, default=3.5)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1, help="also time N requests batched")
    parser.add_argument(
        "--strength", type=float, default=0.6, help="image-to-image row's strength (0-1)"
    )
    parser.add_argument(
        "--lora-rank", type=int, default=16, help="rank of the LoRA rows' adapters; 0: no rows"
    )
    parser.add_argument(
        "--lora-compile",
        action="store_true",
        help="compile the LoRA engine's blocks and count recompiles during hot-swaps",
    )
    parser.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    args = parser.parse_args(argv)
    args.device = args.device or ("cuda" if args.full else "cpu")
    args.dtype = args.dtype or ("bfloat16" if args.full else "float32")
    args.size = args.size or (1024 if args.full else 512)
    args.steps = args.steps or (25 if args.full else 8)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--full needs a CUDA GPU (or pass --device cpu and a lot of patience)")
    report = bench(args)
    print(table(report))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
