"""Fused q/k/v projections and the SDPA backend choice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from auraserve.core.engine_options import EngineOptions
from auraserve.engine.optimize.attention import sdpa_context_factory, sdpa_order
from tests.engine.optimize.conftest import first_image, tiny_engine


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


# --- our attention processor (issue 20) ------------------------------------------------------


@pytest.mark.parametrize("fuse", [False, True])
def test_attention_processor_is_bit_identical_on_the_cpu(fuse: bool) -> None:
    from auraserve.engine.optimize.attention import AuraFlowAttnProcessor

    reference = first_image(tiny_engine(EngineOptions(fuse_qkv=fuse)))
    engine = tiny_engine(EngineOptions(fuse_qkv=fuse, attention="auto"))
    processors = engine.pipe.transformer.attn_processors.values()
    assert all(isinstance(p, AuraFlowAttnProcessor) for p in processors)
    assert {p.kernel for p in processors} == {"sdpa"}  # type: ignore[attr-defined]
    assert engine.attention_kernel == "sdpa"
    assert "attention sdpa" in engine.description
    assert any(line.startswith("attention: sdpa") for line in engine.optimization_log)
    assert np.array_equal(np.asarray(first_image(engine)), np.asarray(reference))


def test_kernel_choice() -> None:
    from auraserve.engine.optimize.attention import choose_kernel

    assert choose_kernel(torch.device("cpu"))[0] == "sdpa"
    with pytest.raises(ValueError, match="flash_attn_interface"):
        tiny_engine(EngineOptions(attention="flash3"))
