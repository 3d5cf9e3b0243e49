"""GPU benchmark (issue 5): plain diffusers against every auraserve engine mode, same weights.

Builds AuraFlow v0.3's full architecture from its config with random weights (transformer
4 joint + 32 single blocks, width 3072 = 12 heads × 256, patch 2, 4 latent channels,
pos_embed_max_size 96²; UMT5 encoder d_model 2048, 24 layers, d_ff 5120, 32 heads, d_kv 64,
vocab 32128; SDXL-type VAE; nothing downloaded) directly on the GPU, and times in one process:

* "diffusers": `AuraFlowPipeline.__call__`, eager, in the model dtype (bf16) — the baseline;
* every engine mode (`auraserve.core.engine_options.PRESETS`, or `--custom LABEL=SPEC`), each on
  its own copy of the same transformer and VAE (the modes change modules in place), so one
  mode's fusing, compiling or quantising never leaks into another's numbers.

Per mode and size (512², 1024², 1536² by default; 25 steps, CFG on, batch 1, then the batch
sizes at 512²): seconds per image (median of `--repeats` after one untimed run; clocks read
after `torch.cuda.synchronize()`), the fraction of the transformer's FLOP floor reached, peak
GPU memory, the worker-start warm-up (`AuraFlowEngine.warmup` over the benchmark's sizes, which
is where compilation happens; inductor's cache is emptied per mode so it is a cold start), and
the image's PSNR against the unoptimised engine on the same seed (random weights make the image
noise-like, so this is a numerical check, not an aesthetic one).

FLOP floor: forward FLOPs are computed from the transformer's shapes (`transformer_flops`:
44.0 T at 1024², 11.2 T at 512²); one image costs steps × rows × that (rows = 2 with CFG), and
the floor is that over `--peak-tflops` (790 TFLOP/s, what an H200 reaches on large dense bf16
products). Text encoder and VAE are not in the floor, so 100% is out of reach by design.

Memory: the copies are measured against `max_memory_allocated` minus the bytes of the base
components parked beside them, i.e. what a server running that mode alone would hold. Then the
offload modes (`--memory-modes none,model,sequential`) run on the base pipeline at
`--memory-size`, and the table says which GPU size (12/16/24 GiB …) each fits.

    python bench/gpu.py                                   # everything (≈ 40 min on an H200)
    python bench/gpu.py --modes diffusers,default,fast,fp8 --out bench/results/gpu-a.json
    python bench/gpu.py --render bench/results/gpu-*.json --write-docs   # merge, update docs
    python bench/gpu.py --tiny --device cpu               # the script itself, on the CPU (CI)
    python bench/gpu.py --modes '' --memory-modes '' --multi-gpu   # per-GPU workers, 1 → N GPUs

`--multi-gpu` (bench/multi_gpu.py) needs a machine with two GPUs or more: on one GPU it is
skipped and says so. It measures one worker process per GPU (1 GPU against 2, 4 … all), then
the `--parallel` modes that split one image across GPUs (cfg=2, ulysses=2, cfg=2,ulysses=2,
ulysses=4; a mode needing more GPUs than there are is skipped with the reason).

A device command is limited to 10 minutes on the project's lent GPU machines (and a session to
30 minutes of device time), so split the work and merge the parts with `--render`; keep
"default" in every part (the PSNR column compares against it, within one run), and measure the
offload modes once (`--memory-modes ''` elsewhere). E.g., each part a few minutes on an H200:

    python bench/gpu.py --sizes 1024 --batch-sizes '' --memory-modes '' \
        --modes diffusers,default,fast,fp8,fp8_native --out bench/results/gpu-1024.json
    python bench/gpu.py --sizes 512,1536 --memory-modes '' \
        --modes diffusers,default,fast --out bench/results/gpu-sizes.json
    python bench/gpu.py --modes '' --out bench/results/gpu-memory.json   # offload modes only
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib.util
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from diffusers import AuraFlowPipeline, FlowMatchEulerDiscreteScheduler

from auraserve.core.engine_options import PRESETS, EngineOptions
from auraserve.core.request import GenerationRequest
from auraserve.engine.loading import DTYPES, device_name
from auraserve.engine.pipeline import AuraFlowEngine
from auraserve.engine.pos_embed import install_pos_embed_interpolation
from auraserve.errors import ModelLoadError

MIB = 2**20
GIB = 2**30
DOCS_START = "<!-- gpu-bench:start -->"
DOCS_END = "<!-- gpu-bench:end -->"
DEFAULT_DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
ALL_MODES = ("diffusers", *PRESETS)
GPU_SIZES_GIB = (12, 16, 24, 32, 40, 48, 80, 141)
# Targets of issue 5 (1024², 25 steps, CFG, batch 1).
TARGET_BF16_S = 3.5
TARGET_FP8_S = 2.2
TARGET_SPEEDUP = 1.6
REGISTER_TOKENS = 8  # AuraFlow prepends 8 learned register tokens to the text stream
TEXT_TOKENS = 256


def _sibling(name: str) -> ModuleType:
    """bench/<name>.py as a module (bench/ is scripts, not a package)."""
    path = Path(__file__).with_name(f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"auraserve_bench_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


_engine_bench = _sibling("engine")
psnr: Callable[[Any, Any], float] = _sibling("quality").psnr
_multi_gpu = _sibling("multi_gpu")
PROMPT: str = _engine_bench.PROMPT
NEGATIVE: str = _engine_bench.NEGATIVE


# --- FLOPs ---------------------------------------------------------------------------------------


def transformer_flops(
    config: Any, height: int, width: int, *, text_tokens: int = TEXT_TOKENS, vae_scale: int = 8
) -> float:
    """FLOPs of one transformer forward for one row (one image, cond or uncond), from shapes.

    Counted: every matmul with the tokens (2 FLOPs per multiply-add): patch embedding, caption
    projection, per block q/k/v/out projections and the SwiGLU feed-forward for every token
    (joint blocks run text and image tokens through their own weights, which costs the same
    as one stream of both), attention scores and values (4·N²·d), and the output projection.
    Left out: the AdaLN modulation and timestep MLPs (they run on one row per call, < 0.01%),
    norms and elementwise work. AuraFlow v0.3 at 1024²: 44.0 T; at 512²: 11.2 T.
    """
    d = int(config.num_attention_heads) * int(config.attention_head_dim)
    patch = int(config.patch_size)
    hidden = int(2 * 4 * d / 3)
    ff = hidden if hidden % 256 == 0 else hidden + 256 - hidden % 256  # diffusers' rounding
    image_tokens = (height // vae_scale // patch) * (width // vae_scale // patch)
    tokens = image_tokens + text_tokens + REGISTER_TOKENS
    per_token = 4 * d * d + 3 * d * ff  # q, k, v, out + three feed-forward matrices
    block = 2 * tokens * per_token + 4 * tokens * tokens * d
    blocks = int(config.num_mmdit_layers) + int(config.num_single_dit_layers)
    in_ch, out_ch = int(config.in_channels), int(config.out_channels)
    embed = 2 * image_tokens * patch * patch * in_ch * d
    caption = 2 * text_tokens * int(config.joint_attention_dim) * int(config.caption_projection_dim)
    out = 2 * image_tokens * d * patch * patch * out_ch
    return float(blocks * block + embed + caption + out)


# --- measurement ---------------------------------------------------------------------------------


@dataclass
class Run:
    """One (size, batch) configuration of one mode."""

    width: int
    height: int
    batch: int
    runs_s: list[float] = field(default_factory=list)
    peak_mib: float = 0.0
    peak_reserved_mib: float = 0.0
    psnr_vs_default: float | None = None
    floor_fraction: float | None = None

    @property
    def median_s(self) -> float:
        return statistics.median(self.runs_s)

    @property
    def s_per_image(self) -> float:
        return self.median_s / self.batch

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if data["psnr_vs_default"] == math.inf:  # identical images; JSON has no infinity
            data["psnr_vs_default"] = "inf"
        return {
            **data,
            "median_s": self.median_s,
            "best_s": min(self.runs_s),
            "s_per_image": self.s_per_image,
        }


@dataclass
class ModeResult:
    name: str
    kind: str  # "diffusers" | "engine"
    options: dict[str, Any] | None = None
    log: list[str] = field(default_factory=list)
    skipped: str | None = None
    warmup_s: float | None = None
    runs: list[Run] = field(default_factory=list)
    # Step-cache modes: transformer calls skipped over calls made, in the timed runs.
    skipped_calls: int = 0
    transformer_calls: int = 0

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["runs"] = [run.as_dict() for run in self.runs]
        return data


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def measured(device: torch.device, held_bytes: int = 0) -> Iterator[dict[str, float]]:
    """Wall time between synchronised clocks, and peak memory less `held_bytes` (base
    weights parked on the GPU for other modes). On the CPU: the process's peak RSS."""
    result: dict[str, float] = {}
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        yield result
        _sync(device)
        result["seconds"] = time.perf_counter() - started
        result["peak_mib"] = (torch.cuda.max_memory_allocated(device) - held_bytes) / MIB
        result["peak_reserved_mib"] = (torch.cuda.max_memory_reserved(device) - held_bytes) / MIB
        return
    with _engine_bench.peak_memory(device) as memory:
        started = time.perf_counter()
        yield result
        result["seconds"] = time.perf_counter() - started
    result["peak_mib"] = memory["peak_mib"]
    result["peak_reserved_mib"] = memory["peak_mib"]


