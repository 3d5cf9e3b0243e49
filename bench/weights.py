"""Weights formats and memory: resident bytes per format, and the loader's peak host memory.

1. AuraFlow v0.3's full architecture, counted on the meta device (no download, no memory):
   the transformer's resident bytes per format (bf16, fp8, Q8_0, Q5_K, Q4_K) and which GPUs
   (12, 16, 24 GB) hold the whole pipeline without offload.
2. On a small random AuraFlow (default: width 768, 2 joint + 6 single layers, ~150 M
   parameters, so that weights dominate the process), the loader's peak host memory per
   format, each load in a fresh process: peak RSS (sampled every 2 ms) above the RSS just
   before the load (torch and diffusers imported), next to the bytes a bf16 copy of the
   transformer would take. RSS counts the memory-mapped file's pages as they are read, and
   the load also builds the (small) text encoder and VAE; a format that were upcast whole
   would show the file plus the bf16 copy.

    python bench/weights.py                   # both; writes bench/results/weights.json
    python bench/weights.py --skip-host       # the meta-device table only
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]
RESULTS = ROOT / "bench" / "results" / "weights.json"
GIB = 2**30
# Without offload the GPU holds the transformer, the text encoder and the VAE, plus CUDA's
# context (~0.5 GiB) and activations at 1024², batch 1, with CFG (~1.5 GiB).
OVERHEAD_BYTES = 2 * GIB
GPUS_GIB = (12, 16, 24)

_CHILD = r"""
import json, sys, threading, psutil, torch
from pathlib import Path
from auraserve.engine.weights import components
from auraserve.engine.weights.loader import load_file
folder = Path(sys.argv[2])
components.transformer_config(folder)
process = psutil.Process()
base = process.memory_info().rss
peak = base
done = threading.Event()
def sample():
    global peak
    while not done.is_set():
        peak = max(peak, process.memory_info().rss)
        done.wait(0.002)
sampler = threading.Thread(target=sample)
sampler.start()
pipe, label = load_file(Path(sys.argv[1]), str(folder), torch.bfloat16)
done.set()
sampler.join()
peak = max(peak, process.memory_info().rss)
t = pipe.transformer
resident = sum(p.numel() * p.element_size() for p in t.parameters())
print(json.dumps({"label": label.strip("; "), "peak_above_baseline": peak - base,
                  "transformer_resident": resident}))
"""


def meta_table() -> list[dict[str, Any]]:
    from auraserve.engine.weights.footprint import table

    rows = table()
    for row in rows:
        need = row["with_text_encoder_and_vae_bytes"] + OVERHEAD_BYTES
        row["fits_gib"] = {str(g): need <= g * GIB for g in GPUS_GIB}
    return rows


def host_table(width: int, single: int) -> list[dict[str, Any]]:
    import torch
    from tests.engine.weights.writers import COMFY, write_gguf, write_original

    from auraserve.engine.tiny import build_tiny_pipeline, wide_transformer

    pipe = build_tiny_pipeline()
    torch.manual_seed(0)
    pipe.transformer = wide_transformer(width, mmdit_layers=2, single_layers=single)
    params = sum(p.numel() for p in pipe.transformer.parameters())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "components"
        pipe.save_pretrained(folder)
        files = {
            "bf16": write_original(Path(tmp) / "bf16.st", pipe, prefix=COMFY, dtype=torch.bfloat16),
            "fp8": write_original(
                Path(tmp) / "fp8.st", pipe, prefix=COMFY, dtype=torch.float8_e4m3fn
            ),
        }
        for quant in ("Q8_0", "Q5_K", "Q4_K"):
            files[quant] = write_gguf(Path(tmp) / f"{quant}.gguf", pipe, quant, prefix=COMFY)
        for fmt, path in files.items():
            out = subprocess.run(
                [sys.executable, "-c", _CHILD, str(path), str(folder)],
                capture_output=True,
                text=True,
                check=True,
                env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"},
            )
            result = json.loads(out.stdout.strip().splitlines()[-1])
            result.update(
                format=fmt,
                parameters=params,
                file_bytes=path.stat().st_size,
                bf16_copy_bytes=2 * params,
            )
            rows.append(result)
            print(json.dumps(result), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--single", type=int, default=6)
    parser.add_argument("--skip-host", action="store_true")
    args = parser.parse_args()
    report: dict[str, Any] = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": platform.processor() or platform.machine(),
        "v03_meta": meta_table(),
    }
    for row in report["v03_meta"]:
        fits = ", ".join(g for g, ok in row["fits_gib"].items() if ok) or "none"
        print(
            f"{row['format']:>5}: transformer {row['transformer_bytes'] / GIB:5.2f} GiB "
            f"({row['bits_per_parameter']} bits/param), pipeline "
            f"{row['with_text_encoder_and_vae_bytes'] / GIB:5.2f} GiB; fits (GiB): {fits}"
        )
    if not args.skip_host:
        report["host"] = host_table(args.width, args.single)
    report["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
