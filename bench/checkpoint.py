"""Step checkpoints at 1024²: bytes per checkpoint, and serialize + write time per step.

For a few samplers that carry different history (euler: latents only; dpmpp_2m: one past
denoised; dpmpp_3m_sde: two past denoised, two h and the noise generators; uni_pc: three;
lms: four derivatives), a real sampling run on 1×4×128×128 float32 latents (a 1024² image)
with a cheap stand-in denoiser snapshots its state after step 5 of 10 (histories full). For
each: the checkpoint's size, `SamplerState.to_bytes` time, and the time to write those bytes
to a local directory (write + fsync, as a store write that must survive a crash does) and,
with --s3, to a moto S3 server on loopback (tests/s3_server.py; the HTTP round trip, not a
real network). Medians over --repeats. Numbers are per checkpoint, i.e. per checkpointed
step. The worker saves one every AURASERVE_CHECKPOINT_SECONDS at most (the engine asks its
clock before serialising anything), so the share of a job's time checkpoints take is the cost
of one divided by that interval, whatever the GPU's step time: each row reports it for the
--interval given (default 10 s, the setting's default), for disk and for S3.

    python bench/checkpoint.py                # writes bench/results/checkpoint.json
    python bench/checkpoint.py --s3 --batch 4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]
from timing import timed_ms  # noqa: E402 - bench/ is importable once run

RESULTS = ROOT / "bench" / "results" / "checkpoint.json"
SAMPLERS = ("euler", "dpmpp_2m", "dpmpp_3m_sde", "uni_pc", "lms")


def state_at(sampler: str, batch: int, latent: int, steps: int = 10, at: int = 5) -> Any:
    import torch

    from auraserve.engine.checkpoint import SamplerState
    from auraserve.engine.sampling import NoiseSampler, sample
    from auraserve.engine.schedules import sigmas

    shape = (batch, 4, latent, latent)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    noise = NoiseSampler([torch.Generator().manual_seed(i) for i in range(batch)], shape)
    kept: list[SamplerState] = []

    def keep(state: SamplerState) -> None:
        if state.step == at:
            kept.append(state)

    sample(
        sampler,
        lambda x, s: torch.tanh(x) * (1 - s),
        x,
        sigmas("normal", steps, 1.73, sampler=sampler),
        noise=noise,
        on_state=keep,
    )
    return kept[0].labelled(scheduler="normal", request_digest="0" * 64)


def measure(
    batch: int, latent: int, repeats: int, s3: bool, interval: float = 10.0
) -> list[dict[str, Any]]:  # pragma: no cover - timing
    rows: list[dict[str, Any]] = []
    server = bucket = client = None
    if s3:
        from tests.s3_server import start_s3_server

        server = start_s3_server()
        bucket = server.make_bucket()
        client = server.client()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for sampler in SAMPLERS:
                state = state_at(sampler, batch, latent)
                data = state.to_bytes()
                path = Path(tmp) / f"{sampler}.ckpt"

                def write_local(data: bytes = data, path: Path = path) -> None:
                    with open(path, "wb") as file:
                        file.write(data)
                        file.flush()
                        os.fsync(file.fileno())

                row: dict[str, Any] = {
                    "sampler": sampler,
                    "batch": batch,
                    "latents": [batch, 4, latent, latent],
                    "buffers": sorted(state.buffers),
                    "bytes": len(data),
                    "latents_bytes": state.x.numel() * state.x.element_size(),
                }
                timed: dict[str, Callable[[], object]] = {
                    "serialize": state.to_bytes,
                    "write_local_fsync": write_local,
                }
                if client is not None:
                    timed["put_s3_moto"] = lambda data=data, key=sampler: client.put_object(
                        Bucket=bucket, Key=f"ckpt/{key}", Body=data
                    )
                for name, run in timed.items():
                    row[f"{name}_ms"], row[f"{name}_min_ms"] = timed_ms(run, repeats)
                row["serialize_and_write_local_ms"] = (
                    row["serialize_ms"] + row["write_local_fsync_ms"]
                )
                # The share of a job's wall time at one checkpoint per interval.
                row["interval_s"] = interval
                row["share_of_job_time_local"] = row["serialize_and_write_local_ms"] / (
                    1000 * interval
                )
                if "put_s3_moto_ms" in row:
                    row["share_of_job_time_s3"] = (row["serialize_ms"] + row["put_s3_moto_ms"]) / (
                        1000 * interval
                    )
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        if server is not None:
            server.stop()
    return rows


def main() -> None:  # pragma: no cover - CLI
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--latent", type=int, default=128, help="latent side (128 = 1024²)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--s3", action="store_true", help="also PUT to a moto S3 server")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--interval", type=float, default=10.0, help="AURASERVE_CHECKPOINT_SECONDS to report for"
    )
    args = parser.parse_args()
    import torch

    report = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "rows": measure(args.batch, args.latent, args.repeats, args.s3, args.interval),
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