def module_bytes(module: torch.nn.Module) -> int:
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- the contenders ------------------------------------------------------------------------------


@dataclass
class Context:
    args: argparse.Namespace
    device: torch.device
    dtype: torch.dtype
    base: AuraFlowPipeline
    default_images: dict[tuple[int, int, int], Any] = field(default_factory=dict)

    @property
    def sizes(self) -> list[tuple[int, int]]:
        return [(s, s) for s in self.args.sizes]

    def configs(self) -> list[tuple[int, int, int]]:
        """(width, height, batch): batch 1 at every size, then the batch sweep."""
        out = [(w, h, 1) for w, h in self.sizes]
        at = self.args.batch_at
        out += [(at, at, n) for n in self.args.batch_sizes if n > 1]
        return out

    def rows_per_image(self) -> int:
        return 2 if self.args.guidance > 1 else 1

    def floor_s_per_image(self, width: int, height: int) -> float:
        flops = transformer_flops(self.base.transformer.config, height, width)
        total = flops * self.rows_per_image() * self.args.steps
        return total / (self.args.peak_tflops * 1e12)


def engine_request(ctx: Context, width: int, height: int, batch: int) -> GenerationRequest:
    # model_construct: the tiny model's sizes lie below the API's 512 px minimum.
    return GenerationRequest.model_construct(
        model="bench",
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        num_images=batch,
        guidance_scale=ctx.args.guidance,
        steps=ctx.args.steps,
        width=width,
        height=height,
        seed=ctx.args.seed,
        shift=1.73,
        sampler="euler",
        scheduler="normal",
        output_format="png",
        output_quality=80,
        expand_prompt=False,
    )


