"""bench/gpu.py's multi-GPU stage: what more GPUs give, on a machine that has them.

Per-GPU workers (`auraserve worker --gpus`): N processes, each born with CUDA_VISIBLE_DEVICES
naming its one GPU as the worker supervisor starts them, each building the benchmark's model
and engine (default mode) on its GPU; once all are ready they start together and each times
`--multi-images` images at `--multi-size`², batch 1. The row gives the seconds per image of
each process, the aggregate images/s, and the scaling against one process alone (1.0 = linear).
Measured for 1 GPU and for every power of two up to all the GPUs.

Then the parallel modes that split one image across GPUs (`--parallel cfg=2`, `ulysses=2`,
`cfg=2,ulysses=2`, and `ulysses=4` where there are 4 GPUs): one group of ranks (rank r on GPU
r, nccl), started here as `generate --parallel` starts it, each rank building the same engine;
rank 0 times `--multi-images` images at `--multi-size`², batch 1, and the row gives its seconds
per image and the speed-up against the one-GPU row. A mode that needs more GPUs than the
machine has is skipped with that reason.

It needs two CUDA GPUs or more: on one GPU, or on the CPU, the stage is skipped with that reason
(AURASERVE_TEST_GPUS, the worker supervisor's hidden test setting, fakes a GPU list so the
tests run the whole stage on the CPU with the tiny model).

    python bench/gpu.py --modes '' --memory-modes '' --multi-gpu   # only this stage
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from auraserve.cli.gpu_workers import TEST_GPUS_ENV, VISIBLE_ENV, available_gpus

SCRIPT = Path(__file__).resolve()
PARALLEL_MODES = ("cfg=2", "ulysses=2", "cfg=2,ulysses=2", "ulysses=4")


def gpu_counts(available: int) -> list[int]:
    """1, then powers of two, then all of them: 1, 2, 4, 8 on eight; 1, 2, 3 on three."""
    counts = [1]
    while counts[-1] * 2 <= available:
        counts.append(counts[-1] * 2)
    if counts[-1] != available:
        counts.append(available)
    return counts


def _child_command(args: argparse.Namespace) -> list[str]:
    command = [sys.executable, str(SCRIPT), "child", "--device", args.device]
    command += ["--dtype", args.dtype, "--size", str(args.multi_size)]
    command += ["--images", str(args.multi_images), "--steps", str(args.steps)]
    command += ["--guidance", str(args.guidance), "--seed", str(args.seed)]
    return command + (["--tiny"] if args.tiny else [])


def _parallel_row(args: argparse.Namespace, mode: str, gpus: list[str]) -> dict[str, Any]:
    """One image across `mode`'s ranks: one process (rank 0) that starts the others."""
    from auraserve.engine.parallel import parse_parallel

    world = parse_parallel(mode).world_size
    if world > len(gpus):
        return {
            "mode": mode,
            "skipped": f"needs {world} GPUs (one per rank); this machine has {len(gpus)}",
        }
    print(f"multi-GPU: --parallel {mode} on {world} GPUs", flush=True)
    env = dict(os.environ, **{VISIBLE_ENV: ",".join(gpus[:world])})
    env.pop(TEST_GPUS_ENV, None)
    command = [*_child_command(args), "--parallel", mode]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=env, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(
            f"--parallel {mode}: the benchmark group failed (exit {done.returncode})"
        )
    record = json.loads(done.stdout.strip().splitlines()[-1])
    return {"mode": mode, "gpus": world, "s_per_image": round(record["s_per_image"], 4)}


def _run_group(args: argparse.Namespace, gpus: list[str]) -> dict[str, Any]:
    """One process per GPU of `gpus`, started together once every one is ready."""
    children = []
    for gpu in gpus:
        env = dict(os.environ, **{VISIBLE_ENV: gpu})
        env.pop(TEST_GPUS_ENV, None)
        children.append(
            subprocess.Popen(
                _child_command(args),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=env,
            )
        )
    try:
        for child in children:
            assert child.stdout is not None
            line = child.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"a benchmark process failed to start (exit {child.wait()})")
        for child in children:  # go: every process is loaded, none is timing yet
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
        results = []
        for child in children:
            out, _ = child.communicate(timeout=3600)
            if child.returncode != 0:
                raise RuntimeError(f"a benchmark process failed (exit {child.returncode})")
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    per_image = [r["s_per_image"] for r in results]
    return {
        "gpus": len(gpus),
        "s_per_image": [round(s, 4) for s in per_image],
        "images_per_s": round(sum(1.0 / s for s in per_image), 4),
        "pinned_to": [r["visible"] for r in results],
    }


def bench_multi_gpu(args: argparse.Namespace) -> dict[str, Any]:
    """The stage's report: rows, or why it was skipped."""
    faked = TEST_GPUS_ENV in os.environ
    if not args.device.startswith("cuda") and not faked:
        return {"skipped": "the multi-GPU stage needs two CUDA GPUs or more (device is cpu)"}
    gpus = available_gpus()
    if len(gpus) < 2:
        return {
            "skipped": f"the multi-GPU stage needs two GPUs or more; this machine has "
            f"{len(gpus)}: per-GPU workers and the parallel modes were not measured"
        }
    rows = []
    for count in gpu_counts(len(gpus)):
        print(f"multi-GPU: {count} worker process(es), one per GPU", flush=True)
        rows.append(_run_group(args, gpus[:count]))
    single = rows[0]["images_per_s"]
    for row in rows:
        row["scaling"] = round(row["images_per_s"] / (single * row["gpus"]), 3)
    parallel = [_parallel_row(args, mode, gpus) for mode in PARALLEL_MODES]
    one_gpu = rows[0]["s_per_image"][0]
    for row in parallel:
        if "s_per_image" in row:
            row["speedup"] = round(one_gpu / row["s_per_image"], 3)
    return {
        "size": args.multi_size,
        "images_per_process": args.multi_images,
        "gpus_available": len(gpus),
        "workers": rows,
        "parallel": parallel,
    }


