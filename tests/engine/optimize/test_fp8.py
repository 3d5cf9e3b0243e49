"""fp8: our native `torch._scaled_mm` layer, which layers it replaces, and torchao's absence."""

from __future__ import annotations

import sys

import pytest
import torch

from auraserve.core.engine_options import EngineOptions
from auraserve.engine.optimize.fp8 import Fp8Linear
from auraserve.errors import ModelLoadError
from tests.engine.optimize.conftest import tiny_engine


def test_fp8_native_replaces_block_linears_only() -> None:
    engine = tiny_engine(EngineOptions(fp8=True, fp8_backend="native"))
    transformer = engine.pipe.transformer
    fp8 = {name for name, m in transformer.named_modules() if isinstance(m, Fp8Linear)}
    assert "single_transformer_blocks.0.ff.linear_1" in fp8
    assert "joint_transformer_blocks.0.attn.add_q_proj" in fp8
    # AdaLN modulation, embeddings and the output projection stay in the model dtype.
    assert not any(".norm" in name for name in fp8)
    assert not any(name.startswith(("proj_out", "context_embedder", "time_")) for name in fp8)
    layer = transformer.single_transformer_blocks[0].ff.linear_1
    assert layer.weight_fp8.dtype == torch.float8_e4m3fn


@pytest.mark.parametrize("rowwise", [True, False])
def test_fp8_linear_is_close_to_the_linear(rowwise: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(64, 48, bias=True)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(48, 64, generator=generator) * 0.05)
        linear.bias.copy_(torch.randn(48, generator=generator))
    x = torch.randn(2, 7, 64, generator=generator)
    with torch.no_grad():
        expected = linear(x)
        actual = Fp8Linear(linear, rowwise=rowwise)(x)
    assert actual.shape == expected.shape
    relative = (actual - expected).norm() / expected.norm()
    assert relative < 0.05  # e4m3 keeps 3 mantissa bits: a few percent at worst


def test_fp8_torchao_without_torchao_fails_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao → ImportError
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(ModelLoadError, match="pip install torchao"):
        tiny_engine(EngineOptions(fp8=True, fp8_backend="torchao"))
