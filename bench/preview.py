"""Live previews at 1024²: milliseconds per preview from 1×4×128×128 latents on the CPU.

Steps timed separately and together (`engine.preview.preview_png`): the 4→3 projection, and
the whole preview (projection, uint8, resize to --size px, encode) as PNG (compress level 1)
and as JPEG (quality 80, what the engine streams). Two kinds of latents: smooth ones
(image-like, upsampled noise — what a sampler's x0 estimate looks like after a few steps)
and white noise (the worst case for PNG compression). Medians over --repeats, with torch's
default thread count and with one thread: on a busy host the thread pool's hand-offs cost
more than a 16k-pixel matmul, so the worker may want previews computed single-threaded.

    python bench/preview.py                   # writes bench/results/preview.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]
from timing import timed_ms  # noqa: E402 - bench/ is importable once run

RESULTS = ROOT / "bench" / "results" / "preview.json"


def latents(kind: str, side: int) -> Any:
    import torch

    generator = torch.Generator().manual_seed(0)
    if kind == "noise":
        return torch.randn(1, 4, side, side, generator=generator)
    coarse = torch.randn(1, 4, 8, 8, generator=generator)
    return torch.nn.functional.interpolate(coarse, size=(side, side), mode="bilinear") * 2


def measure(side: int, size: int, repeats: int) -> list[dict[str, Any]]:  # pragma: no cover
    import torch

    from auraserve.engine.preview import SDXL_PROJECTION, preview_png

    rows = []
    default_threads = torch.get_num_threads()
    for threads in sorted({default_threads, 1}, reverse=True):
        torch.set_num_threads(threads)
        for kind in ("smooth", "noise"):
            x = latents(kind, side)
            row: dict[str, Any] = {
                "latents": [1, 4, side, side],
                "image_px": side * 8,
                "preview_px": min(size, side * 8),
                "kind": kind,
                "torch_threads": threads,
                "png_bytes": len(preview_png(x, size=size)),
                "jpeg_bytes": len(preview_png(x, size=size, image_format="jpeg")),
            }
            timed: dict[str, Callable[[], object]] = {
                "projection": lambda x=x: SDXL_PROJECTION.rgb(x),
                "png": lambda x=x: preview_png(x, size=size),
                "jpeg": lambda x=x: preview_png(x, size=size, image_format="jpeg"),
            }
            for name, run in timed.items():
                row[f"{name}_ms"], row[f"{name}_min_ms"] = timed_ms(run, repeats)
            rows.append(row)
            print(json.dumps(row), flush=True)
    torch.set_num_threads(default_threads)
    return rows


def main() -> None:  # pragma: no cover - CLI
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent", type=int, default=128, help="latent side (128 = 1024²)")
    parser.add_argument("--size", type=int, default=256, help="preview's longer side, px")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    report = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": platform.processor() or platform.machine(),
        "rows": measure(args.latent, args.size, args.repeats),
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
