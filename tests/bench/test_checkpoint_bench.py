"""bench/checkpoint.py and bench/preview.py on tiny latents: the figures they report."""

from __future__ import annotations

from tests.bench.loader import bench_module


def test_checkpoint_bench_sizes_grow_with_history() -> None:
    rows = bench_module("checkpoint").measure(batch=2, latent=8, repeats=1, s3=False)
    sizes = {row["sampler"]: row["bytes"] for row in rows}
    assert list(sizes) == ["euler", "dpmpp_2m", "dpmpp_3m_sde", "uni_pc", "lms"]
    latents = rows[0]["latents_bytes"]
    assert latents == 2 * 4 * 8 * 8 * 4
    # Latents plus one latent-sized buffer per history entry, plus headers and RNG states.
    for sampler, extra in {
        "euler": 0,
        "dpmpp_2m": 1,
        "dpmpp_3m_sde": 2,
        "uni_pc": 3,
        "lms": 4,
    }.items():
        assert (1 + extra) * latents < sizes[sampler] < (1 + extra) * latents + 16_000, sampler
    assert all(row["serialize_ms"] > 0 and row["write_local_fsync_ms"] > 0 for row in rows)
    # The share of a job's time: one checkpoint's cost over the interval (10 s by default).
    for row in rows:
        assert row["share_of_job_time_local"] == row["serialize_and_write_local_ms"] / 10_000


def test_preview_bench_reports_both_formats() -> None:
    rows = bench_module("preview").measure(side=16, size=64, repeats=1)
    assert {row["kind"] for row in rows} == {"smooth", "noise"}
    for row in rows:
        assert row["preview_px"] == 64 and row["png_bytes"] > 0 and row["jpeg_bytes"] > 0
        assert row["jpeg_ms"] > 0 and row["png_ms"] > 0
