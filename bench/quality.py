"""Image agreement between two engine modes: PSNR, SSIM and step-cache skip ratios.

`psnr` is the measure the speed-mode tests and bench/gpu.py hold modes to. `compare` runs two
engine modes (`AURASERVE_ENGINE_MODE` strings: a preset, `field=value` pairs, or both) over a
prompt set with the same seeds and reports per prompt and on average: PSNR and SSIM of mode B
against mode A, the seconds each took, and for step-cache modes the share of transformer calls
skipped. Mode A runs over every prompt before mode B loads, so a real checkpoint is in memory
once at a time.

No learned metric (LPIPS, DISTS): their networks' weights come from the internet at first use
(torchvision's AlexNet/VGG), which this project's machines cannot reach; PSNR and SSIM need
nothing.

Quality on random weights (the tiny model, or bench/gpu.py's full-size random AuraFlow) says
nothing about quality on real weights: random blocks change their residuals by 40–130 % per
step where trained ones change by a few percent, so both the skip decisions and the error
differ. Run it on the real checkpoint to judge a preset.

    python bench/quality.py --tiny                         # CI-sized, CPU: default vs cache_fast
    python bench/quality.py --weights fal/AuraFlow-v0.3 --a default --b cache_fast \\
        --steps 25 --size 1024 --out bench/results/quality-cache_fast.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

PROMPTS = (
    "a cat holding a sign that says hello world",
    "a lighthouse on a cliff at dusk, oil painting",
    "a bowl of ramen, studio photograph, shallow depth of field",
    "an astronaut riding a horse on mars, cinematic",
    "a watercolor map of an imaginary island",
    "a close-up portrait of an old fisherman, natural light",
    "isometric pixel art of a tiny city block",
    "a glass teapot with blooming flowers inside, macro",
)


def psnr(a: Any, b: Any, peak: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB between two images (PIL images or arrays of the same
    shape, 8-bit range by default); inf when they are identical.

    The acceptance bar for the speed modes: ≥ 35 dB against the unoptimised engine on the same
    seed for bf16 modes (differences invisible), ≥ 25 dB for fp8.
    """
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"images differ in shape: {x.shape} vs {y.shape}")
    mse = float(np.mean((x - y) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(peak * peak / mse)


def ssim(a: Any, b: Any, peak: float = 255.0) -> float:
    """Structural similarity (Wang et al. 2004: Gaussian window σ = 1.5, K1 = 0.01,
    K2 = 0.03), per channel, averaged; 1.0 when identical."""
    from scipy.ndimage import gaussian_filter

    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"images differ in shape: {x.shape} vs {y.shape}")
    if x.ndim == 2:
        x, y = x[..., None], y[..., None]
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    values = []
    for ch in range(x.shape[-1]):
        p, q = x[..., ch], y[..., ch]

        def blur(img: np.ndarray) -> np.ndarray:
            return np.asarray(gaussian_filter(img, sigma=1.5, truncate=3.5))

        mu_p, mu_q = blur(p), blur(q)
        var_p = blur(p * p) - mu_p**2
        var_q = blur(q * q) - mu_q**2
        cov = blur(p * q) - mu_p * mu_q
        num = (2 * mu_p * mu_q + c1) * (2 * cov + c2)
        den = (mu_p**2 + mu_q**2 + c1) * (var_p + var_q + c2)
        values.append(float(np.mean(num / den)))
    return float(np.mean(values))


def _requests(prompts: Sequence[str], args: argparse.Namespace) -> list[Any]:
    from auraserve.core.request import GenerationRequest

    # model_construct: the tiny model runs below the API's 512 px minimum.
    return [
        GenerationRequest.model_construct(
            model="quality",
            prompt=prompt,
            negative_prompt="",
            num_images=1,
            guidance_scale=args.guidance,
            steps=args.steps,
            width=args.size,
            height=args.size,
            seed=args.seed + i,
            shift=1.73,
            sampler=args.sampler,
            scheduler="normal",
            output_format="png",
            output_quality=80,
            expand_prompt=False,
            exact=False,
            loras=(),
            image=None,
            strength=1.0,
            warnings=(),
            size_from_image=False,
        )
        for i, prompt in enumerate(prompts)
    ]


def _engine_factory(args: argparse.Namespace) -> Callable[[Any], Any]:
    from auraserve.engine.pipeline import AuraFlowEngine, load_engine

    def make(options: Any) -> Any:
        if args.tiny:
            from auraserve.engine.tiny import build_tiny_pipeline

            pipe = build_tiny_pipeline()
            pipe.set_progress_bar_config(disable=True)
            return AuraFlowEngine(pipe, description="tiny", is_test_model=True, options=options)
        return load_engine(args.weights, device=args.device, dtype=args.dtype, options=options)

    return make


def _run_mode(make: Callable[[Any], Any], spec: str, requests: list[Any]) -> dict[str, Any]:
    from auraserve.core.engine_options import EngineOptions

    engine = make(EngineOptions.parse(spec))
    images, seconds, skipped, calls = [], [], 0, 0
    for request in requests:
        started = time.perf_counter()
        [result] = engine.generate([request])
        seconds.append(time.perf_counter() - started)
        images.append(result.images[0])
        for item in result.fidelity.get("lossy", []):
            if item["option"] == "step_cache":
                skipped += item["skipped_calls"]
                calls += item["transformer_calls"]
    return {
        "mode": spec,
        "images": images,
        "seconds": seconds,
        "log": engine.optimization_log,
        "skipped_calls": skipped,
        # Without a cache (or when it skipped nothing) every call ran: the ratio is 0.
        "skip_ratio": skipped / calls if calls else 0.0,
    }


def compare(args: argparse.Namespace, prompts: Sequence[str]) -> dict[str, Any]:
    """Mode B against mode A over `prompts` (see the module docstring)."""
    requests = _requests(prompts, args)
    make = _engine_factory(args)
    a = _run_mode(make, args.a, requests)
    b = _run_mode(make, args.b, requests)
    rows = []
    for i, prompt in enumerate(prompts):
        p = psnr(a["images"][i], b["images"][i])
        rows.append(
            {
                "prompt": prompt,
                "seed": requests[i].seed,
                "psnr_db": "inf" if p == math.inf else round(p, 3),
                "ssim": round(ssim(a["images"][i], b["images"][i]), 5),
                "seconds_a": round(a["seconds"][i], 4),
                "seconds_b": round(b["seconds"][i], 4),
            }
        )
    finite = [r["psnr_db"] for r in rows if r["psnr_db"] != "inf"]
    return {
        "model": "tiny (random weights)" if args.tiny else args.weights,
        "a": args.a,
        "b": args.b,
        "steps": args.steps,
        "size": args.size,
        "sampler": args.sampler,
        "rows": rows,
        "mean_psnr_db": round(statistics.mean(finite), 3) if finite else "inf",
        "min_psnr_db": round(min(finite), 3) if finite else "inf",
        "mean_ssim": round(statistics.mean(r["ssim"] for r in rows), 5),
        "skip_ratio_a": round(a["skip_ratio"], 4),
        "skip_ratio_b": round(b["skip_ratio"], 4),
        "seconds_a": round(sum(a["seconds"]), 3),
        "seconds_b": round(sum(b["seconds"]), 3),
        "log_b": b["log"],
        "note": "quality on random weights says nothing about quality on real ones",
    }


def render(report: dict[str, Any]) -> str:
    lines = [
        f"{report['b']} against {report['a']} on {report['model']}, {report['size']}², "
        f"{report['steps']} steps, {report['sampler']}: mean PSNR {report['mean_psnr_db']} dB "
        f"(min {report['min_psnr_db']}), mean SSIM {report['mean_ssim']}, skipped "
        f"{report['skip_ratio_b']:.0%} of transformer calls, "
        f"{report['seconds_a']:.2f} s → {report['seconds_b']:.2f} s",
        "",
        "| prompt | PSNR dB | SSIM | s (a) | s (b) |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['prompt'][:48]} | {row['psnr_db']} | {row['ssim']} "
            f"| {row['seconds_a']} | {row['seconds_b']} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", default="default", help="reference mode (default: default)")
    parser.add_argument("--b", default="cache_fast", help="mode to judge (default: cache_fast)")
    parser.add_argument("--tiny", action="store_true", help="the tiny random model (CPU, CI)")
    parser.add_argument("--weights", default="fal/AuraFlow-v0.3")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--prompts", type=int, default=None, help="first N of the set")
    parser.add_argument("--prompt-file", type=Path, default=None, help="one prompt a line")
    parser.add_argument("--steps", type=int, default=None, help="25 (8 with --tiny)")
    parser.add_argument("--size", type=int, default=None, help="1024 (128 with --tiny)")
    parser.add_argument("--sampler", default="euler")
    parser.add_argument("--guidance", type=float, default=3.5)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", type=Path, default=None, help="write the report as JSON")
    args = parser.parse_args(argv)
    args.steps = args.steps or (8 if args.tiny else 25)
    args.size = args.size or (128 if args.tiny else 1024)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    prompts: Sequence[str] = PROMPTS
    if args.prompt_file is not None:
        prompts = [p for p in args.prompt_file.read_text().splitlines() if p.strip()]
    prompts = list(prompts)[: args.prompts or (2 if args.tiny else len(prompts))]
    report = compare(args, prompts)
    print(render(report), end="")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
