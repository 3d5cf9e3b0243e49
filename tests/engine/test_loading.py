"""Loading: dtypes, placement, and one clear line for every way loading can fail."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from auraserve.engine.loading import DTYPES, resolve_dtype
from auraserve.engine.pipeline import load_engine
from auraserve.errors import ModelLoadError
from tests.engine.conftest import make_small_request


def test_float16_keeps_the_vae_in_float32() -> None:
    engine = load_engine("tiny", device="cpu", dtype="float16")
    assert engine.pipe.transformer.dtype == torch.float16
    assert engine.pipe.vae.dtype == torch.float32
    [result] = engine.generate([make_small_request(size=64, steps=2)])
    assert result.images[0].size == (64, 64)


def test_bfloat16_runs() -> None:
    engine = load_engine("tiny", device="cpu", dtype="bfloat16")
    assert "bfloat16" in engine.description
    [result] = engine.generate([make_small_request(size=64, steps=2)])
    assert np.asarray(result.images[0], dtype=np.int16).std() > 1


def _load_error(weights: str, **kwargs: str) -> str:
    with pytest.raises(ModelLoadError) as info:
        load_engine(weights, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_hub_id_without_network_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket
    import time

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens once closed
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    started = time.perf_counter()
    message = _load_error("auraserve-tests/AuraFlow-missing")
    assert time.perf_counter() - started < 10
    assert message.startswith("cannot download auraserve-tests/AuraFlow-missing: no network")
    assert "--model /path/to/AuraFlow-missing" in message and "--model tiny" in message

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "HF_HUB_OFFLINE" in _load_error("auraserve-tests/AuraFlow-missing")


def test_bad_local_paths_and_devices(tmp_path: Path) -> None:
    assert "does not exist" in _load_error(str(tmp_path / "nope"))
    assert "no model_index.json" in _load_error(str(tmp_path))
    (tmp_path / "model_index.json").write_text('{"_class_name": "AuraFlowPipeline"}')
    assert _load_error(str(tmp_path)).startswith(f"cannot load AuraFlow from {tmp_path}")
    assert "neither" in _load_error("not-a-model")
    if not torch.cuda.is_available():
        assert "--device cpu" in _load_error("tiny", device="cuda")


def test_offload_is_ignored_on_the_cpu(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="auraserve.engine.loading"):
        engine = load_engine("tiny", device="cpu", offload="sequential")
    assert "offload" not in engine.description
    assert "does nothing on the CPU" in caplog.text
    assert "unknown offload" in _load_error("tiny", device="cpu", offload="disk")


def test_dtype_names() -> None:
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert {name: resolve_dtype(name, cpu) for name in DTYPES} == DTYPES
    with pytest.raises(ModelLoadError, match="unknown dtype 'float8'"):
        resolve_dtype("float8", cpu)