def render(section: dict[str, Any] | None) -> list[str]:
    """Markdown lines for bench/gpu.py's report."""
    if section is None:
        return []
    if "skipped" in section:
        return [f"Multi-GPU: {section['skipped']}.", ""]
    lines = [
        f"Multi-GPU, per-GPU workers ({section['size']}², batch 1, "
        f"{section['images_per_process']} images per process, all processes at once):",
        "",
        "| GPUs | s / image per process | images/s in all | scaling vs 1 GPU |",
        "|---:|---|---:|---:|",
    ]
    for row in section["workers"]:
        seconds = ", ".join(f"{s:.2f}" for s in row["s_per_image"])
        lines.append(
            f"| {row['gpus']} | {seconds} | {row['images_per_s']:.3f} | {row['scaling']:.2f} |"
        )
    lines += ["", "One image across GPUs (rank 0's seconds per image, batch 1):", ""]
    for row in section["parallel"]:
        if "skipped" in row:
            lines.append(f"- `--parallel {row['mode']}`: skipped, {row['skipped']}")
        else:
            lines.append(
                f"- `--parallel {row['mode']}` on {row['gpus']} GPUs: "
                f"{row['s_per_image']:.2f} s / image, {row['speedup']:.2f}x vs one GPU"
            )
    return [*lines, ""]


# --- the child: one process on its one GPU ---------------------------------------------------


def _child_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="multi_gpu.py child")
    parser.add_argument("--device", required=True)
    parser.add_argument("--dtype", required=True)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--images", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--guidance", type=float, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--parallel", help="a --parallel mode: this process is its rank 0")
    return parser.parse_args(argv)


def _build(args: argparse.Namespace) -> tuple[Any, Any, Any, Any]:
    """(gpu.py's module, engine, request, device) as gpu.py's own options would make them."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("auraserve_bench_gpu", SCRIPT.with_name("gpu.py"))
    assert spec is not None and spec.loader is not None
    gpu = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = gpu
    spec.loader.exec_module(gpu)

    # As gpu.py's own options would be: the context only reads these.
    bench_args = argparse.Namespace(
        tiny=args.tiny, guidance=args.guidance, steps=args.steps, seed=args.seed
    )
    device = torch.device(args.device)  # cuda: its one visible GPU
    base = gpu.build_base(bench_args, device, gpu.DTYPES[args.dtype])
    ctx = gpu.Context(args=bench_args, device=device, dtype=gpu.DTYPES[args.dtype], base=base)
    engine = gpu.AuraFlowEngine(base, description="bench", is_test_model=args.tiny)
    request = gpu.engine_request(ctx, args.size, args.size, 1)
    return gpu, engine, request, device


def _parallel_follower(index: int, port: int, mode: str, argv: list[str]) -> None:
    """Rank index+1: the same engine, its share of every image, as many images as rank 0."""
    from auraserve.engine.parallel import install, join_group, leave_group, parse_parallel

    args = _child_args(argv)
    placement = join_group(index + 1, parse_parallel(mode), port, args.device)
    try:
        _, engine, request, _ = _build(args)
        install(engine, placement)
        for _ in range(1 + args.images):  # the warm-up, then the timed ones
            engine.generate([request])
    finally:
        leave_group()


def _parallel(argv: list[str], args: argparse.Namespace) -> None:
    from auraserve.engine.parallel import install, parse_parallel, start_group

    spec = parse_parallel(args.parallel)
    group = start_group(_parallel_follower, (args.parallel, argv), spec, args.device)
    try:
        gpu, engine, request, device = _build(args)
        install(engine, group.split)
        engine.generate([request])  # warm
        times = []
        for _ in range(args.images):
            gpu._sync(device)
            started = time.perf_counter()
            engine.generate([request])
            gpu._sync(device)
            times.append(time.perf_counter() - started)
    except BaseException:
        group.abort()
        raise
    group.finish()
    print(json.dumps({"s_per_image": statistics.median(times)}), flush=True)


def child(argv: list[str]) -> None:
    args = _child_args(argv)
    if args.parallel:
        _parallel(argv, args)
        return
    gpu, engine, request, device = _build(args)
    engine.generate([request])  # warm: kernels chosen, allocator grown
    gpu._sync(device)
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        raise SystemExit("no go")
    times = []
    for _ in range(args.images):
        started = time.perf_counter()
        engine.generate([request])
        gpu._sync(device)
        times.append(time.perf_counter() - started)
    record = {
        "s_per_image": statistics.median(times),
        "visible": os.environ.get(VISIBLE_ENV, ""),
    }
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] != ["child"]:
        raise SystemExit("run bench/gpu.py --multi-gpu; this file is its multi-GPU stage")
    child(sys.argv[2:])