def run_diffusers(
    pipe: AuraFlowPipeline, ctx: Context, width: int, height: int, batch: int, steps: int
) -> Any:
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=1.73)
    return pipe(
        PROMPT,
        negative_prompt=NEGATIVE,
        guidance_scale=ctx.args.guidance,
        num_inference_steps=steps,
        height=height,
        width=width,
        num_images_per_prompt=batch,
        generator=torch.Generator("cpu").manual_seed(ctx.args.seed),
    ).images[0]


def _time_configs(
    ctx: Context,
    result: ModeResult,
    generate: Callable[[int, int, int], Any],
    held_bytes: int,
) -> None:
    for width, height, batch in ctx.configs():
        run = Run(width=width, height=height, batch=batch)
        # Untimed (lazy init, CUDA-graph capture per shape) but measured for memory, from an
        # emptied allocator cache: reserved memory then counts this run, not leftovers.
        _release(ctx.device)
        with measured(ctx.device, held_bytes) as first:
            image = generate(width, height, batch)
        run.peak_mib = first["peak_mib"]
        run.peak_reserved_mib = first["peak_reserved_mib"]
        for _ in range(ctx.args.repeats):
            with measured(ctx.device, held_bytes) as m:
                image = generate(width, height, batch)
            run.runs_s.append(m["seconds"])
            run.peak_mib = max(run.peak_mib, m["peak_mib"])
        run.floor_fraction = ctx.floor_s_per_image(width, height) / run.s_per_image
        key = (width, height, batch)
        if result.name == "default":
            ctx.default_images[key] = image
        if key in ctx.default_images:
            run.psnr_vs_default = psnr(ctx.default_images[key], image)
        result.runs.append(run)
        print(
            f"  {result.name}: {width}x{height} x{batch}: {run.s_per_image:.3f} s/image, "
            f"{run.floor_fraction:.0%} of floor, peak {run.peak_mib:.0f} MiB",
            flush=True,
        )


def bench_diffusers(ctx: Context) -> ModeResult:
    result = ModeResult(name="diffusers", kind="diffusers")
    pipe = ctx.base
    with measured(ctx.device) as m:
        for width, height in ctx.sizes:
            run_diffusers(pipe, ctx, width, height, 1, ctx.args.warmup_steps)
    result.warmup_s = m["seconds"]
    _time_configs(ctx, result, lambda w, h, n: run_diffusers(pipe, ctx, w, h, n, ctx.args.steps), 0)
    return result


