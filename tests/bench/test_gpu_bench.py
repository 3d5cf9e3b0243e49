"""bench/gpu.py: the FLOP model, and the whole script end to end on the CPU with the tiny model.

The GPU numbers themselves need a GPU; what is checked here is that the script runs, that its
JSON and markdown hold what docs/benchmarks.md is built from, and that modes which cannot run
on the CPU are reported as skipped rather than failing the run.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu.py"


@pytest.fixture(scope="module")
def gpu_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("auraserve_bench_gpu", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


AURAFLOW_V03 = SimpleNamespace(
    num_attention_heads=12,
    attention_head_dim=256,
    patch_size=2,
    num_mmdit_layers=4,
    num_single_dit_layers=32,
    in_channels=4,
    out_channels=4,
    joint_attention_dim=2048,
    caption_projection_dim=3072,
)


def test_flops_match_the_design_numbers(gpu_bench: ModuleType) -> None:
    flops = gpu_bench.transformer_flops
    assert round(flops(AURAFLOW_V03, 1024, 1024) / 1e12, 1) == 44.0
    assert round(flops(AURAFLOW_V03, 512, 512) / 1e12, 1) == 11.2
    # 25 steps with batched CFG at 1024²: 2.2 PFLOP, 2.8 s at 790 TFLOP/s.
    per_image = flops(AURAFLOW_V03, 1024, 1024) * 2 * 25
    assert round(per_image / 1e15, 1) == 2.2
    assert round(per_image / 790e12, 1) == 2.8
    # Computed from shapes, so other sizes work: attention grows faster than linearly.
    assert flops(AURAFLOW_V03, 1536, 1536) > 2.25 * flops(AURAFLOW_V03, 1024, 1024)
    assert flops(AURAFLOW_V03, 1024, 512) < flops(AURAFLOW_V03, 1024, 1024)


def _docs(path: Path) -> Path:
    path.write_text(
        "# Benchmarks\n\nkept above\n\n## GPU\n\n<!-- gpu-bench:start -->\nPREVIOUS TABLE\n"
        "<!-- gpu-bench:end -->\n\nkept below\n"
    )
    return path


def test_tiny_cpu_end_to_end(tmp_path: Path, gpu_bench: ModuleType) -> None:
    out, md, docs = tmp_path / "r.json", tmp_path / "r.md", _docs(tmp_path / "bench.md")
    command = [
        sys.executable, str(SCRIPT), "--tiny", "--device", "cpu",
        "--modes", "diffusers,default,fused_qkv,sdpa,vae,text_cache,fp8",
        "--custom", "fp8n=fp8=1,fp8_backend=native",
        "--out", str(out), "--md", str(md), "--write-docs", "--docs", str(docs),
    ]  # fmt: skip
    done = subprocess.run(
        command, check=False, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report: dict[str, Any] = json.loads(out.read_text())
    modes = {mode["name"]: mode for mode in report["modes"]}
    assert list(modes) == [
        "diffusers", "default", "fused_qkv", "sdpa", "vae", "text_cache", "fp8", "fp8n"
    ]  # fmt: skip
    assert report["config"]["model"].startswith("tiny")
    for name, mode in modes.items():
        if name == "fp8" and mode["skipped"]:
            assert "torchao" in mode["skipped"]  # not installed: a clear reason, no crash
            continue
        assert mode["skipped"] is None, (name, mode["skipped"])
        assert mode["warmup_s"] > 0
        configs = [(r["width"], r["batch"]) for r in mode["runs"]]
        assert configs == [(64, 1), (128, 1), (64, 2)]  # sizes at batch 1, then the sweep
        for run in mode["runs"]:
            assert len(run["runs_s"]) == 2 and run["s_per_image"] > 0
            assert 0 < run["floor_fraction"] < 1 and run["peak_mib"] > 0
            assert run["psnr_vs_default"] is not None
    # Exact modes are exact; the others keep the image.
    for name in ("default", "text_cache", "sdpa"):
        assert all(r["psnr_vs_default"] == "inf" for r in modes[name]["runs"]), name
    assert all(
        r["psnr_vs_default"] == "inf" or r["psnr_vs_default"] >= 25 for r in modes["fp8n"]["runs"]
    )
    assert any("text cache" in line for line in modes["text_cache"]["log"])
    assert "need a CUDA GPU" in report["memory"]["skipped"]
    markdown = md.read_text()
    assert "| diffusers | 64×64 | 1 |" in markdown and "| fp8n | 128×128 | 1 |" in markdown
    assert "Offload modes: offload modes need a CUDA GPU" in markdown
    text = docs.read_text()
    assert text.startswith("# Benchmarks\n\nkept above\n") and text.endswith("kept below\n")
    assert "PREVIOUS TABLE" not in text and "| default | 64×64 | 1 |" in text
    assert "`python bench/gpu.py --tiny --device cpu" in text

    # --render merges partial runs (a mode measured twice: the later file wins).
    later = json.loads(out.read_text())
    later["modes"] = [dict(modes["default"], warmup_s=123.0)]
    second = tmp_path / "later.json"
    second.write_text(json.dumps(later))
    merged = gpu_bench.main(["--render", str(out), str(second), "--md", str(tmp_path / "m.md")])
    names = [mode["name"] for mode in merged["modes"]]
    assert names == list(modes)
    assert next(m for m in merged["modes"] if m["name"] == "default")["warmup_s"] == 123.0


def test_missing_gpu_and_bad_arguments_fail_clearly(gpu_bench: ModuleType, tmp_path: Path) -> None:
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA GPU"):
            gpu_bench.main(["--modes", "default"])
    with pytest.raises(SystemExit):
        gpu_bench.parse_args(["--memory-modes", "swap"])
    with pytest.raises(SystemExit, match="unknown mode"):
        gpu_bench.resolve_modes(gpu_bench.parse_args(["--tiny", "--modes", "warp"]))
    docs = tmp_path / "no-markers.md"
    docs.write_text("# nothing here\n")
    with pytest.raises(SystemExit, match="gpu-bench:start"):
        gpu_bench.write_docs("table", docs, "python bench/gpu.py")
