"""Fused q/k/v projections and the SDPA backend choice."""

from __future__ import annotations

import torch

from auraserve.core.engine_options import EngineOptions
from auraserve.engine.optimize.attention import sdpa_context_factory, sdpa_order
from tests.engine.optimize.conftest import tiny_engine


def test_fuse_qkv_fuses_and_drops_the_unfused_layers() -> None:
    engine = tiny_engine(EngineOptions(fuse_qkv=True))
    transformer = engine.pipe.transformer
    joint = transformer.joint_transformer_blocks[0].attn
    single = transformer.single_transformer_blocks[0].attn
    assert hasattr(joint, "to_qkv") and hasattr(joint, "to_added_qkv")
    assert hasattr(single, "to_qkv")
    for attn in (joint, single):
        assert not any(name in attn._modules for name in ("to_q", "to_k", "to_v"))
    assert type(joint.processor).__name__ == "FusedAuraFlowAttnProcessor2_0"


def test_cuda_backend_order_runs_on_the_cpu() -> None:
    """The CUDA priority list (cuDNN first) degrades to what the CPU has, call by call."""
    assert sdpa_order("auto") == ["cudnn", "flash", "efficient", "math"]
    assert sdpa_order("flash") == ["flash", "cudnn", "efficient", "math"]
    assert sdpa_order("math") == ["math"]
    q = torch.randn(1, 2, 16, 8, generator=torch.Generator().manual_seed(0))
    expected = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    with sdpa_context_factory(sdpa_order("auto"))():
        actual = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert torch.allclose(actual, expected, atol=1e-6)