def fork_pipeline(base: AuraFlowPipeline, options: EngineOptions) -> tuple[AuraFlowPipeline, int]:
    """A pipeline sharing the base's tokenizer and text encoder (no mode modifies them) with
    its own transformer and, where a VAE option is on, its own VAE. Returns it and the bytes
    of the base components that now sit idle beside it."""
    transformer = copy.deepcopy(base.transformer)
    touches_vae = (
        options.vae_channels_last or options.vae_dtype != "same" or options.vae_tiling_above > 0
    )
    vae = copy.deepcopy(base.vae) if touches_vae else base.vae
    pipe = AuraFlowPipeline(
        tokenizer=base.tokenizer,
        text_encoder=base.text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=copy.deepcopy(base.scheduler),
    )
    pipe.set_progress_bar_config(disable=True)
    held = module_bytes(base.transformer) + (module_bytes(base.vae) if touches_vae else 0)
    return pipe, held


@contextlib.contextmanager
def cold_compile_caches(keep: bool, label: str) -> Iterator[None]:
    """Forget compiled graphs, and give inductor an empty cache directory, so each mode's
    warm-up is a cold worker start (a restart with a warm cache dir is faster)."""
    torch._dynamo.reset()
    if keep:
        yield
        return
    with tempfile.TemporaryDirectory(prefix=f"auraserve-inductor-{label}-") as directory:
        try:
            from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir
        except ImportError:  # older torch: the environment variable alone
            previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = directory
            try:
                yield
            finally:
                if previous is None:
                    os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
                else:
                    os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous
            return
        with temporary_cache_dir(directory):
            yield


def bench_engine(ctx: Context, name: str, options: EngineOptions) -> ModeResult:
    result = ModeResult(name=name, kind="engine", options=options.as_dict())
    pipe, held = fork_pipeline(ctx.base, options)
    engine: AuraFlowEngine | None = None
    try:
        with cold_compile_caches(ctx.args.keep_inductor_cache, name):
            try:
                engine = AuraFlowEngine(
                    pipe, description=name, is_test_model=ctx.args.tiny, options=options
                )
            except (ModelLoadError, ValueError) as exc:
                result.skipped = str(exc)
                print(f"  {name}: skipped: {exc}", flush=True)
                return result
            result.log = engine.optimization_log
            for line in result.log:
                print(f"  {name}: {line}", flush=True)
            _release(ctx.device)  # weights replaced by fusing or fp8 stay cached otherwise
            _sync(ctx.device)
            result.warmup_s = engine.warmup(ctx.sizes, steps=ctx.args.warmup_steps)
            _sync(ctx.device)

            def generate(width: int, height: int, batch: int) -> Any:
                assert engine is not None
                request = engine_request(ctx, width, height, batch)
                [out] = engine.generate([request])
                for item in out.fidelity.get("lossy", []):
                    if item["option"] == "step_cache":
                        result.skipped_calls += item["skipped_calls"]
                        result.transformer_calls += item["transformer_calls"]
                return out.images[0]

            _time_configs(ctx, result, generate, held)
    except Exception as exc:
        if ctx.args.fail_fast:
            raise
        result.skipped = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        print(f"  {name}: {result.skipped}", flush=True)
    finally:
        # Drop the copy (and its compiled graphs, CUDA-graph pools) before the next mode, so
        # its memory neither counts there nor crowds it.
        engine = None
        del pipe
        torch._dynamo.reset()
        _release(ctx.device)
    return result


# --- memory: offload modes -----------------------------------------------------------------------


def _fits(peak_reserved_mib: float, context_mib: float) -> str:
    need_gib = (peak_reserved_mib + context_mib) / 1024
    for size in GPU_SIZES_GIB:
        if need_gib <= size:
            return f"{size} GiB"
    return f"> {GPU_SIZES_GIB[-1]} GiB"


