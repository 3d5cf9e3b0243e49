"""bench/weights.py: the GPU table's figures, counted on the meta device."""

from __future__ import annotations

from tests.bench.loader import bench_module


def test_v03_table_and_fits() -> None:
    rows = {row["format"]: row for row in bench_module("weights").meta_table()}
    assert set(rows) == {"bf16", "fp8", "Q8_0", "Q5_K", "Q4_K"}
    assert rows["bf16"]["parameters"] == 6_858_605_568
    assert rows["bf16"]["bits_per_parameter"] == 16.0
    sizes = [rows[f]["transformer_bytes"] for f in ("bf16", "Q8_0", "fp8", "Q5_K", "Q4_K")]
    assert sizes == sorted(sizes, reverse=True)
    assert rows["bf16"]["fits_gib"] == {"12": False, "16": False, "24": True}
    for fmt in ("fp8", "Q8_0", "Q5_K", "Q4_K"):
        assert rows[fmt]["fits_gib"]["12"], fmt