def bench_memory(ctx: Context) -> dict[str, Any]:
    """Peak memory and speed of the default engine with each offload mode, on the base
    pipeline. Runs last: offloading moves the base weights off the GPU for good."""
    if ctx.device.type != "cuda":
        return {"skipped": f"offload modes need a CUDA GPU; not measured on {ctx.device.type}"}
    device = ctx.device
    _release(device)
    free, total = torch.cuda.mem_get_info(device)
    # What the CUDA context and libraries take outside torch's allocator.
    context_mib = (total - free - torch.cuda.memory_reserved(device)) / MIB
    size = ctx.args.memory_size
    rows: list[dict[str, Any]] = []
    pipe = ctx.base
    for mode in ctx.args.memory_modes:
        if mode == "model":
            pipe.enable_model_cpu_offload(device=device)
        elif mode == "sequential":
            pipe.enable_sequential_cpu_offload(device=device)
        _release(device)
        engine = AuraFlowEngine(pipe, description=f"offload={mode}", is_test_model=ctx.args.tiny)
        times: dict[int, float] = {}
        peak = reserved = 0.0
        try:
            for steps in (1, ctx.args.memory_steps):
                request = engine_request(ctx, size, size, 1).model_copy(update={"steps": steps})
                engine.generate([request])  # untimed: hooks, kernels
                with measured(device) as m:
                    engine.generate([request])
                times[steps] = m["seconds"]
                peak = max(peak, m["peak_mib"])
                reserved = max(reserved, m["peak_reserved_mib"])
        except torch.cuda.OutOfMemoryError as exc:
            rows.append({"offload": mode, "size": size, "skipped": f"out of memory: {exc}"})
            continue
        span = max(ctx.args.memory_steps - 1, 1)
        per_step = (times[ctx.args.memory_steps] - times[1]) / span
        fixed = times[1] - per_step
        rows.append(
            {
                "offload": mode,
                "size": size,
                "s_per_step": per_step,
                "fixed_s": fixed,
                "s_per_image_at_steps": fixed + per_step * ctx.args.steps,
                "peak_mib": peak,
                "peak_reserved_mib": reserved,
                "fits": _fits(reserved, context_mib),
            }
        )
        print(f"  offload={mode}: peak {peak:.0f} MiB, {per_step:.2f} s/step", flush=True)
    return {"context_mib": context_mib, "steps": ctx.args.steps, "rows": rows}


# --- the run -------------------------------------------------------------------------------------


def resolve_modes(args: argparse.Namespace) -> list[tuple[str, EngineOptions | None]]:
    modes: list[tuple[str, EngineOptions | None]] = []
    for name in args.modes:
        if name == "diffusers":
            modes.append((name, None))
        elif name in PRESETS:
            modes.append((name, PRESETS[name]))
        else:
            raise SystemExit(f"unknown mode {name!r}; known: {', '.join(ALL_MODES)}")
    for spec in args.custom:
        label, _, options = spec.partition("=")
        if not label or not options:
            raise SystemExit(f"--custom wants LABEL=SPEC, e.g. mine=fast,autotune=1; not {spec!r}")
        modes.append((label, EngineOptions.parse(options)))
    return modes


def build_base(
    args: argparse.Namespace, device: torch.device, dtype: torch.dtype
) -> AuraFlowPipeline:
    if args.tiny:
        pipe = _engine_bench.tiny_pipeline(device, dtype)
    else:
        pipe = _engine_bench.full_size_pipeline(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    install_pos_embed_interpolation(pipe)
    return pipe


def _versions() -> dict[str, Any]:
    import diffusers

    try:
        import torchao

        torchao_version: str | None = torchao.__version__
    except ImportError:
        torchao_version = None
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "diffusers": diffusers.__version__,
        "torchao": torchao_version,
        "python": sys.version.split()[0],
    }


def bench(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    modes = resolve_modes(args)
    started = time.perf_counter()
    base = build_base(args, device, dtype)
    build_s = time.perf_counter() - started
    ctx = Context(args=args, device=device, dtype=dtype, base=base)
    # The default engine runs first: every other mode's PSNR is measured against its images.
    # The report keeps the order asked for.
    order = [name for name, _ in modes]
    results: dict[str, ModeResult] = {}
    for name, options in sorted(modes, key=lambda mode: mode[0] != "default"):
        print(f"mode {name}", flush=True)
        if options is None:
            results[name] = bench_diffusers(ctx)
        else:
            results[name] = bench_engine(ctx, name, options)
    memory = bench_memory(ctx) if args.memory_modes else {"skipped": "--memory-modes empty"}
    # Its processes build their own models, one per GPU (this process's stays idle on GPU 0:
    # memory only, which an 80 GB card holds beside a second copy).
    multi_gpu = _multi_gpu.bench_multi_gpu(args) if args.multi_gpu else None
    config = base.transformer.config
    return {
        "config": {
            "model": "tiny (random weights)"
            if args.tiny
            else "AuraFlow v0.3 architecture, random weights",
            "device": str(device),
            "device_name": device_name(device),
            "torch_threads": torch.get_num_threads(),
            "dtype": args.dtype,
            "sizes": args.sizes,
            "batch_at": args.batch_at,
            "batch_sizes": args.batch_sizes,
            "steps": args.steps,
            "guidance_scale": args.guidance,
            "repeats": args.repeats,
            "warmup_steps": args.warmup_steps,
            "peak_tflops": args.peak_tflops,
            "tflops_per_forward": {
                str(s): transformer_flops(config, s, s) / 1e12 for s in sorted(set(args.sizes))
            },
            "build_s": round(build_s, 3),
            "inductor_cache": "kept" if args.keep_inductor_cache else "cold per mode",
            **_versions(),
        },
        "modes": [results[name].as_dict() for name in order],
        "memory": memory,
        **({"multi_gpu": multi_gpu} if multi_gpu is not None else {}),
    }


# --- report --------------------------------------------------------------------------------------


def _fmt(value: float | str | None, spec: str, missing: str = "–") -> str:
    if value is None:
        return missing
    if value == "inf" or (isinstance(value, float) and math.isinf(value)):
        return "identical"
    return format(value, spec)


def _pct(fraction: float | None) -> str:
    if fraction is None:
        return "–"
    percent = 100 * fraction
    return f"{percent:.0f}" if percent >= 1 else f"{percent:.2g}"


def _reference_size(config: dict[str, Any]) -> int:
    sizes: list[int] = config["sizes"]
    return 1024 if 1024 in sizes else sorted(sizes)[len(sizes) // 2]


def _batch1(mode: dict[str, Any], size: int) -> dict[str, Any] | None:
    for run in mode["runs"]:
        if run["batch"] == 1 and run["width"] == size and run["height"] == size:
            return run
    return None


def _targets(report: dict[str, Any]) -> list[str]:
    size = _reference_size(report["config"])
    by_name = {m["name"]: m for m in report["modes"]}
    timed = {
        name: run["s_per_image"]
        for name, mode in by_name.items()
        if (run := _batch1(mode, size)) is not None
    }
    engine_modes = {n: s for n, s in timed.items() if by_name[n]["kind"] == "engine"}
    fp8 = {n: s for n, s in engine_modes.items() if (by_name[n]["options"] or {}).get("fp8")}
    bf16 = {n: s for n, s in engine_modes.items() if n not in fp8}
    if report["config"]["model"].startswith("tiny"):
        return ["The targets apply to the full-size model on a GPU; not evaluated here."]
    lines = [f"Targets at {size}², {report['config']['steps']} steps, CFG, batch 1:"]

    def verdict(ok: bool) -> str:
        return "**met**" if ok else "**not met**"

    if bf16:
        name, best = min(bf16.items(), key=lambda item: item[1])
        lines.append(
            f"- bf16 ≤ {TARGET_BF16_S} s/image: best {name} {best:.2f} s: "
            + verdict(best <= TARGET_BF16_S)
        )
    if fp8:
        name, best = min(fp8.items(), key=lambda item: item[1])
        lines.append(
            f"- fp8 ≤ {TARGET_FP8_S} s/image: best {name} {best:.2f} s: "
            + verdict(best <= TARGET_FP8_S)
        )
    if "diffusers" in timed and engine_modes:
        name, best = min(engine_modes.items(), key=lambda item: item[1])
        speedup = timed["diffusers"] / best
        lines.append(
            f"- ≥ {TARGET_SPEEDUP}× plain diffusers (bf16 eager): {name} {speedup:.2f}×: "
            f"{verdict(speedup >= TARGET_SPEEDUP)}"
        )
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    config = report["config"]
    size = _reference_size(config)
    diffusers = next((m for m in report["modes"] if m["name"] == "diffusers"), None)
    memory_note = "GPU memory" if config["device"].startswith("cuda") else "process RSS"
    per_forward = ", ".join(
        f"{s}²: {t:.1f} T/forward" for s, t in config["tflops_per_forward"].items()
    )
    lines = [
        (
            f"{config['model']} on {config['device_name']} ({config['device']}, "
            f"{config['dtype']}), {config['steps']} steps, CFG {config['guidance_scale']:g}, "
            f"median of {config['repeats']} after one untimed run; torch {config['torch']}, "
            f"diffusers {config['diffusers']}, torchao {config['torchao'] or 'not installed'}; "
            f"FLOP floor at {config['peak_tflops']:g} TFLOP/s ({per_forward}); warm-up = "
            f"`engine.warmup()` over the sizes, inductor cache {config['inductor_cache']}."
        ),
        "",
        (
            f"| mode | size | batch | s / image | best s | % of FLOP floor | peak {memory_note} "
            f"MiB | PSNR vs default (dB) | vs diffusers ({size}², batch 1) | warm-up s |"
        ),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ref = _batch1(diffusers, size) if diffusers else None
    notes: list[str] = []
    for mode in report["modes"]:
        if mode["skipped"]:
            lines.append(f"| {mode['name']} | – | – | – | – | – | – | – | – | skipped |")
            notes.append(f"- {mode['name']}: {mode['skipped']}")
            continue
        quiet = (": off", "default backend", "vae: unchanged")
        applied = [line for line in mode["log"] if not any(q in line for q in quiet)]
        if mode.get("transformer_calls"):
            share = mode["skipped_calls"] / mode["transformer_calls"]
            applied.append(f"step cache skipped {share:.0%} of transformer calls (row-calls)")
        if applied:
            notes.append(f"- {mode['name']}: " + "; ".join(applied))
        for i, run in enumerate(mode["runs"]):
            speedup = "–"
            if ref and run["batch"] == 1 and run["width"] == size:
                speedup = f"{ref['s_per_image'] / run['s_per_image']:.2f}×"
            lines.append(
                f"| {mode['name']} | {run['width']}×{run['height']} | {run['batch']} "
                f"| {run['s_per_image']:.3f} | {run['best_s'] / run['batch']:.3f} "
                f"| {_pct(run['floor_fraction'])} "
                f"| {run['peak_mib']:.0f} | {_fmt(run['psnr_vs_default'], '.1f')} | {speedup} "
                f"| {_fmt(mode['warmup_s'], '.1f') if i == 0 else ''} |"
            )
    lines += ["", *_targets(report), ""]
    memory = report["memory"]
    if "rows" in memory:
        lines += [
            (
                "Offload modes (default engine, batch 1, CFG; CUDA context and libraries add "
                f"{memory['context_mib']:.0f} MiB outside torch's allocator, counted in 'fits'):"
            ),
            "",
            "| offload | size | s / step | s / image (est.) | peak allocated MiB "
            "| peak reserved MiB | fits |",
            "|---|---|---:|---:|---:|---:|---|",
        ]
        for row in memory["rows"]:
            if "skipped" in row:
                lines.append(f"| {row['offload']} | {row['size']}² | {row['skipped']} | | | | |")
                continue
            lines.append(
                f"| {row['offload']} | {row['size']}² | {row['s_per_step']:.2f} "
                f"| {row['s_per_image_at_steps']:.1f} | {row['peak_mib']:.0f} "
                f"| {row['peak_reserved_mib']:.0f} | {row['fits']} |"
            )
        lines.append("")
    else:
        lines += [f"Offload modes: {memory.get('skipped', 'not measured')}.", ""]
    lines += _multi_gpu.render(report.get("multi_gpu"))
    if notes:
        lines += ["What each mode applied or skipped:", "", *notes]
    return "\n".join(lines).rstrip() + "\n"


def merge_reports(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Several partial runs (split to fit a device time limit) as one report: later files
    win for a mode measured twice; sizes are the union; memory from the last that has it."""
    if not reports:
        raise SystemExit("--render needs at least one JSON report")
    merged = copy.deepcopy(reports[0])
    by_name = {m["name"]: m for m in merged["modes"]}
    order = [m["name"] for m in merged["modes"]]
    for report in reports[1:]:
        if report["config"]["device_name"] != merged["config"]["device_name"]:
            print(
                f"warning: merging runs from {merged['config']['device_name']} and "
                f"{report['config']['device_name']}",
                file=sys.stderr,
            )
        merged["config"]["sizes"] = sorted(
            set(merged["config"]["sizes"]) | set(report["config"]["sizes"])
        )
        merged["config"]["tflops_per_forward"].update(report["config"]["tflops_per_forward"])
        for mode in report["modes"]:
            if mode["name"] not in by_name:
                order.append(mode["name"])
            by_name[mode["name"]] = mode
        if "rows" in report["memory"]:
            merged["memory"] = report["memory"]
        section = report.get("multi_gpu")
        if section is not None and ("workers" in section or not merged.get("multi_gpu")):
            merged["multi_gpu"] = section
    merged["modes"] = [by_name[name] for name in order]
    return merged


def write_docs(markdown: str, docs: Path, command: str) -> None:
    text = docs.read_text()
    start, end = text.find(DOCS_START), text.find(DOCS_END)
    if start < 0 or end < start:
        raise SystemExit(f"{docs} has no {DOCS_START} … {DOCS_END} section to replace")
    body = f"{DOCS_START}\n\n`{command}`\n\n{markdown}\n{DOCS_END}"
    docs.write_text(text[:start] + body + text[end + len(DOCS_END) :])


# --- command line --------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--tiny", action="store_true", help="the tiny model (tests, CPU)")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --tiny)")
    parser.add_argument("--dtype", default=None, choices=tuple(DTYPES))
    parser.add_argument(
        "--sizes", type=_ints, default=None, help="square sizes, px (512,1024,1536)"
    )
    parser.add_argument("--batch-at", type=int, default=None, help="size of the batch sweep (512)")
    parser.add_argument("--batch-sizes", type=_ints, default=None, help="batch sweep (2,4,8)")
    parser.add_argument("--steps", type=int, default=None, help="25 (2 with --tiny)")
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per config (3)")
    parser.add_argument("--guidance", type=float, default=3.5)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--modes", type=_names, default=None, help="comma-separated: " + ", ".join(ALL_MODES)
    )
    parser.add_argument(
        "--custom",
        action="append",
        default=[],
        metavar="LABEL=SPEC",
        help="an extra engine mode, SPEC as EngineOptions.parse: mine=fast,autotune=1",
    )
    parser.add_argument(
        "--memory-modes",
        type=_names,
        default=None,
        help="offload modes (none,model,sequential); '' skips",
    )
    parser.add_argument(
        "--multi-gpu",
        action="store_true",
        help="also the multi-GPU stage (bench/multi_gpu.py): one worker process per GPU, "
        "1 GPU against 2, 4 … all; needs two GPUs or more, skipped with the reason otherwise",
    )
    parser.add_argument("--multi-size", type=int, default=None, help="its image size (1024)")
    parser.add_argument("--multi-images", type=int, default=None, help="images per process (4)")
    parser.add_argument("--memory-size", type=int, default=1024)
    parser.add_argument("--memory-steps", type=int, default=3)
    parser.add_argument(
        "--peak-tflops", type=float, default=790.0, help="dense bf16 floor (H200: 790)"
    )
    parser.add_argument(
        "--keep-inductor-cache", action="store_true", help="do not start each mode cold"
    )
    parser.add_argument(
        "--fail-fast", action="store_true", help="raise instead of recording a failed mode"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON report (default bench/results/gpu-….json)"
    )
    parser.add_argument("--md", type=Path, default=None, help="also write the markdown table here")
    parser.add_argument(
        "--render",
        type=Path,
        nargs="+",
        default=None,
        help="merge JSON reports and render; runs nothing",
    )
    parser.add_argument(
        "--write-docs",
        action="store_true",
        help=f"replace the marked section of {DEFAULT_DOCS.name}",
    )
    parser.add_argument("--docs", type=Path, default=DEFAULT_DOCS)
    args = parser.parse_args(argv)
    args.device = args.device or ("cpu" if args.tiny else "cuda")
    if args.modes is None:
        # On the CPU, modes that only differ from others by CUDA-only parts (graphs) would
        # just repeat a multi-second cold compile each.
        cuda_only = ("compile_cudagraphs", "fast_cudagraphs")
        cpu = not args.device.startswith("cuda")
        args.modes = [m for m in ALL_MODES if not (cpu and m in cuda_only)]
    on_cuda = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bfloat16" if on_cuda else "float32")
    args.sizes = args.sizes or ([64, 128] if args.tiny else [512, 1024, 1536])
    args.batch_at = args.batch_at or (args.sizes[0] if args.tiny else 512)
    args.batch_sizes = (
        args.batch_sizes if args.batch_sizes is not None else ([2] if args.tiny else [2, 4, 8])
    )
    args.steps = args.steps or (2 if args.tiny else 25)
    args.repeats = args.repeats or (2 if args.tiny else 3)
    args.multi_size = args.multi_size or (64 if args.tiny else 1024)
    args.multi_images = args.multi_images or (2 if args.tiny else 4)
    if args.memory_modes is None:
        args.memory_modes = ["none", "model", "sequential"]
    bad = [m for m in args.memory_modes if m not in ("none", "model", "sequential")]
    if bad:
        parser.error(f"unknown offload mode(s) {', '.join(bad)}")
    if min([*args.sizes, args.batch_at]) % 16:
        parser.error("sizes must be multiples of 16")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    command = "python bench/gpu.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.render:
        report = merge_reports([json.loads(path.read_text()) for path in args.render])
    else:
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise SystemExit(
                "no CUDA GPU visible to torch; run on a GPU machine, or test the script with "
                "--tiny --device cpu"
            )
        report = bench(args)
        out = args.out or Path("bench/results") / (
            f"gpu-{'tiny' if args.tiny else 'full'}-{args.device.split(':')[0]}.json"
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
        print(f"wrote {out}")
    markdown = render_markdown(report)
    print()
    print(markdown)
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(markdown)
    if args.write_docs:
        write_docs(markdown, args.docs, command)
        print(f"updated {args.docs}")
    return report


if __name__ == "__main__":
    main()
